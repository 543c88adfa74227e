"""Bad input through the real command line: one line naming the problem, exit 2, no traceback,
and nothing written to the stores (no MLflow run or experiment, no Optuna study, no output file).

One row per case of README's "Bad input" table, with the message it shows. Also: whatever run
names, params and tags hold, ``export`` writes only inside its output folder.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline import cli, naming
from pipeline.export import export
from pipeline.features import write_features
from pipeline.tracking import create_run, log_batch, series
from tests.helpers import new_store

RNG = np.random.default_rng(0)
X = RNG.normal(size=(40, 8)).astype(np.float32)
Y = np.array([0, 1] * 20)


def h5(path, **datasets):
    import h5py

    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f[name] = value


def with_value(x, row, col, value):
    x = x.copy()
    x[row, col] = value
    return x


def truncated(path):
    write_features(path, X, Y, {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def not_hdf5(path):
    path.write_text("train,label\n0.1,0\n")


def image_folder(root, classes):
    """``root`` with one subfolder per entry of ``classes`` holding that many PNGs."""
    root.mkdir()
    for name, count in classes.items():
        (root / name).mkdir()
        for i in range(count):
            Image.new("RGB", (8, 8), (i, i, i)).save(root / name / f"{i}.png")


SWEEP = {"name": "bad", "experiment": "bad-exp", "fixed": {"epochs": 1},
         "space": {"activation": ["sigmoid"]}}

# (case, how to make the input, command line, the error line it must print: exact, or a prefix
# ending in "(" where the rest comes from a library and varies with its version)
FEATURES_CASES = [
    ("not an HDF5 file", not_hdf5, "error: f.h5: not a readable HDF5 file ("),
    ("truncated HDF5", truncated, "error: f.h5: not a readable HDF5 file ("),
    ("'train' missing", lambda p: h5(p, label=Y),
     "error: f.h5: no dataset 'train' (expected 'train' N x D features and 'label' N labels, "
     "as in gap_Xception.h5)"),
    ("'label' missing", lambda p: h5(p, train=X),
     "error: f.h5: no dataset 'label' (expected 'train' N x D features and 'label' N labels, "
     "as in gap_Xception.h5)"),
    ("lengths differ", lambda p: h5(p, train=X, label=Y[:30]),
     "error: f.h5: 'train' has 40 rows but 'label' has 30"),
    ("features not 2-D", lambda p: h5(p, train=X.reshape(40, 2, 4), label=Y),
     "error: f.h5: 'train' must be 2-D (N x D), got shape (40, 2, 4)"),
    ("labels outside {0, 1}", lambda p: h5(p, train=X, label=np.array([0, 1, 2, 1] * 10)),
     "error: f.h5: labels must be 0 or 1, found [2]"),
    ("only one class", lambda p: h5(p, train=X, label=np.zeros(40, dtype=int)),
     "error: f.h5: only one class present (40 rows of label 0); a binary classifier needs both"),
    ("NaN in the features", lambda p: h5(p, train=with_value(X, 3, 2, np.nan), label=Y),
     "error: f.h5: 'train' holds NaN or Inf in 1 rows (first: row 3)"),
    ("Inf in the features", lambda p: h5(p, train=with_value(X, 5, 1, np.inf), label=Y),
     "error: f.h5: 'train' holds NaN or Inf in 1 rows (first: row 5)"),
]
IMAGES_CASES = [
    ("empty images folder", {},
     "error: images folder img: needs exactly 2 class subfolders, found 0 (none)"),
    ("empty class folder", {"cats": 2, "dogs": 0},
     "error: images folder img: class folder 'dogs' has no images (.bmp, .gif, .jpeg, .jpg, .png)"),
    ("one class folder", {"cats": 2},
     "error: images folder img: needs exactly 2 class subfolders, found 1 (cats)"),
]
SWEEP_CASES = [
    ("unknown key", {"epochz": 3},
     "error: s.yaml: epochz: unknown key (allowed: name, experiment, description, kind, report, "
     "sampler, sampler_seed, n_trials, seeds, engine, objective, pruner, fixed, space)"),
    ("wrong type", {"fixed": {"epochs": "ten"}},
     "error: s.yaml: fixed.epochs: Input should be a valid integer, unable to parse string as an "
     "integer"),
    ("empty space", {"space": {}}, "error: s.yaml: space: must be a non-empty mapping of axes"),
    ("learning rate <= 0", {"space": {"learning_rate": [0.01, 0]}},
     "error: s.yaml: space.learning_rate[1]: 0: input should be greater than 0"),
    ("unknown activation", {"space": {"activation": ["relu"]}},
     "error: s.yaml: space.activation[0]: 'relu' is not allowed (allowed: sigmoid, softmax)"),
    ("unknown loss", {"space": {"loss": ["mse"]}},
     "error: s.yaml: space.loss[0]: 'mse' is not allowed (allowed: binary_crossentropy, "
     "categorical_crossentropy, sparse_categorical_crossentropy)"),
    ("unknown optimizer", {"fixed": {"optimizer": "lbfgs"}},
     "error: s.yaml: fixed.optimizer: 'lbfgs' is not allowed (allowed: sgd, momentum, nesterov, "
     "adam, rmsprop, adagrad, adadelta, adamw)"),
    ("unknown init", {"space": {"init": ["ones"]}},
     "error: s.yaml: space.init[0]: 'ones' is not allowed (allowed: glorot_uniform, "
     "glorot_centered, zeros, he_normal, transfer)"),
]
MISSING_RUN = "runs:/0123456789abcdef0123456789abcdef/features/f.h5"


def cases():
    for name, make, line in FEATURES_CASES:
        yield pytest.param(
            lambda d, make=make: (make(d / "f.h5"), None)[1],
            ["sweep", "--features", "f.h5", "--sweep", "ok.yaml"], line, id=name)
    for name, classes, line in IMAGES_CASES:
        yield pytest.param(
            lambda d, classes=classes: image_folder(d / "img", classes),
            ["extract", "--images", "img", "--output", "out.h5"], line, id=name)
    for name, change, line in SWEEP_CASES:
        yield pytest.param(
            lambda d, change=change: (d / "s.yaml").write_text(yaml.safe_dump({**SWEEP, **change})),
            ["sweep", "--features", "good.h5", "--sweep", "s.yaml"], line, id=name)
    yield pytest.param(
        lambda d: new_store(d),  # an existing, empty store
        ["sweep", "--features", MISSING_RUN, "--sweep", "ok.yaml"],
        f"error: features '{MISSING_RUN}': cannot be fetched (", id="runs:/ URI that does not exist")


@pytest.mark.parametrize(("make", "argv", "line"), list(cases()))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(make, argv, line, tmp_path, monkeypatch,
                                                         capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    write_features(tmp_path / "good.h5", X, Y, {})
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(SWEEP))
    make(tmp_path)
    capsys.readouterr()
    before = set(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    if line.endswith("("):
        assert err[0].startswith(line) and err[0].endswith(")"), err[0]
    else:
        assert err[0] == line
    assert set(tmp_path.rglob("*")) == before  # no MLflow store, journal or output file made
    if (tmp_path / "mlflow.db").exists():  # made empty beforehand: still empty
        client = mlflow.MlflowClient()
        assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
        assert [e.name for e in client.search_experiments()] == ["Default"]
    mlflow.set_tracking_uri(None)


def test_export_writes_only_inside_its_folder_whatever_names_hold(tmp_path, tracking, monkeypatch):
    """Run names, params and tags holding ``../``, ``/`` and NUL never steer where files go; the
    study named in the parent's ``optuna.storage`` tag is only read, never created."""
    monkeypatch.chdir(tmp_path)
    hostile = "../../escaped/x/..\x00/etc/passwd"
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("../escaped-exp")
    parent = create_run(experiment, hostile, tags={
        naming.STEP: "sweep", naming.SWEEP_NAME: hostile, naming.STUDY: hostile,
        naming.STORAGE: f"../escaped/optuna.log#study={hostile}"})
    heads = [("softmax", 2, "categorical_crossentropy", 0.05, "glorot_uniform", "softmax"),
             ("sigmoid", 1, "binary_crossentropy", 0.1, "transfer", "sigmoid_transfer")]
    for seed in (0, 1):
        for activation, units, loss, lr, init, role in heads:
            run = create_run(experiment, f"{hostile}-{role}-{seed}", parent,
                                      {naming.ROLE: role, naming.COLLAPSED: "false", "note": hostile})
            params = {"activation": activation, "units": units, "loss": loss, "learning_rate": lr,
                      "init": init, "seed": seed, "origin": hostile}
            history = {m: [1.0 - 0.1 * e - 0.01 * seed for e in range(3)]
                       for m in ("loss", "val_loss", "accuracy", "val_accuracy", "prob_loss",
                                 "val_prob_loss")}
            metrics = [m for name, values in history.items() for m in series(name, values)]
            log_batch(run, params=params, metrics=metrics)
            client.set_terminated(run, "FINISHED")
    out = tmp_path / "deep" / "out"
    result = export(parent, str(out), "csv,md,tex,png,html")
    assert {"trials.csv", "summary.csv", "epochs.csv", "loss_curves.png", "loss_gaps.png",
            "summary.md", "summary.tex"} <= {p.name for p in result.files}
    assert all(p.resolve().parent == out.resolve() for p in result.files)
    assert f"{hostile}-softmax-0" in (out / "trials.csv").read_text()  # the names did reach export
    written = {p for p in tmp_path.rglob("*") if p.is_file()}
    store = {p for p in written if p.name == "mlflow.db" or "mlruns" in p.relative_to(tmp_path).parts}
    assert written - store == {out / p.name for p in result.files}
    assert not (tmp_path.parent / "escaped").exists()
    artifacts = {a.path for a in client.list_artifacts(parent, "export")}
    assert artifacts == {f"export/{p.name}" for p in result.files}
