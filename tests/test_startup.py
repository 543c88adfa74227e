"""Commands that train nothing do not import TensorFlow.

``--help``, ``export`` and an error on bad input answer without the seconds ``import
tensorflow`` takes. Each command runs in a fresh interpreter, as a user runs it, and reports at
exit whether ``tensorflow`` or ``keras`` was ever imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import make_sweep, new_store

pytestmark = pytest.mark.slow  # each test starts a fresh interpreter: 8-12 s apiece

ROOT = Path(__file__).resolve().parent.parent
REPORT = "imported at exit:"
PROBE = f"""
import atexit, runpy, sys

def report():
    print({REPORT!r}, sorted({{"tensorflow", "keras"}} & set(sys.modules)), file=sys.stderr)

atexit.register(report)
sys.argv = ["pipeline", *sys.argv[1:]]
runpy.run_module("pipeline", run_name="__main__")
"""


def run_pipeline(args: list[str], cwd: Path, store: str) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGS`` in a fresh interpreter, MLflow pointed at ``store``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": store}
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def imported(proc: subprocess.CompletedProcess) -> str:
    """What the probe reported at exit: ``[]`` when neither TensorFlow nor Keras was imported."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith(REPORT)]
    assert lines, proc.stderr[-2000:]
    return lines[-1].removeprefix(REPORT).strip()


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """An empty MLflow store in ``tmp_path``, copied (creating MLflow's tables takes seconds of
    CPU in the command, and is not what is tested here)."""
    monkeypatch.chdir(tmp_path)
    return new_store(tmp_path)


@pytest.mark.parametrize("args", [["--help"], ["sweep", "--help"], ["export", "--help"]],
                         ids=["help", "sweep-help", "export-help"])
def test_help_imports_no_tensorflow(args, tmp_path, store):
    proc = run_pipeline(args, tmp_path, store)
    assert proc.returncode == 0 and "usage:" in proc.stdout
    assert imported(proc) == "[]"


def test_missing_sweep_file_imports_no_tensorflow(tmp_path, store):
    proc = run_pipeline(["sweep", "--features", "features.h5", "--sweep", "missing.yaml"],
                        tmp_path, store)
    assert proc.returncode == 2 and "error: sweep file not found: missing.yaml" in proc.stderr
    assert imported(proc) == "[]"


def test_bad_sweep_file_imports_no_tensorflow(tmp_path, store):
    (tmp_path / "bad.yaml").write_text("name: bad\nepochz: 3\nspace: {units: [1, 2]}\n")
    proc = run_pipeline(["sweep", "--features", "features.h5", "--sweep", "bad.yaml"],
                        tmp_path, store)
    assert proc.returncode == 2 and "epochz: unknown key" in proc.stderr
    assert imported(proc) == "[]"


@pytest.mark.parametrize("features", ["missing.h5", "not_hdf5.h5"])
def test_bad_features_file_imports_no_tensorflow(features, tmp_path, store):
    (tmp_path / "not_hdf5.h5").write_text("not an HDF5 file")
    proc = run_pipeline(["sweep", "--features", features, "--sweep", str(ROOT / "sweeps" / "default.yaml")],
                        tmp_path, store)
    assert proc.returncode == 2, proc.stderr[-2000:]
    expected = "features file not found" if features == "missing.h5" else "not a readable HDF5 file"
    assert expected in proc.stderr
    assert imported(proc) == "[]"


@pytest.mark.parametrize(("args", "message"), [
    (["extract", "--images", "nowhere"], "images folder not found: nowhere"),
    (["extract", "--images", "builtin:digits", "--weights", "imagenet.h5"],
     "weights 'imagenet.h5': not imagenet, random, auto or an existing file"),
    (["extract", "--images", "builtin:digits", "--input_size", "70"],
     "input_size 70: Xception needs at least 71"),
    (["main", "--images", "nowhere", "--sweep", str(ROOT / "sweeps" / "default.yaml"), "--output", "out"],
     "images folder not found: nowhere"),
], ids=["images", "weights", "input-size", "main-images"])
def test_bad_extraction_input_imports_no_tensorflow(args, message, tmp_path, store):
    proc = run_pipeline(args, tmp_path, store)
    assert proc.returncode == 2 and f"error: {message}" in proc.stderr, proc.stderr[-2000:]
    assert imported(proc) == "[]"
    assert not (tmp_path / "features.h5").exists() and not (tmp_path / "out").exists()


def test_export_without_sweeps_imports_no_tensorflow(tmp_path, store):
    proc = run_pipeline(["export", "--output", "out"], tmp_path, store)
    assert proc.returncode == 2 and "error: no sweep runs" in proc.stderr
    assert imported(proc) == "[]"


def test_export_of_a_sweep_imports_no_tensorflow(tmp_path):
    grid = {"activation": ["sigmoid", "softmax"], "units": [2], "loss": ["categorical_crossentropy"],
            "learning_rate": [0.01, 0.1], "init": ["glorot_uniform"]}
    sweep = make_sweep(tmp_path, grid=grid)
    proc = run_pipeline(["export", "--run_id", sweep.parent, "--output", "out",
                         "--formats", "csv,md,tex,png"], tmp_path, sweep.store)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "param_importances.html").exists()
    assert imported(proc) == "[]"


def test_sweep_and_records_modules_import_no_tensorflow(tmp_path):
    code = ("import sys; import pipeline.sweep, pipeline.records, pipeline.parity, pipeline.export, "
            "pipeline.results; print(sorted({'tensorflow', 'keras'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"  # TensorFlow comes with an engine, when a sweep trains
