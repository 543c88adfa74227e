"""Optuna studies: storage URLs, create-or-resume, and the trial budget as a queue.

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
budget. Storage calls survive a database restart: they are retried for a while.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.exceptions import DuplicatedStudyError, ExperimentalWarning, UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from pipeline.config import FloatRange, SweepSpec, freeze_params
from pipeline.errors import UserError

JOURNAL_NAME = "optuna-journal.log"
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
SPACE_ATTR = "sweep_space"
FEATURES_ATTR = "features_sha256"
PARENT_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"       # user attr: the trial's MLflow run
REASON_ATTR = "fail_reason"      # user attr: why a trial failed
WORKER_ATTR = "worker"           # user attr: "host:pid" of the process running the trial
ATTEMPT_ATTRS = (RUN_ATTR, REASON_ATTR, WORKER_ATTR, "collapsed")  # not carried over to a retry
MAX_RETRIES = 3                  # a trial that loses its worker more often fails for good
HEARTBEAT_ENV = "PIPELINE_HEARTBEAT_SECONDS"  # RDB heartbeat interval (default 10)
GRACE_ENV = "PIPELINE_GRACE_SECONDS"          # silence after which a trial is lost (default 60)
STORAGE_PATIENCE = 120.0         # seconds a storage call is retried while the database is down
READY_WAIT = 30.0                # seconds a worker waits for another process to set a study up
POLL = 1.0                       # seconds between looks at trials other workers run

OnLost = Callable[[FrozenTrial, str], None]


def make_storage(url: str | None, on_lost: OnLost | None = None) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL.

    ``sqlite:///f.db``, ``postgresql://...`` and ``mysql://...`` give an RDB storage with a
    heartbeat (every ``$PIPELINE_HEARTBEAT_SECONDS``, default 10 s; a trial silent for
    ``$PIPELINE_GRACE_SECONDS``, default 60 s, is lost: ``on_lost(trial, reason)`` is called and
    the trial queued again). A path (``*.log``/``*.journal``, or ``journal:PATH``) gives a
    journal file storage, which several local processes can share safely. ``None`` is
    :func:`default_storage`.
    """
    url = url or default_storage()
    scheme = url.split(":", 1)[0].split("+", 1)[0] if "://" in url else ""
    if scheme in RDB_SCHEMES:
        return _rdb_storage(url, on_lost)
    if "://" in url:
        raise UserError(f"storage '{redact(url)}': unknown scheme (use sqlite:///, postgresql://, "
                        f"mysql:// or a journal file path)")
    from pipeline.paths import writable_file

    path = writable_file(url.removeprefix("journal:"), "storage")
    backend = optuna.storages.journal.JournalFileBackend(
        str(path), lock_obj=optuna.storages.journal.JournalFileOpenLock(str(path)))
    return optuna.storages.JournalStorage(backend)


def read_storage(url: str | None) -> optuna.storages.BaseStorage:
    """An existing storage, opened to read a study without writing anything: no journal file or
    folder is made, no table created (``url`` may come from a run's tag: see :func:`study_url`).
    Raises FileNotFoundError for a journal file that does not exist."""
    url = url or default_storage()
    if "://" in url:
        return optuna.storages.RDBStorage(url, skip_table_creation=True)
    path = Path(url.removeprefix("journal:"))
    if not path.is_file():
        raise FileNotFoundError(f"no journal file {path}")
    return make_storage(str(path))


def _rdb_storage(url: str, on_lost: OnLost | None) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats; see :func:`make_storage`.

    Workers that open a fresh database together race to create Optuna's tables; the losers
    see a duplicate-key or duplicate-table error and simply open it again.
    """
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(5):
        try:
            with _experimental_ok():
                return optuna.storages.RDBStorage(
                    url, engine_kwargs={"pool_pre_ping": True},
                    heartbeat_interval=_seconds(HEARTBEAT_ENV, 10), grace_period=grace_seconds(),
                    heartbeat_stale_trial_callback=Requeue(on_lost,
                                                           "its worker stopped sending heartbeats"))
        except (IntegrityError, ProgrammingError):
            if attempt == 4:
                raise
            time.sleep(0.5 + attempt)
        except Exception as exc:  # SQLAlchemy and the DB driver raise many types
            raise UserError(f"storage '{redact(url)}': cannot be opened ({_short(exc)})") from None


def default_storage() -> str:
    """A journal file beside the MLflow store (so a fresh store starts fresh studies).

    ``sqlite:///dir/mlflow.db`` and ``file:///dir`` give ``dir/optuna-journal.log``; a remote
    tracking server gives ``./optuna-journal.log``.
    """
    from urllib.parse import urlparse

    import mlflow

    uri = mlflow.get_tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        return str(Path(uri.removeprefix("sqlite:///")).parent / JOURNAL_NAME)
    if parsed.scheme in ("file", ""):
        return str(Path(parsed.path) / JOURNAL_NAME)
    return JOURNAL_NAME


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to log as a tag)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    """The seeded sampler of a sweep. A grid's points are all enqueued, so it samples nothing."""
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=spec.sampler_seed)
    return optuna.samplers.RandomSampler(seed=spec.sampler_seed)


def open_study(spec: SweepSpec, storage: str | None, name: str | None, features_sha: str,
               make_parent: Callable[[optuna.Study], str],
               on_lost: OnLost | None = None) -> optuna.Study:
    """Create the study ``name`` (default: the sweep's name) or resume it, with its queue.

    Exactly one process creates a study (the storage refuses a second study of the same name):
    it records the search space, queues the budget, and last calls ``make_parent(study)`` for
    the MLflow parent run whose id marks the study ready. Others wait for that mark (another
    worker is setting the study up), and take the setup over if it does not come within
    ``READY_WAIT`` seconds (its creator died). Resuming refuses a study made from a different
    search space or features file, which would mix incomparable trials; ``n_trials`` may grow
    a study: the missing trials are queued.
    """
    name = name or spec.name
    sampler, the_storage = make_sampler(spec), make_storage(storage, on_lost)
    try:
        study = patiently(optuna.create_study, study_name=name, storage=the_storage,
                          sampler=sampler, direction=spec.objective.direction)
        created = True
    except DuplicatedStudyError:
        study = patiently(optuna.load_study, study_name=name, storage=the_storage, sampler=sampler)
        created = False
    space = json.dumps(describe_space(spec), sort_keys=True)
    ready = created or _wait_ready(study)
    attrs = study.user_attrs
    if SPACE_ATTR in attrs:
        if attrs[SPACE_ATTR] != space:
            raise UserError(f"study '{name}' exists with a different search space; resume it with "
                            f"the sweep file it was made from, or choose another --study")
        if attrs.get(FEATURES_ATTR) != features_sha:
            raise UserError(f"study '{name}' was run on another features file "
                            f"(sha256 {str(attrs.get(FEATURES_ATTR))[:12]}...); choose another --study")
    else:
        for key, value in {SPACE_ATTR: space, FEATURES_ATTR: features_sha, "sweep": spec.name,
                           "objective": spec.objective_metric}.items():
            patiently(study.set_user_attr, key, value)
    patiently(_fill_queue, study, spec)
    if created or not ready:
        patiently(study.set_user_attr, PARENT_ATTR, make_parent(study))
    return study


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
    no params: :func:`suggest` finds them set. On a journal file every write is a locked,
    fsynced append, and a grid trial's five suggestions were most of its writes."""
    return optuna.trial.create_trial(state=TrialState.WAITING, params=params, distributions=space,
                                     system_attrs={"fixed_params": params})


def _distributions(spec: SweepSpec) -> dict[str, BaseDistribution]:
    """The Optuna distribution of every searched field: what :func:`suggest` asks for, and what
    a queued grid point is stored with (the two must match, or Optuna refuses the claim)."""
    return {name: FloatDistribution(axis.low, axis.high, log=axis.log) if isinstance(axis, FloatRange)
            else CategoricalDistribution(list(axis)) for name, axis in spec.axes().items()}


def next_trial(study: optuna.Study, on_lost: OnLost | None = None,
               wait: bool = True) -> optuna.Trial | None:
    """Claim the next WAITING trial of the study, or None when its budget is used up.

    The claim is the storage's atomic WAITING -> RUNNING transition that ``study.ask()`` makes
    first; unlike ``ask()``, this never creates a trial when the queue is empty. With ``wait``,
    while other workers still run trials that could be lost (and so queued again), it waits for
    them, failing and re-queueing those whose worker is gone, so that no trial is left behind.
    The claimed trial's first heartbeat is recorded at once; keep it beating with
    :class:`Heartbeats`.
    """
    while True:
        _recover_lost(study, on_lost)
        trial_id = patiently(study._pop_waiting_trial_id)
        if trial_id is not None:
            if _beats(study):
                patiently(study._storage.record_heartbeat, trial_id)
            study._thread_local.cached_all_trials = None  # as ask() does: samplers see the latest
            trial = patiently(optuna.Trial, study, trial_id)
            patiently(trial.set_user_attr, WORKER_ATTR, worker_id())
            return trial
        if not wait or not any(_may_be_lost(study, t) for t in patiently(
                study.get_trials, deepcopy=False, states=(TrialState.RUNNING,))):
            return None
        time.sleep(POLL)


class Heartbeats:
    """Records the heartbeats of this worker's trials in the background (RDB storages only):
    ``add`` a trial when it is claimed, ``discard`` it once told. Use as a context manager.

    A failed beat (the database restarting) is skipped, not fatal: the grace period covers it.
    """

    def __init__(self, study: optuna.Study):
        self.study = study
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, trial: optuna.Trial) -> None:
        with self._lock:
            self._ids.add(trial._trial_id)

    def discard(self, trial: optuna.Trial) -> None:
        with self._lock:
            self._ids.discard(trial._trial_id)

    def __enter__(self) -> Heartbeats:
        if _beats(self.study):
            self._thread = threading.Thread(target=self._beat, name="optuna-heartbeats", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _beat(self) -> None:
        storage = self.study._storage
        while not self._stop.wait(storage.get_heartbeat_interval()):
            with self._lock:
                ids = sorted(self._ids)
            for trial_id in ids:
                with contextlib.suppress(Exception):
                    storage.record_heartbeat(trial_id)


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
    with _experimental_ok():
        patiently(optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES), study, clean)


def _recover_lost(study: optuna.Study, on_lost: OnLost | None) -> None:
    """Fail and re-queue the RUNNING trials whose worker is gone.

    RDB: Optuna's stale-heartbeat check (its callback is :class:`Requeue`). Journal file: the
    trials of processes of this machine that no longer exist. Both: a trial claimed by no known
    worker (one killed between claiming it and signing it, or an older version's) once it has
    run for the grace period.
    """
    if _beats(study):
        with _experimental_ok():
            patiently(optuna.storages.fail_stale_trials, study)
    grace = grace_seconds()
    for trial in patiently(study.get_trials, deepcopy=False, states=(TrialState.RUNNING,)):
        if WORKER_ATTR not in trial.user_attrs:
            started = trial.datetime_start
            now = datetime.now(started.tzinfo) if started else None
            reason = "no worker signed it" if started and (now - started).total_seconds() > grace else None
        elif not _beats(study) and _local_worker_alive(trial) is False:
            reason = "its worker process is gone"
        else:
            reason = None
        if reason is not None:
            with contextlib.suppress(UpdateFinishedTrialError):
                if patiently(study._storage.set_trial_state_values, trial._trial_id, TrialState.FAIL):
                    Requeue(on_lost, reason)(study, patiently(study._storage.get_trial, trial._trial_id))


def _may_be_lost(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Whether a RUNNING trial is watched: if its worker were lost, it would be queued again.

    Not so for a trial of a journal file's worker on another machine: its liveness is unknown.
    """
    if trial.user_attrs.get(WORKER_ATTR) == worker_id():
        return False  # this process's own, which it is about to finish
    if _beats(study) or WORKER_ATTR not in trial.user_attrs:
        return True
    return _local_worker_alive(trial) is True


def grace_seconds() -> int:
    """Seconds of silence after which a trial's worker is taken for lost: ``$PIPELINE_GRACE_SECONDS``,
    default 60 (at least twice the heartbeat interval)."""
    return _seconds(GRACE_ENV, max(60, 2 * _seconds(HEARTBEAT_ENV, 10)))


def _local_worker_alive(trial: FrozenTrial) -> bool | None:
    """Whether the trial's worker process is alive; None when it is not of this machine."""
    host, _, pid = str(trial.user_attrs.get(WORKER_ATTR, "")).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def _beats(study: optuna.Study) -> bool:
    """Whether the study's storage keeps heartbeats (an RDB storage made by :func:`make_storage`)."""
    return getattr(study._storage, "get_heartbeat_interval", lambda: None)() is not None


def worker_id() -> str:
    """This process as a trial's worker: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of the trials that were queued again after losing their worker."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", ())}


def tally(study: optuna.Study) -> dict[str, int]:
    """Trials by outcome; retried attempts are counted apart, so complete + fail = the budget."""
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


def patiently(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, retried for up to ``STORAGE_PATIENCE`` seconds while the storage's
    database cannot be reached (a restart, a network blip)."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    deadline, delay = time.monotonic() + STORAGE_PATIENCE, 0.5
    while True:
        try:
            return fn(*args, **kwargs)
        except (optuna.exceptions.StorageInternalError, OperationalError, InterfaceError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            print(f"warning: Optuna storage unavailable ({_short(exc)}); retrying in {delay:g} s",
                  file=sys.stderr)
            time.sleep(delay)
            delay = min(2 * delay, 8.0)


def study_url(storage: str | None, name: str) -> str:
    """How to open the study elsewhere: ``optuna-dashboard <storage>`` and the study name."""
    storage = redact(storage or os.path.abspath(default_storage()))
    return f"{storage}#study={name}"


def _experimental_ok():
    """Silence Optuna's ExperimentalWarning: the heartbeat API is used knowingly."""
    return warnings.catch_warnings(action="ignore", category=ExperimentalWarning)


def _seconds(env: str, default: int) -> int:
    text = os.environ.get(env, "")
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"{env}={text!r}: must be a whole number of seconds >= 1")
    return int(text)


def _short(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"[:300]
