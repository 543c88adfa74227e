"""Faults of the workers and services a sweep must survive whole: a killed worker, a database
restart, and an unreachable tracking server (signals that stop a command: test_interrupts.py).

Each test prints what it measured (recovery times); run with ``-s`` to see them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime

import optuna
import pytest
from optuna.trial import TrialState

from pipeline import naming, storages, studies
from tests.services import (
    ROOT,
    audit,
    finished_trial_of,
    running_trial_of,
    tiny_study,
    unreachable_server,
    wait_for,
)

pytestmark = pytest.mark.slow  # worker processes, PostgreSQL and recovery timeouts

FAST_HEARTBEAT = {storages.HEARTBEAT_ENV: "1", storages.GRACE_ENV: "3"}


def test_sigkill_of_a_worker_mid_trial_is_failed_by_heartbeat_and_retried(
        tmp_path, postgres, mlflow_server, launch):
    # 60 epochs a trial (about 6 s on a quiet machine, longer under load) keep both processes
    # at work (a 1-epoch queue can be done by the first before the second has imported
    # TensorFlow). The victim is killed in a trial it began 0.5-4 s before, so that the trial
    # is still training at the kill: a trial that is about to end, or one that fails at once by
    # design, would leave nothing lost and nothing retried. The window counts from the claim,
    # and on a loaded machine the trial's run id (created through the tracking server) can
    # reach the study seconds after it.
    # The victim starts once the survivor has finished a trial, so that the queue still holds
    # trials for it to claim whatever the survivor's start-up took.
    features, sweep, budget = tiny_study(tmp_path, n_seeds=3, epochs=60)
    storage = postgres.create_database("optuna_kill")
    args = ("--features", features, "--sweep", sweep, "--storage", storage, "--study", "kill")
    survivor = launch(mlflow_server.uri, *args, env=FAST_HEARTBEAT, log="survivor")
    wait_for(finished_trial_of(storage, "kill", survivor.pid))
    victim = launch(mlflow_server.uri, *args, env=FAST_HEARTBEAT, log="victim")
    lost = wait_for(running_trial_of(storage, "kill", victim.pid, started_before=0.5, started_within=4.0))
    assert victim.poll() is None
    victim.kill()
    killed_at = datetime.now()
    assert victim.wait(timeout=30) == -signal.SIGKILL
    assert survivor.wait(timeout=300) == 0, survivor.log_path.read_text()[-3000:]
    result = audit(storage, "kill", mlflow_server.uri, budget)
    assert result["retried"] == 1 and result["runs"] == budget + 1
    trials = {t.number: t for t in result["trials"]}
    assert trials[lost.number].state == TrialState.FAIL
    run = result["by_run"][lost.user_attrs[studies.RUN_ATTR]]
    assert run.info.status == "KILLED"
    assert run.data.tags[naming.ERROR] == "lost: its worker stopped sending heartbeats"
    retry = next(t for t in trials.values() if t.system_attrs.get("failed_trial") == lost.number)
    assert retry.params == lost.params and retry.state.is_finished()
    print(f"SIGKILL: trial {lost.number} failed by the heartbeat check "
          f"{(trials[lost.number].datetime_complete - killed_at).total_seconds():.1f} s after the "
          f"kill (heartbeat 1 s, grace 3 s); its retry {retry.number} finished "
          f"{(retry.datetime_complete - killed_at).total_seconds():.1f} s after the kill, "
          f"last of the queue")


def test_postgres_restart_mid_sweep_loses_nothing(tmp_path, postgres, mlflow_server, launch):
    features, sweep, budget = tiny_study(tmp_path, n_seeds=3)
    storage = postgres.create_database("optuna_restart")
    proc = launch(mlflow_server.uri, "--features", features, "--sweep", sweep,
                       "--storage", storage, "--study", "restart", "--workers", "2",
                       env={storages.HEARTBEAT_ENV: "1", storages.GRACE_ENV: "30"})

    def some_done():
        """3 finished trials"""
        try:
            study = optuna.load_study(study_name="restart", storage=storages.make_storage(storage))
        except KeyError:
            return None
        return sum(t.state.is_finished() for t in study.get_trials()) >= 3
    wait_for(some_done, every=0.2)
    started = time.monotonic()
    postgres.restart()
    down = time.monotonic() - started
    assert proc.wait(timeout=300) == 0, proc.log_path.read_text()[-3000:]
    finished = time.monotonic() - started
    result = audit(storage, "restart", mlflow_server.uri, budget)
    assert result["retried"] == 0 and result["runs"] == budget
    retries = proc.log_path.read_text().count("warning: Optuna storage unavailable")
    print(f"PostgreSQL restart: down {down:.1f} s, {retries} storage retries, sweep done "
          f"{finished:.1f} s after the restart; {result['complete']} + {result['fail']} trials")


@pytest.mark.parametrize("server", ["refusing", "silent"])
def test_unreachable_tracking_server_fails_fast_and_creates_no_trial(tmp_path, server):
    features, sweep, _ = tiny_study(tmp_path, n_seeds=1)
    with unreachable_server(server) as uri:
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "pipeline", "sweep", "--features", features, "--sweep", sweep,
             "--storage", str(tmp_path / "journal.log")], cwd=tmp_path, capture_output=True,
            text=True, timeout=120, env={**os.environ, "MLFLOW_TRACKING_URI": uri,
                                         "PYTHONPATH": str(ROOT)})
        elapsed = time.monotonic() - started
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: tracking server {uri} cannot be reached"), result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 10
    assert not (tmp_path / "journal.log").exists()
    print(f"tracking server {server}: error after {elapsed:.1f} s (process start included)")
