"""Shared fixtures: a quiet TensorFlow, a private MLflow store, small real features files."""

from __future__ import annotations

from pipeline.quiet import quiet_tensorflow

quiet_tensorflow()

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pipeline.features import write_features  # noqa: E402
from tests.services import launch, mlflow_server, postgres  # noqa: E402, F401 (fixtures)


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store in ``tmp_path``; yields its URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def make_features(n: int = 240, d: int = 32, seed: int = 0, positive: float = 0.5,
                  sorted_labels: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A linearly separable-ish two-class problem; labels sorted by class like a folder walk."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < positive).astype(np.int64)
    if sorted_labels:
        y = np.sort(y)
    direction = rng.normal(size=d)
    x = rng.normal(size=(n, d)) + np.outer(2 * y - 1, direction) * 0.4
    return x.astype(np.float32), y


@pytest.fixture
def features_file(tmp_path):
    """A small features file in the seed's layout (only ``train`` and ``label``)."""
    x, y = make_features()
    return write_features(tmp_path / "features.h5", x, y, {})
