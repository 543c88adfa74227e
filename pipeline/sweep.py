"""The sweep stage: an Optuna study over classifier heads, every trial one MLflow run.

:func:`run_sweep` validates the sweep file and the features before it creates anything, opens
(or resumes) the study, and runs its queued trials with the chosen engine. Each trial is a
run nested under the sweep's parent run, with its config as params, per-epoch metrics
(step = epoch) and tags for the useful filters; the Optuna trial carries the run's id.

The reference engine trains one trial at a time (:func:`_run_trial`); an engine that trains
many at once (``engine: fused``) gets them in batches (:func:`_run_batches`), each trial still
recorded the same way. With a ``pruner``, every trial reports a metric per epoch and stops when
the pruner says so: PRUNED in Optuna, its run FINISHED with the tag ``pruned``.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
from optuna.trial import TrialState

from pipeline import naming, studies, tracking
from pipeline.config import Pruner, SweepSpec, TrialConfig, load_sweep
from pipeline.errors import UserError
from pipeline.features import FeatureSet, read_features, sha256_file
from pipeline.split import Split, make_split

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass(frozen=True)
class SweepOutcome:
    """What a finished sweep leaves: its parent run, study and trial counts."""

    parent_run_id: str
    experiment_id: str
    study_name: str
    counts: dict[str, int]


def resolve_features(features: str) -> Path:
    """A local path for ``features``: the path itself, or a ``runs:/`` artifact downloaded."""
    if features.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=features))
        except Exception as exc:  # MLflow raises several types for a missing run or artifact
            raise UserError(f"features '{features}': cannot be fetched "
                            f"({' '.join(str(exc).split())[:200]})") from None
    return Path(features)


class Objective:
    """Trains trials of one sweep on one features file, loaded once, splits cached by seed."""

    def __init__(self, spec: SweepSpec, features: FeatureSet, engine):
        self.spec, self.features, self.engine = spec, features, engine
        self._splits: dict[tuple, Split] = {}

    def split(self, config: TrialConfig) -> Split:
        """The train/validation split of ``config`` (shared by all trials of the same seed)."""
        key = (config.seed, config.validation_fraction, config.standardize)
        if key not in self._splits:
            self._splits[key] = make_split(self.features.x, self.features.y,
                                           config.validation_fraction, config.seed,
                                           config.standardize)
        return self._splits[key]


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
    parent = _open_parent(the_study, spec, experiment, launcher_run_id, storage,
                          features_sha, str(features_path), sweep)
    common_tags = {naming.STUDY: the_study.study_name, naming.FEATURES_SHA: features_sha,
                   naming.WEIGHTS: str(data.attrs.get("weights", "unknown")),
                   naming.STEP: "trial", naming.SWEEP_NAME: spec.name, **tracking.versions()}
    objective = Objective(spec, data, make_engine(spec.engine))
    with tracking.terminal_run(parent):
        bar = _progress(spec.budget(), the_study, progress)
        if getattr(objective.engine, "trains_many", False):
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
            naming.STORAGE: studies.study_url(storage, study.study_name),
            naming.FEATURES_SHA: features_sha, naming.NOTE: _description(spec),
            **tracking.versions()}
    if launcher and not nest:
        tags[naming.MAIN_RUN] = launcher
    parent = tracking.create_run(experiment, naming.parent_run_name(spec.name), nest, tags)
    if launcher and not nest:
        client.set_tag(launcher, "pipeline.sweep_run_id", parent)
    params = {"sweep": spec.name, "sampler": spec.sampler, "sampler_seed": spec.sampler_seed,
              "n_trials": spec.budget(), "seeds": list(spec.seeds), "engine": spec.engine,
              "objective": f"{spec.objective.direction} {spec.objective.metric}",
              "features": features_path, "study": study.study_name,
              **{f"fixed.{k}": v for k, v in spec.fixed.items()}}
    tracking.log_batch(parent, params=params)
    client.log_artifact(parent, sweep, "sweep")
    study.set_user_attr(studies.PARENT_ATTR, parent)
    return parent


def _description(spec: SweepSpec) -> str:
    return (f"{spec.description.strip()}\n\n"
            f"Each nested run is one trial: a head trained with the config in its name and "
            f"params. Compare `val_accuracy` with `positive_fraction` and `val_prob_loss` "
            f"(the loss of the actual probabilities) with `val_loss` (Keras's, from logits); "
            f"filter `tags.collapsed = 'true'` for heads whose prediction never varies.").strip()


def _run_trial(study: optuna.Study, trial: optuna.Trial, objective: Objective, experiment: str,
               parent: str, common_tags: dict) -> None:
    """Train one trial, record it in MLflow and tell Optuna; a failure fails only this trial."""
    config = _config(study, trial, objective.spec)
    if config is None:
        return
    run_id = _open_run(experiment, parent, _trial_tags(common_tags, trial, config, objective.engine),
                       config)
    trial.set_user_attr("mlflow_run_id", run_id)
    reporter = _Reporter(trial, objective.spec.pruner)
    try:
        outcome = objective.engine.train(config, objective.split(config), reporter)
    except KeyboardInterrupt:
        _interrupted(study, trial, run_id)
        raise
    except Exception as exc:
        outcome = exc
    record = _record(outcome, reporter, objective.spec)
    _write_run(run_id, record)
    _tell(study, trial, record)


BATCH_TRIALS = 256  # trials asked of Optuna at once for an engine that trains many


def _run_batches(study: optuna.Study, objective: Objective, experiment: str, parent: str,
                 common_tags: dict, bar) -> None:
    """Run the study's trials in batches, each trained at once by the engine's ``train_many``.

    Every trial is recorded as :func:`_run_trial` records it (its own MLflow run, same params,
    metrics and tags). The MLflow writes go to one background thread, in order, so they
    overlap the training; Optuna is told in this thread. A batch is every waiting trial up to
    :data:`BATCH_TRIALS`; with a pruner, the first batch is its ``n_startup_trials`` alone, so
    the later ones have completed trials to be compared with. A sampler learns between batches.
    """
    spec = objective.spec
    with ThreadPoolExecutor(1, thread_name_prefix="mlflow-writer") as writer:
        written = []
        while study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            batch, opened = [], []
            for trial, config in _ask_batch(study, spec, bar):  # runs open while Optuna answers
                objective.engine.prepare(config)
                batch.append((trial, config))
                opened.append(writer.submit(_open_run, experiment, parent,
                                            _trial_tags(common_tags, trial, config, objective.engine),
                                            config))
            if not batch:
                continue
            reporters = [_Reporter(trial, spec.pruner) for trial, _ in batch]
            try:
                outcomes = objective.engine.train_many([config for _, config in batch],
                                                       objective.features.x, objective.features.y,
                                                       reporters)
            except KeyboardInterrupt:
                for (trial, _), run in zip(batch, opened, strict=True):
                    _interrupted(study, trial, run.result())
                raise
            for (trial, _), run, reporter, outcome in zip(batch, opened, reporters, outcomes, strict=True):
                run_id = run.result()
                trial.set_user_attr("mlflow_run_id", run_id)
                record = _record(outcome, reporter, spec)
                written.append(writer.submit(_write_run, run_id, record))
                _tell(study, trial, record)
                bar.update(1)
        for write in written:
            write.result()  # raise what the writer met


def _ask_batch(study: optuna.Study, spec: SweepSpec, bar) -> Iterator[tuple[optuna.Trial, TrialConfig]]:
    """The next batch of trials and their configs, one by one (see :func:`_run_batches`).
    Trials whose params make no config are failed here."""
    size = BATCH_TRIALS
    if spec.pruner.type != "none":
        completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        size = max(spec.pruner.n_startup_trials - completed, 0) or size
    for _ in range(size):
        if (trial := studies.next_trial(study)) is None:
            return
        config = _config(study, trial, spec)
        if config is None:
            bar.update(1)
        else:
            yield trial, config


def _config(study: optuna.Study, trial: optuna.Trial, spec: SweepSpec) -> TrialConfig | None:
    """The trial's config from its params; a trial that has none is failed (no MLflow run)."""
    try:
        return spec.trial_config(studies.suggest(trial, spec))
    except Exception as exc:
        trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
        study.tell(trial, state=TrialState.FAIL)
        return None


def _trial_tags(common_tags: dict, trial: optuna.Trial, config: TrialConfig, engine) -> dict:
    """A trial run's tags: the sweep's, the trial number, the head's role and its engine."""
    role = naming.role_of(config)
    engine_name = engine.engine_for(config) if hasattr(engine, "engine_for") else engine.name
    return {**common_tags, naming.TRIAL_NUMBER: trial.number, "activation": config.activation,
            naming.ENGINE: engine_name, **({naming.ROLE: role} if role else {})}


def _open_run(experiment: str, parent: str, tags: dict, config: TrialConfig) -> str:
    """A trial's RUNNING MLflow run under ``parent``, with its config as params."""
    run_id = tracking.create_run(experiment, naming.trial_run_name(config), parent, tags)
    tracking.log_batch(run_id, params=config.params())
    return run_id


class _Reporter:
    """A trial's ``on_epoch`` callback: keeps the epochs' metrics; with a pruner, reports its
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
                raise optuna.TrialPruned(f"pruned after epoch {epoch}: {self.pruner.metric} {value:.6g}")


@dataclass(frozen=True)
class _Record:
    """What a trial's outcome leaves: its run's metrics, tags and error (the run ends FAILED
    with it, else FINISHED), and Optuna's state, value and user attributes."""

    metrics: list
    tags: dict
    error: Exception | None
    state: TrialState
    value: float | None
    attrs: dict


def _record(outcome, reporter: _Reporter, spec: SweepSpec) -> _Record:
    """The record of an engine's outcome: a TrialResult, TrialPruned, or the exception it raised."""
    if isinstance(outcome, optuna.TrialPruned):
        metrics = [m for name, values in reporter.history.items() for m in tracking.series(name, values)]
        return _Record(metrics, {naming.PRUNED: "true"}, None, TrialState.PRUNED, None,
                       {"pruned": str(outcome)})
    if isinstance(outcome, Exception):
        return _Record([], {}, outcome, TrialState.FAIL, None, {"fail_reason": _reason(outcome)})
    value = outcome.final(spec.objective.metric)
    metrics = [m for name, values in outcome.history.items() for m in tracking.series(name, values)]
    metrics += tracking.scalars({"positive_fraction": outcome.positive_fraction})
    tags = {naming.COLLAPSED: str(outcome.collapsed).lower()}
    if not math.isfinite(value):
        error = FloatingPointError(f"{spec.objective.metric} is {value}: training diverged")
        return _Record(metrics, tags, error, TrialState.FAIL, None, {"fail_reason": _reason(error)})
    return _Record(metrics, tags, None, TrialState.COMPLETE, value, {"collapsed": outcome.collapsed})


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:2000]


def _write_run(run_id: str, record: _Record) -> None:
    """Log a trial's record on its run and end the run: FINISHED, or FAILED with tag ``error``."""
    try:
        with tracking.terminal_run(run_id):
            tracking.log_batch(run_id, metrics=record.metrics, tags=record.tags)
            if record.error is not None:
                raise record.error
    except Exception as exc:
        if exc is not record.error:
            raise


def _tell(study: optuna.Study, trial: optuna.Trial, record: _Record) -> None:
    for name, value in record.attrs.items():
        trial.set_user_attr(name, value)
    if record.state == TrialState.COMPLETE:
        study.tell(trial, record.value)
    else:
        study.tell(trial, state=record.state)


def _interrupted(study: optuna.Study, trial: optuna.Trial, run_id: str) -> None:
    """Ctrl-C or SIGTERM during training: the run ends KILLED, the trial FAIL."""
    mlflow.MlflowClient().set_terminated(run_id, "KILLED")
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
    """A tqdm bar over the study's budget (quiet when stderr is not a terminal)."""
    from tqdm.auto import tqdm

    done = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
    disable = (not sys.stderr.isatty()) if enabled is None else not enabled
    return tqdm(total=total, initial=done, desc="sweep", unit="trial", disable=disable)
