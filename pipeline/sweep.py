"""The sweep stage: an Optuna study over classifier heads, every trial one MLflow run.

:func:`run_sweep` validates the sweep file and the features before it creates anything, opens
(or resumes) the study, and runs its queued trials with the chosen engine. Each trial is a
run nested under the sweep's parent run, with its config as params, per-epoch metrics
(step = epoch) and tags for the useful filters; the Optuna trial carries the run's id.

The reference engine trains one trial at a time (:func:`_run_trial`); an engine that trains
many at once (``engine: fused``) gets a ``heads`` sweep's trials in batches
(:func:`_run_batches`), each trial recorded the same way. With a ``pruner``, every head
reports a metric per epoch and stops when the pruner says so: PRUNED in Optuna, its run
FINISHED with the tag ``pruned`` and the epochs it trained.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import optuna
from optuna.trial import TrialState

from pipeline import naming, parity, records, studies, tracking
from pipeline.config import ParityConfig, Pruner, SweepSpec, TrialConfig, load_sweep
from pipeline.features import FeatureSet, read_features, resolve_features, sha256_file
from pipeline.progress import progress_bar
from pipeline.split import Split, make_split, stratified_split

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
        self._labels: dict[tuple, np.ndarray] = {}

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
                      tags: dict[str, str], on_epoch=None) -> float:
        """Train ``config``, record the results on ``run_id``, return the objective's value.

        ``on_epoch`` gets a head's metrics after each epoch (and may stop it by raising)."""
        split = self.split(config)
        metric = self.spec.objective_metric
        if isinstance(config, ParityConfig):
            result = parity.train_parity(config, split, self.engine)
            return parity.log_parity(run_id, experiment, result, split, tags)[metric]
        result = self.engine.train(config, split, on_epoch)
        records.log_head(run_id, result, split.y_val, config)
        return result.final(metric)

    def validation_labels(self, config: TrialConfig) -> np.ndarray:
        """The validation labels of ``config``'s split, without splitting the features."""
        key = (config.seed, config.validation_fraction)
        if key not in self._labels:
            _, val = stratified_split(self.features.y, config.validation_fraction, config.seed)
            self._labels[key] = self.features.y[val]
        return self._labels[key]


def make_engine(name: str):
    """The trainer named in a sweep file: ``fused`` (many heads per pass) or ``keras`` (the
    reference, one ``model.fit`` per trial)."""
    from pipeline.engine_fused import FusedEngine
    from pipeline.engine_keras import KerasEngine

    engines = {"fused": FusedEngine, "keras": KerasEngine}
    return engines[name]()


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    """The Optuna pruner of a sweep file's ``pruner`` section."""
    if spec.pruner.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.pruner.n_startup_trials,
                                           n_warmup_steps=spec.pruner.n_warmup_steps)
    return optuna.pruners.NopPruner()


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
    the_study.pruner = make_pruner(spec)
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
        if spec.kind == "heads" and getattr(objective.engine, "trains_many", False):
            _run_batches(the_study, objective, experiment, parent, common_tags, bar)
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
    run_id = _open_run(experiment, parent, _trial_tags(common_tags, trial, objective, config), config,
                       objective.run_name(config))
    trial.set_user_attr("mlflow_run_id", run_id)
    reporter = _Reporter(trial, spec.pruner)
    try:
        with tracking.terminal_run(run_id):
            try:
                value = objective.train_and_log(config, run_id, experiment, common_tags, reporter)
            except optuna.TrialPruned:
                value = _log_pruned(run_id, reporter)
            if value is not None and not math.isfinite(value):
                raise FloatingPointError(f"{spec.objective_metric} is {value}: training diverged")
    except KeyboardInterrupt:
        trial.set_user_attr("fail_reason", "interrupted")
        study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as exc:
        trial.set_user_attr("fail_reason", _reason(exc))
        study.tell(trial, state=TrialState.FAIL)
        return
    _tell(study, trial, value)


BATCH_TRIALS = 256  # trials asked of Optuna at once for an engine that trains many


def _run_batches(study: optuna.Study, objective: Objective, experiment: str, parent: str,
                 common_tags: dict, bar) -> None:
    """Run a ``heads`` study's trials in batches, each trained at once by ``engine.train_many``.

    Every trial is recorded as :func:`_run_trial` records it: its own MLflow run with the same
    params, metrics and tags. The MLflow writes go to one background thread, in order, so they
    overlap Optuna's bookkeeping and the training; Optuna is told here as each record is
    written. A batch is every waiting trial up to :data:`BATCH_TRIALS`; with a pruner, the
    first batch is its ``n_startup_trials`` alone, so that later ones have completed trials to
    be compared with. A sampler learns between batches. Ctrl-C ends the batch's runs KILLED and
    fails its trials.
    """
    spec = objective.spec
    with ThreadPoolExecutor(1, thread_name_prefix="mlflow-writer") as writer:
        while study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            batch, opened = [], []
            for trial, config in _ask_batch(study, spec, bar):  # runs open while Optuna answers
                objective.engine.prepare(config)
                batch.append((trial, config))
                opened.append(writer.submit(_open_run, experiment, parent,
                                            _trial_tags(common_tags, trial, objective, config), config,
                                            objective.run_name(config)))
            reporters = [_Reporter(trial, spec.pruner) for trial, _ in batch]
            written, told = [], 0
            try:
                outcomes = objective.engine.train_many([config for _, config in batch],
                                                       objective.features.x, objective.features.y,
                                                       reporters)
                for (_, config), run, reporter, outcome in zip(batch, opened, reporters, outcomes,
                                                               strict=True):
                    written.append(writer.submit(_record_head, run.result(), outcome, reporter,
                                                 objective.validation_labels(config), config,
                                                 spec.objective_metric))
                for (trial, _), run, write in zip(batch, opened, written, strict=True):
                    trial.set_user_attr("mlflow_run_id", run.result())
                    _tell_written(study, trial, write)
                    told += 1
                    bar.update(1)
            except KeyboardInterrupt:
                _abandon(study, writer, batch[told:], opened[told:], written[told:])
                raise


def _ask_batch(study: optuna.Study, spec: SweepSpec, bar) -> Iterator[tuple[optuna.Trial, TrialConfig]]:
    """The trials of the next batch with their configs, one by one (see :func:`_run_batches`).
    A trial whose params make no config is failed here (no MLflow run)."""
    size = BATCH_TRIALS
    if spec.pruner.type != "none":
        completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        size = max(spec.pruner.n_startup_trials - completed, 0) or size
    for _ in range(size):
        if (trial := studies.next_trial(study)) is None:
            return
        try:
            config = spec.trial_config(studies.suggest(trial, spec))
        except Exception as exc:
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
            study.tell(trial, state=TrialState.FAIL)
            bar.update(1)
            continue
        yield trial, config


def _trial_tags(common_tags: dict, trial: optuna.Trial, objective: Objective, config) -> dict:
    """A trial run's tags at creation: the sweep's, the trial number, the config's own and the
    engine that trains it."""
    engine = objective.engine
    per_config = hasattr(engine, "engine_for") and isinstance(config, TrialConfig)
    name = engine.engine_for(config) if per_config else engine.name
    return {**common_tags, naming.TRIAL_NUMBER: trial.number, naming.ENGINE: name,
            **objective.tags(config)}


def _open_run(experiment: str, parent: str, tags: dict, config, run_name: str) -> str:
    """A trial's RUNNING MLflow run under ``parent``, with its config as params."""
    run_id = tracking.create_run(experiment, run_name, parent, tags)
    tracking.log_batch(run_id, params=config.params())
    return run_id


def _record_head(run_id: str, outcome, reporter: _Reporter, y_val: np.ndarray, config: TrialConfig,
                 metric: str) -> float | None:
    """Record a head's outcome (TrialResult, TrialPruned or the exception that ended it) on its
    run as :func:`_run_trial` does, and end the run. Returns the objective's value, None for a
    pruned head; a failure is raised after the run ends FAILED with it as tag ``error``."""
    with tracking.terminal_run(run_id):
        if isinstance(outcome, optuna.TrialPruned):
            return _log_pruned(run_id, reporter)
        if isinstance(outcome, Exception):
            raise outcome
        records.log_head(run_id, outcome, y_val, config)
        value = outcome.final(metric)
        if not math.isfinite(value):
            raise FloatingPointError(f"{metric} is {value}: training diverged")
        return value


class _Reporter:
    """A head's ``on_epoch`` callback: keeps the epochs' metrics; with a pruner, reports its
    metric to Optuna and raises ``optuna.TrialPruned`` when the pruner says stop."""

    def __init__(self, trial: optuna.Trial, pruner: Pruner):
        self.trial, self.pruner = trial, pruner
        self.history: dict[str, list[float]] = {}

    def __call__(self, epoch: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.history.setdefault(name, []).append(value)
        if self.pruner.type != "none":
            value = values[self.pruner.metric]
            self.trial.report(value, epoch)
            if self.trial.should_prune():
                self.trial.set_user_attr("pruned", f"after epoch {epoch}: {self.pruner.metric} {value:.6g}")
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")


def _log_pruned(run_id: str, reporter: _Reporter) -> None:
    """A pruned head's record: the epochs it trained and the tag ``pruned``."""
    points = [m for name, values in reporter.history.items() for m in tracking.series(name, values)]
    tracking.log_batch(run_id, metrics=points, tags={naming.PRUNED: "true"})


def _tell(study: optuna.Study, trial: optuna.Trial, value: float | None) -> None:
    """Tell Optuna a trial's value, or that it was pruned (value None)."""
    if value is None:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, value)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:2000]


def _tell_written(study: optuna.Study, trial: optuna.Trial, write) -> None:
    """Tell Optuna the outcome of a trial once its record is written (a failure fails it)."""
    try:
        value = write.result()
    except Exception as exc:
        trial.set_user_attr("fail_reason", _reason(exc))
        study.tell(trial, state=TrialState.FAIL)
    else:
        _tell(study, trial, value)


def _abandon(study: optuna.Study, writer: ThreadPoolExecutor, batch: list, opened: list,
             written: list) -> None:
    """Ctrl-C or SIGTERM in a batch: every trial not yet told ends. A record already being
    written is finished and told; the others' runs end KILLED and their trials FAIL."""
    for i, ((trial, _), run) in enumerate(zip(batch, opened, strict=True)):
        run_id = run.result()
        trial.set_user_attr("mlflow_run_id", run_id)
        if i < len(written) and not written[i].cancel():
            _tell_written(study, trial, written[i])
            continue
        writer.submit(mlflow.MlflowClient().set_terminated, run_id, "KILLED").result()
        trial.set_user_attr("fail_reason", "interrupted")
        study.tell(trial, state=TrialState.FAIL)


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
