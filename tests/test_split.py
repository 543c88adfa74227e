"""The seeded stratified split and training-only standardization."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.split import make_split, standardize, stratified_split
from tests.helpers import fresh_python, make_features


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


# --- parity with scikit-learn: stratified_split reproduces train_test_split without importing it ---

LABELS = {  # labels of n rows, drawn from rng where random
    "balanced binary": lambda n, rng: np.arange(n) % 2,
    "sorted binary": lambda n, rng: (np.arange(n) >= 0.55 * n).astype(np.int64),
    "unbalanced binary": lambda n, rng: (rng.random(n) < 0.1).astype(np.int64),
    "three classes": lambda n, rng: rng.integers(0, 3, n),
    "five uneven classes": lambda n, rng: rng.choice(5, n, p=[0.4, 0.3, 0.15, 0.1, 0.05]),
    "string classes": lambda n, rng: np.array(["cat", "dog", "eel"])[np.arange(n) % 3],
}
FRACTIONS = [0.1, 0.2, 0.25, 0.3, 0.33, 0.5, 0.7]
SEEDS = [0, 1, 17, 2**32 - 1]


def sklearn_split(y: np.ndarray, fraction, seed) -> tuple[np.ndarray, np.ndarray] | str:
    """The split as scikit-learn's train_test_split makes it (stratified_split's former body): the
    sorted training and validation indices, or the message of the UserError it became."""
    from sklearn.model_selection import train_test_split

    try:
        train, val = train_test_split(np.arange(len(y)), test_size=fraction, shuffle=True,
                                      random_state=seed, stratify=y)
    except ValueError as exc:
        return (f"cannot split {len(y)} rows with validation_fraction {fraction}: "
                f"{str(exc).splitlines()[0]}")
    return np.sort(train), np.sort(val)


def assert_as_sklearn(y: np.ndarray, fraction, seed) -> tuple[np.ndarray, np.ndarray] | str:
    """Assert that stratified_split gives scikit-learn's indices (values, order, dtype) or error."""
    expected = sklearn_split(y, fraction, seed)
    try:
        got = stratified_split(y, fraction, seed)
    except UserError as exc:
        assert str(exc) == expected, (len(y), fraction, seed)
        return str(exc)
    assert not isinstance(expected, str), (len(y), fraction, seed, expected)
    for side, want in zip(got, expected, strict=True):
        assert side.dtype == want.dtype, (len(y), fraction, seed)
        np.testing.assert_array_equal(side, want, err_msg=f"{len(y)} rows, {fraction}, seed {seed}")
    return got


@pytest.mark.parametrize("n", [5, 6, 7, 10, 13, 30, 31, 100, 240, 999, 5000])
@pytest.mark.parametrize("kind", LABELS)
def test_same_split_as_sklearn(kind, n):
    y = LABELS[kind](n, np.random.default_rng(n))
    results = [assert_as_sklearn(y, fraction, seed) for fraction in FRACTIONS for seed in SEEDS]
    if n >= 100:  # large enough that every fraction splits
        assert not any(isinstance(result, str) for result in results)


def test_validation_size_rounds_up_as_sklearn():
    """0.07 * 100 is 7.000000000000001 in floating point: scikit-learn, and so the split, take 8."""
    _, val = assert_as_sklearn(np.arange(100) % 2, 0.07, 0)
    assert len(val) == 8


@pytest.mark.parametrize(("y", "fraction"), [
    (np.arange(10) % 2, 0.25),  # 7 training rows from 5 + 5: 3.5 each, which class gets 4 is drawn
    (np.repeat([0, 1, 2], 10), 0.25),  # 22 training rows from 3 x 10: 7.33 each, one class gets 8
    (np.repeat([0, 1, 2, 3], [7, 7, 3, 3]), 0.5),  # 3.5, 3.5, 1.5, 1.5: four classes tie for two rows
])
def test_ties_broken_as_sklearn(y, fraction):
    """Where classes tie for the rows left over after flooring, scikit-learn draws which get them
    from the seeded generator: the split draws the same, so the winners change with the seed."""
    val_counts = set()
    for seed in range(20):
        _, val = assert_as_sklearn(y, fraction, seed)
        val_counts.add(tuple(np.bincount(y[val], minlength=y.max() + 1)))
    assert len(val_counts) > 1


@pytest.mark.parametrize(("class_counts", "n_draws"), [
    ([5, 5], 9), ([10, 10, 10], 22), ([7, 7, 3, 3], 10), ([1, 2, 3, 4, 5], 7), ([100, 3], 11), ([4], 3),
])
def test_approximate_mode_as_sklearn(class_counts, n_draws):
    """The same counts, and the same draws taken from the generator (its next number agrees)."""
    from sklearn.utils.extmath import _approximate_mode as sklearn_approximate_mode

    from pipeline.split import _approximate_mode

    counts = np.array(class_counts)
    for seed in range(10):
        ours, theirs = np.random.RandomState(seed), np.random.RandomState(seed)
        got = _approximate_mode(counts, n_draws, ours)
        want = sklearn_approximate_mode(counts, n_draws, theirs)
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype and ours.random() == theirs.random()


@pytest.mark.parametrize(("y", "fraction", "seed", "message"), [
    (np.array([0, 0, 0, 1]), 0.5, 0, "Classes with too few members are: [1]"),
    (np.array([0, 0, 0, 1, 1]), 0.2, 0, "The test_size = 1 should be greater or equal to the number of "
                                        "classes = 2"),
    (np.repeat([0, 1, 2], 2), 0.7, 0, "The train_size = 1 should be greater or equal to the number of "
                                      "classes = 3"),
    (np.array([0]), 0.5, 0, "the resulting train set will be empty"),
    (np.array([], dtype=np.int64), 0.2, 0, "With n_samples=0"),
    (np.arange(10) % 2, 0.0, 0, "Got 0.0 instead"),
    (np.arange(10) % 2, 1.0, 0, "Got 1.0 instead"),
    (np.arange(10) % 2, float("nan"), 0, "Got nan instead"),
    (np.arange(10) % 2, np.float32(0.2), 0, "Got np.float32(0.2) instead"),
    (np.arange(10) % 2, 0.2, -1, "Got -1 instead"),
    (np.arange(10) % 2, 0.2, 2**32, "Got 4294967296 instead"),
])
def test_errors_as_sklearn(y, fraction, seed, message):
    with pytest.raises(UserError, match=f"^cannot split {len(y)} rows") as info:
        stratified_split(y, fraction, seed)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert_as_sklearn(y, fraction, seed)


def test_split_imports_no_sklearn(tmp_path):
    code = ("import sys; from pipeline.split import stratified_split; import numpy as np; "
            "stratified_split(np.arange(100) % 2, 0.2, 0); print('sklearn' in sys.modules)")
    assert fresh_python(code, tmp_path) == "False"
