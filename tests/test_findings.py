"""The collapse, parity and breakers studies through sweep and export, into findings.md/.tex."""

from __future__ import annotations

import math
import re
import time

import mlflow
import pandas as pd
import pytest
import yaml

from pipeline import naming
from pipeline.errors import UserError
from pipeline.export import export
from pipeline.features import write_features
from pipeline.findings import Section, latex, markdown, parity_deep_rows, parity_rows, sci
from pipeline.runs import resolve_run_ids, trial_records
from pipeline.sweep import run_sweep
from tests.helpers import make_features, private_store

FAST = {"epochs": 2, "batch_size": 32, "dropout": 0.5}
COLLAPSE = {"name": "collapse-t", "experiment": "collapse-exp", "report": "collapse", "seeds": [0, 1],
            "fixed": {**FAST, "learning_rate": 0.05},
            "space": [{"activation": "softmax", "units": 1,
                       "loss": ["binary_crossentropy", "categorical_crossentropy",
                                "sparse_categorical_crossentropy"]},
                      {"activation": "sigmoid", "units": 1, "loss": "binary_crossentropy"}]}
PARITY = {"name": "parity-t", "experiment": "parity-exp", "kind": "parity", "report": "parity",
          "seeds": [0], "fixed": {**FAST, "learning_rate": 0.05},
          "space": {"optimizer": ["sgd", "adam"], "ratio": [1, 2]}}
BREAKERS = {"name": "breakers-t", "experiment": "parity-exp", "kind": "parity", "report": "breakers",
            "seeds": [0], "fixed": {**FAST, "learning_rate": 0.05},
            "space": [{"optimizer": "sgd"}, {"optimizer": "sgd", "share_masks": False}]}


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """The three tiny studies, swept on one features file in a store of their own:
    {name: parent run id}. The tests only read them."""
    tmp_path = tmp_path_factory.mktemp("studies")
    x, y = make_features()
    features = write_features(tmp_path / "features.h5", x, y, {})
    with private_store(tmp_path):
        parents = {}
        for spec in (COLLAPSE, PARITY, BREAKERS):
            path = tmp_path / f"{spec['name']}.yaml"
            path.write_text(yaml.safe_dump(spec))
            parents[spec["name"]] = run_sweep(str(features), str(path), progress=False).parent_run_id
        yield parents


@pytest.mark.slow
def test_findings_report_from_the_three_studies(studies, tmp_path):
    # -- the collapse, per run: tags, exact accuracy, expected values logged beside measured ones
    trials = trial_records(studies["collapse-t"])
    soft1 = trials[(trials["activation"] == "softmax") & (trials["units"] == 1)]
    assert soft1["collapsed"].all() and len(soft1) == 6
    done = soft1[soft1["status"] == "FINISHED"]
    assert set(done["loss"]) == {"binary_crossentropy", "categorical_crossentropy"}
    assert (done["final_val_accuracy"] == done["positive_fraction"]).all()
    failed = soft1[soft1["status"] != "FINISHED"]
    assert set(failed["loss"]) == {"sparse_categorical_crossentropy"}
    assert failed["error"].str.contains("outside the valid range").all()
    for run_id in done["run_id"]:
        metrics = mlflow.MlflowClient().get_run(run_id).data.metrics
        negatives = 1 - metrics["positive_fraction"]
        assert metrics["expected_val_prob_loss"] == pytest.approx(negatives * 16.1181, abs=1e-3)
        assert abs(metrics["val_prob_loss_minus_expected"]) <= 1e-3
        assert metrics["val_accuracy_minus_expected"] == 0
    cce = done[done["loss"] == "categorical_crossentropy"]
    assert (cce["final_loss"] == 0).all() and (cce["final_val_loss"] == 0).all()
    healthy = trials[trials["activation"] == "sigmoid"]
    assert not healthy["collapsed"].any() and (healthy["final_val_accuracy"] > 0.7).all()

    # -- the report: every table under its command, Markdown and LaTeX
    result = export(",".join(studies.values()), str(tmp_path / "out"))
    md = (tmp_path / "out" / "findings.md").read_text()
    tex = (tmp_path / "out" / "findings.tex").read_text()
    for title in ("The 1-unit softmax collapse", "The sigmoid/softmax parity", "What breaks the parity"):
        assert f"## {title}" in md and f"% {title}. Regenerate with:" in tex
    assert md.count("python -m pipeline sweep --features") == 3
    assert "Received a label value of 1 which is outside the valid range" in md
    assert "| optimizer | softmax lr | ratio 1 | ratio 2 | seeds |" in md
    assert "| dropout masks not shared | sgd | share the masks |" in md
    assert tex.count(r"\begin{tabular}") == 3 and r"\times10^{" in tex
    typeset = [line for line in tex.splitlines() if not line.startswith("%")]
    assert not [line for line in typeset if "|" in line]  # OT1 sets a bare | as an em dash
    before_tables = [line for line in tex.split(r"\begin{table}")[0].splitlines() if line]
    assert len(before_tables) == 3 and all(line.startswith("% ") for line in before_tables)
    for name in studies:  # each study keeps its own tables in a folder named for it
        assert (tmp_path / "out" / name / "trials.csv").is_file()
    assert {p.name for p in result.files} >= {"findings.md", "findings.tex"}
    logged = mlflow.MlflowClient().list_artifacts(studies["parity-t"], "export")
    assert "export/findings.md" in {a.path for a in logged}


@pytest.mark.slow
def test_parity_table_reads_optimizers_by_ratios(studies):
    trials = trial_records(studies["parity-t"])
    header, rows = parity_rows(trials)
    assert header == ["optimizer", "softmax lr", "ratio 1", "ratio 2", "seeds"]
    assert [row[0] for row in rows] == ["sgd", "adam"]
    for optimizer, _, at_1, at_2, _ in rows:
        part = trials[trials["optimizer"] == optimizer]
        gap = part.loc[part["ratio"] == 2, "final_max_gap_softmax_transfer"].mean()
        assert at_2 == sci(gap) and gap <= 1e-5
        assert float(at_1) > 1e-3
    # each parity trial is a run holding its three heads, nested one level further down
    trial = trials.iloc[0]
    children = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.`{naming.PARENT}` = '{trial['run_id']}'")
    assert sorted(run.data.tags[naming.ROLE] for run in children) == [
        "sigmoid_random", "sigmoid_transfer", "softmax"]


@pytest.mark.slow
def test_figures_alone_of_parity_studies_are_refused_before_anything_is_written(studies, tmp_path):
    """A parity trial has no figure's metrics: asking its studies for figures alone is an error
    with no folder made; with a sweep of heads beside them, the heads' figures are written."""
    parity = f"{studies['parity-t']},{studies['breakers-t']}"
    with pytest.raises(UserError, match="a parity study has no figures"):
        export(parity, str(tmp_path / "out"), "png,pdf")
    assert not (tmp_path / "out").exists()
    result = export(f"{parity},{studies['collapse-t']}", str(tmp_path / "out"), "png", log_to_run=False)
    assert {p.relative_to(tmp_path / "out").as_posix() for p in result.files} == {"collapse-t/accuracy.png"}


def test_sci_formats_gaps_for_text_and_latex():
    assert sci(1.7e-05) == "1.7e-5" and sci(0.19) == "1.9e-1" and sci(0.0) == "0"
    assert sci(6e-08, tex=True) == r"$6.0\times10^{-8}$"
    assert sci(math.nan) == "–"
    frame = pd.DataFrame({"status": ["FINISHED"] * 4, "optimizer": ["adam", "sgd"] * 2,
                          "ratio": [2.0, 2.0, 4.0, 4.0], "learning_rate": [1e-3, 1e-2] * 2,
                          "seed": [0, 0, 0, 0],
                          "final_max_gap_softmax_transfer": [1e-7, 2e-7, 0.1, 0.2]})
    header, rows = parity_rows(frame)
    assert rows == [["sgd", "0.01", "2.0e-7", "2.0e-1", "1"], ["adam", "0.001", "1.0e-7", "1.0e-1", "1"]]


def test_main_on_a_users_features_file_writes_the_findings(tracking, features_file, tmp_path, capsys):
    from pipeline import cli

    small_collapse = {**COLLAPSE, "seeds": [0], "space": [{"activation": "softmax", "units": 1}]}
    small_parity = {**PARITY, "space": {"optimizer": "sgd", "ratio": [2]}}
    paths = []
    for spec in (small_collapse, small_parity):
        paths.append(tmp_path / f"{spec['name']}.yaml")
        paths[-1].write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    cli.main(["main", "--features", str(features_file), "--sweep", ",".join(map(str, paths)),
              "--output", str(out)])
    err = capsys.readouterr().err.splitlines()
    ends = [line for line in err if line.startswith("sweep: study '")]  # each sweep's last line
    assert [line.split("'")[1].rsplit("-", 1)[0] for line in ends] == ["collapse-t", "parity-t"]
    md = (out / "export" / "findings.md").read_text()
    assert "## The 1-unit softmax collapse" in md and "## The sigmoid/softmax parity" in md
    assert f"python -m pipeline sweep --features {features_file} --sweep {paths[0]} --study collapse-t-" in md
    assert re.search(r"python -m pipeline export --run_id parity-t-[0-9a-f]{8} --output ", md)
    assert not (out / "features.h5").exists()  # the given file was used, nothing extracted
    mains = mlflow.search_runs(search_all_experiments=True, output_format="list",
                               filter_string=f"tags.`{naming.STEP}` = 'main'")
    assert len(mains) == 1 and mains[0].info.status == "FINISHED"


def test_main_on_another_features_file_runs_a_study_of_its_own(tracking, features_file, tmp_path):
    """``main`` has no --study: on another features file it runs a new study instead of
    refusing the first one's, and a rerun resumes its own."""
    from pipeline import cli

    sweep = tmp_path / "collapse.yaml"
    sweep.write_text(yaml.safe_dump({**COLLAPSE, "seeds": [0],
                                     "space": [{"activation": "softmax", "units": 1}]}))
    x, y = make_features(n=200, d=16, seed=3)
    other = write_features(tmp_path / "other.h5", x, y, {})
    for features, out in ((features_file, "a"), (other, "b"), (other, "b")):
        cli.main(["main", "--features", str(features), "--sweep", str(sweep),
                  "--output", str(tmp_path / out)])
    mains = mlflow.search_runs(search_all_experiments=True, output_format="list",
                               filter_string=f"tags.`{naming.STEP}` = 'main'")
    assert [run.info.status for run in mains] == ["FINISHED"] * 3
    sweeps = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                filter_string=f"tags.`{naming.STEP}` = 'sweep'")
    assert len({run.data.tags[naming.STUDY] for run in sweeps}) == len(sweeps) == 2
    assert all((tmp_path / out / "export" / "trials.csv").is_file() for out in "ab")
    # export takes a main run's id for the sweeps it ran
    assert {rid for run in mains for rid in resolve_run_ids(run.info.run_id)} == {
        run.info.run_id for run in sweeps}


def test_main_interrupted_before_it_writes_leaves_no_output_folder(tracking, features_file, tmp_path,
                                                                   monkeypatch, capsys):
    """Ctrl-C during main's sweep (on a given features file): exit 130, the main run KILLED, and
    no output folder: main checks its folders at the start and makes them only to write."""
    from pipeline import cli, sweep

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(sweep, "run_sweep", interrupted)
    spec = tmp_path / "collapse.yaml"
    spec.write_text(yaml.safe_dump({**COLLAPSE, "seeds": [0], "space": [{"activation": "softmax"}]}))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["main", "--features", str(features_file), "--sweep", str(spec),
                  "--output", str(tmp_path / "out" / "deep")])
    assert exit_info.value.code == 130
    assert "interrupted (Ctrl-C)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (main,) = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                 filter_string=f"tags.`{naming.STEP}` = 'main'")
    assert main.info.status == "KILLED"


def test_deep_parity_table_reads_optimizers_by_ratio_and_scope():
    cells = [("sgd", 2.0, "output", 0, 1e-7), ("sgd", 2.0, "output", 1, 3e-7), ("sgd", 2.0, "all", 0, 0.2),
             ("sgd", 1.0, "output", 0, 0.05), ("adam", 2.0, "output", 0, 1e-7), ("adam", 2.0, "all", 0, 0.3)]
    frame = pd.DataFrame([{"status": "FINISHED", "optimizer": o, "ratio": r, "ratio_scope": s, "seed": seed,
                           "learning_rate": 0.01, "hidden_units": 32, "hidden_activation": "relu",
                           "final_max_gap_softmax_transfer": gap} for o, r, s, seed, gap in cells])
    header, rows = parity_deep_rows(frame)
    assert header == ["optimizer", "softmax lr", "hidden layer", "ratio 1",
                      "ratio 2, output layer", "ratio 2, all layers", "seeds"]
    # the largest gap over seeds; a cell no trial ran is a dash
    assert rows == [["sgd", "0.01", "32 relu", "5.0e-2", "3.0e-7", "2.0e-1", "2"],
                    ["adam", "0.01", "32 relu", "–", "1.0e-7", "3.0e-1", "1"]]
    text = markdown([Section("parity_deep", frame, "python -m pipeline export --run_id parity_deep")])
    assert "## The parity for heads with a hidden layer" in text and "| sgd | 0.01 | 32 relu |" in text
    assert "ratio 2, all layers" in latex([Section("parity_deep", frame, "cmd")])


def test_a_finished_extraction_is_found_whatever_its_params_hold(tracking):
    """main reuses an extraction by its input's fingerprint and its params; a param holding a
    quote (an images folder named it's) is compared, never put into a search filter."""
    from pipeline.main import find_extraction

    client = mlflow.MlflowClient()
    params = {"images": "/data/it's", "weights": "random"}
    runs = []
    for _ in range(2):
        runs.append(client.create_run("0", tags={naming.STEP: "extract", "input.fingerprint": "ab12"}))
        time.sleep(0.01)  # start times in milliseconds: the second is the newer
    older, newer = runs
    for run in runs:
        for key, value in params.items():
            client.log_param(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
    assert find_extraction("0", params, "ab12").info.run_id == newer.info.run_id
    assert find_extraction("0", {**params, "weights": "imagenet"}, "ab12") is None
    assert find_extraction("0", params, "cd34") is None
