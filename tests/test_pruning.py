"""Median pruning on ``val_loss`` per epoch, with either engine: the sweep file, Optuna, MLflow."""

from __future__ import annotations

import mlflow
import pytest
import yaml
from optuna.trial import TrialState

from pipeline import naming
from pipeline.errors import UserError
from pipeline.runs import trial_records
from pipeline.sweep import run_sweep
from pipeline.sweep_file import parse_sweep
from pipeline.tables import summarize
from pipeline.tracking import default_study_storage
from tests.helpers import load_study

EPOCHS = 4
# Trial 0 learns fast and completes; the grid's later trials learn far slower, so their
# val_loss is above trial 0's from the first epoch on and the pruner stops them there.
PRUNED_SWEEP = {
    "name": "pruned", "experiment": "pruned-exp", "sampler": "grid", "seeds": [0],
    "fixed": {"epochs": EPOCHS, "batch_size": 32, "dropout": 0.0, "activation": "sigmoid",
              "units": 1, "loss": "binary_crossentropy"},
    "space": {"learning_rate": [0.3, 1e-6, 2e-6]},
    "objective": {"metric": "val_loss"},
    "pruner": {"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
}


def test_pruner_section_is_validated():
    base = {"name": "a", "experiment": "e", "space": {"activation": ["sigmoid"]}}
    assert parse_sweep(base).pruner.type == "none"
    assert parse_sweep({**base, "pruner": "median"}).pruner.n_startup_trials == 5
    spec = parse_sweep({**base, "pruner": {"type": "median", "n_startup_trials": 2, "n_warmup_steps": 1}})
    assert (spec.pruner.n_startup_trials, spec.pruner.n_warmup_steps) == (2, 1)
    with pytest.raises(UserError, match=r"pruner\.patience: unknown key"):
        parse_sweep({**base, "pruner": {"type": "median", "patience": 3}})
    with pytest.raises(UserError, match="pruner.type"):
        parse_sweep({**base, "pruner": "hyperband"})
    with pytest.raises(UserError, match="n_warmup_steps"):
        parse_sweep({**base, "pruner": {"type": "median", "n_warmup_steps": -1}})
    with pytest.raises(UserError, match="val_accuracy is maximized but the objective is to minimize"):
        parse_sweep({**base, "pruner": {"type": "median", "metric": "val_accuracy"}})
    maximize = {**base, "objective": {"metric": "val_accuracy", "direction": "maximize"}}
    assert parse_sweep({**maximize, "pruner": {"type": "median", "metric": "val_accuracy"}})
    parity = {**base, "kind": "parity", "space": {"ratio": [2.0]}}
    assert parse_sweep(parity).pruner.type == "none"
    with pytest.raises(UserError, match="only a heads sweep can be pruned"):
        parse_sweep({**parity, "pruner": "median"})


@pytest.mark.parametrize("engine", [pytest.param("keras", marks=pytest.mark.slow), "fused"])
def test_a_pruned_trial_is_pruned_in_optuna_and_finished_in_mlflow(engine, tmp_path, tracking,
                                                                   features_file):
    sweep = tmp_path / "pruned.yaml"
    sweep.write_text(yaml.safe_dump({**PRUNED_SWEEP, "engine": engine}))
    outcome = run_sweep(str(features_file), str(sweep), progress=False)
    assert outcome.counts == {"complete": 1, "fail": 0, "pruned": 2}
    study = load_study(default_study_storage(), outcome.study_name)
    client = mlflow.MlflowClient()
    for trial in study.trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags[naming.ENGINE] == engine
        history = client.get_metric_history(run.info.run_id, "val_loss")
        if trial.number == 0:
            assert trial.state == TrialState.COMPLETE
            assert naming.PRUNED not in run.data.tags
            assert len(history) == EPOCHS
            continue
        assert trial.state == TrialState.PRUNED
        assert run.data.tags[naming.PRUNED] == "true"
        assert list(trial.intermediate_values) == [0]  # stopped after its first epoch
        assert [p.step for p in history] == [0]  # the epochs it trained are recorded
        assert history[0].value == pytest.approx(trial.intermediate_values[0])
        assert trial.value == trial.intermediate_values[0]
        assert history[0].value > study.trials[0].intermediate_values[0]
        assert trial.user_attrs["pruned"].startswith("after epoch 0: val_loss")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert all(run.info.status != "RUNNING" for run in runs)
    trials = trial_records(outcome.parent_run_id)  # the tables leave the pruned trials out
    assert sorted(trials["pruned"]) == [False, True, True]
    summary = summarize(trials)
    assert len(summary) == 1 and list(summary["n"]) == [1]  # the completed trial's config alone
    assert summary["final_val_loss_mean"][0] == study.trials[0].value


def test_without_a_pruner_nothing_is_reported(tmp_path, tracking, features_file):
    sweep = tmp_path / "unpruned.yaml"
    sweep.write_text(yaml.safe_dump({k: v for k, v in PRUNED_SWEEP.items() if k != "pruner"}))
    outcome = run_sweep(str(features_file), str(sweep), progress=False)
    assert outcome.counts == {"complete": 3, "fail": 0, "pruned": 0}
    study = load_study(default_study_storage(), outcome.study_name)
    assert all(not t.intermediate_values for t in study.trials)
