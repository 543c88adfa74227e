"""The trial path: claim a batch, train it, record it, tell Optuna; until the study's queue is empty.

Every worker of every sweep runs :func:`work`, whatever the engine or the kind of trial: a
batch is as many trials as the engine takes at once (256 for the fused engine, 1 for the Keras
reference; 1 for parity trials, and for a TPE study, whose sampler draws each trial from those
before it), so a serial run is a batch of one. In a batch:

1. the trials are claimed from Optuna (:func:`pipeline.studies.claim`), each a
   :class:`~pipeline.trial.TrialLife`;
2. their runs open on the writer thread while the batch trains here (the engines' arithmetic
   leaves Python's lock free, so the two overlap), and then the writer does ahead what logging
   the best trial will need (:meth:`~pipeline.kinds.TrialKind.prepare_best`);
3. each trained trial's files are written here, its metrics recorded and its run ended on the
   writer thread, in order, and each is told to Optuna here as soon as it is recorded; with a
   pruner, a batch of several trials is judged here first, trial by trial, each once the
   trials before it are told (:class:`~pipeline.trial.Reporter`).

Ctrl-C or SIGTERM ends every trial of the batch not yet told: a record already being written
is finished and told; the others' runs end KILLED and their trials FAIL and are queued again.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import optuna
from mlflow.entities import Dataset
from optuna.trial import TrialState

from pipeline import atlas, studies, tracking
from pipeline.engines import Engine
from pipeline.heartbeats import Heartbeats
from pipeline.kinds import Recording, TrialKind
from pipeline.split import Splits
from pipeline.storages import patiently
from pipeline.sweep_file import SweepSpec
from pipeline.trial import TrialLife


@dataclass(frozen=True)
class Job:
    """What a worker needs to run a study's trials; picklable, for worker processes."""

    source: str  # the features as the user named them (a path or a runs:/ URI)
    features: str  # ... as a local path
    sweep: str
    n_trials: int | None
    storage: str
    study: str
    experiment: str
    parent: str
    tags: dict
    tracking_uri: str
    workers: int = 1  # this command's workers: a batch takes at most 1/workers of the queue
    register_model: str | None = None  # the Model Registry name of the best head, if any


@dataclass(frozen=True)
class Worker:
    """One process's share of a sweep: its job, the study, and what trains and records trials."""

    job: Job
    study: optuna.Study
    spec: SweepSpec
    kind: TrialKind
    engine: Engine
    splits: Splits
    dataset: Dataset  # the features file as an MLflow dataset (pipeline.lineage)

    def finishing(self) -> list[tuple[str, Callable[[optuna.trial.FrozenTrial], None]]]:
        """What the worker that ends a finished study does, step by step (each step's failure is
        its own warning, :func:`pipeline.parent.closing`): an atlas study's trial runs get their
        cells' verdicts (:func:`pipeline.atlas.tag_verdicts`, which need every trial); the best
        trial is logged as the parent run's model (:meth:`TrialKind.log_best`)."""
        steps = []
        if self.spec.report == "atlas":
            steps.append(("atlas verdicts", lambda best: atlas.tag_verdicts(self.job.parent)))
        steps.append(("best trial's model", lambda best: self.kind.log_best(
            self.job.parent, best, self.splits, self.job.register_model)))
        return steps

    def recording(self, life: TrialLife) -> Recording:
        return Recording(life.run_id, self.job.experiment, self.job.tags, self.splits,
                         self.spec.objective_metric)


def freeze_imports() -> None:
    """Leave the objects that exist now, the imported libraries' (TensorFlow, MLflow: half a
    million), out of Python's cyclic garbage collection, once per process: a full collection
    walks every tracked object, and MLflow's SQLAlchemy store makes short-lived objects fast
    enough to set several off per sweep. Objects made later are collected as usual, and frozen
    ones are still freed when their last reference goes."""
    if not gc.get_freeze_count():
        gc.freeze()


def end_lost_run(trial: optuna.trial.FrozenTrial, reason: str) -> None:
    """A lost trial's MLflow run ends KILLED (the ``on_lost`` of :mod:`pipeline.studies`)."""
    tracking.end_lost_run(trial.user_attrs.get(studies.RUN_ATTR), reason)


def work(worker: Worker, bar=None) -> None:
    """Run the study's trials batch by batch until none is left, keeping their heartbeats."""
    with Heartbeats(worker.study) as beats, \
            ThreadPoolExecutor(1, thread_name_prefix="mlflow-writer") as writer:
        while True:
            tracking.raise_swallowed_interrupt()
            with tracking.deferred_interrupts():
                trials = studies.claim(worker.study, _batch_size(worker), end_lost_run)
                batch = [TrialLife(worker.study, trial, worker.spec, worker.kind, len(trials) == 1)
                         for trial in trials]
                for life in batch:
                    beats.add(life.trial)
            if not batch:
                break
            _run_batch(worker, batch, writer, beats)
            _advance(bar, worker.study)
    if bar is not None:
        bar.close()


def _batch_size(worker: Worker) -> int:
    """Trials to claim next: as many as the engine (or the kind) trains at once, at most
    1/``workers`` of the waiting ones (the command's other workers get their share); one when
    the sampler draws from the trials told before (:func:`pipeline.studies.draws_from_results`)."""
    if studies.draws_from_results(worker.spec):
        return 1
    size = worker.kind.batch_trials or worker.engine.batch_trials
    if worker.job.workers > 1:
        waiting = patiently(worker.study.get_trials, deepcopy=False, states=(TrialState.WAITING,))
        size = min(size, max(1, -(-len(waiting) // worker.job.workers)))
    return size


def _run_batch(worker: Worker, batch: list[TrialLife], writer: ThreadPoolExecutor,
               beats: Heartbeats) -> None:
    """Train, record and tell one claimed batch (see the module docstring)."""
    job = worker.job
    opened = [writer.submit(life.open, job.experiment, job.parent, job.tags, worker.engine, worker.dataset)
              for life in batch]
    prepared = writer.submit(worker.kind.prepare_best)  # not waited on: a failure leaves it to log_best
    written: list[Future] = []
    try:
        trainable = [life for life in batch if life.config is not None]
        outcomes = dict(zip(map(id, trainable), worker.kind.train(
            worker.engine, [life.config for life in trainable], worker.splits,
            [life.reporter for life in trainable]), strict=True))
        tracking.raise_swallowed_interrupt()  # a head's error may be an interrupt in disguise
        for life, run in zip(batch, opened, strict=True):
            if life.reporter.judges_after:
                _tell(batch, written, beats)  # the pruner meets every trial before it
            with tracking.deferred_interrupts():  # between trials, not in a GC callback
                run.result()
                outcome = life.reporter.judged(outcomes.get(id(life), life.error))
                outcome = life.write_files(outcome)
                written.append(writer.submit(life.record, outcome, worker.recording(life)))
        _tell(batch, written, beats)
    except BaseException as error:  # an interrupt, or an error of the sweep's own: no trial stays RUNNING
        prepared.cancel()  # the trials' ends come first
        told = sum(life.told for life in batch)  # a prefix: trials are told in order
        with tracking.deferred_interrupts():
            _abandon(writer, batch[told:], opened[told:], written[told:], error)
        raise


def _tell(batch: list[TrialLife], written: list[Future], beats: Heartbeats) -> None:
    """Tell Optuna, in order, how each trial of ``batch`` whose record was submitted
    (``written``) and that is not told yet ended, once its record is written."""
    for life, write in zip(batch[:len(written)], written, strict=True):
        if not life.told:
            recorded = write.result()
            with tracking.deferred_interrupts():
                life.tell(recorded)
                beats.discard(life.trial)


def _abandon(writer: ThreadPoolExecutor, batch: list[TrialLife], opened: list[Future],
             written: list[Future], error: BaseException) -> None:
    """End the trials of a batch that ``error`` cut short: a record already being written is
    finished and told; the others end as :meth:`TrialLife.abandon` ends them. Every waiting
    record is cancelled first, so that the writer thread starts none of them while the one
    under way finishes. The runs' opens, queued before the records, stay queued: the writer
    reaches them while the first trials are ended, and an attempt with a run ends it KILLED."""
    not_written = [write.cancel() for write in written]
    for i, life in enumerate(batch):
        if not opened[i].cancel():
            opened[i].result()
        if i < len(written) and not not_written[i]:
            life.tell(written[i].result())
            continue
        writer.submit(life.abandon, error).result()


def _advance(bar, study: optuna.Study) -> None:
    """Bring ``bar`` to the trials finished so far, by every worker."""
    if bar is not None:
        bar.update(done(study) - bar.n)


def done(study: optuna.Study) -> int:
    """Trials of the study's budget that have finished, by every worker."""
    return studies.finished(studies.tally(study))
