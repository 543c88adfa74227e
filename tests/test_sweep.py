"""The sweep stage end to end in-process: runs, nesting, params, histories, failures, resume."""

from __future__ import annotations

import io
import math
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from pipeline import naming, studies
from pipeline.errors import UserError
from pipeline.export import export
from pipeline.features import write_features
from pipeline.runs import resolve_run_ids, trial_records
from pipeline.sweep import run_sweep
from pipeline.sweep_file import parse_sweep
from pipeline.tracking import default_study_storage
from tests.helpers import TINY, load_study, make_features, private_store


def write_sweep(tmp_path, spec=TINY, name="tiny.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One finished tiny sweep in its own store: (outcome, runs under its parent, sweep file).

    Shared by the tests of this module (read-only use, except the resume tests, which leave
    the study as it was, and the test of studies of their own, which adds two in another
    experiment).
    """
    tmp_path = tmp_path_factory.mktemp("swept")
    x, y = make_features()
    features = write_features(tmp_path / "features.h5", x, y, {})
    with private_store(tmp_path):
        sweep = write_sweep(tmp_path)
        outcome = run_sweep(str(features), sweep, progress=False)
        runs = mlflow.search_runs(experiment_ids=[outcome.experiment_id], output_format="list",
                                  filter_string=f"tags.`{naming.PARENT}` = '{outcome.parent_run_id}'")
        yield outcome, runs, sweep, features


def test_every_trial_is_one_nested_run_with_its_record(swept):
    outcome, runs, _, _ = swept
    assert outcome.counts == {"complete": 8, "fail": 2, "pruned": 0} and outcome.retried == 0
    assert len(runs) == 10
    names = {r.info.run_name for r in runs}
    assert "softmax-1u-bce-lr5e-2-glorot-s0" in names
    assert "sigmoid-1u-bce-lr1e-1-transfer-s1" in names
    for run in runs:
        assert run.info.status in ("FINISHED", "FAILED")
        for key in ("activation", "units", "loss", "learning_rate", "init", "seed", "optimizer",
                    "dropout", "epochs", "batch_size", "standardize"):
            assert key in run.data.params
        tags = run.data.tags
        assert tags[naming.STUDY] == outcome.study_name
        assert tags[naming.NOTE].startswith(f"Trial {tags[naming.TRIAL_NUMBER]} of sweep `tiny`: a ")
        one_unit_softmax = run.data.params["activation"] == "softmax" and run.data.params["units"] == "1"
        assert ("outputs 1.0 for every input" in tags[naming.NOTE]) == one_unit_softmax
        assert len(tags[naming.FEATURES_SHA]) == 64
        assert tags[naming.WEIGHTS] == "unknown"
        for package in ("tensorflow", "keras", "mlflow", "optuna"):
            assert tags[f"version.{package}"]
    parent = mlflow.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name.startswith("tiny-")
    assert parent.data.tags[naming.NOTE].startswith("a test study")


def test_metric_histories_have_one_point_per_epoch(swept):
    _, runs, _, _ = swept
    client = mlflow.MlflowClient()
    finished = [r for r in runs if r.info.status == "FINISHED"]
    for run in finished:
        for metric in ("loss", "val_loss", "accuracy", "val_accuracy", "prob_loss", "val_prob_loss"):
            history = client.get_metric_history(run.info.run_id, metric)
            assert sorted(p.step for p in history) == [0, 1, 2]
            assert all(math.isfinite(p.value) for p in history)
        assert 0 < run.data.metrics["positive_fraction"] < 1


def test_step_losses_are_a_file_per_trial(swept):
    """Every trained trial's per-step losses are ``step_loss.csv``: a row per step, and each
    epoch's rows average to the epoch's ``loss`` (Keras's running mean; full batches here)."""
    _, runs, _, _ = swept
    client = mlflow.MlflowClient()
    for run in runs:
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        if run.info.status != "FINISHED":  # sparse cross-entropy on one unit fails at its first step
            assert "step_loss.csv" not in files
            continue
        assert "step_loss.csv" in files and "step_loss" not in run.data.metrics
        steps = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(
            f"runs:/{run.info.run_id}/step_loss.csv")))
        assert list(steps.columns) == ["step", "epoch", "loss"]
        assert list(steps["step"]) == list(range(3 * 6))  # 192 training rows in batches of 32
        assert list(steps["epoch"]) == [e for e in range(3) for _ in range(6)]
        epoch_loss = [p.value for p in sorted(client.get_metric_history(run.info.run_id, "loss"),
                                              key=lambda p: p.step)]
        np.testing.assert_allclose(steps.groupby("epoch")["loss"].mean(), epoch_loss, rtol=0, atol=1e-5)
        assert steps["loss"].nunique() == len(steps)


def test_collapse_is_tagged_and_measured(swept):
    _, runs, _, _ = swept
    for run in runs:
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        if run.info.status != "FINISHED":
            continue
        one_unit_softmax = params["activation"] == "softmax" and params["units"] == "1"
        assert tags[naming.COLLAPSED] == str(one_unit_softmax).lower()
        if one_unit_softmax:
            assert metrics["val_accuracy"] == metrics["positive_fraction"]
            pos = metrics["positive_fraction"]
            assert metrics["val_prob_loss"] == pytest.approx((1 - pos) * -np.log(1e-7), abs=1e-3)
            assert metrics["val_loss"] < 2.0  # Keras's loss from logits never sees the 1.0s


def test_rejected_combination_is_a_failed_trial_and_the_sweep_goes_on(swept):
    outcome, runs, _, _ = swept
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert {r.data.params["loss"] for r in failed} == {"sparse_categorical_crossentropy"}
    assert all(r.data.tags[naming.ERROR] for r in failed)
    study = load_study(default_study_storage(), outcome.study_name)
    fails = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(fails) == 2 and all(t.user_attrs["fail_reason"] for t in fails)
    run_ids = [t.user_attrs["mlflow_run_id"] for t in study.trials]
    assert sorted(run_ids) == sorted(r.info.run_id for r in runs)


def test_transfer_follows_softmax(swept):
    _, runs, _, _ = swept
    client = mlflow.MlflowClient()
    by_name = {r.info.run_name: r.info.run_id for r in runs}
    for seed in (0, 1):
        soft = client.get_metric_history(by_name[f"softmax-2u-cce-lr5e-2-glorot-s{seed}"], "loss")
        sig = client.get_metric_history(by_name[f"sigmoid-1u-bce-lr1e-1-transfer-s{seed}"], "loss")
        rand = client.get_metric_history(by_name[f"sigmoid-1u-bce-lr1e-1-glorot-s{seed}"], "loss")
        gap = max(abs(a.value - b.value) for a, b in zip(soft, sig, strict=True))
        other = max(abs(a.value - b.value) for a, b in zip(sig, rand, strict=True))
        assert gap < 1e-5 < other


def test_rerun_resumes_instead_of_restarting(swept):
    outcome, runs, sweep, features_file = swept
    again = run_sweep(str(features_file), sweep, progress=False)
    assert again.parent_run_id == outcome.parent_run_id
    assert again.counts == outcome.counts
    after = mlflow.search_runs(experiment_ids=[outcome.experiment_id], output_format="list",
                               filter_string=f"tags.`{naming.PARENT}` = '{outcome.parent_run_id}'")
    assert len(after) == len(runs)


def test_a_sweep_whose_parent_run_was_deleted_restores_it_and_resumes(swept, capsys):
    outcome, runs, sweep, features_file = swept
    client = mlflow.MlflowClient()
    client.delete_run(outcome.parent_run_id)
    again = run_sweep(str(features_file), sweep, progress=False)
    assert again.parent_run_id == outcome.parent_run_id and again.counts == outcome.counts
    parent = client.get_run(outcome.parent_run_id).info
    assert (parent.lifecycle_stage, parent.status) == ("active", "FINISHED")
    assert f"parent run {outcome.parent_run_id} was deleted; restored" in capsys.readouterr().err


def test_a_main_that_resumes_a_study_lists_it_before_it_runs(swept):
    """A main (launcher) run lists each sweep as the sweep starts, a resumed one too (its parent
    run nests under the main that made it): export by the main run's id finds it even if that
    main is interrupted."""
    outcome, _, sweep, features_file = swept
    client = mlflow.MlflowClient()
    launcher = client.create_run(client.create_experiment("another-main"),
                                 tags={naming.STEP: "main"}).info.run_id
    again = run_sweep(str(features_file), sweep, progress=False, launcher_run_id=launcher)
    assert again.parent_run_id == outcome.parent_run_id
    assert client.get_run(launcher).data.tags[naming.SWEEP_RUNS] == outcome.parent_run_id
    run_sweep(str(features_file), sweep, progress=False, launcher_run_id=launcher)
    assert client.get_run(launcher).data.tags[naming.SWEEP_RUNS] == outcome.parent_run_id  # listed once
    assert resolve_run_ids(launcher) == [outcome.parent_run_id]


def test_a_stale_launcher_run_is_refused_before_the_parent_run_is_touched(swept):
    outcome, _, sweep, features_file = swept
    stale = "f" * 32
    refused = f"launcher run {stale} \\(MLFLOW_RUN_ID\\): not in the tracking store"
    with pytest.raises(UserError, match=refused):
        run_sweep(str(features_file), sweep, progress=False, launcher_run_id=stale)
    assert mlflow.MlflowClient().get_run(outcome.parent_run_id).info.status == "FINISHED"


def test_another_space_or_features_file_runs_a_study_of_its_own(swept, tmp_path):
    """Without --study, the study is named for the sweep, its space and its features: a changed
    sweep file or another features file starts a new study beside the first."""
    outcome, _, _, features_file = swept
    assert outcome.study_name.startswith("tiny-") and len(outcome.study_name) == len("tiny-") + 8
    changed = write_sweep(tmp_path, {**TINY, "experiment": "tiny-other", "seeds": [0],
                                      "space": TINY["space"][:1]}, "changed.yaml")
    x, y = make_features(n=160, d=8, seed=1)
    other_features = str(write_features(tmp_path / "other.h5", x, y, {}))
    first = run_sweep(str(features_file), changed, progress=False)
    second = run_sweep(other_features, changed, progress=False)
    names = {outcome.study_name, first.study_name, second.study_name}
    assert len(names) == 3 and all(name.startswith("tiny-") for name in names)
    assert first.counts == second.counts == {"complete": 1, "fail": 0, "pruned": 0}
    assert run_sweep(other_features, changed, progress=False).parent_run_id == second.parent_run_id


def test_a_named_study_refuses_another_space_or_features_file(swept, tmp_path):
    outcome, _, sweep, features_file = swept
    journal = Path(default_study_storage())
    before = journal.read_bytes()
    changed = write_sweep(tmp_path, {**TINY, "seeds": [0, 1, 2]}, "changed.yaml")
    with pytest.raises(UserError, match="different search space"):
        run_sweep(str(features_file), changed, study=outcome.study_name, progress=False)
    x, y = make_features(n=160, d=8, seed=1)
    other_features = str(write_features(tmp_path / "other.h5", x, y, {}))
    with pytest.raises(UserError, match="was run on another features file"):
        run_sweep(other_features, sweep, study=outcome.study_name, progress=False)
    assert journal.read_bytes() == before  # a refusal writes nothing to the study's journal


def test_a_finished_study_whose_runs_are_elsewhere_is_refused(swept, tmp_path, tracking):
    """mlflow.db deleted to start over while the Optuna journal beside it stayed: the study's
    trials are finished, their runs gone; a sweep would run nothing and export nothing."""
    outcome, _, sweep, features_file = swept
    journal = str(Path(sweep).parent / "optuna-journal.log")
    with pytest.raises(UserError, match=f"10 finished trials recorded under parent run "
                                        f"{outcome.parent_run_id}, which is not in this tracking store"):
        run_sweep(str(features_file), sweep, storage=journal, progress=False)
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
    assert mlflow.get_experiment_by_name(TINY["experiment"]) is None  # nothing written


def test_a_finished_study_moved_to_another_experiment_is_refused(swept, tmp_path):
    """A sweep file whose experiment changed names its study by --study (without it, the
    experiment is part of the default name, and the sweep gets a study of its own)."""
    outcome, _, _, features_file = swept
    moved = write_sweep(tmp_path, {**TINY, "experiment": "moved-exp"}, "moved.yaml")
    with pytest.raises(UserError, match=f"is in experiment {outcome.experiment_id}, not in 'moved-exp'"):
        run_sweep(str(features_file), moved, study=outcome.study_name, progress=False)
    assert mlflow.get_run(outcome.parent_run_id).info.status == "FINISHED"
    assert mlflow.get_experiment_by_name("moved-exp") is None  # nothing written


def test_tpe_sweep_runs_exactly_n_trials(tmp_path, tracking, features_file, capsys):
    spec = {"name": "tpe", "experiment": "tpe-exp", "sampler": "tpe", "n_trials": 4,
            "seeds": [0], "fixed": {"epochs": 1, "units": 1, "loss": "binary_crossentropy"},
            "space": {"activation": ["sigmoid"], "learning_rate": {"low": 1e-3, "high": 1e-1}}}
    outcome = run_sweep(str(features_file), write_sweep(tmp_path, spec, "tpe.yaml"), progress=False)
    assert outcome.counts["complete"] == 4
    grown = run_sweep(str(features_file), write_sweep(tmp_path, spec, "tpe.yaml"), n_trials=6,
                      progress=False)
    assert grown.counts["complete"] == 6
    assert (grown.study_name, grown.parent_run_id) == (outcome.study_name, outcome.parent_run_id)
    capsys.readouterr()
    fewer = run_sweep(str(features_file), write_sweep(tmp_path, spec, "tpe.yaml"), n_trials=4,
                      progress=False)  # a smaller n_trials does not shrink the study
    assert fewer.counts["complete"] == 6
    assert "sweep: 0 trials to go (6 done before)" in capsys.readouterr().err.splitlines()


def test_bad_features_create_nothing(tmp_path, tracking):
    bad = tmp_path / "bad.h5"
    bad.write_text("not hdf5")
    with pytest.raises(UserError, match="not a readable HDF5"):
        run_sweep(str(bad), write_sweep(tmp_path), progress=False)
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
    assert mlflow.get_experiment_by_name(TINY["experiment"]) is None
    assert not (tmp_path / "optuna-journal.log").exists()


def test_missing_runs_uri_is_one_line_error(tmp_path, tracking):
    with pytest.raises(UserError, match="cannot be fetched"):
        run_sweep("runs:/0123456789abcdef/features/f.h5", write_sweep(tmp_path), progress=False)


def test_export_writes_typed_tables_and_figures(swept, tmp_path):
    outcome, runs, _, _ = swept
    result = export(outcome.parent_run_id, str(tmp_path / "out"), "csv,md,tex,png")
    names = {p.name for p in result.files}
    assert {"trials.csv", "summary.csv", "summary.md", "summary.tex", "loss_curves.png",
            "loss_gaps.png", "epochs.csv"} <= names
    trials = trial_records(outcome.parent_run_id)
    assert len(trials) == len(runs)
    assert trials["units"].dtype.kind == "i" and trials["learning_rate"].dtype.kind == "f"
    assert trials["loss"].isin(["binary_crossentropy", "categorical_crossentropy",
                                "sparse_categorical_crossentropy"]).all()
    tex = (tmp_path / "out" / "summary.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"$\pm$" in tex
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "python -m pipeline export --run_id " + outcome.parent_run_id in md
    assert (tmp_path / "out" / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(outcome.parent_run_id, "export")}
    assert "export/trials.csv" in artifacts and "export/loss_gaps.png" in artifacts


def test_a_sweep_on_a_runs_uri_records_the_uri_not_its_local_copy(tmp_path, tracking):
    """The parent run's ``features`` param (the rerun command of an export) and the runs'
    dataset source name the artifact, not the copy fetched for this command."""
    x, y = make_features()
    client = mlflow.MlflowClient()
    run = client.create_run("0").info.run_id
    client.log_artifact(run, str(write_features(tmp_path / "f.h5", x, y, {})), "features")
    uri = f"runs:/{run}/features/f.h5"
    sweep = write_sweep(tmp_path, {**TINY, "seeds": [0], "space": TINY["space"][:1]}, "one.yaml")
    parent = mlflow.get_run(run_sweep(uri, sweep, progress=False).parent_run_id)
    assert parent.data.params["features"] == uri
    (dataset_input,) = parent.inputs.dataset_inputs
    assert yaml.safe_load(dataset_input.dataset.source)["uri"] == uri


def test_tpe_draws_each_trial_from_every_trial_told_before_it(tmp_path, tracking, features_file):
    """TPE learns from the trials told so far, so the fused engine trains its trials one by one:
    drawn from a batch before any was told, TPE's trials past its random start-up would be
    random draws. An oracle study with the same sampler, told each trial before the next is
    drawn, draws the same params."""
    spec = {"name": "tpe-order", "experiment": "tpe-exp", "sampler": "tpe", "n_trials": 14,
            "seeds": [0], "engine": "fused",
            "fixed": {"epochs": 2, "units": 1, "loss": "binary_crossentropy"},
            "space": {"activation": ["sigmoid"], "learning_rate": {"low": 1e-4, "high": 1.0}}}
    outcome = run_sweep(str(features_file), write_sweep(tmp_path, spec, "tpe.yaml"), progress=False)
    study = load_study(default_study_storage(), outcome.study_name)
    oracle = optuna.create_study(sampler=studies.make_sampler(parse_sweep(spec)))
    for trial in sorted(study.trials, key=lambda t: t.number):
        asked = oracle.ask()
        assert studies.suggest(asked, parse_sweep(spec)) == trial.params, trial.number
        oracle.tell(asked, trial.value)
