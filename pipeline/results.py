"""What an engine hands back for one trained head, free of TensorFlow.

Every engine returns a :class:`TrialResult`; the records, the parity experiment and the export
read it. It lives apart from the engines so that importing it, as commands that never train
do, does not import TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pipeline.metrics import sigmoid

EpochCallback = Callable[[int, dict[str, float]], None]
HIDDEN_FUNCTIONS = {"relu": lambda z: np.maximum(z, 0.0), "tanh": np.tanh,
                    "sigmoid": sigmoid, "linear": lambda z: z}
EPOCH_METRICS = ("loss", "val_loss", "accuracy", "val_accuracy", "prob_loss", "val_prob_loss",
                 "keras_accuracy", "keras_val_accuracy")


@dataclass
class TrialResult:
    """What one trained head leaves: per-epoch metrics, per-step training loss, end state.

    ``kernel`` and ``bias`` are the output layer's; ``hidden_kernel`` and ``hidden_bias`` the
    hidden layer's of a head that has one (None otherwise).
    """

    history: dict[str, list[float]]
    step_loss: list[float]
    positive_fraction: float
    collapsed: bool
    kernel: np.ndarray
    bias: np.ndarray
    extra: dict[str, float] = field(default_factory=dict)
    engine: str = "keras"  # the engine that trained it
    hidden_kernel: np.ndarray | None = None
    hidden_bias: np.ndarray | None = None

    def final(self, name: str) -> float:
        """The last epoch's value of metric ``name``."""
        return self.history[name][-1]

    def output_inputs(self, x: np.ndarray, hidden_activation: str) -> np.ndarray:
        """What the output layer reads for features ``x`` in inference mode (float64): ``x``
        itself, or the hidden layer's output (:func:`hidden_output`)."""
        if self.hidden_kernel is None:
            return np.asarray(x, dtype=np.float64)
        return hidden_output(x, self.hidden_kernel, self.hidden_bias, hidden_activation)


def hidden_output(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, activation: str) -> np.ndarray:
    """A hidden Dense layer's output in float64: ``activation(x @ kernel + bias)``."""
    z = np.asarray(x, dtype=np.float64) @ kernel.astype(np.float64) + bias.astype(np.float64)
    return HIDDEN_FUNCTIONS[activation](z)
