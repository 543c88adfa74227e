"""The sweep stage: an Optuna study over classifier heads, every trial one MLflow run.

:func:`run_sweep` validates the sweep file and the features before it creates anything, opens
(or resumes) the study, and runs its queued trials with the chosen engine. Each trial is a
run nested under the sweep's parent run, with its config as params, per-epoch metrics
(step = epoch) and tags for the useful filters; the Optuna trial carries the run's id.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
from optuna.trial import TrialState

from pipeline import naming, parity, records, studies, tracking
from pipeline.config import ParityConfig, SweepSpec, TrialConfig, load_sweep
from pipeline.features import FeatureSet, read_features, resolve_features, sha256_file
from pipeline.progress import progress_bar
from pipeline.split import Split, make_split

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass(frozen=True)
class SweepOutcome:
    """What a finished sweep leaves: its parent run, study and trial counts."""

    parent_run_id: str
    experiment_id: str
    study_name: str
    counts: dict[str, int]


class Objective:
    """Trains trials of one sweep on one features file, loaded once, splits cached by seed.

    A trial of a ``heads`` sweep trains one head; a trial of a ``parity`` sweep trains the
    seed's three heads (:mod:`pipeline.parity`) as runs nested under the trial's run.
    """

    def __init__(self, spec: SweepSpec, features: FeatureSet, engine):
        self.spec, self.features, self.engine = spec, features, engine
        self._splits: dict[tuple, Split] = {}

    def split(self, config: TrialConfig | ParityConfig) -> Split:
        """The train/validation split of ``config`` (shared by all trials of the same seed)."""
        key = (config.seed, config.validation_fraction, config.standardize)
        if key not in self._splits:
            self._splits[key] = make_split(self.features.x, self.features.y,
                                           config.validation_fraction, config.seed,
                                           config.standardize)
        return self._splits[key]

    def run_name(self, config: TrialConfig | ParityConfig) -> str:
        """The MLflow run name of a trial (:mod:`pipeline.naming`)."""
        if isinstance(config, ParityConfig):
            return naming.parity_run_name(config)
        return naming.trial_run_name(config)

    def tags(self, config: TrialConfig | ParityConfig) -> dict[str, str]:
        """Tags a trial's run gets when it is created."""
        return {} if isinstance(config, ParityConfig) else records.head_tags(config)

    def train_and_log(self, config: TrialConfig | ParityConfig, run_id: str, experiment: str,
                      tags: dict[str, str]) -> float:
        """Train ``config``, record the results on ``run_id``, return the objective's value."""
        split = self.split(config)
        metric = self.spec.objective_metric
        if isinstance(config, ParityConfig):
            result = parity.train_parity(config, split, self.engine)
            return parity.log_parity(run_id, experiment, result, split, tags)[metric]
        result = self.engine.train(config, split)
        records.log_head(run_id, result, split, config)
        return result.final(metric)


def make_engine(name: str):
    """The trainer named in a sweep file."""
    from pipeline.engine_keras import KerasEngine

    engines = {"keras": KerasEngine}
    return engines[name]()


def run_sweep(features: str, sweep: str, n_trials: int | None = None, storage: str | None = None,
              study: str | None = None, launcher_run_id: str | None = None,
              progress: bool | None = None) -> SweepOutcome:
    """Run (or resume) the study a sweep file describes, on a features file or ``runs:/`` URI.

    ``launcher_run_id`` is the run this sweep was started under (``main``'s, or the one
    ``mlflow run`` opened): the parent run nests under it when both are in the study's
    experiment, and the two are linked by tags otherwise. Returns the parent run and counts.
    """
    spec = load_sweep(sweep, n_trials)
    features_path = resolve_features(features)
    data = read_features(features_path)
    features_sha = sha256_file(features_path)
    tracking.install_sigterm_handler()
    the_study = studies.open_study(spec, storage, study, features_sha)
    experiment = tracking.experiment_id(spec.experiment)
    tracking.describe_experiment(experiment, spec.description)
    parent = _open_parent(the_study, spec, experiment, launcher_run_id, storage,
                          features_sha, str(features_path), sweep)
    common_tags = {naming.STUDY: the_study.study_name, naming.FEATURES_SHA: features_sha,
                   naming.WEIGHTS: str(data.attrs.get("weights", "unknown")),
                   naming.STEP: "trial", naming.SWEEP_NAME: spec.name, **tracking.versions()}
    objective = Objective(spec, data, make_engine(spec.engine))
    with tracking.terminal_run(parent):
        bar = _progress(spec.budget(), the_study, progress)
        while (trial := studies.next_trial(the_study)) is not None:
            _run_trial(the_study, trial, objective, experiment, parent, common_tags)
            bar.update(1)
        bar.close()
        counts = _summarise(the_study, parent)
    return SweepOutcome(parent, experiment, the_study.study_name, counts)


def _open_parent(study: optuna.Study, spec: SweepSpec, experiment: str, launcher: str | None,
                 storage: str | None, features_sha: str, features_path: str, sweep: str) -> str:
    """The sweep's parent run: reopened when the study is resumed, created otherwise."""
    client = mlflow.MlflowClient()
    previous = study.user_attrs.get(studies.PARENT_ATTR)
    if previous:
        try:
            if client.get_run(previous).info.experiment_id == experiment:
                client.update_run(previous, status="RUNNING")
                return previous
        except mlflow.exceptions.MlflowException:
            pass  # the tracking store has changed since: start a new parent
    launcher_experiment = client.get_run(launcher).info.experiment_id if launcher else None
    nest = launcher if launcher_experiment == experiment else None
    tags = {naming.STEP: "sweep", naming.SWEEP_NAME: spec.name, naming.STUDY: study.study_name,
            naming.KIND: spec.kind, naming.REPORT: spec.report,
            naming.STORAGE: studies.study_url(storage, study.study_name),
            naming.FEATURES_SHA: features_sha, naming.NOTE: naming.parent_description(spec),
            **tracking.versions()}
    if launcher and not nest:
        tags[naming.MAIN_RUN] = launcher
    parent = tracking.create_run(experiment, naming.parent_run_name(spec.name), nest, tags)
    if launcher and not nest:
        client.set_tag(launcher, "pipeline.sweep_run_id", parent)
    params = {"sweep": spec.name, "sweep_file": sweep, "kind": spec.kind, "sampler": spec.sampler,
              "sampler_seed": spec.sampler_seed,
              "n_trials": spec.budget(), "seeds": list(spec.seeds), "engine": spec.engine,
              "objective": f"{spec.objective.direction} {spec.objective_metric}",
              "features": features_path, "study": study.study_name,
              **{f"fixed.{k}": v for k, v in spec.fixed.items()}}
    tracking.log_batch(parent, params=params)
    client.log_artifact(parent, sweep, "sweep")
    study.set_user_attr(studies.PARENT_ATTR, parent)
    return parent


def _run_trial(study: optuna.Study, trial: optuna.Trial, objective: Objective, experiment: str,
               parent: str, common_tags: dict) -> None:
    """Train one trial, record it in MLflow and tell Optuna; a failure fails only this trial."""
    spec = objective.spec
    try:
        config = spec.trial_config(studies.suggest(trial, spec))
    except Exception as exc:
        trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
        study.tell(trial, state=TrialState.FAIL)
        return
    tags = {**common_tags, naming.TRIAL_NUMBER: trial.number, **objective.tags(config)}
    run_id = tracking.create_run(experiment, objective.run_name(config), parent, tags)
    trial.set_user_attr("mlflow_run_id", run_id)
    tracking.log_batch(run_id, params=config.params())
    try:
        with tracking.terminal_run(run_id):
            value = objective.train_and_log(config, run_id, experiment, common_tags)
            if not math.isfinite(value):
                raise FloatingPointError(f"{spec.objective_metric} is {value}: training diverged")
    except KeyboardInterrupt:
        trial.set_user_attr("fail_reason", "interrupted")
        study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as exc:
        trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:2000])
        study.tell(trial, state=TrialState.FAIL)
        return
    study.tell(trial, value)


def _summarise(study: optuna.Study, parent: str) -> dict[str, int]:
    """Log trial counts and the best trial on the parent run; return the counts."""
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials)
              for state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)}
    tags = {}
    metrics = {f"trials.{k}": v for k, v in counts.items()}
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    if completed:
        best = study.best_trial
        metrics["best.value"] = best.value
        tags = {"best.trial_number": best.number,
                "best.run_id": best.user_attrs.get("mlflow_run_id", ""),
                "best.params": json.dumps(best.params, sort_keys=True)}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, "best_trial.json")
            path.write_text(json.dumps({"number": best.number, "value": best.value,
                                        "params": best.params,
                                        "user_attrs": best.user_attrs}, indent=2, default=str))
            mlflow.MlflowClient().log_artifact(parent, str(path))
    tracking.log_batch(parent, metrics=tracking.scalars(metrics), tags=tags)
    return counts


def _progress(total: int, study: optuna.Study, enabled: bool | None):
    """The sweep's progress over the study's budget, counting trials finished before."""
    done = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
    return progress_bar("sweep", total, "trial", initial=done, enabled=enabled)
