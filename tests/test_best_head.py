"""A heads sweep ends with its best head as an MLflow model: features in, P(class 1) out."""

from __future__ import annotations

import tempfile
import threading

import mlflow
import numpy as np
import yaml

from pipeline import naming, studies
from pipeline.best_head import HEAD_FILE, MODEL_NAME
from pipeline.features import write_features
from pipeline.sweep import run_sweep
from pipeline.tracking import default_study_storage
from tests.helpers import load_study, make_features


def test_the_best_head_loads_and_predicts_as_its_trial_did(tmp_path, tracking, monkeypatch):
    x, y = make_features(n=160, d=8)
    features = write_features(tmp_path / "f.h5", x, y, {})
    sweep = tmp_path / "best.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "best", "experiment": "best-exp", "sampler": "grid", "seeds": [0],
        "fixed": {"epochs": 3, "batch_size": 32, "standardize": True},
        "space": {"activation": ["sigmoid", "softmax"], "units": [2], "loss": ["categorical_crossentropy"]}}))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    outcome = run_sweep(str(features), str(sweep), progress=False, register_model="best-head")
    assert not list(scratch.iterdir())  # the sweep's temporary files go with it
    study = load_study(default_study_storage(), outcome.study_name)
    best_run = mlflow.get_run(study.best_trial.user_attrs[studies.RUN_ATTR])
    parent = mlflow.get_run(outcome.parent_run_id)
    model = mlflow.pyfunc.load_model(parent.data.tags["best.model_uri"])
    p = model.predict(x.astype(np.float32))
    assert p.shape == (160,) and np.all((p >= 0) & (p <= 1))
    # the trial's own val_accuracy, from the validation rows of its split
    from pipeline.split import stratified_split

    _, val = stratified_split(y, 0.2, 0)
    accuracy = np.mean((p[val] >= 0.5) == y[val])
    assert accuracy == best_run.data.metrics["val_accuracy"]
    logged = mlflow.MlflowClient().get_logged_model(model.metadata.model_id)
    assert logged.name == MODEL_NAME and logged.tags[naming.TRIAL_NUMBER] == str(study.best_trial.number)
    assert logged.tags["best.run_id"] == best_run.info.run_id
    assert model.metadata.get_input_schema().inputs[0].shape == (-1, 8)
    versions = mlflow.MlflowClient().search_model_versions("name = 'best-head'")
    assert len(versions) == 1
    assert HEAD_FILE in {f.path for f in mlflow.MlflowClient().list_artifacts(best_run.info.run_id)}


def test_a_head_with_a_hidden_layer_predicts_through_it():
    import io
    from types import SimpleNamespace

    from pipeline.best_head import head_file, predict
    from pipeline.config import TrialConfig
    from pipeline.heads import body_weights, build_head, head_weights

    config = TrialConfig(activation="softmax", units=2, loss="categorical_crossentropy",
                         hidden_units=5, hidden_activation="tanh", seed=3)
    model = build_head(config, 12)
    (kernel, bias), (hidden_kernel, hidden_bias) = head_weights(model), body_weights(model)
    result = SimpleNamespace(kernel=kernel, bias=bias, hidden_kernel=hidden_kernel, hidden_bias=hidden_bias)
    with np.load(io.BytesIO(head_file(result, config, None))) as arrays:
        head = {k: arrays[k] for k in arrays.files}
    x = np.random.default_rng(0).normal(size=(20, 12)).astype(np.float32)
    np.testing.assert_allclose(predict(head, x), np.asarray(model(x, training=False))[:, 1], atol=1e-6)


def test_the_writer_thread_reads_the_installed_distributions_while_the_batch_trains(
        tmp_path, tracking, monkeypatch):
    """What logging the best head reads from the environment (MLflow's map of the installed
    distributions' modules) is built once, on the sweep's writer thread, not after the study
    has finished."""
    from mlflow.utils import requirements_utils

    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    monkeypatch.setattr(requirements_utils, "_PACKAGES_TO_MODULES", None)
    readers = []
    read = requirements_utils.importlib_metadata.packages_distributions

    def reading():
        readers.append(threading.current_thread().name)
        return read()
    monkeypatch.setattr(requirements_utils.importlib_metadata, "packages_distributions", reading)
    x, y = make_features(n=160, d=8)
    features = write_features(tmp_path / "f.h5", x, y, {})
    sweep = tmp_path / "best.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "warm", "experiment": "warm-exp", "sampler": "grid", "seeds": [0], "engine": "fused",
        "fixed": {"epochs": 2, "batch_size": 32}, "space": {"activation": ["sigmoid", "softmax"]}}))
    outcome = run_sweep(str(features), str(sweep), progress=False)
    assert "best.model_uri" in mlflow.get_run(outcome.parent_run_id).data.tags
    assert len(readers) == 1 and readers[0].startswith("mlflow-writer"), readers
