"""The reference Keras trainer on small real data: determinism, the collapse, the parity, steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from pipeline import metrics
from pipeline.config import TrialConfig
from pipeline.engine_keras import KerasEngine
from pipeline.heads import build_head, head_weights
from pipeline.split import batch_order, make_split
from tests.helpers import make_features

EPOCHS = 3
BATCH = 32

_cache: dict[TrialConfig, object] = {}


@pytest.fixture(scope="module")
def split():
    x, y = make_features(n=240, d=32, seed=0)
    return make_split(x, y, 0.2, seed=0, standardized=False)


def config(**keys) -> TrialConfig:
    return TrialConfig(**{"epochs": EPOCHS, "batch_size": BATCH, **keys})


def train(split, **keys):
    """Train once per config in this module (a fresh engine every time)."""
    cfg = config(**keys)
    if cfg not in _cache:
        _cache[cfg] = KerasEngine().train(cfg, split)
    return _cache[cfg]


COLLAPSE = {"activation": "softmax", "units": 1, "loss": "binary_crossentropy", "learning_rate": 0.01}


# --- determinism -------------------------------------------------------------------------------

@pytest.mark.slow
def test_same_config_and_seed_give_identical_histories(split):
    cfg = config(optimizer="adam", learning_rate=0.01, seed=3)
    first = KerasEngine().train(cfg, split)
    second = KerasEngine().train(cfg, split)
    assert first.history == second.history
    assert first.step_loss == second.step_loss
    np.testing.assert_array_equal(first.kernel, second.kernel)
    np.testing.assert_array_equal(first.bias, second.bias)
    # and the seed matters, so the equality above is not vacuous
    other = KerasEngine().train(config(optimizer="adam", learning_rate=0.01, seed=4), split)
    assert other.history["loss"] != first.history["loss"]


def test_history_has_every_metric_per_epoch(split):
    result = train(split, **COLLAPSE)
    assert set(result.history) == {"loss", "val_loss", "accuracy", "val_accuracy", "prob_loss",
                                   "val_prob_loss", "keras_accuracy", "keras_val_accuracy"}
    assert all(len(values) == EPOCHS for values in result.history.values())
    assert all(math.isfinite(v) for values in result.history.values() for v in values)


# --- the collapse ------------------------------------------------------------------------------

def test_one_unit_softmax_collapses(split):
    result = train(split, **COLLAPSE)
    expected = metrics.collapse_expectation(split.y_val)
    assert result.collapsed
    assert result.positive_fraction == float(np.mean(split.y_val))
    assert result.history["val_accuracy"] == [result.positive_fraction] * EPOCHS
    assert result.history["val_accuracy"][-1] == expected["accuracy"]
    for value in result.history["val_prob_loss"]:
        assert value == pytest.approx(expected["prob_loss"], abs=1e-3)
    train_expected = metrics.collapse_expectation(split.y_train)["prob_loss"]
    assert result.final("prob_loss") == pytest.approx(train_expected, abs=1e-3)


def test_collapsed_head_still_trains_on_the_logits_path(split):
    result = train(split, **COLLAPSE)
    h = result.history
    # its outputs never move, so the probability metrics are constant over epochs ...
    assert len(set(h["val_prob_loss"])) == 1 and len(set(h["prob_loss"])) == 1
    # ... while Keras's logits-based loss moves and reports something else entirely
    assert len(set(h["val_loss"])) == EPOCHS
    assert len(set(h["loss"])) == EPOCHS
    assert h["val_loss"][-1] < h["val_loss"][0]  # Keras reports progress the outputs never show
    for keras_loss, prob in zip(h["val_loss"], h["val_prob_loss"], strict=True):
        assert abs(keras_loss - prob) > 1.0
    # and the weights did change
    start, _ = head_weights(build_head(config(**COLLAPSE), split.x_train.shape[1]))
    assert not np.allclose(result.kernel, start)


# --- the parity --------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_sigmoid_transfer_at_twice_lr_follows_two_unit_softmax(split, optimizer):
    lr = 0.01
    softmax = train(split, activation="softmax", units=2, loss="categorical_crossentropy",
                    learning_rate=lr, optimizer=optimizer, dropout=0.5)
    sigmoid = train(split, activation="sigmoid", units=1, loss="binary_crossentropy",
                    learning_rate=2 * lr, init="transfer", optimizer=optimizer, dropout=0.5)
    assert len(set(softmax.history["loss"])) == EPOCHS  # the trajectory is not trivial
    for name in ("loss", "val_loss", "prob_loss", "val_prob_loss"):
        np.testing.assert_allclose(sigmoid.history[name], softmax.history[name], rtol=0, atol=1e-5,
                                   err_msg=name)
    np.testing.assert_allclose(sigmoid.step_loss, softmax.step_loss, rtol=0, atol=1e-5)
    assert sigmoid.history["val_accuracy"] == softmax.history["val_accuracy"]
    # the end state is the transfer of the softmax's end state
    np.testing.assert_allclose(sigmoid.kernel[:, 0], softmax.kernel[:, 1] - softmax.kernel[:, 0],
                               atol=1e-5)


@pytest.mark.slow
def test_sigmoid_transfer_at_same_lr_does_not_follow(split):
    lr = 0.01
    softmax = train(split, activation="softmax", units=2, loss="categorical_crossentropy",
                    learning_rate=lr, optimizer="sgd", dropout=0.5)
    same_lr = train(split, activation="sigmoid", units=1, loss="binary_crossentropy",
                    learning_rate=lr, init="transfer", optimizer="sgd", dropout=0.5)
    # identical start, so the first step agrees; the lr factor shows after that
    assert same_lr.step_loss[0] == pytest.approx(softmax.step_loss[0], abs=1e-5)
    assert np.max(np.abs(np.subtract(same_lr.history["loss"], softmax.history["loss"]))) > 1e-3


# --- per-step losses ---------------------------------------------------------------------------

def test_step_losses_average_to_epoch_loss(split):
    batch = 36  # 192 training rows: 5 batches of 36 and a last one of 12
    cfg = {"activation": "sigmoid", "units": 1, "learning_rate": 0.05, "batch_size": batch}
    result = train(split, **cfg)
    n_train = len(split.y_train)
    steps = math.ceil(n_train / batch)
    assert n_train % batch != 0
    assert len(result.step_loss) == EPOCHS * steps
    sizes = [len(rows) for rows in batch_order(n_train, batch, 0, 0)]
    assert len(sizes) == steps and sum(sizes) == n_train
    for epoch in range(EPOCHS):
        losses = result.step_loss[epoch * steps:(epoch + 1) * steps]
        assert np.average(losses, weights=sizes) == pytest.approx(result.history["loss"][epoch],
                                                                  abs=1e-5)
    assert len(set(result.step_loss)) == len(result.step_loss)


def test_step_loss_count_default_batch(split):
    result = train(split, **COLLAPSE)
    assert len(result.step_loss) == EPOCHS * math.ceil(len(split.y_train) / BATCH)


FIRST_STEP = {"activation": "sigmoid", "units": 1, "learning_rate": 0.05, "dropout": 0.0, "seed": 2}


def first_batch_loss(split, epoch: int) -> float:
    """BCE, at the head's start weights, of the first batch that batch_order gives ``epoch``."""
    kernel, bias = head_weights(build_head(config(**FIRST_STEP), split.x_train.shape[1]))
    rows = batch_order(len(split.y_train), BATCH, FIRST_STEP["seed"], epoch)[0]
    z = split.x_train[rows].astype(np.float64) @ kernel.astype(np.float64) + bias
    p = 1 / (1 + np.exp(-z[:, 0]))
    y = split.y_train[rows]
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def test_first_epoch_trains_on_batch_order_of_epoch_zero(split):
    # With no dropout, the first recorded step is the plain BCE of the first batch of
    # batch_order(..., epoch=0) at the start weights; epoch 1's first batch would differ.
    result = train(split, **FIRST_STEP)
    assert abs(first_batch_loss(split, 0) - first_batch_loss(split, 1)) > 1e-3
    assert result.step_loss[0] == pytest.approx(first_batch_loss(split, 0), abs=1e-5)


# --- combinations Keras rejects ------------------------------------------------------------------

def test_sparse_loss_on_one_unit_head_raises(split):
    cfg = config(activation="softmax", units=1, loss="sparse_categorical_crossentropy")
    with pytest.raises(tf.errors.InvalidArgumentError, match="sparse_categorical_crossentropy"):
        KerasEngine().train(cfg, split)


def test_sparse_loss_on_two_unit_head_matches_categorical(split):
    keys = {"activation": "softmax", "units": 2, "learning_rate": 0.01, "optimizer": "sgd",
            "dropout": 0.5}
    sparse = train(split, loss="sparse_categorical_crossentropy", **keys)
    onehot = train(split, loss="categorical_crossentropy", **keys)
    np.testing.assert_allclose(sparse.history["loss"], onehot.history["loss"], atol=1e-5)
    np.testing.assert_allclose(sparse.history["val_prob_loss"], onehot.history["val_prob_loss"],
                               atol=1e-5)
