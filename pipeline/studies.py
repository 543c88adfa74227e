"""Optuna studies: create-or-resume, and the trial budget as a queue.

A study's budget is put in its storage as WAITING trials when the study is created: one per
grid point (params fixed), or ``n_trials`` blank ones that the sampler fills in. Workers only
ever take WAITING trials, through the storage's atomic claim, and never ask for a new one, so
a study runs exactly its budget however many processes share it (one machine or many), and
rerunning the same command resumes it: finished trials stay, waiting ones are run.

A trial whose worker is lost is failed and queued again with the same params (Optuna's
:class:`~optuna.storages.RetryHeartbeatStaleTrialCallback`): on an RDB storage (PostgreSQL)
by Optuna's heartbeat once its worker has been silent for the grace period; on a journal file
(one machine) as soon as its worker's process is gone; and at once when the worker is
interrupted (Ctrl-C, SIGTERM). The failed attempt is then *retried*, not counted: a study is
done when every queued trial has finished and was not retried, so ``complete + fail`` is the
budget. What a lost trial leaves elsewhere (its MLflow run) is the caller's: ``on_lost(trial,
reason)`` is called for each. This module knows nothing of MLflow.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
from collections.abc import Callable
from datetime import datetime

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.exceptions import DuplicatedStudyError, UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from pipeline.errors import UserError
from pipeline.heartbeats import keeps_heartbeats, local_worker_alive, worker_id
from pipeline.optuna_internals import forget_cached_trials, storage_of, take_waiting, trial_id
from pipeline.storages import experimental_ok, grace_seconds, make_storage, patiently
from pipeline.sweep_file import FloatRange, SweepSpec, freeze_params

SPACE_ATTR = "sweep_space"
FEATURES_ATTR = "features_sha256"
PARENT_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"       # user attr: the trial's MLflow run
REASON_ATTR = "fail_reason"      # user attr: why a trial failed
WORKER_ATTR = "worker"           # user attr: "host:pid" of the process running the trial
ATTEMPT_ATTRS = (RUN_ATTR, REASON_ATTR, WORKER_ATTR, "collapsed")  # not carried over to a retry
MAX_RETRIES = 3                  # a trial that loses its worker more often fails for good
READY_WAIT = 30.0                # seconds a worker waits for another process to set a study up
POLL = 1.0                       # seconds between looks at trials other workers run

OnLost = Callable[[FrozenTrial, str], None]


def draws_from_results(spec: SweepSpec) -> bool:
    """Whether the sweep's sampler draws each trial from the trials told before it (TPE; a
    grid's points and random draws do not depend on them): such a trial is claimed, and so
    drawn, only once the trials before it are told, whichever engine trains it."""
    return spec.sampler == "tpe"


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    """The seeded sampler of a sweep. A grid's points are all enqueued, so it samples nothing."""
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=spec.sampler_seed)
    return optuna.samplers.RandomSampler(seed=spec.sampler_seed)


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    """The Optuna pruner of a sweep file's ``pruner`` section."""
    if spec.pruner.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.pruner.n_startup_trials,
                                           n_warmup_steps=spec.pruner.n_warmup_steps)
    return optuna.pruners.NopPruner()


def load_study(spec: SweepSpec, storage: str, name: str, on_lost: OnLost | None = None) -> optuna.Study:
    """An existing study of ``spec`` (another process set it up), with its sampler and pruner."""
    return _load(spec, _storage(storage, on_lost), name)


def _load(spec: SweepSpec, storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    return patiently(optuna.load_study, study_name=name, storage=storage, sampler=make_sampler(spec),
                     pruner=make_pruner(spec))


def _storage(url: str, on_lost: OnLost | None) -> optuna.storages.BaseStorage:
    return make_storage(url, Requeue(on_lost, "its worker stopped sending heartbeats"))


def open_study(spec: SweepSpec, storage: str, name: str | None, features_sha: str,
               on_lost: OnLost | None = None) -> tuple[optuna.Study, bool]:
    """Create the study ``name`` (default: :func:`default_study_name`) or resume it, with its
    queue, and say whether this process is to set it up: ``(study, setup)``.

    Exactly one process creates a study (the storage refuses a second study of the same name):
    it records the search space and queues the budget; ``setup`` is then True, and the caller
    marks the study ready with :func:`mark_ready` once the study's parent record exists. Others
    wait for that mark (another worker is setting the study up), and take the setup over if it
    does not come within ``READY_WAIT`` seconds (its creator died). Resuming refuses a study
    made from a different search space or features file, which would mix incomparable trials;
    ``n_trials`` may grow a study: the missing trials are queued.
    """
    the_storage = _storage(storage, on_lost)
    names = patiently(optuna.get_all_study_names, the_storage)
    name = name or _default_name(the_storage, spec, features_sha, names)
    if name in names:
        study, created = _load(spec, the_storage, name), False
    else:
        study, created = _create(spec, the_storage, name)
    ready = created or _wait_ready(study)
    _check_or_record_space(study, spec, features_sha)
    patiently(_fill_queue, study, spec)
    return study, created or not ready


def default_study_name(spec: SweepSpec, features_sha: str) -> str:
    """The study a sweep runs when none is named: the sweep's name and the first 8 hex digits
    of a digest of its search space (:func:`describe_space`), experiment and features file, as
    in ``default-3f9a02c1``. The same sweep file on the same features resumes its study; another
    space, experiment or features file starts its own study instead of being refused as a
    mismatch."""
    key = f"{_space_json(spec)}\n{spec.experiment}\n{features_sha}"
    return f"{spec.name}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def _create(spec: SweepSpec, storage: optuna.storages.BaseStorage, name: str) -> tuple[optuna.Study, bool]:
    """The new study ``name`` and True; the study and False if another process made it first.
    (Resuming loads a study without trying this: a journal storage records every attempt.)"""
    try:
        return patiently(optuna.create_study, study_name=name, storage=storage, sampler=make_sampler(spec),
                         pruner=make_pruner(spec), direction=spec.objective.direction), True
    except DuplicatedStudyError:
        return _load(spec, storage, name), False


def _default_name(storage: optuna.storages.BaseStorage, spec: SweepSpec, features_sha: str,
                  names: list[str]) -> str:
    """:func:`default_study_name`, unless only a study under the sweep's plain name exists (of
    the storage's ``names``), with this search space and features file: studies were named so
    before version 0.2, and that one resumes."""
    name = default_study_name(spec, features_sha)
    if name in names or spec.name not in names:
        return name
    attrs = _load(spec, storage, spec.name).user_attrs
    same = attrs.get(SPACE_ATTR) == _space_json(spec) and attrs.get(FEATURES_ATTR) == features_sha
    return spec.name if same else name


def _space_json(spec: SweepSpec) -> str:
    return json.dumps(describe_space(spec), sort_keys=True)


def _check_or_record_space(study: optuna.Study, spec: SweepSpec, features_sha: str) -> None:
    """Record what makes the study's trials comparable and the name of its objective (as Optuna's
    clients show it), or refuse a study made otherwise."""
    space = _space_json(spec)
    attrs = study.user_attrs
    if study.metric_names is None:
        with experimental_ok():
            patiently(study.set_metric_names, [spec.objective_metric])
    if SPACE_ATTR not in attrs:
        for key, value in {SPACE_ATTR: space, FEATURES_ATTR: features_sha, "sweep": spec.name,
                           "objective": spec.objective_metric}.items():
            patiently(study.set_user_attr, key, value)
        return
    if attrs[SPACE_ATTR] != space:
        raise UserError(f"study '{study.study_name}' exists with a different search space; resume it "
                        f"with the sweep file it was made from, or choose another --study")
    if attrs.get(FEATURES_ATTR) != features_sha:
        raise UserError(f"study '{study.study_name}' was run on another features file "
                        f"(sha256 {str(attrs.get(FEATURES_ATTR))[:12]}...); choose another --study")


def mark_ready(study: optuna.Study, parent: str) -> None:
    """Record the study's parent record (its MLflow parent run), which marks the study set up."""
    patiently(study.set_user_attr, PARENT_ATTR, parent)


def parent_of(study: optuna.Study) -> str | None:
    """The id of the study's parent record, None before it is set up."""
    return study.user_attrs.get(PARENT_ATTR)


def _wait_ready(study: optuna.Study) -> bool:
    """Wait until the study's creator has marked it ready; False when it never did."""
    deadline = time.monotonic() + READY_WAIT
    while PARENT_ATTR not in patiently(lambda: study.user_attrs):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL / 2)
    return True


def describe_space(spec: SweepSpec) -> dict:
    """The parts of a sweep that make its trials comparable: axes, fixed settings, objective."""
    axes = {k: (v.model_dump() if isinstance(v, FloatRange) else list(v))
            for k, v in spec.axes().items()}
    return {"axes": axes, "base": spec.base(), "objective": spec.objective.model_dump(),
            "sampler": spec.sampler}


def _fill_queue(study: optuna.Study, spec: SweepSpec) -> None:
    trials = study.get_trials(deepcopy=False)
    if spec.sampler == "grid":
        queued = {freeze_params(t.system_attrs.get("fixed_params", t.params)) for t in trials}
        space = _distributions(spec)
        for params in spec.grid()[:spec.budget()]:
            if freeze_params(params) not in queued:
                study.add_trial(_grid_trial(params, space))
    else:
        for _ in range(spec.budget() - (len(trials) - len(retried_numbers(trials)))):
            study.enqueue_trial({})


def _grid_trial(params: dict, space: dict[str, BaseDistribution]) -> FrozenTrial:
    """A grid point to queue: WAITING with its params already set, as Optuna queues a retried
    trial (and marked ``fixed_params``, as ``enqueue_trial`` marks them). Claiming it then writes
    no params: :func:`suggest` finds them set (on a journal file every write is a locked,
    fsynced append)."""
    return optuna.trial.create_trial(state=TrialState.WAITING, params=params, distributions=space,
                                     system_attrs={"fixed_params": params})


def _distributions(spec: SweepSpec) -> dict[str, BaseDistribution]:
    """The Optuna distribution of every searched field: what :func:`suggest` asks for, and what
    a queued grid point is stored with (the two must match, or Optuna refuses the claim)."""
    return {name: FloatDistribution(axis.low, axis.high, log=axis.log) if isinstance(axis, FloatRange)
            else CategoricalDistribution(list(axis)) for name, axis in spec.axes().items()}


def claim(study: optuna.Study, n: int, on_lost: OnLost | None = None,
          wait: bool = True) -> list[optuna.Trial]:
    """Claim up to ``n`` WAITING trials of the study; an empty list when its budget is used up.

    A claim is the storage's atomic WAITING -> RUNNING transition that ``study.ask()`` makes
    first; unlike ``ask()``, this never creates a trial when the queue is empty. Lost trials
    are recovered first (:func:`_recover_lost`), once per call. With ``wait``, while the queue
    is empty but other workers still run trials that could be lost (and so queued again), it
    waits for them, so that no trial is left behind. A claimed trial's first heartbeat is
    recorded at once; keep it beating with :class:`Heartbeats`.
    """
    while True:
        _recover_lost(study, on_lost)
        trials = _claim_waiting(study, n)
        if trials or not wait or not any(_may_be_lost(study, t) for t in patiently(
                study.get_trials, deepcopy=False, states=(TrialState.RUNNING,))):
            return trials
        time.sleep(POLL)


def _claim_waiting(study: optuna.Study, n: int) -> list[optuna.Trial]:
    """Claim up to ``n`` WAITING trials, signed with this worker.

    The queue is read once for the whole batch, not once per trial as ``ask()``'s pop reads it
    (a read lists the study's trials, so per-trial reads make a study's claims quadratic in its
    size); it is read again only while the last read still yielded a claim, which picks up
    trials queued meanwhile (a lost trial's retry) in place of those other workers took first.
    """
    trials: list[optuna.Trial] = []
    while len(trials) < n:
        before = len(trials)
        for waiting in patiently(study.get_trials, deepcopy=False, states=(TrialState.WAITING,)):
            if len(trials) == n:
                break
            if patiently(take_waiting, study, waiting):
                trials.append(_signed(study, trial_id(waiting)))
        if len(trials) == before:
            break
    return trials


def _signed(study: optuna.Study, claimed: int) -> optuna.Trial:
    """The trial this worker just claimed, with its first heartbeat and signed with the worker."""
    if keeps_heartbeats(study):
        patiently(storage_of(study).record_heartbeat, claimed)
    forget_cached_trials(study)  # as ask() does: samplers see the latest trials
    trial = patiently(optuna.Trial, study, claimed)
    patiently(trial.set_user_attr, WORKER_ATTR, worker_id())
    return trial


def finish(study: optuna.Study, trial: optuna.Trial, state: TrialState, value: float | None = None,
           reason: str | None = None, retry: bool = False) -> bool:
    """Tell the storage how ``trial`` ended: ``state`` COMPLETE (with ``value``), PRUNED, or
    FAIL (with ``reason``).

    ``retry`` queues the trial again (an interrupted trial is not a result). Returns False when
    the trial had already been finished by someone else: its worker was taken for lost.
    """
    try:
        if reason is not None:
            patiently(trial.set_user_attr, REASON_ATTR, reason[:2000])
        frozen = patiently(study.tell, trial, value if state == TrialState.COMPLETE else None,
                           state=state)
    except (UpdateFinishedTrialError, ValueError):  # ValueError: "Cannot tell a FAIL trial"
        return False
    if retry:
        requeue(study, frozen)
    return True


class Requeue:
    """What happens to a lost trial: ``on_lost(trial, reason)`` (e.g. end its MLflow run), then
    :func:`requeue`. Given to the RDB storage as its heartbeat-stale trial callback."""

    def __init__(self, on_lost: OnLost | None, reason: str):
        self.on_lost, self.reason = on_lost, reason

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.on_lost is not None:
            self.on_lost(trial, self.reason)
        requeue(study, trial)


def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a FAILed trial again with its params (up to ``MAX_RETRIES`` times).

    The new WAITING trial records the numbers it retries (system attr ``retry_history``); the
    attributes of the failed attempt (its MLflow run, reason, worker) stay behind.
    """
    clean = copy.deepcopy(trial)
    clean.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in ATTEMPT_ATTRS}
    with experimental_ok():
        patiently(optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES), study, clean)


def _recover_lost(study: optuna.Study, on_lost: OnLost | None) -> None:
    """Fail and re-queue the RUNNING trials whose worker is gone.

    RDB: Optuna's stale-heartbeat check (its callback is :class:`Requeue`). Journal file: the
    trials of processes of this machine that no longer exist. Both: a trial claimed by no known
    worker (one killed between claiming it and signing it, or an older version's) once it has
    run for the grace period.
    """
    if keeps_heartbeats(study):
        with experimental_ok():
            patiently(optuna.storages.fail_stale_trials, study)
    for trial in patiently(study.get_trials, deepcopy=False, states=(TrialState.RUNNING,)):
        if (reason := _lost_reason(study, trial)) is not None:
            _fail_lost(study, trial, reason, on_lost)


def _lost_reason(study: optuna.Study, trial: FrozenTrial) -> str | None:
    """Why a RUNNING trial is lost, or None while it is not."""
    if WORKER_ATTR not in trial.user_attrs:
        started = trial.datetime_start
        silent = started is not None and (datetime.now(started.tzinfo) - started).total_seconds()
        return "no worker signed it" if silent and silent > grace_seconds() else None
    worker = str(trial.user_attrs.get(WORKER_ATTR, ""))
    if not keeps_heartbeats(study) and local_worker_alive(worker) is False:
        return "its worker process is gone"
    return None


def _fail_lost(study: optuna.Study, trial: FrozenTrial, reason: str, on_lost: OnLost | None) -> None:
    """Fail a lost trial (unless another worker did first) and queue it again."""
    storage = storage_of(study)
    with contextlib.suppress(UpdateFinishedTrialError):
        if patiently(storage.set_trial_state_values, trial_id(trial), TrialState.FAIL):
            Requeue(on_lost, reason)(study, patiently(storage.get_trial, trial_id(trial)))


def _may_be_lost(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Whether a RUNNING trial is watched: if its worker were lost, it would be queued again.

    Not so for a trial of a journal file's worker on another machine: its liveness is unknown.
    """
    if trial.user_attrs.get(WORKER_ATTR) == worker_id():
        return False  # this process's own, which it is about to finish
    if keeps_heartbeats(study) or WORKER_ATTR not in trial.user_attrs:
        return True
    return local_worker_alive(str(trial.user_attrs[WORKER_ATTR])) is True


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of the trials that were queued again after losing their worker."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", ())}


FINISHED = ("complete", "fail", "pruned")  # the tally's keys of the trials that are done
BUDGET = (*FINISHED, "running", "waiting")  # ... and of the study's budget


def finished(counts: dict[str, int]) -> int:
    """The trials of a :func:`tally` that are done."""
    return sum(counts.get(k, 0) for k in FINISHED)


def budget(counts: dict[str, int]) -> int:
    """The study's budget by a :func:`tally` (0 for no counts)."""
    return sum(counts.get(k, 0) for k in BUDGET)


def tally(study: optuna.Study) -> dict[str, int]:
    """Trials by outcome; retried attempts are counted apart, so the study's budget is the sum
    over :data:`BUDGET` (over :data:`FINISHED` once every trial has run)."""
    trials = patiently(study.get_trials, deepcopy=False)
    retried = retried_numbers(trials)
    counts = {state.name.lower(): sum(t.state == state and t.number not in retried for t in trials)
              for state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED,
                            TrialState.RUNNING, TrialState.WAITING)}
    return {**counts, "retried": len(retried)}


def suggest(trial: optuna.Trial, spec: SweepSpec) -> dict:
    """The searched params of ``trial``: fixed for a grid point, else drawn by the sampler."""
    params = {}
    for name, space in _distributions(spec).items():
        if isinstance(space, FloatDistribution):
            params[name] = trial.suggest_float(name, space.low, space.high, log=space.log)
        else:
            params[name] = trial.suggest_categorical(name, list(space.choices))
    return params
