"""Median pruning on ``val_loss`` per epoch, with either engine: the sweep file, Optuna, MLflow."""

from __future__ import annotations

import mlflow
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from pipeline import naming, studies
from pipeline.errors import UserError
from pipeline.runs import trial_records
from pipeline.sweep import run_sweep
from pipeline.sweep_file import parse_sweep
from pipeline.tables import summarize
from pipeline.tracking import default_study_storage
from pipeline.trial import Reporter
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
    # without a metric of its own the pruner judges the objective's, the kind's default included
    assert parse_sweep(base).pruner_metric is None
    assert parse_sweep({**base, "pruner": "median"}).pruner_metric == "val_prob_loss"
    assert parse_sweep({**maximize, "pruner": "median"}).pruner_metric == "val_accuracy"
    own = parse_sweep({**maximize, "pruner": {"type": "median", "metric": "accuracy"}})
    assert own.pruner_metric == "accuracy"
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


# Learning rates spread so that whether a trial is pruned depends on which trials it meets:
# the slow first trial alone would let most of the others through.
ORDERED_SWEEP = {**PRUNED_SWEEP, "name": "ordered",
                 "space": {"learning_rate": [1e-3, 0.3, 0.01, 0.03, 3e-3, 0.1, 1e-4, 0.05]}}


def _fates(study: optuna.Study) -> list[tuple[TrialState, int]]:
    """Each trial's state and last reported epoch, in trial order."""
    return [(t.state, max(t.intermediate_values)) for t in sorted(study.trials, key=lambda t: t.number)]


def _fates_run_in_order(study: optuna.Study) -> list[tuple[TrialState, int]]:
    """The fates Optuna's median pruner gives the same reported values when the trials run one
    after another: a fresh study is told each trial before the next reports."""
    pruner = PRUNED_SWEEP["pruner"]
    oracle = optuna.create_study(pruner=optuna.pruners.MedianPruner(
        n_startup_trials=pruner["n_startup_trials"], n_warmup_steps=pruner["n_warmup_steps"]))
    fates = []
    for trial in sorted(study.trials, key=lambda t: t.number):
        asked = oracle.ask()
        for epoch, value in sorted(trial.intermediate_values.items()):
            asked.report(value, epoch)
            if asked.should_prune():
                oracle.tell(asked, state=TrialState.PRUNED)
                fates.append((TrialState.PRUNED, epoch))
                break
        else:
            oracle.tell(asked, trial.value)
            fates.append((TrialState.COMPLETE, epoch))
    return fates


def test_a_batch_trained_side_by_side_is_judged_trial_by_trial(tmp_path, tracking, features_file):
    sweep = tmp_path / "ordered.yaml"
    sweep.write_text(yaml.safe_dump({**ORDERED_SWEEP, "engine": "fused"}))
    outcome = run_sweep(str(features_file), str(sweep), progress=False)
    study = load_study(default_study_storage(), outcome.study_name)
    fates = _fates(study)
    assert fates == _fates_run_in_order(study)
    assert {state for state, _ in fates} == {TrialState.COMPLETE, TrialState.PRUNED}
    client = mlflow.MlflowClient()
    for trial, (_, last) in zip(sorted(study.trials, key=lambda t: t.number), fates, strict=True):
        history = client.get_metric_history(trial.user_attrs["mlflow_run_id"], "val_loss")
        assert [p.step for p in history] == list(range(last + 1))  # a pruned run ends where it was judged


@pytest.mark.slow
def test_the_engines_prune_the_same_trials(tmp_path, tracking, features_file):
    studies = {}
    for engine in ("keras", "fused"):
        sweep = tmp_path / f"{engine}.yaml"
        sweep.write_text(yaml.safe_dump({**ORDERED_SWEEP, "name": engine, "engine": engine}))
        studies[engine] = load_study(default_study_storage(),
                                     run_sweep(str(features_file), str(sweep), progress=False).study_name)
    assert _fates(studies["keras"]) == _fates(studies["fused"])
    for keras, fused in zip(studies["keras"].trials, studies["fused"].trials, strict=True):
        assert list(fused.intermediate_values.values()) == pytest.approx(
            list(keras.intermediate_values.values()), abs=1e-4)


def _judging(study: optuna.Study) -> Reporter:
    """A reporter of a new trial of ``study``, in a batch trained side by side, that has kept
    three epochs of ``val_loss``: 0.9, 0.8, 0.7."""
    reporter = Reporter(study.ask(), "val_loss", alone=False)
    for epoch, value in enumerate((0.9, 0.8, 0.7)):
        reporter(epoch, {"val_loss": value, "loss": value})
    return reporter


def test_a_head_that_failed_after_the_epoch_it_is_pruned_at_is_pruned():
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    better = study.ask()
    for epoch in range(3):
        better.report(0.1, epoch)
    study.tell(better, 0.1)
    reporter = _judging(study)
    outcome = reporter.judged(FloatingPointError("diverged at epoch 2"))
    assert isinstance(outcome, optuna.TrialPruned)
    assert reporter.history == {"val_loss": [0.9], "loss": [0.9]}  # the run records epoch 0 alone
    assert reporter.trial.user_attrs["pruned"] == "after epoch 0: val_loss 0.9"


def test_a_judgement_the_storage_refuses_fails_that_trial_alone():
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=0))
    reporter = _judging(study)
    study.tell(reporter.trial, state=TrialState.FAIL)  # taken for lost by another worker meanwhile
    outcome = reporter.judged("its result")
    assert isinstance(outcome, optuna.exceptions.UpdateFinishedTrialError)


def test_in_a_sweep_a_refused_judgement_fails_its_trial_and_the_batch_goes_on(
        tmp_path, tracking, features_file, monkeypatch):
    judge = Reporter._judge

    def refused(reporter, epoch, value):
        if reporter.trial.number == 1:
            raise RuntimeError("the storage refused the report")
        judge(reporter, epoch, value)

    monkeypatch.setattr(Reporter, "_judge", refused)
    sweep = tmp_path / "refused.yaml"
    sweep.write_text(yaml.safe_dump({**PRUNED_SWEEP, "engine": "fused"}))
    outcome = run_sweep(str(features_file), str(sweep), progress=False)
    study = load_study(default_study_storage(), outcome.study_name)
    states = [t.state for t in sorted(study.trials, key=lambda t: t.number)]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED]
    assert study.trials[1].user_attrs[studies.REASON_ATTR] == "RuntimeError: the storage refused the report"
    run = mlflow.get_run(study.trials[1].user_attrs["mlflow_run_id"])
    assert (run.info.status, run.data.tags[naming.ERROR]) == (
        "FAILED", "RuntimeError: the storage refused the report")


def test_by_default_a_collapsed_head_is_pruned_on_the_objective(tmp_path, tracking, features_file):
    """The 1-unit softmax trains as a sigmoid under Keras's ``val_loss`` (the cached logits),
    so only the probabilities' loss, the heads' default objective, shows its collapse: a pruner
    without a metric of its own judges that and stops the collapsed head after its first epoch."""
    sweep = tmp_path / "collapse.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "collapse", "experiment": "collapse-exp", "sampler": "grid", "seeds": [0],
        "fixed": {"epochs": EPOCHS, "batch_size": 32, "dropout": 0.0, "units": 1,
                  "loss": "binary_crossentropy", "learning_rate": 0.1},
        "space": {"activation": ["sigmoid", "softmax"]},
        "pruner": {"type": "median", "n_startup_trials": 1}}))
    outcome = run_sweep(str(features_file), str(sweep), progress=False)
    study = load_study(default_study_storage(), outcome.study_name)
    sigmoid, softmax = sorted(study.trials, key=lambda t: t.number)
    assert (sigmoid.state, softmax.state) == (TrialState.COMPLETE, TrialState.PRUNED)
    assert softmax.user_attrs["pruned"].startswith("after epoch 0: val_prob_loss")
