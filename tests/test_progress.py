"""Progress and start-up noise as a user sees them: bars on a terminal, one line in a log.

The CLI runs in a subprocess twice: with stderr on a pseudo-terminal (what a user at a shell
sees) and on a pipe (what CI and ``mlflow run`` logs get). TensorFlow is imported in both.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import yaml

from pipeline.quiet import filter_absl
from tests.helpers import TINY, make_folder

ROOT = Path(__file__).resolve().parents[1]
SWEEP = {**TINY, "seeds": [0], "fixed": {**TINY["fixed"], "epochs": 2}, "space": TINY["space"][:3]}
ETA = re.compile(r"\[\d\d:\d\d<\d\d:\d\d")  # tqdm's [elapsed<remaining
NOISE = ("absl::InitializeLog", "cudart_stub", "Unable to register", "cpu_feature_guard", "oneDNN")


def run_cli(args: list[str], cwd: Path, terminal: bool) -> tuple[int, str]:
    """Run ``python -m pipeline ARGS``; return its exit status and everything it wrote on stderr."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}",
           "PYTHONPATH": str(ROOT)}
    for name in ("MLFLOW_RUN_ID", "TF_CPP_MIN_LOG_LEVEL"):
        env.pop(name, None)
    command = [sys.executable, "-m", "pipeline", *args]
    if not terminal:
        done = subprocess.run(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
        return done.returncode, done.stderr.decode()
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # rows, columns
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 300)
        if not ready:
            proc.kill()
            raise TimeoutError(f"{command} wrote nothing for 300 s")
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("progress")
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(SWEEP))
    make_folder(tmp / "images", counts=(12, 12), corrupt=0)
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "pipe"])
def test_extract_and_sweep_report_progress(workdir, terminal):
    name = "tty" if terminal else "pipe"
    status, err = run_cli(["extract", "--images", "images", "--weights", "random", "--input_size", "71",
                           "--batch_size", "8", "--output", f"{name}.h5"], workdir, terminal)
    assert status == 0, err
    status, sweep_err = run_cli(["sweep", "--features", f"{name}.h5", "--sweep", "tiny.yaml",
                                 "--study", name], workdir, terminal)
    assert status == 0, sweep_err
    for noise in NOISE:
        assert noise not in err + sweep_err
    if terminal:  # bars: the count out of the total, the time left, redrawn with \r
        assert "extract: 100%" in err and "25/25" in err and ETA.search(err)  # 24 images, 1 other file
        assert "sweep: 100%" in sweep_err and "4/4" in sweep_err and ETA.search(sweep_err)
        assert "\r" in err and "\r" in sweep_err
    else:  # a line saying what starts and the stage's summary; no bar, no carriage return
        lines = err.splitlines()
        assert "extract: 25 files to go" in lines
        assert any(line.startswith("extract: 24 images -> ") for line in lines)
        assert "sweep: 4 trials to go" in sweep_err.splitlines()
        assert any(line.startswith(f"sweep: study '{name}'") for line in sweep_err.splitlines())
        assert "\r" not in err + sweep_err and "%|" not in err + sweep_err


def test_absl_lines_filtered_by_level():
    text = (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            b"I0000 00:00:1795261750.338482   31396 cudart_stub.cc:31] Could not find cuda drivers\n"
            b"E0000 00:00:1795261750.338482   31396 cuda_dnn.cc:8310] Unable to register cuDNN factory\n"
            b"a line of the user's own\n")
    assert filter_absl(text, 0) == text
    assert filter_absl(text, 1) == text.split(b"\n", 2)[2]
    assert filter_absl(text, 3) == b"a line of the user's own\n"
