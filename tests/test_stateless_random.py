"""TensorFlow's stateless random numbers without TensorFlow, held against TensorFlow's ops."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import stateless_random
from pipeline.quiet import quiet_tensorflow

quiet_tensorflow()
import tensorflow as tf  # noqa: E402

SHAPES = [(1,), (3, 3), (7, 13), (128, 2048), (2048, 2)]  # sizes that end mid-call and on a call
SEEDS = [(0, 0), (5, 624), (1_234_567, 3), (2**31 - 3, 2**31 - 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_uniform_is_tensorflows_bit_for_bit(shape, seed):
    expected = tf.random.stateless_uniform(shape, tf.constant(seed, tf.int32),
                                           minval=tf.cast(-0.7, tf.float32),
                                           maxval=tf.cast(0.3, tf.float32)).numpy()
    np.testing.assert_array_equal(stateless_random.uniform(shape, seed, -0.7, 0.3), expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_normals_are_tensorflows_to_the_last_bits(shape, seed):
    tf_seed = tf.constant(seed, tf.int32)
    for ours, theirs in (
            (stateless_random.normal, tf.random.stateless_normal),
            (stateless_random.truncated_normal, tf.random.stateless_truncated_normal)):
        # the same draws (the truncated one keeps the same ones, in order), to a few bits
        standard = theirs(shape, tf_seed).numpy()
        np.testing.assert_array_max_ulp(ours(shape, seed), standard, maxulp=8)
        scaled = theirs(shape, tf_seed, mean=0.5, stddev=0.3).numpy()
        np.testing.assert_allclose(ours(shape, seed, 0.5, 0.3), scaled, rtol=0, atol=1e-6)
    assert np.abs(stateless_random.truncated_normal(shape, seed)).max() < 2


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rate", [0.5, 0.1, 0.9, 1 / 3])
def test_dropout_is_tensorflows_bit_for_bit(shape, seed, rate):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    expected = tf.nn.experimental.stateless_dropout(x, rate=rate, seed=tf.constant(seed, tf.int32)).numpy()
    np.testing.assert_array_equal(stateless_random.dropout(x, rate, seed), expected)


def test_keras_seed_is_the_seed_keras_hands_tensorflow():
    # Keras's _cast_seed: floormod by int32.max - 1, so the two largest seeds wrap
    assert stateless_random.keras_seed(2**31 - 2, 5) == (0, 5)
    assert stateless_random.keras_seed(2**31 - 1, 2**31) == (1, 2)


@pytest.mark.parametrize("width", [13, 2048])
def test_dropout_of_chosen_rows_is_tensorflows_bit_for_bit(width):
    """The rows a batch takes, in a shuffled order, through the masks of the batch's shape: with
    a width apart from a multiple of 4, Philox's words straddle rows."""
    x = np.random.default_rng(1).normal(size=(50, width)).astype(np.float32)
    rows = np.random.default_rng(2).permutation(50)[:7]
    seed = (12_345, 67)
    expected = tf.nn.experimental.stateless_dropout(x[rows], rate=0.5, seed=tf.constant(seed, tf.int32))
    np.testing.assert_array_equal(stateless_random.dropout_rows(x, rows, 0.5, seed), expected.numpy())
