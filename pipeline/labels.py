"""Label encoding, which follows the head: the one place that decides what ``y`` a loss sees.

- 1 unit: one column of 0/1 (``binary_crossentropy`` on a sigmoid; what the seed fed its
  1-unit softmax);
- 2 units: one-hot, label 0 -> [1, 0] and label 1 -> [0, 1];
- ``sparse_categorical_crossentropy``: the integer labels, whatever the width.

A config may instead give its loss the labels people often pass by mistake (its ``labels``:
``column``, a 0/1 column, or ``onehot``, N x 2), to record what Keras does with them.
"""

from __future__ import annotations

import numpy as np


def encode_labels(y: np.ndarray, units: int, loss: str) -> np.ndarray:
    """Encode integer labels ``y`` (N,) for a head of ``units`` outputs trained with ``loss``."""
    y = np.asarray(y, dtype=np.int64)
    if loss == "sparse_categorical_crossentropy":
        return y
    if units == 1:
        return y.astype(np.float32).reshape(-1, 1)
    return np.eye(units, dtype=np.float32)[y]


def labels_for(y: np.ndarray, config) -> np.ndarray:
    """The ``y`` a head of ``config`` (a :class:`~pipeline.config.TrialConfig`) is trained on:
    :func:`encode_labels` for ``labels: expected``, else the 0/1 column or the one-hot it names."""
    if config.labels == "column":
        return encode_labels(y, 1, "binary_crossentropy")
    if config.labels == "onehot":
        return encode_labels(y, 2, "categorical_crossentropy")
    return encode_labels(y, config.units, config.loss)


def invalid_labels(y: np.ndarray, limit: int = 5) -> list:
    """Up to ``limit`` distinct values of ``y`` that are not the label 0 or 1, sorted.

    Only integers and floats can be labels: every value of another dtype is invalid, booleans
    included, though ``True == 1`` in Python.
    """
    values = np.unique(np.asarray(y)).tolist()
    if np.asarray(y).dtype.kind in "iuf":
        values = [v for v in values if v not in (0, 1)]
    return values[:limit]
