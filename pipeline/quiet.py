"""Keep TensorFlow's start-up noise out of the user's terminal, and MLflow's download bars
out of logs.

Must run before ``tensorflow`` or ``keras`` is first imported: the C++ log level is read
once, at import. :func:`quiet_tensorflow` is idempotent and only sets variables the user
has not set, so ``TF_CPP_MIN_LOG_LEVEL=0`` still shows everything when debugging.

``TF_CPP_MIN_LOG_LEVEL`` alone is not enough: TensorFlow's shared libraries log through
Abseil before Abseil's logging is initialised (``cudart_stub.cc ... Could not find cuda
drivers``, ``Unable to register cuDNN factory``), and those lines go straight to file
descriptor 2 whatever the level. So the first ``import tensorflow`` runs with descriptor 2
captured, and the captured text is written back without the Abseil lines below the level
``TF_CPP_MIN_LOG_LEVEL`` asks for (0 keeps all, 1 drops INFO, 2 WARNING, 3 ERROR too).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import tempfile
import warnings

# An Abseil/glog line: severity letter, MMDD, time, thread, file:line]
_ABSL_LINE = re.compile(rb"^([IWEF])\d{4} [\d:.]+\s+\d+ [^\]]+\] ")
_ABSL_PREAMBLE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_SEVERITY = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}


def quiet_tensorflow() -> None:
    """Silence TensorFlow's C++ and Python logs (its oneDNN notice among them), Keras's and
    TensorFlow's warnings, and the FutureWarnings MLflow and Optuna raise from their own code.
    Nothing that changes a number: oneDNN stays as TensorFlow ships it (on, on
    x86), as in the user's own Keras scripts (``TF_ENABLE_ONEDNN_OPTS=0`` still turns it off)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="keras")
    warnings.filterwarnings("ignore", module="tensorflow")
    # MLflow's and Optuna's deprecation notices are FutureWarnings; those raised inside the
    # libraries themselves are theirs to fix. One raised by a call of ours names our module,
    # is not filtered here, and fails the tests (pyproject's filterwarnings).
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(mlflow|optuna)(\.|$)")
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())


def filter_absl(text: bytes, min_level: int) -> bytes:
    """``text`` without Abseil log lines of severity below ``min_level`` (0 INFO .. 3 FATAL).

    The "All log messages before absl::InitializeLog()" preamble goes whenever anything is
    filtered; every other line is kept as it was.
    """
    if min_level <= 0:
        return text
    kept = []
    for line in text.splitlines(keepends=True):
        match = _ABSL_LINE.match(line)
        if line.rstrip() == _ABSL_PREAMBLE or (match and _SEVERITY[match.group(1)] < min_level):
            continue
        kept.append(line)
    return b"".join(kept)


@contextlib.contextmanager
def filtered_stderr(min_level: int):
    """Capture file descriptor 2 in the block, then write it back through :func:`filter_absl`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = filter_absl(capture.read(), min_level)
            if text:
                os.write(2, text)


def _min_level() -> int:
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` as usual, but runs its first import under :func:`filtered_stderr`."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # one import is all it takes; later finds go the usual way
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and type(spec.loader) is importlib.machinery.SourceFileLoader:
            spec.loader = _QuietLoader(spec.loader.name, spec.loader.path)
        return spec


class _QuietLoader(importlib.machinery.SourceFileLoader):
    def exec_module(self, module):
        with filtered_stderr(_min_level()):
            super().exec_module(module)


@contextlib.contextmanager
def no_artifacts_progress(off: bool = True):
    """MLflow's artifact download/upload progress bar off for the block when ``off`` (the
    setting ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR``, restored after it; left as the user set it
    otherwise): in a log a redrawn bar is a line of carriage returns."""
    saved = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    if off:
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = saved
