"""Keep TensorFlow's start-up noise out of the user's terminal.

Must run before ``tensorflow`` or ``keras`` is first imported: the C++ log level is read
once, at import. :func:`quiet_tensorflow` is idempotent and only sets variables the user
has not set, so ``TF_CPP_MIN_LOG_LEVEL=0`` still shows everything when debugging.
"""

import logging
import os
import warnings


def quiet_tensorflow() -> None:
    """Silence TensorFlow's C++ and Python logs, oneDNN notices and Keras UserWarnings."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="keras")
    warnings.filterwarnings("ignore", module="tensorflow")
    warnings.filterwarnings("ignore", category=FutureWarning)
