"""Probability-based metrics: clipped cross-entropy, accuracy, collapse."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.metrics import (
    EPSILON,
    accuracies,
    accuracy,
    collapse_expectation,
    is_collapsed,
    positive_probability,
    prob_loss,
    prob_losses,
)


def test_prob_loss_is_binary_cross_entropy():
    p = np.array([0.9, 0.2, 0.6, 0.3])
    y = np.array([1, 0, 0, 1])
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.4) + math.log(0.3)) / 4
    assert prob_loss(p, y) == pytest.approx(expected, abs=1e-12)


def test_prob_loss_clips_at_epsilon():
    y = np.array([0, 1])
    p = np.array([1.0, 0.0])  # both certain and wrong
    assert EPSILON == 1e-7
    assert prob_loss(p, y) == pytest.approx(-math.log(1e-7), rel=1e-6)
    assert math.isfinite(prob_loss(np.array([0.0, 1.0]), np.array([0, 1])))


@pytest.mark.parametrize("positive", [0, 3, 7, 10])
def test_all_ones_loss_is_negative_fraction_times_ln_1e7(positive):
    y = np.array([1] * positive + [0] * (10 - positive))
    expected = (1 - positive / 10) * math.log(1e7)
    loss = prob_loss(np.ones(10), y)
    assert loss == pytest.approx(expected, abs=1e-6)
    assert loss == pytest.approx(collapse_expectation(y)["prob_loss"], abs=1e-6)
    assert accuracy(np.ones(10), y) == collapse_expectation(y)["accuracy"] == positive / 10


def test_collapse_expectation_reproduces_the_seed_number():
    # the seed notes: 7.6 at 47% negatives
    y = np.array([1] * 53 + [0] * 47)
    assert collapse_expectation(y)["prob_loss"] == pytest.approx(0.47 * 16.1181, abs=1e-3)
    assert round(collapse_expectation(y)["prob_loss"], 1) == 7.6


@pytest.mark.parametrize("heads, rows", [(1, 7), (3, 1000), (16, 16_001), (5, 4_099)])
def test_a_head_scores_the_same_alone_and_among_others(heads, rows):
    """The per-head forms score each row of a block exactly (to the bit) as the head's
    probabilities alone, passed as the fused engine passes them (float32, a transposed view of
    rows x heads), for sizes around NumPy's blocks of pairwise summation."""
    rng = np.random.default_rng(heads * rows)
    p = rng.random((heads, rows), dtype=np.float32)
    p[rng.random((heads, rows)) < 0.1] = 1.0
    y = rng.integers(0, 2, rows)
    block = np.ascontiguousarray(p.T).T
    assert prob_losses(block, y).tolist() == [prob_loss(p[j].copy(), y) for j in range(heads)]
    assert accuracies(block, y).tolist() == [accuracy(p[j].copy(), y) for j in range(heads)]
    # and each is the head's cross-entropy and accuracy written out for one head, to the bit
    for j in range(heads):
        clipped, labels = np.clip(p[j].astype(np.float64), EPSILON, 1 - EPSILON), y.astype(np.float64)
        one_head = -np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped))
        assert prob_loss(p[j], y) == one_head
        assert accuracy(p[j], y) == np.mean((p[j] >= 0.5) == y.astype(bool))


def test_accuracy_threshold_at_one_half():
    y = np.array([1, 0, 1, 0, 1, 0])
    p = np.array([0.5, 0.4999, 0.51, 0.5, 0.0, 1.0])
    # predicted labels: 1, 0, 1, 1, 0, 1 -> right, right, right, wrong, wrong, wrong
    assert accuracy(p, y) == pytest.approx(3 / 6)
    assert accuracy(np.array([0.5]), np.array([1])) == 1.0
    assert accuracy(np.array([np.nextafter(0.5, 0)]), np.array([0])) == 1.0


def test_is_collapsed():
    assert is_collapsed(np.full(20, 0.73))
    assert is_collapsed(np.ones(5))
    assert is_collapsed(np.array([0.73] * 19 + [0.7300001]))  # one float32 step apart: the same
    assert not is_collapsed(np.array([0.73] * 19 + [0.7300002]))  # two steps: not
    assert not is_collapsed(np.linspace(0, 1, 5))


@pytest.mark.parametrize("rows", [9, 71, 4001])
def test_a_softmax_over_one_unit_is_collapsed_whatever_the_row_count(rows):
    import tensorflow as tf

    logits = np.random.default_rng(rows).normal(size=(rows, 1)).astype(np.float32) * 3
    p = tf.nn.softmax(logits, axis=-1).numpy()[:, 0]
    # Eigen's softmax (TF_ENABLE_ONEDNN_OPTS=0, or a CPU without oneDNN) rounds the 1.0 one
    # float32 step low at some rows; oneDNN's gives 1.0 at every row ...
    assert set(p.tolist()) <= {1.0, float(np.nextafter(np.float32(1), np.float32(0)))}
    assert is_collapsed(p)  # ... and the head is collapsed either way


def test_positive_probability_two_units_takes_column_one():
    outputs = np.array([[0.8, 0.2], [0.1, 0.9], [0.5, 0.5]], dtype=np.float32)
    p = positive_probability(outputs)
    assert p.shape == (3,)
    np.testing.assert_allclose(p, [0.2, 0.9, 0.5], rtol=1e-6)


def test_positive_probability_one_unit_takes_its_only_column():
    outputs = np.array([[0.3], [0.7]], dtype=np.float32)
    p = positive_probability(outputs)
    assert p.shape == (2,)
    np.testing.assert_allclose(p, [0.3, 0.7], rtol=1e-6)
    np.testing.assert_allclose(positive_probability(np.array([0.3, 0.7])), [0.3, 0.7])
