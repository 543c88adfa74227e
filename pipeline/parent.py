"""The sweep's parent run: created with its study, reopened on resume, summarised and closed.

Every trial run of a study nests under its one parent run, whatever worker or machine ran it.
The process that sets a study up creates the parent (:func:`attach`), with the sweep's params,
tags, description and file, and marks the study ready with the parent's id; later commands
reopen it. On the way out (:func:`closing`), each worker logs the trial counts and the best
trial on it, and the last worker out ends it.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
from mlflow.entities import Dataset, Run
from optuna.trial import FrozenTrial

from pipeline import naming, storages, studies, tracking
from pipeline.errors import UserError
from pipeline.kinds import kind_of
from pipeline.storages import patiently
from pipeline.sweep_file import SweepSpec


@dataclass(frozen=True)
class Origin:
    """Where a sweep comes from: its file, features, storage and the run that launched it."""

    spec: SweepSpec
    sweep_file: str
    features: str  # as the user named them: a path, or a runs:/ URI (not its local copy)
    features_sha: str
    dataset: Dataset  # the features file as an MLflow dataset: every run's input
    storage: str
    launcher: Run | None  # the run of ``main`` or of ``mlflow run``, if any (tracking.launcher_run)


def attach(study: optuna.Study, origin: Origin, setup: bool) -> tuple[str, str]:
    """The study's parent run, RUNNING, and its experiment's id: a new one when this process
    sets the study up (``setup``), else the one the study names, reopened.

    If that one is not in this tracking store's experiment (the store or the sweep file's
    experiment has changed since the study was made), a study with no finished trial gets a
    new parent run; one with finished trials raises UserError, writing nothing, since their runs
    are where its parent is and a new parent would hold only the rest.
    """
    name = origin.spec.experiment
    launcher = origin.launcher
    if not setup:
        reopened = _reopen(study, name)
        if reopened is not None:
            _list_on_launcher(launcher, reopened[0])
            return reopened
        finished = studies.finished(studies.tally(study))
        if studies.parent_of(study) and finished:
            raise UserError(_moved(study, origin, finished))
    experiment = tracking.experiment_id(name)
    tracking.describe_experiment(experiment, origin.spec.description, naming.views_for(origin.spec.report))
    parent = _create(study, origin, experiment)
    studies.mark_ready(study, parent)
    _list_on_launcher(launcher, parent)
    return parent, experiment


def _list_on_launcher(launcher: Run | None, parent: str) -> None:
    """Add ``parent`` to the launcher run's list of sweeps (tag ``pipeline.sweep_run_id``) as
    the sweep starts: a ``main`` interrupted later still names every sweep it ran or resumed,
    including a study an earlier ``main`` made (whose parent run nests under that one)."""
    if launcher is None:
        return
    listed = [rid for rid in launcher.data.tags.get(naming.SWEEP_RUNS, "").split(",") if rid]
    if parent not in listed:
        tracking.client().set_tag(launcher.info.run_id, naming.SWEEP_RUNS, ",".join([*listed, parent]))


def _reopen(study: optuna.Study, experiment_name: str) -> tuple[str, str] | None:
    """The study's parent run set RUNNING again and its experiment, or None when the parent is
    not in experiment ``experiment_name`` of this store. The experiment is looked up now, after
    the study was opened: another command may have just made both."""
    parent = studies.parent_of(study)
    run = tracking.find_run(parent)
    experiment = tracking.experiment_id(experiment_name, create=False)
    if run is None or run.info.experiment_id != experiment:
        return None
    if run.info.lifecycle_stage == "deleted":  # the run was deleted, or its experiment
        tracking.experiment_id(experiment_name)  # restores a deleted experiment and its runs
        if tracking.find_run(parent).info.lifecycle_stage == "deleted":
            tracking.client().restore_run(parent)
        print(f"sweep: parent run {parent} was deleted; restored to resume its study", file=sys.stderr)
    if run.info.status != "RUNNING":
        tracking.client().update_run(parent, status="RUNNING")
    return parent, experiment


def _moved(study: optuna.Study, origin: Origin, finished: int) -> str:
    parent = studies.parent_of(study)
    run = tracking.find_run(parent)
    where = ("is not in this tracking store" if run is None
             else f"is in experiment {run.info.experiment_id}, not in '{origin.spec.experiment}'")
    return (f"study {storages.study_url(origin.storage, study.study_name)} has {finished} finished "
            f"trials recorded under parent run {parent}, which {where} ({mlflow.get_tracking_uri()}): "
            f"use that store, or start afresh (another study name, or delete the study from its storage)")


def _create(study: optuna.Study, origin: Origin, experiment: str) -> str:
    """A new parent run for the study: tags, params and the sweep file. It nests under the
    launcher run (None: there is none) when both are in one experiment; otherwise the two are
    linked by tags."""
    spec, client = origin.spec, tracking.client()
    launcher = origin.launcher.info.run_id if origin.launcher else None
    nest = launcher if origin.launcher and origin.launcher.info.experiment_id == experiment else None
    tags = {naming.STEP: "sweep", naming.SWEEP_NAME: spec.name, naming.STUDY: study.study_name,
            naming.KIND: spec.kind, naming.REPORT: spec.report,
            naming.STORAGE: storages.study_url(origin.storage, study.study_name),
            naming.FEATURES_SHA: origin.features_sha,
            naming.NOTE: kind_of(spec).parent_description(spec), **tracking.versions()}
    if launcher and not nest:
        tags[naming.MAIN_RUN] = launcher
    parent = tracking.create_run(experiment, naming.parent_run_name(spec.name), nest, tags)
    params = {"sweep": spec.name, "sweep_file": origin.sweep_file, "kind": spec.kind,
              "sampler": spec.sampler, "sampler_seed": spec.sampler_seed, "n_trials": spec.budget(),
              "seeds": list(spec.seeds), "engine": spec.engine,
              "objective": f"{spec.objective.direction} {spec.objective_metric}",
              "features": origin.features, "study": study.study_name,
              **{f"fixed.{k}": v for k, v in spec.fixed.items()}}
    tracking.log_batch(parent, params=params)
    tracking.log_features(parent, origin.dataset)
    client.log_artifact(parent, origin.sweep_file, "sweep")
    return parent


@contextlib.contextmanager
def closing(study: optuna.Study, parent: str,
            on_finished: Sequence[tuple[str, Callable[[FrozenTrial], None]]] = ()):
    """Yield a dict that holds the trial counts once the block is done. The counts are logged on
    the parent run on the way in and, with the best trial, on the way out, which ends the run
    (FINISHED, KILLED on an interrupt, FAILED on an error) unless other workers still run
    trials: the last worker out ends it. Finished with trials still queued (``workers 0``) it
    is SCHEDULED. The worker that ends a study whose every trial has
    finished runs each ``(name, step)`` of ``on_finished`` first, ``step(best trial)``, if a
    trial completed."""
    counts: dict[str, int] = {}
    status = "FINISHED"
    tracking.log_batch(parent, metrics=tracking.scalars(_count_metrics(studies.tally(study))))
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
            counts.update(summarise(study, parent))
            if on_finished and status == "FINISHED" and counts["complete"] and not (
                    counts["running"] or counts["waiting"]):
                for name, step in on_finished:
                    _call_on_finished(name, step, study)
            _end(parent, status, counts)


def _count_metrics(counts: dict[str, int]) -> dict[str, int]:
    """The parent run's metrics of the study's trial counts, logged when a command on the study
    starts and when it ends, so that they always hold its budget (:data:`studies.BUDGET`)."""
    return {f"{naming.TRIAL_COUNT}{k}": v for k, v in counts.items()}


def _call_on_finished(name: str, step: Callable[[FrozenTrial], None], study: optuna.Study) -> None:
    """``step(best trial)``; a failure is a warning naming the step: the study's record, and the
    other steps, stand without it."""
    try:
        step(patiently(lambda: study.best_trial))
    except Exception as exc:
        print(f"warning: the finished study's {name} were not logged ({type(exc).__name__}: "
              f"{' '.join(str(exc).split())[:300]})", file=sys.stderr)


def _end(parent: str, status: str, counts: dict[str, int]) -> None:
    if counts["running"]:
        return
    client = tracking.client()
    if status == "FINISHED" and counts["waiting"]:
        client.update_run(parent, status="SCHEDULED")
    else:
        client.set_terminated(parent, status)


def summarise(study: optuna.Study, parent: str) -> dict[str, int]:
    """Log trial counts and the best trial on the parent run; return the counts."""
    counts = studies.tally(study)
    tags = {}
    metrics = _count_metrics(counts)
    if counts["complete"]:
        best = patiently(lambda: study.best_trial)
        metrics["best.value"] = best.value
        tags = {"best.trial_number": best.number,
                "best.run_id": best.user_attrs.get(studies.RUN_ATTR, ""),
                "best.params": json.dumps(best.params, sort_keys=True)}
        _log_best_trial(parent, best)
    tracking.log_batch(parent, metrics=tracking.scalars(metrics), tags=tags)
    return counts


def _log_best_trial(parent: str, best: optuna.trial.FrozenTrial) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "best_trial.json")
        path.write_text(json.dumps({"number": best.number, "value": best.value, "params": best.params,
                                    "user_attrs": best.user_attrs}, indent=2, default=str))
        tracking.client().log_artifact(parent, str(path))
