"""Helpers shared by the test modules: small real data, private MLflow stores, study specs.

Test modules import these from here (never from one another or from ``conftest``); the
fixtures that use them are in ``conftest.py``.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import yaml

from pipeline import naming, records, storages, studies, tracking
from pipeline.config import TrialConfig
from pipeline.results import EPOCH_METRICS, TrialResult

PROJECT = Path(__file__).resolve().parent.parent


def fresh_python(code: str, cwd) -> str:
    """What ``python -c code`` prints in a fresh interpreter (the project importable, run in
    ``cwd``), after asserting it exits 0: for what a module imports, which one process hides."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(PROJECT)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def load_study(storage: str, name: str | None = None) -> optuna.Study:
    """Study ``name`` of the Optuna storage ``storage`` or, without a name, the one study there
    (a sweep run under its default name); KeyError while there is none."""
    the_storage = storages.make_storage(storage)
    if name is None:
        names = optuna.get_all_study_names(the_storage)
        if not names:
            raise KeyError(f"no study in {storage}")
        assert len(names) == 1, names
        name = names[0]
    return optuna.load_study(study_name=name, storage=the_storage)


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


_TEMPLATE: list[Path] = []  # the empty store new_store copies, made once per process


def new_store(folder, name: str = "mlflow.db") -> str:
    """The URI of an SQLite MLflow store ``folder/name``: new and empty, unless one is there.

    MLflow makes a store by running its schema migrations (seconds of CPU each time); this
    copies an empty store made once per process instead (milliseconds). Its Default
    experiment keeps its artifacts where a store made here and now would: ``./mlruns/0``.
    """
    path = Path(folder) / name
    if not path.exists():
        if not _TEMPLATE:
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            template = Path(tempfile.mkdtemp(prefix="mlflow-template-"))
            atexit.register(shutil.rmtree, template, True)
            SqlAlchemyStore(f"sqlite:///{template / name}", str(template / "mlruns")).engine.dispose()
            _TEMPLATE.append(template / name)
        shutil.copyfile(_TEMPLATE[0], path)
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                       (str(Path.cwd().resolve() / "mlruns" / "0"),))
    return f"sqlite:///{path}"


@contextlib.contextmanager
def private_store(folder):
    """MLflow pointed at a new SQLite store in ``folder``, also the working folder (where MLflow
    puts the artifacts of the experiments made in the block, ``./mlruns``), for the block (for
    module- or session-scoped fixtures, which cannot use ``monkeypatch``); yields its URI."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        uri = new_store(folder)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(uri)
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(None)


def make_folder(root, counts=(4, 3), corrupt=1, size=80):
    """root/cats and root/dogs with small random PNGs, plus ``corrupt`` undecodable .jpg files
    and a text file in dogs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, (name, n) in enumerate(zip(("cats", "dogs"), counts, strict=True)):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 255, size=(size, size + 10 * label, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    for i in range(corrupt):
        (root / "dogs" / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "dogs" / "notes.txt").write_text("not an image: skipped and listed")
    return root


def write_sweep(folder, spec, name="sweep.yaml") -> str:
    """``spec`` written as the sweep file ``folder/name``; returns its path."""
    path = folder / name
    path.write_text(yaml.safe_dump(spec))
    return str(path)


SMALL_STUDY = {
    "name": "small",
    "experiment": "small-study",
    "description": "Does the 1-unit softmax collapse, and does the transferred sigmoid follow the softmax?",
    "sampler": "grid",
    "seeds": [0, 1],
    "fixed": {"epochs": 3, "batch_size": 32, "dropout": 0.5, "optimizer": "sgd"},
    "space": [
        {"activation": "softmax", "units": 1, "loss": "binary_crossentropy", "learning_rate": 0.05},
        {"activation": "softmax", "units": 2, "loss": "categorical_crossentropy", "learning_rate": 0.05},
        {"activation": "sigmoid", "units": 1, "loss": "binary_crossentropy", "learning_rate": 0.1,
         "init": ["transfer", "glorot_uniform"]},
    ],
}

# SMALL_STUDY and a combination Keras rejects (sparse cross-entropy on one unit): 10 trials.
TINY = {**SMALL_STUDY, "name": "tiny", "experiment": "tiny-exp", "description": "a test study",
        "space": [*SMALL_STUDY["space"],
                  {"activation": "softmax", "units": 1, "loss": "sparse_categorical_crossentropy",
                   "learning_rate": 0.05}]}


SEED_GRID = {"activation": ["sigmoid", "softmax"], "units": [1, 2],
             "loss": ["binary_crossentropy", "categorical_crossentropy"],
             "learning_rate": [0.01], "init": ["glorot_uniform", "he_normal"]}
EPOCHS = 3


def _result(config: TrialConfig, rng: np.random.Generator) -> TrialResult:
    """A plausible trained head: losses falling over the epochs, accuracies around 0.8."""
    history = {name: list(np.sort(rng.uniform(0.3, 0.9, EPOCHS))[::-1] if "loss" in name
                          else rng.uniform(0.7, 0.9, EPOCHS)) for name in EPOCH_METRICS}
    return TrialResult(history=history, step_loss=list(rng.uniform(0.3, 0.9, 4 * EPOCHS)),
                       positive_fraction=0.5, collapsed=naming.role_of(config) == "softmax_1unit",
                       kernel=np.zeros((2, config.units)), bias=np.zeros(config.units))


def make_sweep(folder, seeds=(0,), grid=None) -> types.SimpleNamespace:
    """A finished ``heads`` sweep over ``grid`` x ``seeds`` in ``folder`` (its own SQLite store and
    journal), recorded as the sweep records one. Returns ``store``, ``parent``, ``n``; MLflow's
    tracking URI is left as it was."""
    grid = grid or SEED_GRID
    store, journal = new_store(folder), str(folder / "optuna-journal.log")
    rng = np.random.default_rng(0)
    mlflow.set_tracking_uri(store)
    try:
        study = optuna.create_study(study_name="scale", storage=storages.make_storage(journal))
        study.set_user_attr("objective", "val_prob_loss")
        experiment = mlflow.MlflowClient().create_experiment(
            "scale", artifact_location=str(folder / "mlruns"))
        parent = tracking.create_run(experiment, "scale-run", tags={
            naming.STEP: "sweep", naming.SWEEP_NAME: "scale", naming.STUDY: "scale",
            naming.KIND: "heads", naming.REPORT: "summary",
            naming.STORAGE: storages.study_url(journal, "scale")})
        axes = {**grid, "seed": list(seeds)}
        distributions = {k: optuna.distributions.CategoricalDistribution(v) for k, v in axes.items()}
        trials = []
        for number, values in enumerate(itertools.product(*axes.values())):
            params = dict(zip(axes, values, strict=True))
            config = TrialConfig(**params, epochs=EPOCHS)
            run = tracking.create_run(experiment, naming.trial_run_name(config), parent,
                                      {**records.head_tags(config), naming.STEP: "trial",
                                       naming.TRIAL_NUMBER: str(number), naming.ENGINE: "fused"})
            result = _result(config, rng)
            tracking.log_batch(run, params=config.params())
            records.log_head_metrics(run, result, np.array([0, 1]), config)
            mlflow.MlflowClient().set_terminated(run, "FINISHED")
            trials.append(optuna.trial.create_trial(params=params, distributions=distributions,
                                                    value=result.final("val_prob_loss"),
                                                    user_attrs={studies.RUN_ATTR: run}))
        study.add_trials(trials)
        mlflow.MlflowClient().set_terminated(parent, "FINISHED")
    finally:
        mlflow.set_tracking_uri(None)
    return types.SimpleNamespace(store=store, parent=parent, n=len(trials))
