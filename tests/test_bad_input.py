"""Bad input through the real command line: one line naming the problem, exit 2, no traceback,
and nothing written to the stores (no MLflow run or experiment, no Optuna study, no output file).

One row per case of README's "Bad input" table, with the message it shows, and a test for each
row of the table after it (what is taken as it is, not refused: ``mlflow run`` parameter values,
files of any kind in an image folder, an interrupted extraction). Also: whatever run names,
params and tags hold, ``export`` writes only inside its output folder.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline import cli, naming
from pipeline.errors import UserError
from pipeline.export import export
from pipeline.features import read_features, resolve_features, write_features
from pipeline.sweep_file import load_sweep
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


def declared(path, train_shape, label_shape):
    """Features whose datasets declare these shapes and hold nothing (chunked: a few KB)."""
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("train", shape=train_shape, dtype="float32",
                         chunks=(min(1000, train_shape[0]), train_shape[1]))
        f.create_dataset("label", shape=label_shape, dtype="int64", chunks=(min(1000, label_shape[0]),))


def not_hdf5(path):
    path.write_text("train,label\n0.1,0\n")


def image_folder(root, classes, others=()):
    """``root`` with one subfolder per entry of ``classes`` holding that many PNGs, and the
    files ``others`` (paths under ``root``) holding text."""
    root.mkdir()
    for name, count in classes.items():
        (root / name).mkdir()
        for i in range(count):
            Image.new("RGB", (8, 8), (i, i, i)).save(root / name / f"{i}.png")
    for other in others:
        (root / other).write_text("not an image")


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
    ("labels declared past the features' rows", lambda p: declared(p, (40, 8), (10**11,)),
     "error: f.h5: 'train' has 40 rows but 'label' has 100000000000"),
    ("features declared past any memory", lambda p: declared(p, (10**10, 32), (10**10,)),
     "error: f.h5: too large to read into memory (Unable to allocate 1.16 TiB..."),
    ("features not 2-D", lambda p: h5(p, train=X.reshape(40, 2, 4), label=Y),
     "error: f.h5: 'train' must be 2-D (N x D), got shape (40, 2, 4)"),
    ("labels outside {0, 1}", lambda p: h5(p, train=X, label=np.array([0, 1, 2, 1] * 10)),
     "error: f.h5: labels must be 0 or 1, found [2]"),
    ("labels stored as booleans", lambda p: h5(p, train=X, label=Y.astype(bool)),
     "error: f.h5: labels must be 0 or 1, found [False, True] (dtype bool)"),
    ("only one class", lambda p: h5(p, train=X, label=np.zeros(40, dtype=int)),
     "error: f.h5: only one class present (40 rows of label 0); a binary classifier needs both"),
    ("NaN in the features", lambda p: h5(p, train=with_value(X, 3, 2, np.nan), label=Y),
     "error: f.h5: 'train' holds NaN or Inf in 1 rows (first: row 3)"),
    ("Inf in the features", lambda p: h5(p, train=with_value(X, 5, 1, np.inf), label=Y),
     "error: f.h5: 'train' holds NaN or Inf in 1 rows (first: row 5)"),
]
IMAGES_CASES = [
    ("empty images folder", {}, (),
     "error: images folder img: needs exactly 2 class subfolders, found 0 (none)"),
    ("empty class folder", {"cats": 2, "dogs": 0}, (),
     "error: images folder img: class folder 'dogs' is empty"),
    ("no image in a class folder", {"cats": 2, "dogs": 0}, ("dogs/a.webp", "dogs/b.txt"),
     "error: images folder img: class folder 'dogs' holds no JPEG, PNG, GIF, BMP or WebP image "
     "(2 other files)"),
    ("one class folder", {"cats": 2}, (),
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
    ("learning rate not finite", {"space": {"learning_rate": [float("inf")]}},
     "error: s.yaml: space.learning_rate[0]: inf: must be finite"),
    ("unknown activation", {"space": {"activation": ["relu"]}},
     "error: s.yaml: space.activation[0]: 'relu' is not allowed (allowed: sigmoid, softmax, linear)"),
    ("unknown loss", {"space": {"loss": ["mse"]}},
     "error: s.yaml: space.loss[0]: 'mse' is not allowed (allowed: binary_crossentropy, "
     "categorical_crossentropy, sparse_categorical_crossentropy)"),
    ("unknown optimizer", {"fixed": {"optimizer": "lbfgs"}},
     "error: s.yaml: fixed.optimizer: 'lbfgs' is not allowed (allowed: sgd, momentum, nesterov, "
     "adam, rmsprop, adagrad, adadelta, adamw)"),
    ("unknown init", {"space": {"init": ["ones"]}},
     "error: s.yaml: space.init[0]: 'ones' is not allowed (allowed: glorot_uniform, "
     "glorot_centered, zeros, he_normal, transfer)"),
    ("sampler seed below 0", {"sampler_seed": -5},
     "error: s.yaml: sampler_seed: -5: input should be greater than or equal to 0"),
    ("sampler seed past numpy's", {"sampler_seed": 10**23},
     "error: s.yaml: sampler_seed: 100000000000000000000000: input should be less than or equal to "
     "4294967295"),
    ("batch size past int32", {"fixed": {"batch_size": 10**20}},
     "error: s.yaml: fixed.batch_size: 100000000000000000000: input should be less than or equal to "
     "2147483647"),
    ("a grid too large to list", {"seeds": list(range(10)),
                                  "space": {"learning_rate": [i / 100 + 0.001 for i in range(100)],
                                            "dropout": [i / 100 for i in range(100)],
                                            "batch_size": list(range(1, 11))}},
     "error: s.yaml: space: the grid holds 1,000,000 points with its seeds, more than 100,000; search a "
     "space this large with sampler tpe or random and n_trials"),
    ("fixed not a mapping", {"fixed": False},
     "error: s.yaml: fixed: must be a mapping of trial settings"),
    ("n_trials a boolean", {"n_trials": True},
     "error: s.yaml: n_trials: True is a boolean; give an integer"),
    ("more trials than a study queues", {"sampler": "random", "n_trials": 10**9,
                                         "space": {"learning_rate": {"low": 1e-3, "high": 0.1}}},
     "error: s.yaml: n_trials: 1000000000: input should be less than or equal to 100000"),
    ("an experiment name past MLflow's 500 characters", {"experiment": "e" * 501},
     "error: s.yaml: experiment: 501 characters, more than 500"),
    ("a description past MLflow's 20,000 characters", {"description": "d" * 20_001},
     "error: s.yaml: description: 20,001 characters, more than 20,000"),
]
DUPLICATE_KEY = """\
name: bad
experiment: bad-exp
fixed:
  epochs: 1
  batch_size: 32
  batch_size: 64
space: {activation: [sigmoid]}
"""
PARITY_CASES = [
    ("parity: learning rate not finite", ["--learning_rate", "inf"],
     "error: parity: learning_rate: inf: must be finite"),
    ("parity: sigmoid learning rate not finite", ["--learning_rate", "10", "--ratio", "1e308"],
     "error: parity: ratio x learning_rate: 1e+308 x 10.0 is not finite (the sigmoids train with it)"),
    ("parity: a hidden layer past any memory", ["--hidden_units", "1000000000"],
     "error: parity: hidden_units: 1000000000: input should be less than or equal to 16384"),
]
MISSING_RUN = "runs:/0123456789abcdef0123456789abcdef/features/f.h5"
STUDY_CASES = [  # names export --run_id, MLflow's filters or a shell could not give back
    (" ", "is empty"), (" padded ", "starts or ends with a space"),
    ("two\nlines", "holds a control character (a newline, a tab)"),
    ("a,b", "holds a comma, a quote (') or a backtick"), ("it's", "holds a comma, a quote (') or a backtick"),
    ("`x`", "holds a comma, a quote (') or a backtick"), ("-lead", "starts with -"),
    ("0123456789abcdef0123456789abcdef", "reads as a run id (32 hex digits)"),
]


def cases():
    for name, make, line in FEATURES_CASES:
        yield pytest.param(
            lambda d, make=make: (make(d / "f.h5"), None)[1],
            ["sweep", "--features", "f.h5", "--sweep", "ok.yaml"], line, id=name)
    for name, classes, others, line in IMAGES_CASES:
        yield pytest.param(
            lambda d, classes=classes, others=others: image_folder(d / "img", classes, others),
            ["extract", "--images", "img", "--output", "out.h5"], line, id=name)
    yield pytest.param(
        lambda d: image_folder(d / "img", {"cats": 1, "dogs": 1}),
        ["main", "--images", "img", "--weights", "random", "--sweep", "ok.yaml", "--output", "out"],
        "error: cannot split 2 rows with validation_fraction 0.2: ...",
        id="main: images too few to split, refused before extraction")
    for name, change, line in SWEEP_CASES:
        yield pytest.param(
            lambda d, change=change: (d / "s.yaml").write_text(yaml.safe_dump({**SWEEP, **change})),
            ["sweep", "--features", "good.h5", "--sweep", "s.yaml"], line, id=name)
    yield pytest.param(
        lambda d: (d / "s.yaml").write_text(DUPLICATE_KEY),
        ["sweep", "--features", "good.h5", "--sweep", "s.yaml"],
        "error: s.yaml: line 6: key 'batch_size' given twice (first on line 5)", id="key given twice")
    for study, why in STUDY_CASES:
        yield pytest.param(lambda d: None, ["sweep", "--features", "good.h5", "--sweep", "ok.yaml",
                                            f"--study={study}"],
                           f"error: study {study!r}: {why}; choose another name", id=f"study {study!r}")
    sweep_s = ["sweep", "--features", "good.h5", "--sweep", "s.yaml"]
    yield pytest.param(lambda d: (d / "s.yaml").write_bytes("name: caf\xe9\n".encode("latin-1")), sweep_s,
                       "error: s.yaml: not UTF-8 text (byte 9: invalid continuation byte)",
                       id="sweep file not UTF-8")
    yield pytest.param(lambda d: (d / "s.yaml").mkdir(), sweep_s,
                       "error: sweep file s.yaml: is a folder, not a file", id="sweep file a folder")
    yield pytest.param(lambda d: None, ["export", "--output", "out"], "error: no MLflow store at ...",
                       id="export: no store here")
    yield pytest.param(lambda d: new_store(d), ["export", "--run_id", "two\nlines"],
                       "error: no runs of study or sweep 'two\\nlines' in the tracking store ...",
                       id="export: a run id holding a newline")
    for model, why in (("x'y/z%", "holds /, : or %, which the Model Registry refuses"),
                        ("..best", "is . or starts with .., which the Model Registry refuses"),
                        ("two\nlines", "holds a control character (a newline, a tab)")):
        yield pytest.param(lambda d: None, ["sweep", "--features", "good.h5", "--sweep", "ok.yaml",
                                            "--register_model", model],
                           f"error: register_model {model!r}: {why}; choose another name",
                           id=f"register_model {model!r}")
    yield pytest.param(lambda d: None, ["sweep", "--features", "good.h5", "--sweep", "/dev/null"],
                       "error: sweep file /dev/null: not a regular file (a device, a pipe or a socket)",
                       id="sweep file a device")
    yield pytest.param(lambda d: (d / "optuna-journal.log").mkdir(), ["findings", "--features", "good.h5"],
                       "error: storage ...", id="findings: its journal's place a folder")
    for storage, why in (("sqlite:///:memory:", "an in-memory database lasts one process and is not "
                                                 "shared with workers; give a file (sqlite:///study.db) "
                                                 "or a journal file"),
                         ("/dev/null", "not a regular file (a device, a pipe or a socket)")):
        yield pytest.param(lambda d: None, ["sweep", "--features", "good.h5", "--sweep", "ok.yaml",
                                            "--storage", storage],
                           f"error: storage {storage}: {why}", id=f"storage {storage}")
    yield pytest.param(lambda d: None, ["sweep", "--features", "good.h5", "--sweep", "ok.yaml",
                                        "--storage", "sqlite:///mlflow.db"],
                       "error: storage sqlite:///mlflow.db: is the MLflow store's own database; give the "
                       "study a file of its own (sqlite:///optuna.db, or a journal file)",
                       id="storage: the MLflow store's database")
    for name, content, why in (("notes.txt", b"a note\nand another\n", "JSONDecodeError: Expecting value"),
                               ("utf16.txt", b"\xff\xfe\x00a\nb\n", "UnicodeDecodeError: 'utf-16-le'"),
                               ("other.json", b'{"a": 1}\n', "KeyError: 'op_code'")):
        yield pytest.param(lambda d, name=name, content=content: (d / name).write_bytes(content),
                           ["sweep", "--features", "good.h5", "--sweep", "ok.yaml", "--storage", name],
                           f"error: storage {name}: not an Optuna journal file ({why}...",
                           id=f"storage: not a journal ({name})")
    for value in ("0", "-3"):
        yield pytest.param(lambda d: None, ["sweep", "--features", "good.h5", "--sweep", "ok.yaml",
                                            "--n_trials", value],
                           f"error: n_trials {value}: must be an integer >= 1", id=f"n_trials {value}")
    for name, flags, line in PARITY_CASES:
        yield pytest.param(lambda d: None, ["parity", "--features", "good.h5", *flags], line, id=name)
    yield pytest.param(
        lambda d: write_features(d / "f.h5", RNG.normal(size=(60, 8)).astype(np.float32),
                                 np.eye(60, dtype=np.int64)[0], {}),
        ["main", "--features", "f.h5", "--sweep", "ok.yaml", "--output", "out"],
        "error: cannot split 60 rows with validation_fraction 0.2: The least populated class...",
        id="main: features its sweep cannot split")
    yield pytest.param(
        lambda d: new_store(d),  # an existing, empty store
        ["sweep", "--features", MISSING_RUN, "--sweep", "ok.yaml"],
        f"error: features '{MISSING_RUN}': cannot be fetched (", id="runs:/ URI that does not exist")
    stale = "f" * 32
    for argv in (["sweep", "--features", "good.h5", "--sweep", "ok.yaml"],
                 ["parity", "--features", "good.h5"],
                 ["main", "--features", "good.h5", "--sweep", "ok.yaml", "--output", "out"],
                 ["extract", "--images", "builtin:digits", "--weights", "random", "--output", "f.h5"]):
        yield pytest.param(
            lambda d: (new_store(d), {"MLFLOW_RUN_ID": stale})[1], argv,
            f"error: launcher run {stale} (MLFLOW_RUN_ID): not in the tracking store (...",
            id=f"{argv[0]}: stale MLFLOW_RUN_ID")


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
    made = make(tmp_path)
    for name, value in made.items() if isinstance(made, dict) else ():  # the case's environment
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    before = set(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    if line.endswith("("):
        assert err[0].startswith(line) and err[0].endswith(")"), err[0]
    elif line.endswith("..."):  # the rest is a library's own words
        assert err[0].startswith(line.removesuffix("...")), err[0]
    else:
        assert err[0] == line
    assert set(tmp_path.rglob("*")) == before  # no MLflow store, journal or output file made
    if (tmp_path / "mlflow.db").exists():  # made empty beforehand: still empty
        client = mlflow.MlflowClient()
        assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
        assert [e.name for e in client.search_experiments()] == ["Default"]
    mlflow.set_tracking_uri(None)


@pytest.mark.parametrize(("text", "line"), [
    ("name: a\nname: b\n", "line 2: key 'name' given twice (first on line 1)"),
    ("space:\n- {activation: [sigmoid]}\n- {units: [1], units: [2]}\n",
     "line 3: key 'units' given twice (first on line 3)"),
    ("objective:\n  metric: val_loss\n  direction: minimize\n  metric: val_accuracy\n",
     "line 4: key 'metric' given twice (first on line 2)"),
], ids=["top level", "flow mapping in a list", "nested block"])
def test_a_key_given_twice_is_refused_at_any_depth(text, line, tmp_path):
    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(UserError) as refused:
        load_sweep(tmp_path / "s.yaml")
    assert str(refused.value) == f"{tmp_path / 's.yaml'}: {line}"


def test_keys_merged_in_may_be_overridden(tmp_path):
    """YAML's ``<<`` merge gives defaults that the mapping's own keys replace: not a repeat."""
    (tmp_path / "s.yaml").write_text(
        "name: a\nexperiment: e\nfixed:\n  <<: {epochs: 1, batch_size: 16}\n  epochs: 3\n"
        "space: {activation: [sigmoid]}\n")
    assert load_sweep(tmp_path / "s.yaml").fixed == {"epochs": 3, "batch_size": 16}


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
    database = ("mlflow.db", "mlflow.db-wal", "mlflow.db-shm")  # its write-ahead log while open
    store = {p for p in written if p.name in database or "mlruns" in p.relative_to(tmp_path).parts}
    assert written - store == {out / p.name for p in result.files}
    assert not (tmp_path.parent / "escaped").exists()
    artifacts = {a.path for a in client.list_artifacts(parent, "export")}
    assert artifacts == {f"export/{p.name}" for p in result.files}


# Values as an adversarial user gives them to `mlflow run -P name=value`. Each one must reach
# the command as exactly one argument, unchanged, and none may run anything: those that would
# (the last five) create the file M in the working directory if a shell ever read them.
HOSTILE_VALUES = {
    "spaces": "cats vs dogs",
    "quotes": "it's a \"quoted\" value",
    "empty": "",
    "leading dash": "--help",
    "newline": "first line\nsecond line",
    "unicode": "猫 vs 狗, é",
    "shell words": "$HOME ~ * {images} a\\b",
    "semicolon": "x;touch M;#",
    "command substitution": "$(touch M)",
    "backticks": "`touch M`",
    "closing quote": "'; touch M; echo '",
    "closing double quote": "\"; touch M; echo \"",
}
ROOT = Path(__file__).resolve().parents[1]
ECHO_ARGV = f"{shlex.quote(sys.executable)} -I -S -c 'import json, sys; print(json.dumps(sys.argv[1:]))'"


def mlproject_command(entry: str, values: dict[str, str], storage_dir: Path) -> str:
    """The shell command MLflow's launcher runs for ``entry`` with ``values`` (its own code)."""
    from mlflow.projects import _project_spec

    point = _project_spec.load_project(str(ROOT)).get_entry_point(entry)
    return point.compute_command(values, str(storage_dir))


@pytest.mark.parametrize("value", list(HOSTILE_VALUES.values()), ids=list(HOSTILE_VALUES))
def test_mlproject_passes_every_parameter_as_one_verbatim_argument(value, tmp_path):
    """Each entry point's command, built by MLflow and run by bash as ``mlflow run`` does, hands
    ``python -m pipeline`` each parameter as the one argument ``--name=<value>``, and the CLI's
    parser reads back the value itself."""
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    parser = cli.build_parser()
    for entry, spec in project["entry_points"].items():
        template = spec["command"]
        assert template.startswith("python -m pipeline "), entry
        values = dict.fromkeys(spec["parameters"], value)
        command = mlproject_command(entry, values, tmp_path)
        shown = subprocess.run(["bash", "-c", command.replace("python -m pipeline", ECHO_ARGV, 1)],
                               cwd=tmp_path, capture_output=True, text=True, check=True)
        argv = json.loads(shown.stdout)
        expected = [token.format(**values) for token in shlex.split(template)[3:]]
        assert argv == expected, entry
        for name in spec["parameters"]:
            assert f"--{name}={value}" in argv, (entry, name)
        _assert_parsed(parser, argv, values)
        assert not (tmp_path / "M").exists(), entry


def _assert_parsed(parser, argv: list[str], values: dict[str, str]) -> None:
    """The CLI reads each string flag of ``argv`` back as its value ("" as unset where the flag
    is optional); flags of whole numbers are given one, as argparse refuses other text."""
    subparser = parser._subparsers._group_actions[0].choices[argv[0]]
    types = {a.dest: a.type for a in subparser._actions}
    numbers = {name for name in values if types.get(name) not in (None, cli._optional_str)}
    given = [arg if arg.split("=", 1)[0][2:] not in numbers else arg.split("=", 1)[0] + "=3"
             for arg in argv]
    args = parser.parse_args(given)
    for name, value in values.items():
        if name not in numbers:
            optional = types[name] is cli._optional_str
            assert getattr(args, name) == (value or None if optional else value), name


def test_the_project_hands_no_value_to_a_shell():
    """Its own code starts processes with argument lists only: no shell, no os.system."""
    shells = ("shell=True", "os.system(", "os.popen(", "subprocess.getoutput(", "subprocess.getstatusoutput(")
    for path in sorted((ROOT / "pipeline").glob("*.py")):
        text = path.read_text()
        assert not [s for s in shells if s in text], path.name


def mlflow_run(folder: Path, entry: str, params: dict[str, str]) -> subprocess.CompletedProcess:
    """``mlflow run <this project> --env-manager local -e entry -P ...`` in ``folder``, on a new
    store of its own there (a copy of an empty one: MLflow's migrations are not what is tested);
    its output goes to ``folder/log``."""
    folder.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)  # the new store's Default experiment keeps its artifacts in folder/mlruns
        store = new_store(folder)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(ROOT), "TMPDIR": str(folder),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    argv = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", "-e", entry]
    for name, value in params.items():
        argv += ["-P", f"{name}={value}"]
    with (folder / "log").open("w") as log:
        return subprocess.run(argv, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=log,
                              stderr=subprocess.STDOUT, text=True, timeout=900)


@pytest.mark.slow
def test_mlflow_run_passes_values_verbatim_and_runs_none_of_them(tmp_path):
    """Through the real ``mlflow run``, one ``sweep`` carrying a hostile value in each parameter:
    a sweep file path holding every shell construct at once, the issue's ``x;touch ...;#`` as
    the features, a study name with spaces, a storage starting with "-", an empty trial count.
    The step fails on the sweep file (the first thing it reads, before TensorFlow is imported),
    whose error line shows the path unchanged (its newline as ``\\n``); ``mlflow run`` exits
    non-zero; no marker file appears. (That every entry point hands each parameter over as one
    verbatim argument is checked for each of these values, without MLflow's launcher, by
    test_mlproject_passes_every_parameter_as_one_verbatim_argument.)"""
    markers = tmp_path / "markers"
    markers.mkdir()
    sweep = (f"a b 'q' \"dq\" $(touch {markers}/dollar) `touch {markers}/tick` "
             f";touch {markers}/semicolon;# '; touch {markers}/quote; '\n猫 é")
    done = mlflow_run(tmp_path / "sweep", "sweep", {
        "features": f"x;touch {markers}/issue;#", "sweep": sweep, "study": "cats vs dogs",
        "storage": "--help", "n_trials": ""})
    log = (tmp_path / "sweep" / "log").read_text()
    assert done.returncode == 1, log  # mlflow run's status for a failed step
    shown = sweep.replace("\n", "\\n")  # an error is one line: a newline in it is written \n
    assert f"\nerror: sweep file not found: {shown}\n" in log, log
    assert list(markers.iterdir()) == []


def test_every_file_of_a_class_folder_is_decoded_or_listed_as_skipped(tmp_path, tracking, monkeypatch,
                                                                     capsys):
    """Whatever their extension: WebP beside PNG and a PNG named .jpeg are decoded; TIFF, text,
    an empty file and a hidden one are counted (``n_skipped``) and listed in
    ``skipped_images.txt``."""
    monkeypatch.chdir(tmp_path)
    image_folder(tmp_path / "img", {"cats": 2, "dogs": 2}, ["dogs/notes.txt"])
    pixels = RNG.integers(0, 255, size=(80, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "img" / "cats" / "photo.webp")
    Image.fromarray(pixels).save(tmp_path / "img" / "dogs" / "png-inside.jpeg", format="PNG")
    Image.fromarray(pixels).save(tmp_path / "img" / "dogs" / "scan.tiff")
    (tmp_path / "img" / "cats" / "empty.jpg").write_bytes(b"")
    (tmp_path / "img" / "cats" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    cli.main(["extract", "--images", "img", "--weights", "random", "--input_size", "71",
              "--batch_size", "4", "--output", "f.h5"])
    skipped = ["img/cats/.DS_Store", "img/cats/empty.jpg", "img/dogs/notes.txt", "img/dogs/scan.tiff"]
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.data.metrics["n_images"] == 6 and run.data.metrics["n_skipped"] == 4
    listed = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="skipped_images.txt",
                                                 dst_path=str(tmp_path / "fetched"))
    assert Path(listed).read_text().splitlines() == skipped
    uri = f"runs:/{run.info.run_id}/features/f.h5"
    assert f"extract: run {run.info.run_id}; a sweep reads its features as {uri}" in (
        capsys.readouterr().err.splitlines())
    assert read_features(resolve_features(uri)).x.shape == (6, 2048)


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "reason"), [(signal.SIGINT, "Ctrl-C"),
                                                (signal.SIGTERM, "terminated by signal 15")],
                         ids=["Ctrl-C", "SIGTERM"])
def test_interrupted_extraction_says_nothing_was_written(signum, reason, tmp_path):
    """Ctrl-C or SIGTERM in the middle of ``python -m pipeline extract``: exit 130 or 143, one line
    saying that nothing was written and the rerun starts over, no file (not even a temporary
    one), and the run KILLED."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "extract", "--images", "builtin:digits",
                                "--weights", "random", "--batch_size", "1", "--output", "out.h5"],
                               cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:  # the stage's first line: the images are being extracted
        lines.append(line)
        if line.startswith("extract: 357 files to go"):
            break
    time.sleep(1.0)
    process.send_signal(signum)
    lines += process.stderr.readlines()
    assert process.wait(timeout=120) == 128 + signum, lines  # 130 for Ctrl-C, 143 for SIGTERM
    assert lines[-1] == (f"interrupted ({reason}): nothing was written at out.h5; rerun to start "
                         f"the extraction over\n"), lines
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "mlruns") == ["mlflow.db"]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
        assert run.info.status == "KILLED"
    finally:
        mlflow.set_tracking_uri(None)
