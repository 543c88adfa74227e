"""Label encoding follows the head: one float column, one-hot, or the integers for sparse loss."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.labels import encode_labels, invalid_labels

Y = np.array([0, 1, 1, 0, 1])


@pytest.mark.parametrize("loss", ["binary_crossentropy", "categorical_crossentropy"])
def test_one_unit_is_one_float_column(loss):
    encoded = encode_labels(Y, 1, loss)
    assert encoded.shape == (5, 1)
    assert encoded.dtype == np.float32
    np.testing.assert_array_equal(encoded[:, 0], [0.0, 1.0, 1.0, 0.0, 1.0])


@pytest.mark.parametrize("loss", ["categorical_crossentropy", "binary_crossentropy"])
def test_two_units_is_one_hot(loss):
    encoded = encode_labels(Y, 2, loss)
    assert encoded.shape == (5, 2)
    assert encoded.dtype == np.float32
    np.testing.assert_array_equal(encoded, [[1, 0], [0, 1], [0, 1], [1, 0], [0, 1]])
    np.testing.assert_array_equal(encoded.argmax(axis=1), Y)
    np.testing.assert_array_equal(encoded.sum(axis=1), 1.0)


@pytest.mark.parametrize("units", [1, 2])
def test_sparse_loss_gets_the_integer_labels(units):
    encoded = encode_labels(Y, units, "sparse_categorical_crossentropy")
    assert encoded.shape == (5,)
    assert np.issubdtype(encoded.dtype, np.integer)
    np.testing.assert_array_equal(encoded, Y)


def test_accepts_list_and_bool_input():
    encoded = encode_labels(np.array([True, False, True]), 2, "categorical_crossentropy")
    np.testing.assert_array_equal(encoded, [[0, 1], [1, 0], [0, 1]])
    np.testing.assert_array_equal(encode_labels([1, 0], 1, "binary_crossentropy"), [[1.0], [0.0]])


@pytest.mark.parametrize("y, found", [
    (np.array([0, 1, 1, 0]), []),
    (np.array([1.0, 0.0]), []),
    (np.array([0, 1, 2, 1, -1]), [-1, 2]),
    (np.array([0.0, 0.5, 1.0, np.nan]), [0.5, np.nan]),
    (np.array([True, False, True]), [False, True]),  # not numbers, though True == 1
    (np.array([b"cat", b"dog"]), [b"cat", b"dog"]),
    (np.arange(10), [2, 3, 4, 5, 6]),  # at most five
])
def test_invalid_labels_are_shown_whatever_the_dtype(y, found):
    np.testing.assert_equal(invalid_labels(y), found)
