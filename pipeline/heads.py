"""Keras classifier heads: optional ``Dropout``, then one ``Dense``, as in the seed notebook.

Construction is seeded and ordered (the Dropout layer first, then the Dense), so two heads
built with the same seed draw the same dropout masks, and the 2-unit softmax that
:func:`softmax_initial_weights` rebuilds is exactly the one a softmax trial starts from.
Import this module only after :func:`pipeline.quiet.quiet_tensorflow`.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import TrialConfig
from pipeline.quiet import quiet_tensorflow

quiet_tensorflow()
import keras  # noqa: E402

HEAD_LAYER = "head"


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    """A Keras optimizer by the names the sweep files use (Keras defaults otherwise)."""
    factories = {
        "sgd": lambda: keras.optimizers.SGD(learning_rate),
        "momentum": lambda: keras.optimizers.SGD(learning_rate, momentum=0.9),
        "nesterov": lambda: keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True),
        "adam": lambda: keras.optimizers.Adam(learning_rate),
        "rmsprop": lambda: keras.optimizers.RMSprop(learning_rate),
        "adagrad": lambda: keras.optimizers.Adagrad(learning_rate),
        "adadelta": lambda: keras.optimizers.Adadelta(learning_rate),
        "adamw": lambda: keras.optimizers.AdamW(learning_rate),
    }
    return factories[name]()


def _build(n_features: int, units: int, activation: str, init: str, dropout: float, seed: int):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((n_features,), name="features")
    x = keras.layers.Dropout(dropout, name="dropout")(inputs) if dropout > 0 else inputs
    dense = keras.layers.Dense(units, activation=activation, kernel_initializer=init,
                               name=HEAD_LAYER)
    return keras.Model(inputs, dense(x)), dense


def softmax_initial_weights(n_features: int, dropout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Kernel (D x 2) and bias (2,) of the 2-unit glorot softmax head that ``seed`` initialises."""
    _, dense = _build(n_features, 2, "softmax", "glorot_uniform", dropout, seed)
    kernel, bias = dense.get_weights()
    return kernel, bias


def transfer_weights(kernel: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 1-unit sigmoid equal to a 2-unit softmax: beta = w1 - w0 (D x 1), b = b1 - b0 (1,).

    softmax(z)[1] = 1 / (1 + exp(-(z1 - z0))) = sigmoid((w1 - w0).x + (b1 - b0)).
    """
    kernel = np.asarray(kernel)
    bias = np.asarray(bias)
    return (kernel[:, 1] - kernel[:, 0]).reshape(-1, 1), np.asarray([bias[1] - bias[0]])


def build_head(config: TrialConfig, n_features: int) -> keras.Model:
    """The compiled Keras model of ``config`` for inputs of ``n_features``.

    ``init: transfer`` starts a 1-unit sigmoid from the 2-unit softmax head that the same seed
    initialises (so a transfer trial and a softmax trial of one seed are the seed's pair);
    it raises ``ValueError`` for any other head, which the sweep records as a FAILED trial.
    """
    if config.init == "transfer":
        if (config.units, config.activation) != (1, "sigmoid"):
            raise ValueError(f"init=transfer needs a 1-unit sigmoid head, got {config.units} "
                             f"unit(s) with {config.activation}")
        start = transfer_weights(*softmax_initial_weights(n_features, config.dropout, config.seed))
        init = "zeros"
    else:
        start, init = None, config.init
    model, dense = _build(n_features, config.units, config.activation, init,
                          config.dropout, config.seed)
    if start is not None:
        dense.set_weights(list(start))
    model.compile(optimizer=make_optimizer(config.optimizer, config.learning_rate),
                  loss=config.loss, metrics=["accuracy"])
    return model


def head_weights(model: keras.Model) -> tuple[np.ndarray, np.ndarray]:
    """The head's current kernel and bias."""
    kernel, bias = model.get_layer(HEAD_LAYER).get_weights()
    return kernel, bias
