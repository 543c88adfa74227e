"""What an engine hands back for one trained head, free of TensorFlow.

Every engine returns a :class:`TrialResult`; the records, the parity experiment and the export
read it. It lives apart from the engines so that importing it, as commands that never train
do, does not import TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

EpochCallback = Callable[[int, dict[str, float]], None]
EPOCH_METRICS = ("loss", "val_loss", "accuracy", "val_accuracy", "prob_loss", "val_prob_loss",
                 "keras_accuracy", "keras_val_accuracy")


@dataclass
class TrialResult:
    """What one trained head leaves: per-epoch metrics, per-step training loss, end state."""

    history: dict[str, list[float]]
    step_loss: list[float]
    positive_fraction: float
    collapsed: bool
    kernel: np.ndarray
    bias: np.ndarray
    extra: dict[str, float] = field(default_factory=dict)
    engine: str = "keras"  # the engine that trained it

    def final(self, name: str) -> float:
        """The last epoch's value of metric ``name``."""
        return self.history[name][-1]
