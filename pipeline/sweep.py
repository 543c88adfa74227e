"""The sweep stage: an Optuna study over classifier heads, every trial one MLflow run.

:func:`run_sweep` checks the sweep file and the features before it writes anything (a split
that cannot be made is bad input too), opens (or resumes) the study and its parent run
(:mod:`pipeline.parent`), and runs the study's queued trials on the one trial path
(:mod:`pipeline.runner`), in this process and in ``workers - 1`` more (:mod:`pipeline.workers`).
Each trial is a run nested under the sweep's parent run, with its config as params, per-epoch
metrics (step = epoch) and tags for the useful filters; the Optuna trial carries the run's id.
With a ``pruner``, every head reports a metric per epoch and the pruner may stop it there
(:class:`pipeline.trial.Reporter`): PRUNED in Optuna, its run FINISHED with the tag ``pruned``
and the epochs up to that one.

Several workers may share a study (``workers`` processes here, and any number of commands on
other machines): they take queued trials only (:mod:`pipeline.studies`), keep their trials'
heartbeats, and all record under the study's one parent run, which the last worker out ends.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import mlflow
import numpy as np
import optuna

from pipeline import lineage, naming, parent, runner, studies, tracking
from pipeline.engines import make_engine
from pipeline.errors import UserError
from pipeline.features import FeatureSet, read_features, resolve_features, sha256_file
from pipeline.kinds import kind_of
from pipeline.progress import progress_bar
from pipeline.split import Splits
from pipeline.sweep_file import SweepSpec, load_sweep, sweep_path
from pipeline.workers import started_workers

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass(frozen=True)
class SweepOutcome:
    """What a finished sweep leaves: its parent run, study and trial counts."""

    parent_run_id: str
    experiment_id: str
    study_name: str
    counts: dict[str, int]  # complete, fail, pruned: together the study's budget once it is done
    retried: int = 0  # attempts lost with their worker (or interrupted) and queued again

    def line(self) -> str:
        """The line that says how the sweep ended: ``sweep: study 'default-3f9a02c1' {'complete':
        12, 'fail': 0, 'pruned': 0}; parent run <id>``."""
        retried = f" ({self.retried} lost attempts re-run)" if self.retried else ""
        return f"sweep: study '{self.study_name}' {self.counts}{retried}; parent run {self.parent_run_id}"


def run_sweep(features: str, sweep: str, n_trials: int | None = None, storage: str | None = None,
              study: str | None = None, launcher_run_id: str | None = None,
              progress: bool | None = None, workers: int = 1,
              register_model: str | None = None) -> SweepOutcome:
    """Run (or resume) the study a sweep file describes, on a features file or ``runs:/`` URI.

    ``workers`` processes of this machine take the study's trials side by side (this one and
    ``workers - 1`` started here); ``0`` only sets the study and its parent run up, for workers
    to be started elsewhere (its parent run is then SCHEDULED). Any number of such commands on
    any machines may share one study (same ``storage`` and ``study``; without ``study``, the
    default name, :func:`pipeline.studies.default_study_name`, holds only for the same
    features file and version of the project); all trial runs nest under
    the one parent run, which the last worker out ends. ``storage`` defaults to a journal file
    beside the MLflow store. ``launcher_run_id`` is the run this sweep was started under
    (``main``'s, or the one ``mlflow run`` opened): the parent run nests under it when both are
    in the study's experiment, and the two are linked by tags otherwise. Once every trial has
    finished, a heads sweep's parent run logs the best trial's head as the MLflow model
    ``best_head`` (:mod:`pipeline.best_head`), registered as ``register_model`` if given.
    Returns the parent run and the trial counts.
    """
    _check_arguments(workers, study, register_model)
    sweep = str(sweep_path(sweep))
    spec = load_sweep(sweep, n_trials)
    features_path = resolve_features(features)
    data, features_sha = _read_checked(features_path, spec)
    launcher = tracking.launcher_run(launcher_run_id) if launcher_run_id else None
    engine = make_engine(spec.engine)
    runner.freeze_imports()
    tracking.install_sigterm_handler()
    dataset = lineage.features_dataset(features, features_sha, data.x.shape, data.class_names,
                                       float(data.y.mean()))
    origin = parent.Origin(spec, sweep, features, features_sha, dataset,
                           storage or tracking.default_study_storage(), launcher)
    with contextlib.ExitStack() as stack:
        # An interrupt held while the study and its parent run are set up is raised once the
        # parent run's closing is entered, which ends the run KILLED.
        with tracking.deferred_interrupts():
            the_study, setup = studies.open_study(spec, origin.storage, study, features_sha,
                                                  runner.end_lost_run)
            parent_run, experiment = parent.attach(the_study, origin, setup)
            job = runner.Job(features, str(features_path), sweep, n_trials, origin.storage,
                             the_study.study_name, experiment, parent_run,
                             _trial_tags(the_study, origin, data), mlflow.get_tracking_uri(),
                             max(workers, 1), register_model)
            worker = runner.Worker(job, the_study, spec, kind_of(spec), engine, Splits(data.x, data.y),
                                   dataset)
            counts = stack.enter_context(parent.closing(the_study, parent_run, worker.finishing()))
        stack.enter_context(started_workers(job, max(workers - 1, 0)))
        if workers:
            runner.work(worker, _progress(the_study, progress))
    return SweepOutcome(parent_run, experiment, the_study.study_name,
                        {k: counts[k] for k in ("complete", "fail", "pruned")}, counts["retried"])


def _check_arguments(workers: int, study: str | None, register_model: str | None) -> None:
    """Raise :class:`UserError` for a worker count, study name or model name that cannot be."""
    if workers < 0:
        raise UserError(f"workers {workers}: must be >= 0 (0 sets the study up and runs nothing)")
    if study is not None and (problem := naming.study_name_problem(study)):
        raise UserError(f"study {study!r}: {problem}; choose another name")
    if register_model is not None and (problem := naming.model_name_problem(register_model)):
        raise UserError(f"register_model {register_model!r}: {problem}; choose another name")


def _read_checked(path, spec: SweepSpec) -> tuple[FeatureSet, str]:
    """The features and their sha256 (hashed on a thread while they are read: hashing frees
    Python's lock), once every split the study's trials will ask for is known to exist."""
    with ThreadPoolExecutor(1, thread_name_prefix="sha256") as hasher:
        sha = hasher.submit(sha256_file, path)
        data = read_features(path)
        check_splits(data.y, [spec])
        return data, sha.result()


def check_splits(labels: np.ndarray, specs: list[SweepSpec]) -> None:
    """Raise :class:`UserError` unless every split the trials of ``specs`` ask for (each
    validation fraction and seed) can be made of examples of ``labels``: a split is made of
    the labels alone."""
    splits = Splits(np.empty((len(labels), 0), np.float32), labels)
    for spec in specs:
        splits.check(spec.values("validation_fraction"), spec.seeds)


def _trial_tags(the_study: optuna.Study, origin: parent.Origin, data: FeatureSet) -> dict:
    """Tags every trial run of the sweep gets."""
    return {naming.STUDY: the_study.study_name, naming.FEATURES_SHA: origin.features_sha,
            naming.WEIGHTS: str(data.attrs.get("weights", "unknown")), naming.STEP: "trial",
            naming.SWEEP_NAME: origin.spec.name, **tracking.versions()}


def _progress(the_study: optuna.Study, enabled: bool | None):
    """The sweep's progress over the study's budget (which a smaller ``n_trials`` than a
    resumed study's does not shrink), counting trials finished before."""
    counts = studies.tally(the_study)
    return progress_bar("sweep", studies.budget(counts), "trial", initial=studies.finished(counts),
                        enabled=enabled)
