"""Shared fixtures: a quiet TensorFlow, a private MLflow store, small real features files.

The helpers they use live in ``tests/helpers.py``, which test modules import directly."""

from __future__ import annotations

from pipeline.quiet import quiet_tensorflow

quiet_tensorflow()

import mlflow  # noqa: E402
import pytest  # noqa: E402

from pipeline.features import write_features  # noqa: E402
from tests.helpers import SMALL_STUDY, make_features, new_store  # noqa: E402
from tests.services import launch, mlflow_server, postgres  # noqa: E402, F401 (fixtures)


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store in ``tmp_path``, also the working folder (where MLflow puts
    the artifacts of the experiments a test makes, ``./mlruns``); yields its URI."""
    monkeypatch.chdir(tmp_path)
    uri = new_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture
def features_file(tmp_path):
    """A small features file in the seed's layout (only ``train`` and ``label``)."""
    x, y = make_features()
    return write_features(tmp_path / "features.h5", x, y, {})


@pytest.fixture(scope="session")
def small_study(tmp_path_factory):
    """A finished small sweep (8 trials, 2 seeds) exported with every format, and a parity run.

    Both in one store of their own, read-only for their users, who point MLflow at ``store``
    themselves. Yields a namespace: ``folder``, ``store`` (tracking URI), ``journal`` (the
    Optuna storage, the default journal file beside the store), ``outcome`` (the sweep's),
    ``export`` (its folder) and ``parity_run`` (the id of the ``parity`` entry point's run).
    """
    import types

    import yaml

    from pipeline.config import ParityConfig
    from pipeline.export import export
    from pipeline.parity import run_parity
    from pipeline.sweep import run_sweep

    folder = tmp_path_factory.mktemp("small_study")
    x, y = make_features()
    features = write_features(folder / "features.h5", x, y, {})
    (folder / "small.yaml").write_text(yaml.safe_dump(SMALL_STUDY))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)  # the experiment's artifacts go beside the store, not into the repo
        store = new_store(folder)
        mp.setenv("MLFLOW_TRACKING_URI", store)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(store)
        outcome = run_sweep(str(features), str(folder / "small.yaml"), progress=False)
        export(outcome.parent_run_id, str(folder / "export"), "csv,md,tex,png,html")
        parity_run, _ = run_parity(str(features), ParityConfig(learning_rate=0.05, epochs=3, batch_size=32))
        mlflow.set_tracking_uri(None)
    yield types.SimpleNamespace(folder=folder, store=store, journal=folder / "optuna-journal.log",
                                outcome=outcome, export=folder / "export", parity_run=parity_run)
