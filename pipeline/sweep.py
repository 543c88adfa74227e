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

Several workers may share a study (``workers`` processes here, and any number of commands on
other machines): they take queued trials only (:mod:`pipeline.studies`), keep their trials'
heartbeats, and all record under the study's one parent run, which the last worker out ends.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import multiprocessing
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import optuna
from optuna.trial import TrialState

from pipeline import naming, parity, records, studies, tracking
from pipeline.config import ParityConfig, Pruner, SweepSpec, TrialConfig, load_sweep
from pipeline.errors import UserError
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
    counts: dict[str, int]  # complete, fail, pruned: together the study's budget once it is done
    retried: int = 0  # attempts lost with their worker (or interrupted) and queued again


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


def _freeze_imports() -> None:
    """Leave the objects that exist now, the imported libraries' (TensorFlow, MLflow: half a
    million), out of Python's cyclic garbage collection, once per process.

    A full collection walks every tracked object (a quarter of a second here), and MLflow's
    SQLAlchemy store makes short-lived objects fast enough to set off several during a sweep;
    with the libraries frozen, MLflow's Python time per trial run fell by a third
    (docs/benchmarks.md). Objects made later are collected as usual, and frozen ones are still
    freed when their last reference goes.
    """
    if not gc.get_freeze_count():
        gc.freeze()


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    """The Optuna pruner of a sweep file's ``pruner`` section."""
    if spec.pruner.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.pruner.n_startup_trials,
                                           n_warmup_steps=spec.pruner.n_warmup_steps)
    return optuna.pruners.NopPruner()


@dataclass(frozen=True)
class Job:
    """What a worker needs to run a study's trials; picklable, for worker processes."""

    features: str
    sweep: str
    n_trials: int | None
    storage: str | None
    study: str
    experiment: str
    parent: str
    tags: dict
    tracking_uri: str
    workers: int = 1  # this command's workers: a batch takes at most 1/workers of the queue


def run_sweep(features: str, sweep: str, n_trials: int | None = None, storage: str | None = None,
              study: str | None = None, launcher_run_id: str | None = None,
              progress: bool | None = None, workers: int = 1) -> SweepOutcome:
    """Run (or resume) the study a sweep file describes, on a features file or ``runs:/`` URI.

    ``workers`` processes of this machine take the study's trials side by side (this one and
    ``workers - 1`` started here); ``0`` only sets the study and its parent run up, for workers
    to be started elsewhere (its parent run is then SCHEDULED). Any number of such commands on
    any machines may share one study (same ``storage`` and ``study``); all trial runs nest under
    the one parent run, which the last worker out ends. ``launcher_run_id`` is the run this
    sweep was started under (``main``'s, or the one ``mlflow run`` opened): the parent run
    nests under it when both are in the study's experiment, and the two are linked by tags
    otherwise. Returns the parent run and the trial counts.
    """
    if workers < 0:
        raise UserError(f"workers {workers}: must be >= 0 (0 sets the study up and runs nothing)")
    spec = load_sweep(sweep, n_trials)
    features_path = resolve_features(features)
    engine = make_engine(spec.engine)
    _freeze_imports()
    _prepare_grid(engine, spec)
    with ThreadPoolExecutor(1, thread_name_prefix="sha256") as hasher:  # hashing frees Python's lock
        features_sha = hasher.submit(sha256_file, features_path)
        data = read_features(features_path)  # checked before anything is written
        features_sha = features_sha.result()
    tracking.install_sigterm_handler()

    def make_parent(the_study: optuna.Study) -> str:  # the experiment is made with its first run
        experiment = tracking.experiment_id(spec.experiment)
        tracking.describe_experiment(experiment, spec.description)
        return _create_parent(the_study, spec, experiment, launcher_run_id, storage,
                              features_sha, str(features_path), sweep)

    with tracking.deferred_interrupts():
        the_study = studies.open_study(spec, storage, study, features_sha, make_parent, _end_lost_run)
        parent, experiment = _reopen_parent(the_study, spec.experiment, make_parent, storage)
    the_study.pruner = make_pruner(spec)
    job = Job(str(features_path), sweep, n_trials, storage, the_study.study_name, experiment, parent,
              {naming.STUDY: the_study.study_name, naming.FEATURES_SHA: features_sha,
               naming.WEIGHTS: str(data.attrs.get("weights", "unknown")), naming.STEP: "trial",
               naming.SWEEP_NAME: spec.name, **tracking.versions()},
              mlflow.get_tracking_uri(), max(workers, 1))
    with _closing_parent(the_study, parent) as counts, _helpers(job, max(workers - 1, 0)):
        if workers:
            _work(the_study, Objective(spec, data, engine), job,
                  _progress(spec.budget(), the_study, progress))
    return SweepOutcome(parent, experiment, the_study.study_name,
                        {k: counts[k] for k in ("complete", "fail", "pruned")}, counts["retried"])


def _prepare_grid(engine, spec: SweepSpec) -> None:
    """Let an engine that prepares its work ahead (the fused one builds graphs per optimizer and
    dropout rate, about a second of Python) start on a ``heads`` grid's configs now, so that
    this overlaps reading the features and setting the study up."""
    if spec.kind == "heads" and spec.sampler == "grid" and hasattr(engine, "prepare"):
        for params in spec.grid()[:spec.budget()]:
            engine.prepare(spec.trial_config(params))


@contextlib.contextmanager
def _closing_parent(study: optuna.Study, parent: str):
    """Yield a dict that holds the trial counts once the block is done; on the way out log them
    on the parent run and end it (FINISHED, KILLED on an interrupt, FAILED on an error) unless
    other workers still run trials: the last worker out ends it. Finished with trials still
    queued (``workers 0``) it is SCHEDULED."""
    counts: dict[str, int] = {}
    status = "FINISHED"
    try:
        yield counts
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        with tracking.deferred_interrupts():
            counts.update(_summarise(study, parent))
            if not counts["running"]:
                client = mlflow.MlflowClient()
                if status == "FINISHED" and counts["waiting"]:
                    client.update_run(parent, status="SCHEDULED")
                else:
                    client.set_terminated(parent, status)


def _work(study: optuna.Study, objective: Objective, job: Job, bar) -> None:
    """Claim and run the study's trials until none is left, keeping their heartbeats: in
    batches for an engine that trains many (a ``heads`` sweep), then one by one (the rest, and
    trials other workers lost). An interrupt fails and re-queues the trials in hand (their
    MLflow runs KILLED) and propagates."""
    with studies.Heartbeats(study) as beats:
        if objective.spec.kind == "heads" and getattr(objective.engine, "trains_many", False):
            _run_batches(study, objective, job, bar, beats)
        while True:
            trial = None
            try:
                tracking.raise_swallowed_interrupt()
                with tracking.deferred_interrupts():
                    trial = studies.next_trial(study, _end_lost_run)
                    if trial is not None:
                        beats.add(trial)
                if trial is None:
                    break
                _run_trial(study, trial, objective, job)
            except KeyboardInterrupt:
                if trial is not None:
                    with tracking.deferred_interrupts():
                        studies.finish(study, trial, TrialState.FAIL, reason="interrupted", retry=True)
                raise
            finally:
                if trial is not None:
                    beats.discard(trial)
            _advance(bar, study)
    if bar is not None:
        bar.close()


@contextlib.contextmanager
def _helpers(job: Job, n: int):
    """Start ``n`` worker processes on ``job`` for the block; on the way out wait for them
    (after passing on an interrupt as SIGTERM) and report any that did not end cleanly."""
    context = multiprocessing.get_context("spawn")  # no forked TensorFlow or DB connections
    procs = [context.Process(target=_worker_main, args=(job,), name=f"sweep-worker-{i + 1}")
             for i in range(n)]
    for proc in procs:
        proc.start()
    try:
        yield
    except BaseException:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        raise
    finally:
        for proc in procs:
            proc.join()
            if proc.exitcode not in (0, 130):
                print(f"warning: worker process {proc.pid} ended with status {proc.exitcode}; "
                      f"its trial, if any, was queued again", file=sys.stderr)


def _worker_main(job: Job) -> None:
    """A worker process: load what :func:`run_sweep` set up and run trials (exit 130 when
    interrupted)."""
    from pipeline.quiet import quiet_tensorflow

    quiet_tensorflow()
    mlflow.set_tracking_uri(job.tracking_uri)
    tracking.install_sigterm_handler()
    try:
        spec = load_sweep(job.sweep, job.n_trials)
        data = read_features(job.features)
        storage = studies.make_storage(job.storage, _end_lost_run)
        the_study = studies.patiently(optuna.load_study, study_name=job.study, storage=storage,
                                      sampler=studies.make_sampler(spec), pruner=make_pruner(spec))
        engine = make_engine(spec.engine)
        _freeze_imports()
        with _closing_parent(the_study, job.parent):
            _work(the_study, Objective(spec, data, engine), job, None)
    except KeyboardInterrupt:
        sys.exit(130)


def _end_lost_run(trial: optuna.trial.FrozenTrial, reason: str) -> None:
    """A lost trial's MLflow run ends KILLED (see :func:`studies.make_storage`)."""
    tracking.end_lost_run(trial.user_attrs.get(studies.RUN_ATTR), reason)


def _reopen_parent(study: optuna.Study, experiment_name: str, make_parent,
                   storage: str | None) -> tuple[str, str]:
    """The study's parent run, set RUNNING again, and its experiment's id.

    If it is not in this tracking store's experiment ``experiment_name`` (the store or the
    sweep file's experiment has changed since the study was made), a study with no finished
    trial gets a new parent run (``make_parent``, which makes the experiment if need be); one
    with finished trials raises UserError, writing nothing, since their runs are where its
    parent is and a new parent would hold only the rest (e.g. ``mlflow.db`` deleted to start
    over while the Optuna journal beside it stayed: nothing would run and nothing be found).
    """
    client = mlflow.MlflowClient()
    parent = study.user_attrs.get(studies.PARENT_ATTR)
    try:
        run = client.get_run(parent)
    except mlflow.exceptions.MlflowException:
        run = None
    # looked up now, after the study was opened: another command may have just made both
    experiment = tracking.experiment_id(experiment_name, create=False)
    if run is not None and run.info.experiment_id == experiment:
        if run.info.lifecycle_stage == "deleted":  # as deleting its experiment leaves it
            tracking.experiment_id(experiment_name)  # restores the experiment and its runs
        if run.info.status != "RUNNING":
            client.update_run(parent, status="RUNNING")
        return parent, experiment
    counts = studies.tally(study)
    finished = counts["complete"] + counts["fail"] + counts["pruned"]
    if parent and finished:
        where = ("is not in this tracking store" if run is None
                 else f"is in experiment {run.info.experiment_id}, not in '{experiment_name}'")
        raise UserError(f"study {studies.study_url(storage, study.study_name)} has {finished} finished "
                        f"trials recorded under parent run {parent}, which {where} "
                        f"({mlflow.get_tracking_uri()}): use that store, or start afresh (another "
                        f"study name, or delete the study from its storage)")
    parent = make_parent(study)
    studies.patiently(study.set_user_attr, studies.PARENT_ATTR, parent)
    return parent, tracking.experiment_id(experiment_name, create=False)


def _create_parent(study: optuna.Study, spec: SweepSpec, experiment: str, launcher: str | None,
                   storage: str | None, features_sha: str, features_path: str, sweep: str) -> str:
    """A new parent run for the study: tags, params and the sweep file."""
    client = mlflow.MlflowClient()
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
    return parent


def _run_trial(study: optuna.Study, trial: optuna.Trial, objective: Objective, job: Job) -> None:
    """Train one trial, record it in MLflow and tell Optuna; a failure fails only this trial.

    Ctrl-C or SIGTERM ends the trial's run KILLED and propagates (the caller re-queues the
    trial); a trial taken for lost meanwhile (no heartbeat within the grace period) has its run
    KILLED too, since its retry carries the result.
    """
    spec = objective.spec
    try:
        config = spec.trial_config(studies.suggest(trial, spec))
    except Exception as exc:
        with tracking.deferred_interrupts():
            studies.finish(study, trial, TrialState.FAIL, reason=f"{type(exc).__name__}: {exc}")
        return
    run_id = None
    reporter = _Reporter(trial, spec.pruner)
    try:
        with tracking.deferred_interrupts():
            run_id = _open_run(job.experiment, job.parent, _trial_tags(job.tags, trial, objective, config),
                               config, objective.run_name(config), trial)
        with tracking.terminal_run(run_id):
            try:
                value = objective.train_and_log(config, run_id, job.experiment, job.tags, reporter)
            except optuna.TrialPruned:
                value = _log_pruned(run_id, reporter)
            except Exception:
                tracking.raise_swallowed_interrupt()  # the error may be an interrupt in disguise
                raise
            if value is not None:
                _check_finite(value, spec.objective_metric)
    except KeyboardInterrupt:
        with tracking.deferred_interrupts():
            tracking.end_lost_run(run_id, "interrupted")
        raise
    except Exception as exc:
        with tracking.deferred_interrupts():
            studies.finish(study, trial, TrialState.FAIL, reason=_reason(exc))
        return
    with tracking.deferred_interrupts():
        _tell(study, trial, value, run_id)


BATCH_TRIALS = 256  # trials asked of Optuna at once for an engine that trains many


def _run_batches(study: optuna.Study, objective: Objective, job: Job, bar,
                 beats: studies.Heartbeats) -> None:
    """Run a ``heads`` study's trials in batches, each trained at once by ``engine.train_many``.

    Every trial is recorded as :func:`_run_trial` records it: its own MLflow run with the same
    params, metrics and tags. The whole batch is claimed from Optuna first; then its runs are
    opened on one background thread while the batch trains (TensorFlow leaves Python's lock
    free, so the two overlap; claiming and opening at once would contend for it), and written
    and ended on the same thread, in order, once the batch is trained, each told to Optuna
    here as soon as it is written (the two overlap: a tell waits for its file's sync). A batch
    is the waiting trials up to :data:`BATCH_TRIALS` (and 1/``workers`` of them, see
    :func:`_ask_batch`); with a pruner, the first batch is its ``n_startup_trials`` alone, so
    that later ones have completed trials to be compared with. A sampler learns between
    batches. Ctrl-C or SIGTERM ends the batch's runs KILLED, fails its trials and queues them
    again.
    """
    spec = objective.spec
    with ThreadPoolExecutor(1, thread_name_prefix="mlflow-writer") as writer:
        while studies.patiently(study.get_trials, deepcopy=False, states=(TrialState.WAITING,)):
            batch, opened, written, told = [], [], [], 0
            try:
                for trial, config in _ask_batch(study, spec, bar, beats, job.workers):
                    objective.engine.prepare(config)
                    batch.append((trial, config))
                for trial, config in batch:  # the runs open while the batch trains
                    opened.append(writer.submit(_open_run, job.experiment, job.parent,
                                                _trial_tags(job.tags, trial, objective, config),
                                                config, objective.run_name(config), trial))
                reporters = [_Reporter(trial, spec.pruner) for trial, _ in batch]
                outcomes = objective.engine.train_many([config for _, config in batch],
                                                       objective.features.x, objective.features.y,
                                                       reporters)
                tracking.raise_swallowed_interrupt()  # the heads' errors may be an interrupt in disguise
                for (_, config), run, reporter, outcome in zip(batch, opened, reporters, outcomes,
                                                               strict=True):
                    with tracking.deferred_interrupts():  # between trials, not in a GC callback
                        run_id = run.result()
                        outcome = _write_step_losses(run_id, outcome)
                        written.append(writer.submit(_record_head, run_id, config, outcome, reporter,
                                                     objective.validation_labels(config),
                                                     spec.objective_metric))
                for (trial, _), run, write in zip(batch, opened, written, strict=True):
                    recorded = _recorded(write)
                    with tracking.deferred_interrupts():
                        _settle(study, trial, run.result(), recorded)
                        told += 1
                        beats.discard(trial)
                _advance(bar, study)
            except KeyboardInterrupt:
                with tracking.deferred_interrupts():
                    _abandon(study, writer, batch[told:], opened[told:], written[told:])
                raise


def _ask_batch(study: optuna.Study, spec: SweepSpec, bar, beats: studies.Heartbeats,
               workers: int) -> Iterator[tuple[optuna.Trial, TrialConfig]]:
    """The trials of the next batch with their configs, one by one (see :func:`_run_batches`).

    A batch takes at most 1/``workers`` of the waiting trials, so that the other workers of
    the command get their share. A trial whose params make no config is failed here (no MLflow
    run). A trial is claimed and handed over with interrupts held, so an interrupt finds it in
    the batch.
    """
    waiting = len(studies.patiently(study.get_trials, deepcopy=False, states=(TrialState.WAITING,)))
    size = min(BATCH_TRIALS, -(-waiting // workers))
    if spec.pruner.type != "none":
        completed = len(studies.patiently(study.get_trials, deepcopy=False,
                                          states=(TrialState.COMPLETE,)))
        size = min(max(spec.pruner.n_startup_trials - completed, 0) or size, size)
    for _ in range(size):
        with tracking.deferred_interrupts():
            if (trial := studies.next_trial(study, _end_lost_run, wait=False)) is None:
                return
            beats.add(trial)
            try:
                config = spec.trial_config(studies.suggest(trial, spec))
            except Exception as exc:
                studies.finish(study, trial, TrialState.FAIL, reason=f"{type(exc).__name__}: {exc}")
                beats.discard(trial)
                _advance(bar, study)
                continue
            yield trial, config


def _trial_tags(common_tags: dict, trial: optuna.Trial, objective: Objective, config) -> dict:
    """A trial run's tags at creation: the sweep's, the trial number, its description, the
    config's own and the engine that trains it."""
    engine = objective.engine
    per_config = hasattr(engine, "engine_for") and isinstance(config, TrialConfig)
    name = engine.engine_for(config) if per_config else engine.name
    return {**common_tags, naming.TRIAL_NUMBER: trial.number, naming.ENGINE: name,
            naming.NOTE: naming.trial_description(config, trial.number, objective.spec.name),
            **objective.tags(config)}


def _open_run(experiment: str, parent: str, tags: dict, config, run_name: str,
              trial: optuna.Trial) -> str:
    """A trial's RUNNING MLflow run under ``parent``, with its config as params; the trial
    records the run's id at once (so a worker that takes it for lost can end the run)."""
    run_id = tracking.create_run(experiment, run_name, parent, tags)
    studies.patiently(trial.set_user_attr, studies.RUN_ATTR, run_id)
    tracking.log_batch(run_id, params=config.params())
    return run_id


def _write_step_losses(run_id: str, outcome):
    """Write a trained head's ``step_loss.csv`` on its run, on this thread, before its record is
    handed to the writer: this thread is idle then, and its Python runs while the writer waits
    for the database's syncs. Returns ``outcome``, or the error that kept the file from being
    written (which then fails the trial, as a failure to record does)."""
    if isinstance(outcome, Exception):
        return outcome
    try:
        records.log_step_losses(run_id, outcome)
    except Exception as exc:
        return exc
    return outcome


def _record_head(run_id: str, config: TrialConfig, outcome, reporter: _Reporter, y_val: np.ndarray,
                 metric: str) -> float | None:
    """Record a head's outcome (TrialResult, TrialPruned or the exception that ended it) on its
    run as :func:`_run_trial` does (its ``step_loss.csv`` is already written, see
    :func:`_write_step_losses`), and end the run. Returns the objective's value, None for a
    pruned head; a failure is raised after the run ends FAILED with it as tag ``error``."""
    with tracking.terminal_run(run_id):
        if isinstance(outcome, optuna.TrialPruned):
            return _log_pruned(run_id, reporter)
        if isinstance(outcome, Exception):
            raise outcome
        records.log_head_metrics(run_id, outcome, y_val, config)
        return _check_finite(outcome.final(metric), metric)


def _check_finite(value: float, metric: str) -> float:
    """``value`` of the objective's ``metric``; FloatingPointError (a failed trial) if not finite."""
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


def _tell(study: optuna.Study, trial: optuna.Trial, value: float | None, run_id: str) -> None:
    """Tell Optuna a trial's value, or that it was pruned (value None). A trial that was taken
    for lost meanwhile keeps its FAIL, and its run ends KILLED: its retry carries the result."""
    state = TrialState.PRUNED if value is None else TrialState.COMPLETE
    if not studies.finish(study, trial, state, value):
        tracking.end_lost_run(run_id, "its worker was taken for lost before it reported")


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:2000]


def _recorded(write: Future) -> float | None | Exception:
    """What a batch trial's record came to (:func:`_record_head`, on the writer): the objective's
    value, None when pruned, or the exception that failed it."""
    try:
        return write.result()
    except Exception as exc:
        return exc


def _settle(study: optuna.Study, trial: optuna.Trial, run_id: str, recorded) -> None:
    """Tell Optuna how a recorded batch trial ended (see :func:`_recorded`)."""
    if isinstance(recorded, Exception):
        studies.finish(study, trial, TrialState.FAIL, reason=_reason(recorded))
    else:
        _tell(study, trial, recorded, run_id)


def _abandon(study: optuna.Study, writer: ThreadPoolExecutor, batch: list, opened: list,
             written: list) -> None:
    """Ctrl-C or SIGTERM in a batch: every trial not yet told ends. A record already being
    written is finished and told; the others' runs (those opened) end KILLED and their trials
    FAIL and are queued again."""
    for i, (trial, _) in enumerate(batch):
        run_id = opened[i].result() if i < len(opened) else None
        if i < len(written) and not written[i].cancel():
            _settle(study, trial, run_id, _recorded(written[i]))
            continue
        if run_id is not None:
            writer.submit(tracking.end_lost_run, run_id, "interrupted").result()
        studies.finish(study, trial, TrialState.FAIL, reason="interrupted", retry=True)


def _summarise(study: optuna.Study, parent: str) -> dict[str, int]:
    """Log trial counts and the best trial on the parent run; return the counts."""
    counts = studies.tally(study)
    tags = {}
    metrics = {f"trials.{k}": v for k, v in counts.items()}
    if counts["complete"]:
        best = studies.patiently(lambda: study.best_trial)
        metrics["best.value"] = best.value
        tags = {"best.trial_number": best.number,
                "best.run_id": best.user_attrs.get(studies.RUN_ATTR, ""),
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
    return progress_bar("sweep", total, "trial", initial=_done(study), enabled=enabled)


def _advance(bar, study: optuna.Study) -> None:
    """Bring ``bar`` to the trials finished so far, by every worker."""
    if bar is not None:
        bar.update(_done(study) - bar.n)


def _done(study: optuna.Study) -> int:
    counts = studies.tally(study)
    return counts["complete"] + counts["fail"] + counts["pruned"]
