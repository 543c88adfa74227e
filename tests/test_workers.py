"""Several workers on one study: on one machine (``--workers``) and as separate commands on a
PostgreSQL storage with an MLflow tracking server, as on several machines."""

from __future__ import annotations

import time

import pytest

from tests.services import audit, tiny_study

pytestmark = pytest.mark.slow  # PostgreSQL, `mlflow server` and worker processes


def test_four_workers_on_postgres_and_a_tracking_server_run_exactly_the_budget(
        tmp_path, postgres, mlflow_server, launch):
    """Two commands of two workers each start at once on one 40-trial study (as two machines
    would): 40 trials finish, each with one run under one parent, run by 4 processes."""
    features, sweep, budget = tiny_study(tmp_path, n_seeds=10)
    storage = postgres.create_database("optuna_four")
    args = ("--features", features, "--sweep", sweep, "--storage", storage, "--study", "four",
            "--workers", "2")
    started = time.monotonic()
    procs = [launch(mlflow_server.uri, *args, log=f"machine{i}") for i in range(2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.log_path.read_text()[-3000:]
    elapsed = time.monotonic() - started
    result = audit(storage, "four", mlflow_server.uri, budget)
    assert (result["complete"], result["fail"], result["retried"]) == (30, 10, 0)
    assert result["runs"] == 40 and result["workers"] == 4
    print(f"4 workers, 40 trials on PostgreSQL + mlflow server: {elapsed:.1f} s")


def test_workers_on_one_machine_share_the_default_journal_storage(tmp_path, launch):
    """``--workers 2`` with the default storage (a journal file) and a SQLite MLflow store.

    20 epochs a trial keep the queue going until the second process has imported TensorFlow
    and joined (with one epoch, a busy machine let the first finish the queue alone)."""
    features, sweep, budget = tiny_study(tmp_path, n_seeds=3, epochs=20)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = launch(uri, "--features", features, "--sweep", sweep, "--workers", "2")
    assert proc.wait(timeout=300) == 0, proc.log_path.read_text()[-3000:]
    result = audit(str(tmp_path / "optuna-journal.log"), None, uri, budget)
    assert (result["complete"], result["fail"], result["runs"]) == (9, 3, 12)
    assert result["workers"] == 2
