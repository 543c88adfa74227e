"""Signs that a trial's worker is alive: its heartbeats (RDB storages) and its process (this machine).

A worker signs each trial it claims with :func:`worker_id` (``host:pid``). On an RDB storage
it also records the trial's heartbeat every few seconds (:class:`Heartbeats`), and Optuna takes
a trial silent for the grace period for lost; on a journal file, a trial whose worker's
process of this machine is gone is lost (:func:`local_worker_alive`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading

import optuna

from pipeline.optuna_internals import storage_of, trial_id


def worker_id() -> str:
    """This process as a trial's worker: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def keeps_heartbeats(study: optuna.Study) -> bool:
    """Whether the study's storage keeps heartbeats (an RDB storage made by :func:`make_storage`)."""
    return getattr(storage_of(study), "get_heartbeat_interval", lambda: None)() is not None


def local_worker_alive(worker: str) -> bool | None:
    """Whether the worker process ``host:pid`` is alive; None when it is not of this machine."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


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
            self._ids.add(trial_id(trial))

    def discard(self, trial: optuna.Trial) -> None:
        with self._lock:
            self._ids.discard(trial_id(trial))

    def __enter__(self) -> Heartbeats:
        if keeps_heartbeats(self.study):
            self._thread = threading.Thread(target=self._beat, name="optuna-heartbeats", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _beat(self) -> None:
        storage = storage_of(self.study)
        while not self._stop.wait(storage.get_heartbeat_interval()):
            with self._lock:
                ids = sorted(self._ids)
            for claimed in ids:
                with contextlib.suppress(Exception):
                    storage.record_heartbeat(claimed)
