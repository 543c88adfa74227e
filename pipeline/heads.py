"""Keras classifier heads: optional ``Dropout``, then one ``Dense``, as in the seed notebook,
or with ``hidden_units`` a hidden ``Dense`` layer (the body) before the output one.

The reference's models: built with Keras's own seeded initializers, from the seeds of
:mod:`pipeline.start_weights`, so the start weights it computes without Keras are the ones
these models hold.
Import this module only after :func:`pipeline.quiet.quiet_tensorflow`.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import TrialConfig
from pipeline.quiet import quiet_tensorflow
from pipeline.start_weights import hidden_seed, initial_weights, layer_seeds

quiet_tensorflow()
import keras  # noqa: E402

HEAD_LAYER = "head"
HIDDEN_LAYER = "hidden"


LOSSES = {"binary_crossentropy": keras.losses.BinaryCrossentropy,
          "categorical_crossentropy": keras.losses.CategoricalCrossentropy,
          "sparse_categorical_crossentropy": keras.losses.SparseCategoricalCrossentropy}


def make_optimizer(name: str, learning_rate: float,
                   weight_decay: float | None = None) -> keras.optimizers.Optimizer:
    """A Keras optimizer by the names the sweep files use (Keras defaults otherwise).

    ``weight_decay`` is Keras's decoupled decay (``w -= learning_rate * weight_decay * w`` each
    step); ``None`` keeps the optimizer's default (0.004 for AdamW, none for the others).
    """
    decay = {} if weight_decay is None else {"weight_decay": weight_decay}
    factories = {
        "sgd": lambda: keras.optimizers.SGD(learning_rate, **decay),
        "momentum": lambda: keras.optimizers.SGD(learning_rate, momentum=0.9, **decay),
        "nesterov": lambda: keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True, **decay),
        "adam": lambda: keras.optimizers.Adam(learning_rate, **decay),
        "rmsprop": lambda: keras.optimizers.RMSprop(learning_rate, **decay),
        "adagrad": lambda: keras.optimizers.Adagrad(learning_rate, **decay),
        "adadelta": lambda: keras.optimizers.Adadelta(learning_rate, **decay),
        "adamw": lambda: keras.optimizers.AdamW(learning_rate, **decay),
    }
    return factories[name]()


def make_loss(config: TrialConfig) -> keras.losses.Loss:
    """The Keras loss of ``config``: its ``from_logits`` flag, label smoothing only where it is set."""
    smoothing = {"label_smoothing": config.label_smoothing} if config.label_smoothing else {}
    return LOSSES[config.loss](from_logits=config.from_logits, **smoothing)


def _initializer(name: str, seed: int):
    return keras.initializers.get({"class_name": name, "config": {} if name == "zeros" else {"seed": seed}})


def _initializers(config: TrialConfig, init: str):
    """The seeded initializers of a head's kernel (``init``) and bias, both from ``config.seed``."""
    kernel_seed, bias_seed, _ = layer_seeds(config.seed)
    return _initializer(init, kernel_seed), _initializer(config.bias_init, bias_seed)


def _build(config: TrialConfig, n_features: int, init: str):
    """The uncompiled model of ``config`` with output kernel initializer ``init``, and its
    output Dense layer.

    Every random draw is seeded explicitly: kernels and biases from ``config.seed``, dropout
    masks from ``config.dropout_seed``. Two heads of one seed therefore draw the same masks
    (the masks are drawn on the inputs, whose shape does not depend on the head) and start
    from the same hidden layer. A head whose body trains at its own rate is a
    :class:`TwoRateModel`.
    """
    kernel_init, bias_init = _initializers(config, init)
    inputs = keras.Input((n_features,), name="features")
    x = inputs
    if config.dropout > 0:
        x = keras.layers.Dropout(config.dropout, seed=layer_seeds(config.dropout_seed)[2],
                                 name="dropout")(x)
    if config.hidden_units:
        x = keras.layers.Dense(config.hidden_units, activation=config.hidden_activation,
                               name=HIDDEN_LAYER,
                               kernel_initializer=_initializer("glorot_uniform", hidden_seed(config.seed)),
                               bias_initializer="zeros")(x)
    dense = keras.layers.Dense(
        config.units, activation=config.activation, name=HEAD_LAYER,
        kernel_initializer=kernel_init, bias_initializer=bias_init,
        kernel_regularizer=keras.regularizers.L2(config.l2) if config.l2 else None)
    model = (TwoRateModel if config.two_rates else keras.Model)(inputs, dense(x))
    return model, dense


def keras_draw(name: str, seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """What Keras's initializer ``name`` with ``seed`` draws for ``shape``: the reference's
    draw for :func:`pipeline.start_weights.initial_weights`."""
    return np.asarray(_initializer(name, seed)(shape, dtype="float32"))


def build_head(config: TrialConfig, n_features: int) -> keras.Model:
    """The compiled Keras model of ``config`` for inputs of ``n_features``, holding
    :func:`initial_weights` (a transfer trial and a softmax trial of one seed are the seed's
    pair)."""
    if config.init in ("transfer", "glorot_centered"):
        start = initial_weights(config, n_features, keras_draw)
        model, dense = _build(config, n_features, "zeros")
        dense.set_weights(list(start))
    else:
        model, dense = _build(config, n_features, config.init)
    model.compile(optimizer=make_optimizer(config.optimizer, config.learning_rate, config.weight_decay),
                  loss=make_loss(config), metrics=["accuracy"])
    if isinstance(model, TwoRateModel):
        model.body_optimizer = make_optimizer(config.optimizer, config.body_rate, config.weight_decay)
        model.body_optimizer.build(model.get_layer(HIDDEN_LAYER).trainable_variables)
        model.optimizer.build(dense.trainable_variables)
    return model


def head_weights(model: keras.Model) -> tuple[np.ndarray, np.ndarray]:
    """The head's current output kernel and bias."""
    kernel, bias = model.get_layer(HEAD_LAYER).get_weights()
    return kernel, bias


def body_weights(model: keras.Model) -> tuple[np.ndarray, np.ndarray] | None:
    """The current kernel and bias of the head's hidden layer, or None for a head without one."""
    if HIDDEN_LAYER not in {layer.name for layer in model.layers}:
        return None
    kernel, bias = model.get_layer(HIDDEN_LAYER).get_weights()
    return kernel, bias


class TwoRateModel(keras.Model):
    """A head whose hidden layer trains with an optimizer of its own (``body_optimizer``, the
    same kind at ``body_learning_rate``) and its output layer with the compiled one.

    Keras 3 optimizers have one learning rate for every variable, so the step is Keras's own
    ``train_step`` (TensorFlow backend) with the gradients handed to two optimizers: each
    variable's update, and each optimizer's step count, are what one optimizer would give at
    that variable's rate. The loss is tracked weighted by batch size, as Keras's step does.
    """

    body_optimizer: keras.optimizers.Optimizer

    def train_step(self, data):
        import tensorflow as tf

        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
        variables = self.trainable_variables
        gradients = tape.gradient(loss, variables)
        body = {id(v) for v in self.get_layer(HIDDEN_LAYER).trainable_variables}
        for optimizer, in_body in ((self.body_optimizer, True), (self.optimizer, False)):
            pairs = [(g, v) for g, v in zip(gradients, variables, strict=True) if (id(v) in body) == in_body]
            optimizer.apply([g for g, _ in pairs], [v for _, v in pairs])
        next(m for m in self.metrics if m.name == "loss").update_state(loss, sample_weight=tf.shape(x)[0])
        return self.compute_metrics(x, y, y_pred)
