"""Commands that train nothing do not import TensorFlow.

``--help``, ``export`` and an error on bad input answer without the seconds ``import
tensorflow`` takes, and without scikit-learn's second unless they need it (Optuna's
importances; a split needs none: tests/test_split.py); a sweep draws nothing, so it imports
no matplotlib either. The commands run in a fresh interpreter, as a user runs them, which
reports after each command which of ``tensorflow``, ``keras``, ``sklearn`` and ``matplotlib``
have been imported so far.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.features import write_features
from tests.helpers import SEED_GRID, fresh_python, make_features, make_sweep, new_store, write_sweep

pytestmark = pytest.mark.slow  # each test starts a fresh interpreter: 8-12 s apiece

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SWEEP = str(ROOT / "sweeps" / "default.yaml")
REPORT = "after the command:"
# Runs each command of a JSON list through the CLI's entry point, one after the other, and
# after each one reports its exit status and which of TensorFlow, Keras, scikit-learn and
# matplotlib are imported so far (on stdout and stderr alike, so that both can be split by
# command).
PROBE = f"""
import json, sys
from pipeline.cli import main

for args in json.loads(sys.argv[1]):
    try:
        main(args)
        status = 0
    except SystemExit as exit:
        status = exit.code or 0
    heavy = sorted({{"tensorflow", "keras", "sklearn", "matplotlib"}} & set(sys.modules))
    line = {REPORT!r} + " " + json.dumps([status, heavy])
    print(line, flush=True)
    print(line, file=sys.stderr, flush=True)
"""

# Bad input to every stage that reads files the user names: (the command, its one error line).
BAD_INPUT = [
    (["sweep", "--features", "features.h5", "--sweep", "missing.yaml"],
     "sweep file not found: missing.yaml"),
    (["sweep", "--features", "features.h5", "--sweep", "unknown_key.yaml"], "epochz: unknown key"),
    (["sweep", "--features", "features.h5", "--sweep", "relu.yaml"],
     "'relu' is not allowed (allowed: sigmoid, softmax, linear)"),
    (["sweep", "--features", "missing.h5", "--sweep", DEFAULT_SWEEP], "features file not found"),
    (["sweep", "--features", "not_hdf5.h5", "--sweep", DEFAULT_SWEEP], "not a readable HDF5 file"),
    (["extract", "--images", "nowhere", "--output", "out.h5"], "images folder not found: nowhere"),
    (["extract", "--images", "builtin:digits", "--weights", "imagenet.h5", "--output", "out.h5"],
     "weights 'imagenet.h5': not imagenet, random, auto or an existing file"),
    (["extract", "--images", "builtin:digits", "--input_size", "70", "--output", "out.h5"],
     "input_size 70: Xception needs at least 71"),
    (["extract", "--images", "builtin:digits", "--input_size", "1000000", "--output", "out.h5"],
     "input_size 1000000: at most 1024 (Xception's activations of a batch grow with its square)"),
    (["main", "--images", "nowhere", "--sweep", DEFAULT_SWEEP, "--output", "out"],
     "images folder not found: nowhere"),
    (["export", "--output", "out"], "no sweep runs"),
]
HELP = [["--help"], ["sweep", "--help"], ["export", "--help"]]


def run_commands(commands: list[list[str]], cwd: Path, store: str) -> list[tuple[int, list, str, str]]:
    """``commands`` through the CLI, one after the other in one fresh interpreter, MLflow pointed
    at ``store``: for each, its exit status, what of TensorFlow, Keras, scikit-learn and
    matplotlib was imported by then, and its stdout and stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": store}
    env.pop("MLFLOW_RUN_ID", None)
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(commands)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def split(text: str) -> list[tuple[list, str]]:
        """(report, output) per command: a command's output ends with its report line. Whatever
        comes after the last report (the interpreter's exit) is checked for a traceback."""
        reports, (output, *chunks) = [], text.split(REPORT + " ")
        for chunk in chunks:
            report, _, rest = chunk.partition("\n")
            reports.append((json.loads(report), output))
            output = rest
        assert "Traceback" not in output, output
        return reports
    out, err = split(proc.stdout), split(proc.stderr)
    assert len(out) == len(err) == len(commands), proc.stderr[-3000:]
    return [(status, imported, stdout, stderr)
            for ((status, imported), stdout), (_, stderr) in zip(out, err, strict=True)]


def test_help_and_bad_input_import_no_tensorflow(tmp_path):
    """Every ``--help`` answers and every bad input is refused with exit 2, one ``error:`` line and
    no traceback, none of them importing TensorFlow, and nothing is written."""
    (tmp_path / "unknown_key.yaml").write_text("name: bad\nepochz: 3\nspace: {units: [1, 2]}\n")
    (tmp_path / "relu.yaml").write_text("name: x\nexperiment: e\nspace: {activation: [relu]}\n")
    (tmp_path / "not_hdf5.h5").write_text("not an HDF5 file")
    before = sorted(p.name for p in tmp_path.iterdir())
    store = new_store(tmp_path)
    results = run_commands(HELP + [args for args, _ in BAD_INPUT], tmp_path, store)
    for args, (status, imported, stdout, _) in zip(HELP, results, strict=False):
        assert status == 0 and f"usage: python -m pipeline {' '.join(args[:-1])}".strip() in stdout, args
        assert imported == [], args
    for (args, message), (status, imported, _, stderr) in zip(BAD_INPUT, results[len(HELP):], strict=True):
        lines = stderr.strip().splitlines()
        assert status == 2 and lines[-1].startswith("error: ") and message in lines[-1], (args, stderr)
        assert "Traceback" not in stderr, stderr
        assert imported == [], args
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "mlflow.db"])


def test_export_of_a_sweep_imports_no_tensorflow(tmp_path):
    """Export never imports TensorFlow; matplotlib comes with the figures (``png``; ``md``
    brings them too), scikit-learn only with Optuna's pages (``md``)."""
    grid = {"activation": ["sigmoid", "softmax"], "units": [2], "loss": ["categorical_crossentropy"],
            "learning_rate": [0.01, 0.1], "init": ["glorot_uniform"]}
    sweep = make_sweep(tmp_path, grid=grid)
    (tables, pages) = run_commands(
        [["export", "--run_id", sweep.parent, "--output", "tables", "--formats", "csv,tex,png"],
         ["export", "--run_id", sweep.parent, "--output", "pages", "--formats", "md"]],
        tmp_path, sweep.store)
    assert tables[0] == pages[0] == 0, (tables[3] + pages[3])[-2000:]
    assert (tmp_path / "tables" / "summary.csv").exists()
    assert (tmp_path / "pages" / "param_importances.html").exists()
    assert (tables[1], pages[1]) == (["matplotlib"], ["matplotlib", "sklearn"])


def test_sweep_and_records_modules_import_no_tensorflow(tmp_path):
    code = ("import sys; import pipeline.sweep, pipeline.records, pipeline.parity, pipeline.export, "
            "pipeline.results; print(sorted({'tensorflow', 'keras', 'matplotlib'} & set(sys.modules)))")
    # TensorFlow comes with the Keras engine only, matplotlib with a figure drawn
    assert fresh_python(code, tmp_path) == "[]"


def test_a_fused_sweep_imports_no_tensorflow(tmp_path):
    """The fused engine trains without TensorFlow, the split needs no scikit-learn and a sweep
    draws no figure: a sweep whose heads it trains imports none of them, from the command line
    to the last record."""
    write_features(tmp_path / "features.h5", *make_features(), {})
    sweep = write_sweep(tmp_path, {"name": "grid", "experiment": "no-tensorflow", "sampler": "grid",
                                   "seeds": [0], "engine": "fused", "fixed": {"epochs": 2, "dropout": 0.5},
                                   "space": SEED_GRID})
    [(status, imported, stdout, stderr)] = run_commands(
        [["sweep", "--features", "features.h5", "--sweep", sweep]], tmp_path, new_store(tmp_path))
    assert status == 0, stderr[-2000:]
    assert "{'complete': 16, 'fail': 0, 'pruned': 0}" in stdout + stderr
    assert imported == []
