"""The reference trainer: one plain Keras ``model.fit`` per trial.

It implements :class:`~pipeline.engines.Engine`: a :class:`~pipeline.config.TrialConfig` and a
:class:`~pipeline.split.Split` in, a :class:`TrialResult` out; the sweep knows engines only
through that interface.

Per epoch it records Keras's own ``loss``/``val_loss`` (computed from cached logits) and, from
the head's actual probabilities in inference mode, ``accuracy``, ``val_accuracy``,
``prob_loss`` and ``val_prob_loss``. Keras's accuracy is kept as ``keras_accuracy`` and
``keras_val_accuracy``. Batches come in a seeded order that depends on the seed only, so heads
of one seed see the same batches; with the seeded layer order in :mod:`pipeline.heads` they
also draw the same dropout masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline import metrics
from pipeline.config import TrialConfig
from pipeline.engines import Engine
from pipeline.heads import body_weights, build_head, head_weights, keras
from pipeline.labels import labels_for
from pipeline.results import EPOCH_METRICS, EpochCallback, TrialResult
from pipeline.split import Split, batch_order, make_split


def seeded_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, epochs: int):
    """Training batches in :func:`batch_order`, epoch after epoch, as one ``tf.data`` stream.

    ``model.fit`` takes it with ``steps_per_epoch`` and draws it in order. (A Keras
    ``PyDataset`` cannot know its epoch: Keras reads two batches ahead to learn their shapes,
    and calls ``on_epoch_end`` before the first epoch.)
    """
    import tensorflow as tf

    def batches():
        for epoch in range(epochs):
            for rows in batch_order(len(x), batch_size, seed, epoch):
                yield x[rows], y[rows]

    spec = (tf.TensorSpec((None, *x.shape[1:]), tf.as_dtype(x.dtype)),
            tf.TensorSpec((None, *y.shape[1:]), tf.as_dtype(y.dtype)))
    return tf.data.Dataset.from_generator(batches, output_signature=spec)


class _Recorder(keras.callbacks.Callback):
    """Collects the per-epoch metrics and per-step losses of one fit."""

    def __init__(self, split: Split, config: TrialConfig, on_epoch: EpochCallback | None):
        super().__init__()
        self.split, self.config, self.on_epoch = split, config, on_epoch
        self.history: dict[str, list[float]] = {name: [] for name in EPOCH_METRICS}
        self.step_loss: list[float] = []
        self._seen = 0
        self._running = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._seen, self._running = 0, 0.0

    def on_train_batch_end(self, batch, logs=None):
        # Keras logs the epoch's running mean, weighted by batch size; undo it for the step.
        size = min(self.config.batch_size, len(self.split.y_train) - self._seen)
        total = self._running * self._seen
        self._seen += size
        self._running = float(logs["loss"])
        self.step_loss.append((self._running * self._seen - total) / size)

    def on_epoch_end(self, epoch, logs=None):
        p_train = self.probabilities(self.split.x_train)
        p_val = self.probabilities(self.split.x_val)
        values = {
            "loss": float(logs["loss"]),
            "val_loss": float(logs["val_loss"]),
            "accuracy": metrics.accuracy(p_train, self.split.y_train),
            "val_accuracy": metrics.accuracy(p_val, self.split.y_val),
            "prob_loss": metrics.prob_loss(p_train, self.split.y_train),
            "val_prob_loss": metrics.prob_loss(p_val, self.split.y_val),
            "keras_accuracy": float(logs["accuracy"]),
            "keras_val_accuracy": float(logs["val_accuracy"]),
        }
        for name, value in values.items():
            self.history[name].append(value)
        if self.on_epoch is not None:
            self.on_epoch(epoch, values)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        outputs = self.model(x, training=False)
        return metrics.positive_probability(keras.ops.convert_to_numpy(outputs), self.config.activation)


class KerasEngine(Engine):
    """The reference trainer: ``build_head`` then ``model.fit``, one trial at a time."""

    name = "keras"
    batch_trials = 1

    def train(self, config: TrialConfig, split: Split,
              on_epoch: EpochCallback | None = None) -> TrialResult:
        """Train the head of ``config`` on ``split``; ``on_epoch(epoch, metrics)`` after each epoch.

        Raises whatever Keras raises for a combination it rejects (the sweep turns that into a
        FAILED trial), and whatever ``on_epoch`` raises (e.g. ``optuna.TrialPruned``).
        """
        model = build_head(config, split.x_train.shape[1])
        y_train = labels_for(split.y_train, config)
        y_val = labels_for(split.y_val, config)
        recorder = _Recorder(split, config, on_epoch)
        batches = seeded_batches(split.x_train, y_train, config.batch_size, config.batch_seed,
                                 config.epochs)
        model.fit(batches, epochs=config.epochs, steps_per_epoch=-(-len(y_train) // config.batch_size),
                  validation_data=(split.x_val, y_val),
                  validation_batch_size=max(config.batch_size, 1024), shuffle=False,
                  callbacks=[recorder], verbose=0)
        kernel, bias = head_weights(model)
        hidden_kernel, hidden_bias = body_weights(model) or (None, None)
        p_val = recorder.probabilities(split.x_val)
        return TrialResult(history=recorder.history, step_loss=recorder.step_loss,
                           positive_fraction=split.positive_fraction,
                           collapsed=metrics.is_collapsed(p_val), kernel=kernel, bias=bias,
                           hidden_kernel=hidden_kernel, hidden_bias=hidden_bias)

    def train_many(self, configs: Sequence[TrialConfig], x: np.ndarray, y: np.ndarray,
                   callbacks: Sequence[EpochCallback | None] | None = None) -> list[TrialResult | Exception]:
        """Train the configs one after another, each on its own split (see :meth:`Engine.train_many`)."""
        outcomes: list[TrialResult | Exception] = []
        for config, callback in zip(configs, callbacks or [None] * len(configs), strict=True):
            try:
                split = make_split(x, y, config.validation_fraction, config.seed, config.standardize)
                outcomes.append(self.train(config, split, callback))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes
