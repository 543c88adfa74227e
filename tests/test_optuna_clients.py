"""Other real clients read the study storage a sweep wrote: the Optuna CLI and optuna-dashboard.

The sweep's default storage is a journal file beside the MLflow store; both clients open it
the way the README tells a user to, in their own processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

pytestmark = pytest.mark.slow  # the small study's sweep, then the Optuna CLI and dashboard in subprocesses

BIN = Path(sys.executable).parent


def optuna_cli(command: str, small_study) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "optuna"), command, "--storage", str(small_study.journal),
                           "--storage-class", "JournalFileBackend", "--study-name",
                           small_study.outcome.study_name, "-f", "json"],
                          capture_output=True, text=True, timeout=120, check=True)


def test_optuna_cli_lists_trials_and_the_best(small_study):
    trials = json.loads(optuna_cli("trials", small_study).stdout)
    assert len(trials) == 8 and {t["state"] for t in trials} == {"COMPLETE"}
    assert {tuple(t["value"]) for t in trials} == {("val_prob_loss",)}  # the objective, named
    for t in trials:
        t["value"] = t["value"]["val_prob_loss"]
    assert {(t["params"]["activation"], t["params"]["units"], t["params"]["seed"]) for t in trials} == {
        (a, u, s) for a, u in (("softmax", 1), ("softmax", 2), ("sigmoid", 1)) for s in (0, 1)}
    best = json.loads(optuna_cli("best-trial", small_study).stdout)
    best["value"] = best["value"]["val_prob_loss"]
    assert best["value"] == min(t["value"] for t in trials)
    mlflow.set_tracking_uri(small_study.store)
    try:
        parent = mlflow.get_run(small_study.outcome.parent_run_id)
        trial_run = mlflow.get_run(best["user_attrs"]["mlflow_run_id"])
    finally:
        mlflow.set_tracking_uri(None)
    assert parent.data.metrics["best.value"] == pytest.approx(best["value"])
    assert trial_run.data.tags["optuna.trial_number"] == str(best["number"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, deadline: float):
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.load(response)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_optuna_dashboard_serves_the_study(small_study):
    port = _free_port()
    server = subprocess.Popen([str(BIN / "optuna-dashboard"), str(small_study.journal),
                               "--host", "127.0.0.1", "--port", str(port), "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        base = f"http://127.0.0.1:{port}"
        studies = _get_json(f"{base}/api/studies", time.monotonic() + 60)["study_summaries"]
        assert [s["study_name"] for s in studies] == [small_study.outcome.study_name]
        detail = _get_json(f"{base}/api/studies/{studies[0]['study_id']}?after=0", time.monotonic() + 10)
        assert len(detail["trials"]) == 8 and {t["state"] for t in detail["trials"]} == {"Complete"}
        assert detail["objective_names"] == ["val_prob_loss"]
        assert {a["key"]: a["value"] for a in detail["user_attrs"]}["mlflow_parent_run_id"] == (
            small_study.outcome.parent_run_id)
        assert {p["name"] for p in detail["trials"][0]["params"]} == {
            "activation", "units", "loss", "learning_rate", "init", "seed"}
        assert "mlflow_run_id" in {a["key"] for a in detail["trials"][0]["user_attrs"]}
    finally:
        server.terminate()
        server.wait(timeout=30)
