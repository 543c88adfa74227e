"""The weights a head starts training from, and the seeds they are drawn with.

Every random draw of a head is seeded explicitly: kernel, bias and dropout masks each from a
seed of its own derived from the head's (:func:`layer_seeds`), the hidden layer's kernel from
another (:func:`hidden_seed`). Two heads of one seed therefore draw the same dropout masks and
start from the same hidden layer, and the 2-unit softmax that :func:`softmax_initial_weights`
rebuilds is exactly the one a softmax trial starts from.

The draws are Keras's seeded initializers. :func:`draw` computes them without TensorFlow
(:mod:`pipeline.stateless_random`), for engines that train outside Keras;
:mod:`pipeline.heads` builds the reference's Keras models with Keras's own initializers, and
hands :func:`initial_weights` its Keras draw where a start is composed (``transfer``,
``glorot_centered``). tests/test_heads.py holds the two draws together.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from pipeline import stateless_random
from pipeline.config import TrialConfig

Draw = Callable[[str, int, tuple[int, ...]], np.ndarray]  # (initializer, seed, shape) -> float32 array

RANDOM_NORMAL_STDDEV = 0.05  # Keras's RandomNormal default


def layer_seeds(seed: int) -> tuple[int, int, int]:
    """Independent seeds for the kernel, the bias and the dropout masks of head seed ``seed``."""
    kernel, bias, mask = (int(s) for s in np.random.SeedSequence(seed).generate_state(3) % 2**31)
    return kernel, bias, mask


def hidden_seed(seed: int) -> int:
    """The seed of the hidden layer's kernel of head seed ``seed``, independent of
    :func:`layer_seeds` (the next word of the same seed sequence); its bias starts at zeros."""
    return int(np.random.SeedSequence(seed).generate_state(4)[3] % 2**31)


def draw(name: str, seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """What Keras's initializer ``name`` with integer ``seed`` draws for ``shape`` (float32).

    Keras's variance scaling: ``glorot_uniform`` is uniform in +-sqrt(3 / fan_avg),
    ``he_normal`` truncated normal with stddev sqrt(2 / fan_in) / 0.8796...; ``random_normal``
    has stddev 0.05.
    """
    seed_pair = stateless_random.keras_seed(seed)
    if name == "zeros":
        return np.zeros(shape, np.float32)
    if name == "random_normal":
        return stateless_random.normal(shape, seed_pair, 0.0, RANDOM_NORMAL_STDDEV)
    fan_in, fan_out = shape[0], shape[1]
    if name == "glorot_uniform":
        limit = math.sqrt(3.0 * (1.0 / max(1.0, (fan_in + fan_out) / 2.0)))
        return stateless_random.uniform(shape, seed_pair, -limit, limit)
    if name == "he_normal":
        stddev = math.sqrt(2.0 / max(1.0, fan_in)) / 0.87962566103423978
        return stateless_random.truncated_normal(shape, seed_pair, 0.0, stddev)
    raise ValueError(f"unknown initializer {name!r}")


def start_weights(config: TrialConfig, n_features: int, init: str,
                  draw: Draw = draw) -> tuple[np.ndarray, np.ndarray]:
    """The kernel and bias of the Dense output layer of ``config`` with kernel initializer
    ``init``, drawn with seeds from ``config.seed`` (:func:`layer_seeds`)."""
    kernel_seed, bias_seed, _ = layer_seeds(config.seed)
    kernel = draw(init, kernel_seed, (config.hidden_units or n_features, config.units))
    return kernel, draw(config.bias_init, bias_seed, (config.units,))


def softmax_partner(config: TrialConfig) -> TrialConfig:
    """The 2-unit glorot softmax whose initial weights a ``transfer`` head of ``config`` starts from."""
    return config.model_copy(update={"activation": "softmax", "units": 2, "init": "glorot_uniform",
                                     "loss": "categorical_crossentropy"})


def softmax_initial_weights(config: TrialConfig, n_features: int,
                            draw: Draw = draw) -> tuple[np.ndarray, np.ndarray]:
    """Output kernel (D or hidden_units x 2) and bias (2,) that the 2-unit softmax
    :func:`softmax_partner` starts from (its body starts where every head of the seed does)."""
    return start_weights(softmax_partner(config), n_features, "glorot_uniform", draw)


def transfer_weights(kernel: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 1-unit sigmoid equal to a 2-unit softmax: beta = w1 - w0 (D x 1), b = b1 - b0 (1,).

    softmax(z)[1] = 1 / (1 + exp(-(z1 - z0))) = sigmoid((w1 - w0).x + (b1 - b0)).
    """
    kernel = np.asarray(kernel)
    bias = np.asarray(bias)
    return (kernel[:, 1] - kernel[:, 0]).reshape(-1, 1), np.asarray([bias[1] - bias[0]])


def initial_weights(config: TrialConfig, n_features: int,
                    draw: Draw = draw) -> tuple[np.ndarray, np.ndarray]:
    """The output kernel (D x units, or hidden_units x units) and bias (units,) the head of
    ``config`` starts training from: the weights the reference's Keras model holds before its
    first step.

    ``init: glorot_centered`` is glorot with each row's mean over the units taken out (for two
    units w0 = -w1, the same w1 - w0), the softmax start that keeps an L2 penalty's gradient
    equal and opposite on w1 and w0. ``init: transfer`` is the transfer of the seed's softmax
    (:func:`transfer_weights`), with bias 0 when ``transfer_bias`` is off; any head but a
    1-unit sigmoid raises ``ValueError``, which the sweep records as a FAILED trial.
    """
    if config.init == "transfer":
        if (config.units, config.activation) != (1, "sigmoid"):
            raise ValueError(f"init=transfer needs a 1-unit sigmoid head, got {config.units} "
                             f"unit(s) with {config.activation}")
        beta, b = transfer_weights(*softmax_initial_weights(config, n_features, draw))
        return beta, (b if config.transfer_bias else np.zeros_like(b))
    centered = config.init == "glorot_centered"
    kernel, bias = start_weights(config, n_features, "glorot_uniform" if centered else config.init, draw)
    return (kernel - kernel.mean(axis=1, keepdims=True) if centered else kernel), bias
