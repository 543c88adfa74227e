"""The train/validation split and feature standardization, both seeded by the trial.

Files written by a folder walk list their labels sorted by class, so the split must shuffle;
it is stratified so that every seed sees the same class balance. Standardization statistics
come from the training split only, so validation numbers are honest.
"""

from __future__ import annotations

import itertools
import math
import numbers
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
    """Indices of the training and validation rows, each sorted: shuffled with ``seed``, stratified
    on ``y``, a ``fraction`` of the rows (rounded up) in validation.

    It reproduces scikit-learn's ``train_test_split(test_size=fraction, random_state=seed,
    stratify=y)`` (a ``StratifiedShuffleSplit``) in NumPy alone, so that a sweep starts without
    importing scikit-learn; ``tests/test_split.py`` holds it to scikit-learn's indices and error
    messages. ``y`` holds 1-D labels. A ``fraction`` that is no float in (0, 1), a ``seed`` outside
    [0, 2**32 - 1], a class of a single row or a split too small to hold every class on both sides
    raises :class:`UserError` with scikit-learn's message.
    """
    try:
        return _stratified_shuffle_split(np.asarray(y), fraction, seed)
    except ValueError as exc:
        raise UserError(f"cannot split {len(y)} rows with validation_fraction {fraction}: "
                        f"{str(exc).splitlines()[0]}") from None


def _stratified_shuffle_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn 1.9's ``train_test_split`` with ``stratify``, step by step: its parameter checks,
    ``_validate_shuffle_split`` and ``StratifiedShuffleSplit._iter_indices``, raising ``ValueError``
    with their messages. scikit-learn shuffles each side last; sorted, they need no shuffle."""
    if not (isinstance(fraction, float) and 0 < fraction < 1):  # not NaN, nor an int (a row count)
        raise ValueError("The 'test_size' parameter of train_test_split must be a float in the range "
                         f"(0.0, 1.0), an int in the range [1, inf) or None. Got {fraction!r} instead.")
    if not (isinstance(seed, numbers.Integral) and 0 <= seed <= 2**32 - 1):
        raise ValueError("The 'random_state' parameter of train_test_split must be an int in the range "
                         "[0, 4294967295], an instance of 'numpy.random.mtrand.RandomState' or None. "
                         f"Got {seed!r} instead.")
    n_samples = len(y)
    n_test = math.ceil(fraction * n_samples)
    n_train = n_samples - n_test
    if n_train == 0:
        raise ValueError(f"With n_samples={n_samples}, test_size={fraction} and train_size=None, the "
                         "resulting train set will be empty. Adjust any of the aforementioned parameters.")
    classes, y_indices, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    if class_counts.min() < 2:
        raise ValueError("The least populated classes in y have only 1 member, which is too few. The "
                         "minimum number of groups for any class cannot be less than 2. Classes with too "
                         f"few members are: {classes[class_counts < 2].tolist()}")
    for name, size in (("train_size", n_train), ("test_size", n_test)):
        if size < len(classes):
            raise ValueError(f"The {name} = {size} should be greater or equal to the number of "
                             f"classes = {len(classes)}")
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train, test = [], []
    for indices, count, n, t in zip(class_indices, class_counts, n_i, t_i, strict=True):
        shuffled = indices[rng.permutation(count)]
        train.append(shuffled[:n])
        test.append(shuffled[n:n + t])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """scikit-learn's ``utils.extmath._approximate_mode``: ``n_draws`` shared out in proportion to
    ``class_counts``, floored, then one more to each of the largest remainders, ties drawn by ``rng``."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The row indices of each batch of ``epoch``: a permutation seeded by (seed, epoch)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


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
