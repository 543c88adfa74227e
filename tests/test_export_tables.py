"""Export's tables on a small sweep store written run by run, and the table functions themselves.

The store holds what a heads sweep leaves (a parent run tagged as a sweep, its trial runs
nested under it with params, per-epoch metrics and tags), written with the project's own
record functions, so export reads it as it reads a real sweep's, without training anything.
"""

from __future__ import annotations

import math
import shlex
import time

import mlflow
import pandas as pd
import pytest

from pipeline import naming, tables
from pipeline.errors import UserError
from pipeline.export import (
    comparison_trials,
    epoch_records,
    export,
)
from pipeline.runs import resolve_run_ids, sweep_run, trial_records
from pipeline.tracking import create_run, log_batch, scalars, series
from tests.helpers import private_store

HEADS = [  # activation, units, loss, learning rate, init, role, final val_accuracy
    ("softmax", 1, "binary_crossentropy", 0.05, "glorot_uniform", "softmax_1unit", 0.5),
    ("softmax", 2, "categorical_crossentropy", 0.05, "glorot_uniform", "softmax", 0.8),
    ("sigmoid", 1, "binary_crossentropy", 0.1, "transfer", "sigmoid_transfer", 0.8),
    ("sigmoid", 1, "binary_crossentropy", 0.1, "glorot_uniform", "sigmoid_random", 0.85),
]
EPOCHS = 3


def val_loss(role: str, seed: int, epoch: int) -> float:
    """The transferred sigmoid's curve equals the softmax's, as the parity says."""
    offset = {"softmax_1unit": 0.3, "softmax": 0.0, "sigmoid_transfer": 0.0, "sigmoid_random": 0.05}[role]
    return 0.7 - 0.1 * epoch - 0.01 * seed + offset


def write_trial(client, experiment, parent, number, seed, head, status="FINISHED", tags=None):
    activation, units, loss, lr, init, role, accuracy = head
    run = create_run(experiment, f"{role}-s{seed}", parent, {
        naming.STEP: "trial", naming.TRIAL_NUMBER: number, naming.ROLE: role,
        naming.COLLAPSED: str(role == "softmax_1unit").lower(), **(tags or {})})
    params = {"activation": activation, "units": units, "loss": loss, "learning_rate": lr,
              "init": init, "seed": seed, "epochs": EPOCHS, "batch_size": 32}
    history = {"val_loss": [val_loss(role, seed, e) for e in range(EPOCHS)],
               "val_accuracy": [accuracy - 0.01 * (EPOCHS - 1 - e) + 0.01 * seed for e in range(EPOCHS)]}
    for name in ("loss", "accuracy", "prob_loss", "val_prob_loss"):
        history[name] = [0.5] * EPOCHS
    points = [m for name, values in history.items() for m in series(name, values)]
    log_batch(run, params=params, metrics=points + scalars({"positive_fraction": 0.5}))
    if status == "FAILED":
        client.set_tag(run, naming.ERROR, "ValueError: rejected")
    client.set_terminated(run, status)
    return run


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A heads sweep's store: 2 seeds x 4 heads FINISHED, one FAILED and one pruned trial."""
    folder = tmp_path_factory.mktemp("export_tables")
    with pytest.MonkeyPatch.context() as mp, private_store(folder):
        mp.chdir(folder)
        client = mlflow.MlflowClient()
        experiment = client.create_experiment("tables-exp")
        other = create_run(experiment, "not-a-sweep", tags={naming.STEP: "extract"})
        parent = create_run(experiment, "tables-20260101-0000", tags={
            naming.STEP: "sweep", naming.SWEEP_NAME: "tables", naming.STUDY: "tables-0a1b2c3d",
            naming.KIND: "heads", naming.FEATURES_SHA: "ab" * 32})
        number = 0
        for seed in (0, 1):
            for head in HEADS:
                write_trial(client, experiment, parent, number, seed, head)
                number += 1
        write_trial(client, experiment, parent, number, 0,
                    ("softmax", 1, "sparse_categorical_crossentropy", 0.05, "glorot_uniform", "softmax_1unit",
                     0.5), status="FAILED")
        write_trial(client, experiment, parent, number + 1, 2, HEADS[1], tags={naming.PRUNED: "true"})
        log_batch(parent, metrics=scalars({f"{naming.TRIAL_COUNT}{k}": v for k, v in
                                           {"complete": 8, "fail": 1, "pruned": 1, "waiting": 2}.items()}))
        client.set_terminated(parent, "FINISHED")
        yield {"folder": folder, "parent": parent, "other": other}


def test_a_study_name_finds_its_sweep_and_an_unfinished_sweep_says_so(tmp_path, capsys):
    """Two sweeps of one sweep file: a finished one, then an interrupted one under a study
    named with --study. A sweep name finds the one run last; a study name finds its own."""
    with private_store(tmp_path):
        client = mlflow.MlflowClient()
        experiment = client.create_experiment("names-exp")
        parents = {}
        for study, status in (("tables-3f9a02c1", "FINISHED"), ("inttest", "KILLED")):
            parents[study] = create_run(experiment, "tables-run", tags={
                naming.STEP: "sweep", naming.SWEEP_NAME: "tables", naming.STUDY: study,
                naming.KIND: "heads"})
            write_trial(client, experiment, parents[study], 0, 0, HEADS[1])
            client.set_terminated(parents[study], status)
            time.sleep(0.01)  # start times in milliseconds: the second sweep is the newer
        assert resolve_run_ids("inttest") == [parents["inttest"]]
        assert resolve_run_ids("tables-3f9a02c1") == [parents["tables-3f9a02c1"]]
        assert resolve_run_ids("tables") == resolve_run_ids("") == [parents["inttest"]]
        capsys.readouterr()
        export("inttest", str(tmp_path / "out"), "csv,md")
        unfinished = "1 trial complete; the sweep is KILLED, not finished: rerun it to resume"
        assert f"export: study 'inttest' (run {parents['inttest']}): {unfinished} -> " in (
            capsys.readouterr().err)
        assert unfinished in (tmp_path / "out" / "summary.md").read_text()
        export("tables-3f9a02c1", str(tmp_path / "out"), "csv")
        assert ": 1 trial complete -> " in capsys.readouterr().err
        client.set_terminated(parents["tables-3f9a02c1"], "FINISHED")  # resumed, and ended again
        assert resolve_run_ids("tables") == resolve_run_ids("") == [parents["tables-3f9a02c1"]]
        # two studies of one sweep file exported together keep a folder each; a sweep named
        # twice is exported once; the regenerate command is quoted for a shell and asks for the
        # formats asked for here
        both = tmp_path / "o u;t's"
        export("tables-3f9a02c1, inttest ,inttest", str(both), "md")
        killed = f"tables-{parents['inttest'][:8]}"
        assert sorted(p.name for p in both.iterdir()) == ["tables", killed]
        for folder, study in (("tables", "tables-3f9a02c1"), (killed, "inttest")):
            text = (both / folder / "summary.md").read_text()
            assert f"(study `{study}`, parent run `{parents[study]}`)" in text
            command = text.split("```\n")[1].splitlines()[0]
            assert shlex.split(command)[-4:] == ["--output", str(both / folder), "--formats", "md"]


def test_a_main_runs_id_stands_for_its_sweeps_even_when_it_was_interrupted(tmp_path, capsys):
    """An interrupted main has not listed its sweeps: they are found by their links to it
    (nested under it, or tagged with it as their main run). A RUNNING sweep says so."""
    with private_store(tmp_path):
        client = mlflow.MlflowClient()
        experiment = client.create_experiment("main-exp")
        main = create_run(experiment, "main-run", tags={naming.STEP: "main"})
        idle = create_run(experiment, "idle-main", tags={naming.STEP: "main"})
        sweep_tags = {naming.STEP: "sweep", naming.SWEEP_NAME: "s", naming.KIND: "heads"}
        nested = create_run(experiment, "s-1", main, {**sweep_tags, naming.STUDY: "s-1"})
        time.sleep(0.01)
        linked = create_run(experiment, "s-2",
                            tags={**sweep_tags, naming.STUDY: "s-2", naming.MAIN_RUN: main})
        assert resolve_run_ids(main) == [nested, linked]
        with pytest.raises(UserError, match=f"run_id {idle}: a main run that ran no sweep"):
            resolve_run_ids(idle)
        write_trial(client, experiment, linked, 0, 0, HEADS[1])
        log_batch(linked, metrics=scalars({f"{naming.TRIAL_COUNT}complete": 1,
                                           f"{naming.TRIAL_COUNT}waiting": 3}))
        capsys.readouterr()
        export(linked, str(tmp_path / "out"), "csv")
        assert ": 1 of 4 trials complete; the sweep is RUNNING: these are its trials so far -> " in (
            capsys.readouterr().err)


def test_an_attempt_run_again_is_left_out_of_the_tables_and_counted(tmp_path, capsys):
    """A trial interrupted once and run again has two runs, the first KILLED, the second listing
    it (tag ``pipeline.retries``): trials.csv, the summary and the findings hold its outcome
    once, and the context line counts the attempt. A KILLED run that no run lists (a trial lost
    more times than it is retried) is an outcome: it stays, counted as KILLED."""
    soft1 = HEADS[0]
    sparse = ("softmax", 1, "sparse_categorical_crossentropy", 0.05, "glorot_uniform", "softmax_1unit", 0.5)
    with private_store(tmp_path):
        client = mlflow.MlflowClient()
        experiment = client.create_experiment("collapse-exp")
        parent = create_run(experiment, "collapse-run", tags={
            naming.STEP: "sweep", naming.SWEEP_NAME: "collapse", naming.STUDY: "collapse-0a1b2c3d",
            naming.KIND: "heads", naming.REPORT: "collapse"})
        write_trial(client, experiment, parent, 0, 0, soft1, status="KILLED",
                    tags={naming.ERROR: "lost: interrupted"})
        write_trial(client, experiment, parent, 1, 1, soft1)
        write_trial(client, experiment, parent, 2, 0, soft1, tags={naming.RETRIES: "0"})
        write_trial(client, experiment, parent, 3, 0, sparse, status="FAILED")
        write_trial(client, experiment, parent, 4, 2, soft1, status="KILLED",
                    tags={naming.ERROR: "lost: no heartbeat", naming.RETRIES: "5,6,7"})
        log_batch(parent, params={"study": "collapse-0a1b2c3d"},
                  metrics=scalars({f"{naming.TRIAL_COUNT}{k}": v for k, v in
                                   {"complete": 2, "fail": 2, "retried": 4}.items()}))
        client.set_terminated(parent, "FINISHED")
        capsys.readouterr()
        export(parent, str(tmp_path / "out"), "csv,md")
        err = capsys.readouterr().err
        assert (f"export: study 'collapse-0a1b2c3d' (run {parent}): 2 of 4 trials complete (1 failed; "
                f"1 KILLED; 1 attempt run again left out) -> ") in err
        last = err.strip().splitlines()[-1]
        assert last == f"export: findings of 1 study -> {tmp_path / 'out'} (findings.md)"
        rows = pd.read_csv(tmp_path / "out" / "trials.csv")
        assert sorted(rows["trial"]) == [1, 2, 3, 4]
        findings = (tmp_path / "out" / "findings.md").read_text()
        assert "lost: interrupted" not in findings
        row = next(line for line in findings.splitlines() if "| binary_crossentropy |" in line)
        assert row.split("|")[4].strip() == "2/3"  # runs: finished / outcomes
        assert "1 failed: lost: no heartbeat" in row
        assert "With sparse_categorical_crossentropy 1 of 1 runs failed" in findings
        assert "--sweep sweeps/SWEEP.yaml --study collapse-0a1b2c3d --n_trials 4\n" in findings


def test_a_sweep_without_trial_runs_is_refused_before_any_file_is_written(tmp_path):
    with private_store(tmp_path):
        experiment = mlflow.MlflowClient().create_experiment("empty-exp")
        parent = create_run(experiment, "empty-run", tags={
            naming.STEP: "sweep", naming.SWEEP_NAME: "empty", naming.KIND: "heads"})
        with pytest.raises(UserError, match=f"run_id {parent}: the sweep has no trial runs"):
            export(parent, str(tmp_path / "a" / "b" / "c"), "csv")
        full = create_run(experiment, "full-run", tags={
            naming.STEP: "sweep", naming.SWEEP_NAME: "full", naming.KIND: "heads"})
        write_trial(mlflow.MlflowClient(), experiment, full, 0, 0, HEADS[1])
        with pytest.raises(UserError, match=f"run_id {parent}: the sweep has no trial runs"):
            export(f"{full},{parent}", str(tmp_path / "a" / "b" / "c"), "csv")  # the full one first
    assert not (tmp_path / "a").exists()


def test_trial_records_are_one_typed_row_per_trial(sweep):
    trials = trial_records(sweep["parent"])
    assert list(trials["trial"]) == list(range(10))
    assert trials["learning_rate"].dtype == float and trials["units"].dtype == int
    first = trials.iloc[0]
    assert (first["activation"], first["units"], first["loss"], first["role"]) == (
        "softmax", 1, "binary_crossentropy", "softmax_1unit")
    assert bool(first["collapsed"]) and first["status"] == "FINISHED"
    assert first["final_val_loss"] == pytest.approx(val_loss("softmax_1unit", 0, EPOCHS - 1))
    failed = trials[trials["status"] == "FAILED"].iloc[0]
    assert failed["error"] == "ValueError: rejected"
    assert trials["pruned"].sum() == 1
    assert set(tables.completed(trials)["trial"]) == set(range(8))


def test_summary_groups_the_seeds_of_each_config(sweep):
    summary = tables.summarize(trial_records(sweep["parent"]))
    assert list(summary["n"]) == [2, 2, 2, 2]
    assert list(summary["collapsed"]) == [2, 0, 0, 0]
    assert {"activation", "units", "loss", "learning_rate", "init"} <= set(summary.columns)
    assert "seed" not in summary.columns
    random = summary[summary["init"] == "glorot_uniform"].iloc[-1]
    assert random["final_val_accuracy_mean"] == pytest.approx(0.855)
    assert random["final_val_accuracy_std"] == pytest.approx(math.sqrt(0.00005))


def test_markdown_and_latex_tables_of_the_summary(sweep):
    summary = tables.summarize(trial_records(sweep["parent"]))
    markdown = tables.to_markdown(summary).splitlines()
    assert markdown[0] == ("| activation | units | loss | learning_rate | init | n | collapsed "
                           "| val_accuracy | positive_fraction | val_prob_loss | val_loss (Keras) |")
    assert markdown[2].startswith("| softmax | 1 | binary_crossentropy | 0.05 | glorot_uniform | 2 | 2 | "
                                  "0.5050 ± 0.0071 | 0.5000 ± 0.0000 |")
    assert len(markdown) == 2 + 4
    latex = tables.to_latex(summary, caption="100% of 2 seeds", label="tab:t")
    assert r"\toprule" in latex and r"\caption{100\% of 2 seeds}" in latex and r"\label{tab:t}" in latex
    assert r"binary\_crossentropy" in latex and r"0.5050 $\pm$ 0.0071" in latex


def test_latex_escape_writes_every_special_character_as_text():
    assert tables.latex_escape(r"a_b & 5% $x #1 {y} ~z ^w \v |d| <l> -> é") == (
        r"a\_b \& 5\% \$x \#1 \{y\} \textasciitilde{}z \textasciicircum{}w \textbackslash{}v "
        r"\textbar{}d\textbar{} \textless{}l\textgreater{} -\textgreater{} é")


@pytest.mark.parametrize(("mean", "std", "tex", "text"), [
    (0.80091, 0.00803, False, "0.8009 ± 0.0080"),
    (4e-8, 1e-8, False, "4.0e-08 ± 1.0e-08"),
    (0.0, 0.0, True, r"0.0000 $\pm$ 0.0000"),
    (0.5, float("nan"), False, "0.5000"),
    (float("nan"), 0.1, False, "–"),
])
def test_plus_minus(mean, std, tex, text):
    assert tables.plus_minus(mean, std, 4, tex) == text


def test_epoch_records_and_the_parity_curves_they_hold(sweep):
    trials = trial_records(sweep["parent"])
    epochs = epoch_records(trials)
    assert len(epochs) == 8 * EPOCHS  # completed trials only
    curves = epoch_records(comparison_trials(trials))
    assert set(curves["role"]) == {"softmax", "sigmoid_transfer", "sigmoid_random"}
    assert len(curves) == 3 * 2 * EPOCHS
    soft = curves[curves["role"] == "softmax"].sort_values(["seed", "epoch"])["val_loss"].to_numpy()
    sig = curves[curves["role"] == "sigmoid_transfer"].sort_values(["seed", "epoch"])["val_loss"].to_numpy()
    assert (soft == sig).all()
    assert comparison_trials(trials, ratio=4.0).empty  # no sigmoid at 4x a softmax's rate


def test_export_writes_the_tables_and_logs_them(sweep):
    out = sweep["folder"] / "out"
    result = export(sweep["parent"], str(out), "csv,tex")
    assert sorted(p.name for p in result.files) == ["epochs.csv", "summary.csv", "summary.tex", "trials.csv"]
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 10 and "final_val_accuracy" in trials
    assert (out / "summary.tex").read_text().startswith(
        f"% Regenerate with: python -m pipeline export --run_id {sweep['parent']} --output {out} "
        f"--formats csv,tex\n"
        f"% Sweep `tables` (study `tables-0a1b2c3d`, parent run `{sweep['parent']}`): 8 of 12 "
        f"trials complete (1 pruned, left out of the tables; 1 failed); features sha256 `{'ab' * 6}`.\n")
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(sweep["parent"], "export")}
    assert logged == {f"export/{p.name}" for p in result.files}
    default = out / "default"
    export(sweep["parent"], str(default))  # the default formats need no flag to come again
    assert (default / "summary.tex").read_text().startswith(
        f"% Regenerate with: python -m pipeline export --run_id {sweep['parent']} --output {default}\n")


def test_sweeps_are_found_by_name_and_other_runs_refused(sweep):
    assert resolve_run_ids("tables") == [sweep["parent"]]
    assert resolve_run_ids("") == [sweep["parent"]]
    with pytest.raises(UserError, match="no runs of study or sweep 'nothing'"):
        resolve_run_ids("nothing")
    with pytest.raises(UserError, match="not a sweep's parent run"):
        sweep_run(sweep["other"])
    with pytest.raises(UserError, match="formats 'gif'"):
        export(sweep["parent"], str(sweep["folder"] / "no"), "gif")


def test_a_summary_keeps_apart_configs_that_differ_in_any_setting():
    # Every setting of either config model is a grouping column, the seed excepted.
    rows = [{"optimizer": "sgd", "ratio": 2.0, "ratio_scope": scope, "seed": seed, "status": "FINISHED",
             "collapsed": False, "final_max_gap_softmax_transfer": gap}
            for scope, gap in (("output", 1e-9), ("all", 0.2)) for seed in (0, 1)]
    summary = tables.summarize(pd.DataFrame(rows), tables.PARITY_SUMMARY_METRICS)
    assert list(summary["ratio_scope"]) == ["output", "all"]
    assert list(summary["n"]) == [2, 2]
    assert summary["final_max_gap_softmax_transfer_std"].tolist() == [0.0, 0.0]
