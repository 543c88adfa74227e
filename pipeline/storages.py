"""Optuna storages: URLs, opening them, and surviving a database that restarts.

A study lives in a journal file (one machine; the default, beside the MLflow store) or an RDB
(``sqlite:///``, ``postgresql://``, ``mysql://``; many machines), which keeps the heartbeats of
running trials. Every storage call the sweep makes goes through :func:`patiently`, which
retries while the database cannot be reached.
"""

from __future__ import annotations

import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial

from pipeline.errors import UserError
from pipeline.paths import writable_file

RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
HEARTBEAT_ENV = "PIPELINE_HEARTBEAT_SECONDS"  # RDB heartbeat interval (default 10)
GRACE_ENV = "PIPELINE_GRACE_SECONDS"          # silence after which a trial is lost (default 60)
STORAGE_PATIENCE = 120.0         # seconds a storage call is retried while the database is down

OnStale = Callable[[optuna.Study, FrozenTrial], None]


def make_storage(url: str, on_stale: OnStale | None = None) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL.

    ``sqlite:///f.db``, ``postgresql://...`` and ``mysql://...`` give an RDB storage with a
    heartbeat (every ``$PIPELINE_HEARTBEAT_SECONDS``, default 10 s; a trial silent for
    ``$PIPELINE_GRACE_SECONDS``, default 60 s, is stale: ``on_stale(study, trial)`` is called).
    A path (``*.log``/``*.journal``, or ``journal:PATH``) gives a journal file storage, which
    several local processes can share safely.
    """
    scheme = url.split(":", 1)[0].split("+", 1)[0] if "://" in url else ""
    if scheme in RDB_SCHEMES:
        return _rdb_storage(url, on_stale)
    if "://" in url:
        raise UserError(f"storage '{redact(url)}': unknown scheme (use sqlite:///, postgresql://, "
                        f"mysql:// or a journal file path)")
    path = writable_file(url.removeprefix("journal:"), "storage")
    backend = optuna.storages.journal.JournalFileBackend(
        str(path), lock_obj=optuna.storages.journal.JournalFileOpenLock(str(path)))
    try:
        return optuna.storages.JournalStorage(backend)  # replays the file's operations
    except (ValueError, KeyError, TypeError) as exc:  # not JSON, not UTF-8, not Optuna's operations
        raise UserError(f"storage {path}: not an Optuna journal file ({_short(exc)}); give a new "
                        f"file or a study's journal") from None


def read_storage(url: str) -> optuna.storages.BaseStorage:
    """An existing storage, opened to read a study without writing anything: no journal file or
    folder is made, no table created (``url`` may come from a run's tag: see :func:`study_url`).
    Raises FileNotFoundError for a journal file that does not exist."""
    if "://" in url:
        return optuna.storages.RDBStorage(url, skip_table_creation=True)
    path = Path(url.removeprefix("journal:"))
    if not path.is_file():
        raise FileNotFoundError(f"no journal file {path}")
    return make_storage(str(path))


def _rdb_storage(url: str, on_stale: OnStale | None) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats; see :func:`make_storage`.

    Workers that open a fresh database together race to create Optuna's tables; the losers
    see a duplicate-key, duplicate-table or (SQLite) locked-database error and open it again.
    """
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(5):
        try:
            with experimental_ok():
                return optuna.storages.RDBStorage(
                    url, engine_kwargs={"pool_pre_ping": True},
                    heartbeat_interval=heartbeat_seconds(), grace_period=grace_seconds(),
                    heartbeat_stale_trial_callback=on_stale)
        except (IntegrityError, ProgrammingError, OperationalError) as exc:
            racing = not isinstance(exc, OperationalError) or any(
                words in str(exc) for words in ("already exists", "database is locked"))
            if attempt == 4 or not racing:
                raise UserError(f"storage '{redact(url)}': cannot be opened ({_short(exc)})") from None
            time.sleep(0.5 + attempt)
        except Exception as exc:  # SQLAlchemy and the DB driver raise many types
            raise UserError(f"storage '{redact(url)}': cannot be opened ({_short(exc)})") from None


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to log as a tag)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def study_url(storage: str, name: str) -> str:
    """How to open the study elsewhere: ``optuna-dashboard <storage>`` and the study name."""
    storage = redact(storage)
    return f"{storage}#study={name}"


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


def grace_seconds() -> int:
    """Seconds of silence after which a trial's worker is taken for lost: ``$PIPELINE_GRACE_SECONDS``,
    default 60 (at least twice the heartbeat interval)."""
    return _seconds(GRACE_ENV, max(60, 2 * heartbeat_seconds()))


def heartbeat_seconds() -> int:
    """Seconds between an RDB storage's heartbeats of a running trial: ``$PIPELINE_HEARTBEAT_SECONDS``,
    default 10."""
    return _seconds(HEARTBEAT_ENV, 10)


def experimental_ok():
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
