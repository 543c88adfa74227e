"""The sweep's best head as an MLflow model: features in, P(class 1) out.

Every head trial leaves its trained weights on its run (``head.npz``: kernel, bias, activation,
units, for a head with a hidden layer its kernel, bias and activation, and for a standardized
trial the training split's mean and std). Once a heads sweep
has finished, its parent run logs the best completed trial's head as a pyfunc model
(:class:`HeadModel`, no TensorFlow needed to predict) with a signature and an input example,
tagged with the trial and run it came from; ``register_as`` also registers it in the Model
Registry. ``mlflow.pyfunc.load_model(uri).predict(features)`` gives P(class 1) per row, as the
trial computed it in inference mode (dropout off).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

import mlflow
import numpy as np

from pipeline import naming, tracking
from pipeline.metrics import positive_probability, sigmoid
from pipeline.quiet import no_artifacts_progress
from pipeline.results import hidden_output

HEAD_FILE = "head.npz"
MODEL_NAME = "best_head"


def head_file(result, config, standardization: tuple[np.ndarray, np.ndarray] | None) -> bytes:
    """A trained head's ``head.npz``: what :class:`HeadModel` needs to predict."""
    arrays = {"kernel": result.kernel, "bias": result.bias, "activation": np.array(config.activation),
              "units": np.array(config.units)}
    if result.hidden_kernel is not None:
        arrays |= {"hidden_kernel": result.hidden_kernel, "hidden_bias": result.hidden_bias,
                   "hidden_activation": np.array(config.hidden_activation)}
    if standardization is not None:
        arrays["mean"], arrays["std"] = standardization
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def predict(head: dict, x: np.ndarray) -> np.ndarray:
    """P(class 1) of a head (the arrays of ``head.npz``) for features ``x``."""
    x = np.asarray(x, dtype=np.float64)
    if "mean" in head:
        x = (x - head["mean"]) / head["std"]
    if "hidden_kernel" in head:
        x = hidden_output(x, head["hidden_kernel"], head["hidden_bias"], str(head["hidden_activation"]))
    z = x @ head["kernel"].astype(np.float64) + head["bias"].astype(np.float64)
    activation = str(head["activation"])
    outputs = z
    if activation == "softmax":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        outputs = e / e.sum(axis=1, keepdims=True)
    elif activation == "sigmoid":
        outputs = sigmoid(z)
    return positive_probability(outputs, activation)


class HeadModel:
    """A trained head as a pyfunc model (see the module docstring): MLflow loads it with
    :func:`_load_pyfunc`, this module being the model's loader module."""

    def __init__(self, head: dict):
        self.head = head

    def predict(self, model_input, params=None) -> np.ndarray:
        return predict(self.head, np.asarray(model_input))


def _load_pyfunc(data_path: str) -> HeadModel:
    with np.load(data_path) as arrays:
        return HeadModel({k: arrays[k] for k in arrays.files})


def prepare() -> None:
    """Build, once per process, MLflow's map of the installed distributions' modules, which
    logging a model reads (to warn when the model's requirements do not match the
    environment) and builds on first use by reading every distribution's file list
    (its cost: docs/benchmarks.md, section 5).
    MLflow keeps it, so later calls take microseconds. A sweep builds it on its writer thread
    while a batch trains, when that thread has opened the batch's runs and waits for the
    records."""
    from mlflow.utils.requirements_utils import _init_packages_to_modules_map

    _init_packages_to_modules_map()


def log_best_head(parent: str, best: mlflow.entities.Run, trial_number: int, example: np.ndarray,
                  register_as: str | None = None) -> str:
    """Log the head of the best trial's run ``best`` as the model ``best_head`` of run ``parent``;
    returns the model's URI. MLflow's own progress bars and notices stay off: the sweep's last
    line is its summary."""
    with _quiet():
        return _log_best_head(parent, best, trial_number, example, register_as)


@contextlib.contextmanager
def _quiet():
    """No artifact progress bar, no INFO notices from MLflow's model logging, for the block."""
    loggers = [logging.getLogger(name) for name in ("mlflow.pyfunc", "mlflow.models", "mlflow.store")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with no_artifacts_progress():
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _log_best_head(parent: str, best: mlflow.entities.Run, trial_number: int, example: np.ndarray,
                   register_as: str | None) -> str:
    from mlflow.models import infer_signature

    tags = {naming.TRIAL_NUMBER: trial_number, "best.run_id": best.info.run_id,
            "best.run_name": best.info.run_name}
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=parent):
        local = mlflow.artifacts.download_artifacts(run_id=best.info.run_id, artifact_path=HEAD_FILE,
                                                    dst_path=tmp)
        with np.load(local) as arrays:
            output = predict({k: arrays[k] for k in arrays.files}, example)
        code = Path(tmp, "pipeline")
        _copy_package(code)
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME, loader_module=__name__, data_path=local, code_paths=[str(code)],
            signature=infer_signature(example.astype(np.float32), output),
            input_example=example.astype(np.float32), registered_model_name=register_as,
            tags={k: str(v) for k, v in tags.items()}, pip_requirements=["mlflow", "numpy"])
    tracking.log_batch(parent, tags={"best.model_uri": info.model_uri})
    return info.model_uri


def _copy_package(to: Path) -> None:
    """This package's modules the model imports (copied without caches), for a model that loads
    where the project is not installed."""
    import shutil

    shutil.copytree(Path(__file__).parent, to, ignore=shutil.ignore_patterns("__pycache__"))
