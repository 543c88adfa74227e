"""Keras heads: the sigmoid/softmax weight transfer and seeded construction."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import TrialConfig
from pipeline.heads import body_weights, build_head, head_weights, keras_draw
from pipeline.start_weights import draw, initial_weights, softmax_initial_weights, transfer_weights

D = 16


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_transfer_weights_on_hand_made_kernel():
    kernel = np.array([[1.0, 3.0], [2.0, -1.0], [0.5, 0.5]])
    bias = np.array([0.25, -0.75])
    beta, b = transfer_weights(kernel, bias)
    assert beta.shape == (3, 1) and b.shape == (1,)
    np.testing.assert_array_equal(beta[:, 0], [2.0, -3.0, 0.0])
    np.testing.assert_array_equal(b, [-1.0])


def test_sigmoid_of_transfer_equals_softmax_column_one():
    rng = np.random.default_rng(7)
    kernel = rng.normal(size=(D, 2))
    bias = rng.normal(size=2)
    x = rng.normal(size=(200, D)) * 3
    beta, b = transfer_weights(kernel, bias)
    p_sigmoid = sigmoid(x @ beta + b)[:, 0]
    p_softmax = softmax(x @ kernel + bias)[:, 1]
    assert np.ptp(p_softmax) > 0.5  # the check spans confident predictions of both classes
    np.testing.assert_allclose(p_sigmoid, p_softmax, rtol=0, atol=1e-6)


def test_transfer_head_starts_at_transferred_softmax_weights():
    config = TrialConfig(activation="sigmoid", units=1, init="transfer", seed=5, dropout=0.5)
    kernel, bias = softmax_initial_weights(config, D)
    assert kernel.shape == (D, 2) and np.abs(kernel).max() > 0
    beta, b = transfer_weights(kernel, bias)
    model = build_head(config, D)
    start_kernel, start_bias = head_weights(model)
    np.testing.assert_array_equal(start_kernel, beta)
    np.testing.assert_array_equal(start_bias, b)


def test_transfer_head_predicts_what_the_softmax_head_predicts():
    x = np.random.default_rng(1).normal(size=(64, D)).astype(np.float32)
    softmax_model = build_head(TrialConfig(activation="softmax", units=2, seed=2,
                                           loss="categorical_crossentropy"), D)
    transfer_model = build_head(TrialConfig(activation="sigmoid", units=1, init="transfer", seed=2), D)
    p_soft = np.asarray(softmax_model(x, training=False))[:, 1]
    p_sig = np.asarray(transfer_model(x, training=False))[:, 0]
    np.testing.assert_allclose(p_sig, p_soft, atol=1e-6)


@pytest.mark.parametrize("config", [
    TrialConfig(activation="sigmoid", units=1, init="he_normal", seed=3),
    TrialConfig(activation="softmax", units=2, loss="categorical_crossentropy", seed=5),
    TrialConfig(activation="sigmoid", units=2, bias_init="random_normal", seed=7),
    TrialConfig(activation="softmax", units=1, init="zeros", dropout=0.0, seed=0),
    TrialConfig(activation="softmax", units=2, init="he_normal", bias_init="random_normal", seed=2),
])
def test_initial_weights_are_the_built_heads_weights(config):
    kernel, bias = head_weights(build_head(config, D))
    expected_kernel, expected_bias = initial_weights(config, D)
    assert_same_draw(kernel, expected_kernel, config.init)
    assert_same_draw(bias, expected_bias, config.bias_init)
    assert expected_bias.any() == (config.bias_init != "zeros")


def assert_same_draw(keras_values, values, initializer):
    """Uniform draws are Keras's bit for bit; normal ones up to the last bits of float32
    ``log``, ``sin`` and ``cos`` (see pipeline.stateless_random)."""
    if initializer in ("he_normal", "random_normal"):
        np.testing.assert_array_max_ulp(keras_values, values, maxulp=8)
    else:
        np.testing.assert_array_equal(keras_values, values)


@pytest.mark.parametrize("initializer", ["glorot_uniform", "he_normal", "random_normal", "zeros"])
@pytest.mark.parametrize("seed", [0, 1_234_567, 2**31 - 2, 2**31 - 1])
def test_draw_without_keras_is_keras_draw(initializer, seed):
    shape = (2, ) if initializer == "random_normal" else (2048, 2)
    values = draw(initializer, seed, shape)
    assert values.dtype == np.float32 and values.shape == shape
    assert_same_draw(keras_draw(initializer, seed, shape), values, initializer)


def test_softmax_initial_weights_are_what_a_softmax_trial_starts_from():
    for dropout in (0.5, 0.0):
        config = TrialConfig(activation="softmax", units=2, loss="categorical_crossentropy",
                             seed=4, dropout=dropout)
        kernel, bias = head_weights(build_head(config, D))
        expected_kernel, expected_bias = softmax_initial_weights(
            TrialConfig(init="transfer", seed=4, dropout=dropout), D)
        np.testing.assert_array_equal(kernel, expected_kernel)
        np.testing.assert_array_equal(bias, expected_bias)


@pytest.mark.parametrize(("activation", "units"), [("softmax", 1), ("softmax", 2), ("sigmoid", 2)])
def test_transfer_needs_a_one_unit_sigmoid(activation, units):
    config = TrialConfig(activation=activation, units=units, init="transfer")
    with pytest.raises(ValueError, match="init=transfer needs a 1-unit sigmoid"):
        build_head(config, D)


@pytest.mark.parametrize("init", ["glorot_uniform", "he_normal", "transfer"])
def test_same_seed_same_weights_different_seed_different(init):
    def start(seed):
        return head_weights(build_head(TrialConfig(init=init, seed=seed), D))

    k0, b0 = start(0)
    k0_again, b0_again = start(0)
    k1, _ = start(1)
    np.testing.assert_array_equal(k0, k0_again)
    np.testing.assert_array_equal(b0, b0_again)
    assert not np.array_equal(k0, k1)


def test_head_shape_and_activation():
    x = np.random.default_rng(0).normal(size=(8, D)).astype(np.float32) * 10
    one = build_head(TrialConfig(activation="softmax", units=1), D)
    two = build_head(TrialConfig(activation="softmax", units=2, loss="categorical_crossentropy"), D)
    out_one = np.asarray(one(x, training=False))
    out_two = np.asarray(two(x, training=False))
    assert out_one.shape == (8, 1) and out_two.shape == (8, 2)
    # a softmax over one unit ignores its input: the same value for every row, 1 up to float32
    # rounding (TensorFlow gives 1 - 2**-24), above the 1 - 1e-7 clip of the probability loss
    assert np.unique(out_one).size == 1
    assert 1 - 1e-7 <= out_one[0, 0] <= 1.0
    np.testing.assert_allclose(out_two.sum(axis=1), 1.0, atol=1e-6)


def test_transfer_without_bias_starts_at_zero_bias():
    config = TrialConfig(init="transfer", seed=3, bias_init="random_normal")
    _, softmax_bias = softmax_initial_weights(config, D)
    assert softmax_bias[1] != softmax_bias[0]  # the random bias gives b1 - b0 something to carry
    _, with_bias = head_weights(build_head(config, D))
    _, without = head_weights(build_head(config.model_copy(update={"transfer_bias": False}), D))
    np.testing.assert_allclose(with_bias, [softmax_bias[1] - softmax_bias[0]], rtol=1e-6)
    np.testing.assert_array_equal(without, [0.0])


def test_l2_weight_decay_and_smoothing_reach_keras():
    model = build_head(TrialConfig(l2=0.01, weight_decay=0.1, label_smoothing=0.2,
                                   optimizer="adam"), D)
    dense = model.get_layer("head")
    assert dense.kernel_regularizer.l2 == pytest.approx(0.01)
    assert model.optimizer.weight_decay == pytest.approx(0.1)
    assert model.loss.get_config()["label_smoothing"] == pytest.approx(0.2)


def test_mask_seed_changes_only_the_masks():
    x = np.ones((4, D), dtype=np.float32)
    base = TrialConfig(seed=1, dropout=0.5)

    def masks_and_start(config):
        model = build_head(config, D)
        return np.asarray(model.get_layer("dropout")(x, training=True)), head_weights(model)[0]

    mask, kernel = masks_and_start(base)
    same_mask, _ = masks_and_start(base.model_copy(update={"mask_seed": 1}))
    other_mask, other_kernel = masks_and_start(base.model_copy(update={"mask_seed": 2}))
    np.testing.assert_array_equal(mask, same_mask)
    assert not np.array_equal(mask, other_mask)
    np.testing.assert_array_equal(kernel, other_kernel)


def test_default_weight_decay_is_keras_own():
    from pipeline.config import DEFAULT_WEIGHT_DECAY
    from pipeline.heads import make_optimizer

    for name in ("sgd", "momentum", "nesterov", "adam", "rmsprop", "adagrad", "adadelta", "adamw"):
        assert (make_optimizer(name, 0.1).weight_decay or 0.0) == pytest.approx(
            DEFAULT_WEIGHT_DECAY.get(name, 0.0))


def test_heads_of_one_seed_start_from_the_same_hidden_layer():
    deep = {"hidden_units": 6, "hidden_activation": "tanh", "seed": 4}
    soft = build_head(TrialConfig(**deep, activation="softmax", units=2, loss="categorical_crossentropy"), D)
    sig = build_head(TrialConfig(**deep, activation="sigmoid", units=1, init="transfer"), D)
    other = build_head(TrialConfig(**deep | {"seed": 5}), D)
    assert body_weights(build_head(TrialConfig(), D)) is None
    for a, b in zip(body_weights(soft), body_weights(sig), strict=True):
        np.testing.assert_array_equal(a, b)
    assert body_weights(soft)[0].shape == (D, 6) and np.abs(body_weights(soft)[0]).max() > 0
    assert not np.array_equal(body_weights(soft)[0], body_weights(other)[0])
    # the output layer reads the hidden layer, and the transfer predicts what the softmax does
    assert head_weights(sig)[0].shape == (6, 1)
    x = np.random.default_rng(1).normal(size=(64, D)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(sig(x, training=False))[:, 0],
                               np.asarray(soft(x, training=False))[:, 1], atol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", pytest.param("adam", marks=pytest.mark.slow)])
def test_a_body_at_its_own_rate_equals_a_plain_fit_when_the_rates_are_equal(optimizer):
    from pipeline.engine_keras import KerasEngine
    from pipeline.split import make_split
    from tests.helpers import make_features

    split = make_split(*make_features(n=120, d=D, seed=2), 0.2, seed=0, standardized=True)
    base = TrialConfig(optimizer=optimizer, learning_rate=0.01, hidden_units=4, epochs=2, batch_size=32)
    two = base.model_copy(update={"body_learning_rate": 0.01})
    assert two.two_rates and not base.two_rates
    plain, split_rates = (KerasEngine().train(c, split) for c in (base, two))
    assert split_rates.history == plain.history and split_rates.step_loss == plain.step_loss
    np.testing.assert_array_equal(split_rates.hidden_kernel, plain.hidden_kernel)
    np.testing.assert_array_equal(split_rates.kernel, plain.kernel)
    # and the body's rate is its own: a body at a vanishing rate stays where it started
    still = KerasEngine().train(base.model_copy(update={"body_learning_rate": 1e-12}), split)
    start = body_weights(build_head(base, D))[0]
    assert np.abs(still.hidden_kernel - start).max() < 1e-9 < np.abs(plain.hidden_kernel - start).max()
    assert np.abs(still.kernel - plain.kernel).max() > 1e-4
