"""The train/validation split and feature standardization, both seeded by the trial.

Files written by a folder walk list their labels sorted by class, so the split must shuffle;
it is stratified so that every seed sees the same class balance. Standardization statistics
come from the training split only, so validation numbers are honest.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from pipeline.errors import UserError


@dataclass(frozen=True)
class Split:
    """Training and validation features and integer labels for one trial."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray

    @property
    def positive_fraction(self) -> float:
        """The fraction of label 1 in the validation split."""
        return float(np.mean(self.y_val))


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and validation rows: shuffled with ``seed``, stratified on ``y``.
    (scikit-learn is imported here, at the first split: commands that make none, such as
    ``export``, start without it.)"""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    try:
        train, val = train_test_split(idx, test_size=fraction, shuffle=True,
                                      random_state=seed, stratify=y)
    except ValueError as exc:
        raise UserError(f"cannot split {len(y)} rows with validation_fraction {fraction}: "
                        f"{str(exc).splitlines()[0]}") from None
    return np.sort(train), np.sort(val)


def standardization(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The training split's per-feature mean and std (std 0 -> 1), in float64."""
    mean = x_train.mean(axis=0, dtype=np.float64)
    std = x_train.std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0
    return mean, std


def standardize(x_train: np.ndarray, x_val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale both splits by the training split's per-feature mean and std (std 0 -> 1)."""
    mean, std = standardization(x_train)
    scale = lambda x: ((x - mean) / std).astype(np.float32)  # noqa: E731
    return scale(x_train), scale(x_val)


def make_split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int, standardized: bool) -> Split:
    """The :class:`Split` a trial with this seed, validation fraction and standardization uses."""
    train, val = stratified_split(y, fraction, seed)
    x_train, x_val = x[train], x[val]
    if standardized:
        x_train, x_val = standardize(x_train, x_val)
    return Split(x_train=x_train, y_train=y[train], x_val=x_val, y_val=y[val])


class Splits:
    """The splits of one features file, made once per (seed, fraction, standardization) and shared
    by every trial that asks for the same one; validation labels alone need no features copied."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y
        self._splits: dict[tuple, Split] = {}
        self._labels: dict[tuple, np.ndarray] = {}
        self._stats: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def of(self, fraction: float, seed: int, standardized: bool) -> Split:
        """The :class:`Split` of these settings (see :func:`make_split`)."""
        key = (fraction, seed, standardized)
        if key not in self._splits:
            self._splits[key] = make_split(self.x, self.y, fraction, seed, standardized)
        return self._splits[key]

    def validation_labels(self, fraction: float, seed: int) -> np.ndarray:
        """The validation labels of the split of ``fraction`` and ``seed``."""
        key = (fraction, seed)
        if key not in self._labels:
            self._labels[key] = self.y[stratified_split(self.y, fraction, seed)[1]]
        return self._labels[key]

    def standardization(self, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The mean and std the standardized split of ``fraction`` and ``seed`` is scaled by."""
        key = (fraction, seed)
        if key not in self._stats:
            self._stats[key] = standardization(self.x[stratified_split(self.y, fraction, seed)[0]])
        return self._stats[key]

    def check(self, fractions: Iterable[float], seeds: Iterable[int]) -> None:
        """Raise :class:`UserError` unless every split of these fractions and seeds can be made."""
        for fraction, seed in itertools.product(set(fractions), set(seeds)):
            self.validation_labels(fraction, seed)
