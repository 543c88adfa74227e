"""The seeded stratified split and training-only standardization."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.split import make_split, standardize, stratified_split
from tests.helpers import make_features


@pytest.fixture
def sorted_labels():
    _, y = make_features(n=240, d=4, seed=0, positive=0.45, sorted_labels=True)
    assert (np.diff(y) >= 0).all() and 0 < y.sum() < len(y)  # sorted by class, both present
    return y


def test_validation_is_shuffled_out_of_sorted_labels(sorted_labels):
    y = sorted_labels
    train, val = stratified_split(y, 0.2, seed=0)
    assert set(np.unique(y[val])) == {0, 1}
    assert set(np.unique(y[train])) == {0, 1}
    # not simply the last 20% of rows
    assert not np.array_equal(val, np.arange(len(y) - len(val), len(y)))


@pytest.mark.parametrize("seed", [0, 1, 2, 17])
@pytest.mark.parametrize("fraction", [0.2, 0.3])
def test_class_balance_preserved_within_one_example(sorted_labels, seed, fraction):
    y = sorted_labels
    train, val = stratified_split(y, fraction, seed)
    positives = y.sum()
    assert abs(y[val].sum() - positives * len(val) / len(y)) <= 1
    assert abs(y[train].sum() - positives * len(train) / len(y)) <= 1
    assert len(val) == pytest.approx(fraction * len(y), abs=1)


def test_train_and_validation_are_disjoint_and_cover_everything(sorted_labels):
    train, val = stratified_split(sorted_labels, 0.2, seed=3)
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(sorted_labels)))


def test_deterministic_per_seed(sorted_labels):
    first = stratified_split(sorted_labels, 0.2, seed=5)
    second = stratified_split(sorted_labels.copy(), 0.2, seed=5)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_different_across_seeds(sorted_labels):
    vals = [tuple(stratified_split(sorted_labels, 0.2, seed)[1]) for seed in range(4)]
    assert len(set(vals)) == 4


def test_too_few_rows_is_a_user_error():
    with pytest.raises(UserError, match="cannot split 5 rows") as info:
        stratified_split(np.array([0, 0, 0, 1, 1]), 0.2, seed=0)
    assert "\n" not in str(info.value)


def test_make_split_rows_match_labels():
    x, y = make_features(n=100, d=3, seed=2)
    x = np.column_stack([np.arange(100, dtype=np.float32), x])  # column 0 is the row number
    split = make_split(x, y, 0.25, seed=1, standardized=False)
    rows_train = split.x_train[:, 0].astype(int)
    rows_val = split.x_val[:, 0].astype(int)
    np.testing.assert_array_equal(split.y_train, y[rows_train])
    np.testing.assert_array_equal(split.y_val, y[rows_val])
    assert split.positive_fraction == pytest.approx(y[rows_val].mean())
    assert len(rows_val) == 25


def test_standardize_uses_training_statistics_only():
    rng = np.random.default_rng(0)
    x_train = rng.normal(loc=3.0, scale=2.0, size=(500, 4)).astype(np.float32)
    x_val = rng.normal(loc=7.0, scale=0.5, size=(100, 4)).astype(np.float32)
    s_train, s_val = standardize(x_train, x_val)
    assert s_train.dtype == np.float32 and s_val.dtype == np.float32
    np.testing.assert_allclose(s_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(s_train.std(axis=0), 1.0, atol=1e-5)
    mean, std = x_train.mean(axis=0, dtype=np.float64), x_train.std(axis=0, dtype=np.float64)
    np.testing.assert_allclose(s_val, (x_val - mean) / std, rtol=1e-5, atol=1e-5)
    # the validation split keeps its offset: its mean is about (7 - 3) / 2, not 0
    assert (s_val.mean(axis=0) > 1.0).all()
    assert not np.allclose(s_val.std(axis=0), 1.0, atol=0.1)


def test_standardize_does_not_modify_inputs():
    x_train = np.arange(12, dtype=np.float32).reshape(6, 2)
    x_val = x_train[:2] + 1
    before = x_train.copy(), x_val.copy()
    standardize(x_train, x_val)
    np.testing.assert_array_equal(x_train, before[0])
    np.testing.assert_array_equal(x_val, before[1])


def test_constant_feature_gives_no_nan():
    x_train = np.column_stack([np.full(10, 4.0), np.arange(10.0)]).astype(np.float32)
    x_val = np.column_stack([np.array([4.0, 6.0]), np.array([0.0, 9.0])]).astype(np.float32)
    s_train, s_val = standardize(x_train, x_val)
    assert np.isfinite(s_train).all() and np.isfinite(s_val).all()
    np.testing.assert_array_equal(s_train[:, 0], 0.0)
    np.testing.assert_array_equal(s_val[:, 0], [0.0, 2.0])  # centred, scaled by 1


def test_make_split_standardized_matches_standardize():
    x, y = make_features(n=120, d=5, seed=4)
    raw = make_split(x, y, 0.2, seed=0, standardized=False)
    std = make_split(x, y, 0.2, seed=0, standardized=True)
    expected_train, expected_val = standardize(raw.x_train, raw.x_val)
    np.testing.assert_array_equal(std.x_train, expected_train)
    np.testing.assert_array_equal(std.x_val, expected_val)
    np.testing.assert_array_equal(std.y_val, raw.y_val)
