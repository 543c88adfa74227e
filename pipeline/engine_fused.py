"""The fused trainer: many heads per pass over the features, with the reference's numbers.

:class:`~pipeline.engine_keras.KerasEngine` builds and fits one Keras model per trial; on the
seed's workload nearly all of its time is per-model overhead. This engine trains the heads of
many trials at once. Heads of one *pass* (:func:`pass_key`: same split, batch order, dropout
masks, epochs and optimizer) read each batch once, through one matrix product with all their
kernels side by side; each keeps its own learning rate, activation, unit count, loss, label
smoothing, L2 penalty, weight decay, start weights and optimizer state.

It reproduces the reference step for step rather than approximately
(tests/test_engine_fused.py holds every metric of every epoch to 1e-4):

- start weights from :func:`pipeline.heads.initial_weights` (Keras's seeded initializers);
- batches in :func:`~pipeline.engine_keras.batch_order`, and the dropout masks of the head's
  seeded Keras ``Dropout``: ``stateless_dropout`` with seed ``[mask seed, step]``, the seeds
  its ``SeedGenerator`` hands out step after step;
- the loss Keras computes. Keras 3's cross-entropies on a sigmoid or softmax output use the
  cached pre-activation logits, so the loss depends on the unit count and the loss only: a
  1-unit softmax with ``binary_crossentropy`` trains as a sigmoid while its outputs stay 1.0,
  and ``categorical_crossentropy`` on one unit is 0 while its gradient (softmax - label) is
  not. The same TensorFlow ops give the same values (:func:`_losses`), and the gradient is
  what autodiff of them gives, in closed form (:func:`_logit_gradient`);
- Keras 3's update rules of the eight optimizers, constants and epsilons where Keras puts
  them, decoupled weight decay first (:func:`_update`);
- KerasEngine's per-epoch metrics: Keras's running training loss and accuracy (training mode,
  before each step's update), its validation loss and accuracy, and ours from the
  probabilities in inference mode (:mod:`pipeline.metrics`).

Heads Keras refuses (sparse cross-entropy on one unit, a transfer onto anything but a 1-unit
sigmoid) are trained by KerasEngine, which raises the reference's error, and so are heads with
a hidden layer (``hidden_units`` > 0, whatever their body's rate: a pass holds single-layer
heads only) and the heads of the atlas this engine does not reproduce: a ``linear`` output
whose loss reads it as probabilities (``from_logits`` false), labels other than the ones the
loss expects (:func:`engine_for`). A sigmoid or softmax head whose loss is told ``from_logits``
stays here (Keras reads its cached logits whatever the flag says, and warns), and so does a
``linear`` one told ``from_logits``: the same loss on the same logits; only its outputs are
read otherwise (:func:`_outputs`).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline import metrics
from pipeline.config import TrialConfig
from pipeline.engine_keras import EPOCH_METRICS, KerasEngine, TrialResult, batch_order
from pipeline.engines import Engine
from pipeline.features import FEATURES_ALIGNMENT
from pipeline.heads import initial_weights, layer_seeds
from pipeline.quiet import quiet_tensorflow
from pipeline.results import EpochCallback
from pipeline.split import Split, make_split, standardize, stratified_split

quiet_tensorflow()
import tensorflow as tf  # noqa: E402

# Loss kinds in the order their heads sit in a pass: 1-unit heads (one column each) first.
KINDS = ((1, "binary_crossentropy"), (1, "categorical_crossentropy"),
         (2, "binary_crossentropy"), (2, "categorical_crossentropy"),
         (2, "sparse_categorical_crossentropy"))
MAX_HEADS = 256  # heads per pass; more are split into several passes
SLOTS = {"sgd": (), "momentum": ("m",), "nesterov": ("m",), "adam": ("m", "v"), "adamw": ("m", "v"),
         "rmsprop": ("v",), "adagrad": ("acc",), "adadelta": ("g2", "d2")}
SLOT_START = {"acc": 0.1}  # Adagrad's initial_accumulator_value; every other slot starts at 0

Outcome = TrialResult | Exception


def engine_for(config: TrialConfig) -> str:
    """``"fused"`` for a head this engine trains, ``"keras"`` for one it leaves to KerasEngine:
    one Keras refuses, or one with a hidden layer."""
    sparse_one_unit = config.units == 1 and config.loss == "sparse_categorical_crossentropy"
    bad_transfer = config.init == "transfer" and (config.units, config.activation) != (1, "sigmoid")
    raw = config.activation == "linear" and not config.from_logits
    as_written = raw or config.labels != "expected"
    return "keras" if sparse_one_unit or bad_transfer or as_written or config.hidden_units else "fused"


def pass_key(config: TrialConfig) -> tuple:
    """What heads must share to train in one pass: split, batch order, masks, epochs, optimizer."""
    return (config.seed, config.validation_fraction, config.standardize, config.batch_seed,
            config.batch_size, config.dropout, config.dropout_seed, config.epochs, config.optimizer)


@dataclass
class Rows:
    """A split as rows of one matrix: features ``x``, labels ``y``, training and validation rows."""

    x: np.ndarray
    y: np.ndarray
    train: np.ndarray
    val: np.ndarray
    _tensors: tuple | None = field(default=None, init=False, repr=False)

    @classmethod
    def of_features(cls, x: np.ndarray, y: np.ndarray, config: TrialConfig) -> Rows:
        """The split of ``config`` without copying ``x`` (standardization needs one copy)."""
        train, val = stratified_split(y, config.validation_fraction, config.seed)
        if not config.standardize:
            return cls(x, y, train, val)
        x_train, x_val = standardize(x[train], x[val])
        return cls.of_split(Split(x_train=x_train, y_train=y[train], x_val=x_val, y_val=y[val]))

    @classmethod
    def of_split(cls, split: Split) -> Rows:
        """``split`` as rows: its training rows, then its validation rows."""
        n = len(split.y_train)
        return cls(np.concatenate([split.x_train, split.x_val]),
                   np.concatenate([split.y_train, split.y_val]),
                   np.arange(n), np.arange(n, n + len(split.y_val)))

    def tensors(self) -> tuple[tf.Tensor, tf.Tensor]:
        """``x`` and ``y`` as tensors, made once; ``x`` shares its memory when it can."""
        if self._tensors is None:
            self._tensors = (shared_tensor(self.x), tf.convert_to_tensor(self.y, tf.int32))
        return self._tensors


def shared_tensor(x: np.ndarray) -> tf.Tensor:
    """``x`` as a float32 tensor, without a copy when ``x`` is C-contiguous float32 on a 64-byte
    boundary (as :func:`pipeline.features.read_features` leaves it): the features are the
    largest thing a sweep holds, and a copy would double its memory."""
    if x.dtype == np.float32 and x.flags.c_contiguous and x.ctypes.data % FEATURES_ALIGNMENT == 0:
        return tf.experimental.dlpack.from_dlpack(x.__dlpack__())
    return tf.convert_to_tensor(x, tf.float32)


class FusedEngine(Engine):
    """Trains many heads per pass over the features; KerasEngine's numbers, far fewer passes."""

    name = "fused"
    batch_trials = 256

    def trained_by(self, config: TrialConfig) -> str:
        """The engine that trains ``config``: see :func:`engine_for`."""
        return engine_for(config)

    def prepare(self, config: TrialConfig) -> None:
        """Start building the graphs that ``config``'s pass will run, on a background thread.

        Building them is pure Python work; a sweep calls this as soon as it knows a config, so
        the building overlaps its bookkeeping (Optuna, MLflow) instead of adding to it. A config
        this engine hands to Keras (:func:`engine_for`) needs none.
        """
        if engine_for(config) == "fused":
            _graphs(config.optimizer, float(config.dropout), wait=None)

    def train(self, config: TrialConfig, split: Split,
              on_epoch: EpochCallback | None = None) -> TrialResult:
        """Train one head, as :meth:`KerasEngine.train` does (and raising what it raises)."""
        if engine_for(config) == "keras":
            return KerasEngine().train(config, split, on_epoch)
        outcome = train_pass([config], Rows.of_split(split), [on_epoch])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def train_many(self, configs: Sequence[TrialConfig], x: np.ndarray, y: np.ndarray,
                   callbacks: Sequence[EpochCallback | None] | None = None) -> list[Outcome]:
        """Train every config on features ``x`` and labels ``y``; an outcome per config, in order.

        An outcome is the config's :class:`TrialResult`, or the exception that ended it (from
        training, or raised by its ``on_epoch`` callback, e.g. ``optuna.TrialPruned``): one
        head's failure does not stop the others. Heads are grouped into passes by
        :func:`pass_key`; splits are made once per seed and dropped when its passes are done.
        """
        callbacks = callbacks or [None] * len(configs)
        outcomes: list[Outcome | None] = [None] * len(configs)
        by_split: dict[tuple, dict[tuple, list[int]]] = defaultdict(lambda: defaultdict(list))
        for config in configs:
            self.prepare(config)
        for i, config in enumerate(configs):
            if engine_for(config) == "keras":
                split = make_split(x, y, config.validation_fraction, config.seed, config.standardize)
                outcomes[i] = _guarded(KerasEngine().train, config, split, callbacks[i])
            else:
                by_split[pass_key(config)[:3]][pass_key(config)].append(i)
        for passes in by_split.values():
            rows = Rows.of_features(x, y, configs[next(iter(passes.values()))[0]])
            for members in passes.values():
                for start in range(0, len(members), MAX_HEADS):
                    chunk = members[start:start + MAX_HEADS]
                    results = train_pass([configs[i] for i in chunk], rows, [callbacks[i] for i in chunk])
                    for i, outcome in zip(chunk, results, strict=True):
                        outcomes[i] = outcome
        return outcomes


def _guarded(train, config, split, callback) -> Outcome:
    try:
        return train(config, split, callback)
    except Exception as exc:
        return exc


# --- one pass --------------------------------------------------------------------------------

@dataclass
class _Layout:
    """Where the heads of a pass sit: in kind order (:data:`KINDS`), 1-unit columns first."""

    order: list[int]     # the pass's config indices, in layout order
    columns: list[slice]  # each head's kernel columns, in layout order
    counts: list[int]    # heads of each kind

    @classmethod
    def of(cls, configs: Sequence[TrialConfig]) -> _Layout:
        kind = {k: i for i, k in enumerate(KINDS)}
        order = sorted(range(len(configs)), key=lambda i: kind[configs[i].units, configs[i].loss])
        columns, at = [], 0
        for i in order:
            columns.append(slice(at, at + configs[i].units))
            at += configs[i].units
        counts = [sum((c.units, c.loss) == k for c in configs) for k in KINDS]
        return cls(order, columns, counts)


def train_pass(configs: Sequence[TrialConfig], rows: Rows,
               callbacks: Sequence[EpochCallback | None]) -> list[Outcome]:
    """Train heads that share :func:`pass_key` together on ``rows``; an outcome per config.

    After each epoch every head still training gets its metrics and its callback; a head
    whose callback raises stops there (its outcome is the exception) and the pass goes on
    while any head trains.
    """
    first = configs[0]
    layout = _Layout.of(configs)
    heads = [configs[i] for i in layout.order]
    x, y = rows.tensors()
    state = _start_state(heads, layout, rows.x.shape[1], first.optimizer)
    spec = _spec(heads, layout)
    options = {"optimizer": first.optimizer, "rate": float(first.dropout)}
    _graphs(**options, wait="train")
    mask_seed = layer_seeds(first.dropout_seed)[2]
    y_train, y_val = rows.y[rows.train], rows.y[rows.val]
    n_train = len(rows.train)
    sizes = np.array([len(b) for b in batch_order(n_train, first.batch_size, first.batch_seed, 0)])
    history = [{name: [] for name in EPOCH_METRICS} for _ in heads]
    step_loss: list[list[float]] = [[] for _ in heads]
    ended: dict[int, Exception] = {}
    p_val = None
    try:
        for epoch in range(first.epochs):
            order = rows.train[np.concatenate(batch_order(n_train, first.batch_size, first.batch_seed,
                                                          epoch))]
            state, losses, correct = _train_epoch(
                x, y, tf.constant(order, tf.int32), tf.constant(first.batch_size, tf.int32),
                tf.constant(epoch * len(sizes), tf.int64), tf.constant(mask_seed, tf.int64),
                state, spec, **options)
            _graphs(**options, wait="evaluate")
            p, val_loss, val_correct = _evaluate(x, y, tf.constant(rows.val, tf.int32), state["kernel"],
                                                 state["bias"], spec)
            losses, p = losses.numpy().astype(np.float64), p.numpy()
            correct, val_loss, val_correct = correct.numpy(), val_loss.numpy(), val_correct.numpy()
            epoch_loss = sizes @ losses / n_train
            p_train, p_val = p[rows.train], p[rows.val]
            for j in range(len(heads)):
                if j in ended:
                    continue
                values = {
                    "loss": float(np.float32(epoch_loss[j])),
                    "val_loss": float(val_loss[j]),
                    "accuracy": metrics.accuracy(p_train[:, j], y_train),
                    "val_accuracy": metrics.accuracy(p_val[:, j], y_val),
                    "prob_loss": metrics.prob_loss(p_train[:, j], y_train),
                    "val_prob_loss": metrics.prob_loss(p_val[:, j], y_val),
                    "keras_accuracy": float(np.float32(correct[j] / n_train)),
                    "keras_val_accuracy": float(np.float32(val_correct[j] / len(y_val))),
                }
                for name, value in values.items():
                    history[j][name].append(value)
                step_loss[j].extend(losses[:, j].tolist())
                if callbacks[layout.order[j]] is not None:
                    try:
                        callbacks[layout.order[j]](epoch, values)
                    except Exception as exc:
                        ended[j] = exc
            if len(ended) == len(heads):
                break
    except Exception as exc:  # TensorFlow failed: every head still training fails with it
        ended.update({j: exc for j in range(len(heads)) if j not in ended})
    kernel, bias = state["kernel"].numpy(), state["bias"].numpy()
    outcomes: list[Outcome | None] = [None] * len(configs)
    for j, i in enumerate(layout.order):
        if j in ended:
            outcomes[i] = ended[j]
            continue
        cols = layout.columns[j]
        outcomes[i] = TrialResult(history=history[j], step_loss=step_loss[j],
                                  positive_fraction=float(np.mean(y_val)),
                                  collapsed=metrics.is_collapsed(p_val[:, j]),
                                  kernel=kernel[:, cols].copy(), bias=bias[cols].copy(), engine="fused")
    return outcomes


def _start_state(heads: Sequence[TrialConfig], layout: _Layout, n_features: int,
                 optimizer: str) -> dict[str, tf.Tensor]:
    """Kernels (D x columns) and biases side by side, from each head's Keras start weights, and
    the optimizer's slots for both."""
    kernel = np.zeros((n_features, layout.columns[-1].stop), np.float32)
    bias = np.zeros(layout.columns[-1].stop, np.float32)
    cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    for head, cols in zip(heads, layout.columns, strict=True):
        # the start weights depend on these fields only (the initializers' seeds come from `seed`)
        key = (head.seed, head.init, head.units, head.activation, head.bias_init, head.transfer_bias)
        if key not in cache:
            cache[key] = initial_weights(head, n_features)
        kernel[:, cols], bias[cols] = cache[key]
    state = {"kernel": tf.constant(kernel), "bias": tf.constant(bias)}
    for slot in SLOTS[optimizer]:
        for name, value in (("kernel", kernel), ("bias", bias)):
            state[f"{slot}/{name}"] = tf.fill(value.shape, np.float32(SLOT_START.get(slot, 0.0)))
    return state


def _spec(heads: Sequence[TrialConfig], layout: _Layout) -> dict[str, tf.Tensor]:
    """Per-head and per-column settings as tensors, in layout order.

    Label smoothing is kept as Keras applies it, ``y * keep + add`` with ``keep = 1 - s`` and
    ``add = s / 2`` (binary; categorical: ``s / units``), both rounded to float32 as Keras
    rounds them, so smoothed labels are bit for bit Keras's.
    """
    lr, decay, col_head = [], [], []
    for j, (head, cols) in enumerate(zip(heads, layout.columns, strict=True)):
        n = cols.stop - cols.start
        lr += [head.learning_rate] * n
        decay += [head.decay] * n
        col_head += [j] * n
    keep = [np.float32(1.0 - h.label_smoothing) for h in heads]
    add = [np.float32(0.5 * h.label_smoothing) if h.loss == "binary_crossentropy"
           else np.float32(h.label_smoothing) / np.float32(h.units) for h in heads]
    return {"counts": tf.constant(layout.counts, tf.int32),
            "lr": tf.constant(lr, tf.float32), "decay": tf.constant(decay, tf.float32),
            "col_head": tf.constant(col_head, tf.int32),
            "l2": tf.constant([h.l2 for h in heads], tf.float32),
            "keep": tf.constant(keep, tf.float32), "add": tf.constant(add, tf.float32),
            "softmax": tf.constant([h.activation == "softmax" or (h.activation, h.units) == ("linear", 2)
                                    for h in heads]),
            "linear": tf.constant([h.activation == "linear" for h in heads])}


# --- the computation (TensorFlow graphs) -------------------------------------------------------

def _split_logits(z: tf.Tensor, counts: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Logits of the 1-unit heads (rows x n1) and of the 2-unit heads (rows x n2 x 2).

    Here and below, heads are taken apart with ``tf.split`` rather than slices: a slice with
    tensor bounds is eight graph nodes, and tracing the graphs is on a sweep's critical path.
    """
    z1, z2 = tf.split(z, _one_two(counts), num=2, axis=1)
    return z1, tf.reshape(z2, [tf.shape(z)[0], -1, 2])


def _one_two(counts: tf.Tensor) -> tf.Tensor:
    """``tf.split`` sizes that take the 1-unit heads (one column each) first, the rest after:
    for logits (columns) and for per-head vectors alike."""
    return tf.stack([counts[0] + counts[1], -1])


def _by_kind(z: tf.Tensor, y: tf.Tensor, spec: dict) -> list[tuple[tf.Tensor, tf.Tensor]]:
    """The logits of each loss kind, in :data:`KINDS` order, with their labels as Keras smooths
    them (``y * keep + add``): rows x heads for the 1-unit kinds, rows x heads x 2 for the
    2-unit ones; the sparse kind's labels are the classes (rows), unsmoothed."""
    counts = spec["counts"]
    z1, z2 = _split_logits(z, counts)
    za, zb = tf.split(z1, counts[:2], num=2, axis=1)
    zc, zd, ze = tf.split(z2, counts[2:], num=3, axis=1)
    keep, add = tf.split(spec["keep"], counts, num=5), tf.split(spec["add"], counts, num=5)
    y1 = tf.cast(y, tf.float32)[:, None]
    y2 = tf.one_hot(y, 2)[:, None, :]
    return [(za, y1 * keep[0] + add[0]), (zb, y1 * keep[1] + add[1]),
            (zc, y2 * keep[2][:, None] + add[2][:, None]),
            (zd, y2 * keep[3][:, None] + add[3][:, None]), (ze, y)]


def _losses(kinds: list[tuple[tf.Tensor, tf.Tensor]]) -> tf.Tensor:
    """Each head's loss on each row (rows x heads), as Keras computes it from the logits and
    labels of each loss kind (:func:`_by_kind`)."""
    (za, ta), (zb, tb), (zc, tc), (zd, td), (ze, ye) = kinds
    bce1 = tf.nn.sigmoid_cross_entropy_with_logits(labels=ta, logits=za)
    cce1 = tf.nn.softmax_cross_entropy_with_logits(labels=tb[..., None], logits=zb[..., None])
    bce2 = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=tc, logits=zc), axis=-1)
    cce2 = tf.nn.softmax_cross_entropy_with_logits(labels=td, logits=zd)
    sparse2 = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.broadcast_to(ye[:, None], tf.shape(ze[..., 0])), logits=ze)
    return tf.concat([bce1, cce1, bce2, cce2, sparse2], axis=1)


def _outputs(z: tf.Tensor, spec: dict) -> tuple[tf.Tensor, tf.Tensor]:
    """P(label 1) of each head on each row, and Keras's accuracy prediction (1 or 0).

    P(label 1) is the softmax of a softmax head's logits (and of a 2-unit linear head's), the
    sigmoid of any other's (:func:`pipeline.metrics.positive_probability`). Keras's ``accuracy``
    is binary (output > 0.5: a 1-unit linear head's output is its logit) on one unit and
    categorical (argmax, ties to label 0) on two.
    """
    counts = spec["counts"]
    z1, z2 = _split_logits(z, counts)
    softmax1, softmax2 = tf.split(spec["softmax"], _one_two(counts), num=2)
    linear1, _ = tf.split(spec["linear"], _one_two(counts), num=2)
    p1 = tf.where(softmax1, tf.nn.softmax(z1[..., None], axis=-1)[..., 0], tf.sigmoid(z1))
    p2 = tf.where(softmax2[:, None], tf.nn.softmax(z2, axis=-1), tf.sigmoid(z2))
    positive = tf.concat([p1, p2[..., 1]], axis=1)
    predicted = tf.concat([tf.where(linear1, z1 > 0.5, p1 > 0.5), p2[..., 1] > p2[..., 0]], axis=1)
    return positive, predicted


def _head_loss(kinds: list[tuple[tf.Tensor, tf.Tensor]], rows: tf.Tensor, kernel: tf.Tensor,
               spec: dict, has_l2: tf.Tensor) -> tf.Tensor:
    """Each head's loss over the ``rows`` rows of ``kinds`` (:func:`_by_kind`; sum / rows, as
    Keras), plus its L2 penalty (skipped unless ``has_l2``, whether any head has one: else it
    would add exactly 0)."""
    loss = tf.math.divide_no_nan(tf.reduce_sum(_losses(kinds), axis=0), tf.cast(rows, tf.float32))

    def penalty():
        per_column = tf.reduce_sum(tf.square(kernel), axis=0)
        return loss + spec["l2"] * tf.math.unsorted_segment_sum(per_column, spec["col_head"],
                                                                tf.shape(spec["l2"])[0])

    return tf.cond(has_l2, penalty, lambda: loss)


def _logit_gradient(kinds: list[tuple[tf.Tensor, tf.Tensor]], rows: tf.Tensor) -> tf.Tensor:
    """The gradient of the heads' summed :func:`_head_loss` (without penalty) with respect to
    their logits (``rows`` x columns; ``kinds`` from :func:`_by_kind`), in closed form: what
    TensorFlow's autodiff of :func:`_losses` computes, up to rounding in the last bit, without
    its backward graph.

    Each cross-entropy's gradient is its output minus the (smoothed) labels: sigmoid for the
    sigmoid cross-entropies (a 2-unit binary cross-entropy averages its two, so half), softmax
    for the softmax ones (a softmax over one unit is 1), times 1 / rows for the mean over rows
    (multiplied, as autodiff applies the division's gradient).
    """
    (za, ta), (zb, tb), (zc, tc), (zd, td), (ze, ye) = kinds
    g1 = tf.concat([tf.sigmoid(za) - ta, 1.0 - tb], axis=1)
    g2 = tf.concat([(tf.sigmoid(zc) - tc) * 0.5, tf.nn.softmax(zd) - td,
                    tf.nn.softmax(ze) - tf.one_hot(ye, 2)[:, None, :]], axis=1)
    per_row = tf.math.divide_no_nan(1.0, tf.cast(rows, tf.float32))
    return tf.concat([g1, tf.reshape(g2, [rows, -1])], axis=1) * per_row


def _correct(predicted: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(tf.cast(predicted == (y == 1)[:, None], tf.int32), axis=0)


def _dropout_seed(mask_seed: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    """The seed Keras's Dropout draws at training step ``step`` (SeedGenerator, then _cast_seed)."""
    return tf.cast(tf.math.floormod(tf.stack([mask_seed, step]), tf.int32.max - 1), tf.int32)


def _update(optimizer: str, var: tf.Tensor, grad: tf.Tensor, slots: dict, lr: tf.Tensor,
            decay: tf.Tensor, has_decay: tf.Tensor, step: tf.Tensor) -> tuple[tf.Tensor, dict]:
    """One Keras 3 optimizer step on ``var`` (kernel or bias, heads side by side).

    ``lr`` and ``decay`` hold each column's learning rate and decoupled weight decay (skipped
    unless ``has_decay``: ``var - var * 0 * lr`` is ``var``); ``step`` is the optimizer's
    iteration count before this step. Constants are written as Keras writes them (e.g. ``1 - 0.9`` in double
    precision, then float32) so the arithmetic rounds as Keras's does.
    """
    var = tf.cond(has_decay, lambda: var - var * decay * lr, lambda: var)
    if optimizer == "sgd":
        return var - grad * lr, {}
    if optimizer in ("momentum", "nesterov"):
        m = slots["m"] * 0.9 - grad * lr
        return var + (m * 0.9 - grad * lr if optimizer == "nesterov" else m), {"m": m}
    if optimizer in ("adam", "adamw"):
        t = tf.cast(step + 1, tf.float32)
        alpha = lr * tf.sqrt(1 - tf.pow(tf.constant(0.999), t)) / (1 - tf.pow(tf.constant(0.9), t))
        m = slots["m"] + (grad - slots["m"]) * (1 - 0.9)
        v = slots["v"] + (tf.square(grad) - slots["v"]) * (1 - 0.999)
        return var - (m * alpha) / (tf.sqrt(v) + 1e-7), {"m": m, "v": v}
    if optimizer == "rmsprop":
        v = 0.9 * slots["v"] + (1 - 0.9) * tf.square(grad)
        return var - (lr * grad) / tf.sqrt(v + 1e-7), {"v": v}
    if optimizer == "adagrad":
        acc = slots["acc"] + tf.square(grad)
        return var - (lr * grad) / tf.sqrt(acc + 1e-7), {"acc": acc}
    if optimizer == "adadelta":
        g2 = 0.95 * slots["g2"] + (1 - 0.95) * tf.square(grad)
        delta = -((tf.sqrt(slots["d2"] + 1e-7) * grad) / tf.sqrt(g2 + 1e-7))
        d2 = 0.95 * slots["d2"] + (1 - 0.95) * tf.square(delta)
        return var + lr * delta, {"g2": g2, "d2": d2}
    raise ValueError(f"unknown optimizer {optimizer!r}")


@tf.function(autograph=False)
def _train_epoch(x, y, order, batch_size, step0, mask_seed, state, spec, *, optimizer: str, rate: float):
    """One epoch over the rows ``order`` (x's row indices in batch order), from optimizer step
    ``step0``. Returns the new state, each step's loss per head (steps x heads) and each
    head's count of right Keras predictions (training mode, before each update)."""
    n = tf.shape(order)[0]
    steps = (n + batch_size - 1) // batch_size
    n_heads = tf.shape(spec["l2"])[0]
    has_l2, has_decay = tf.reduce_any(spec["l2"] > 0), tf.reduce_any(spec["decay"] > 0)
    l2_column = tf.gather(spec["l2"], spec["col_head"])  # the penalty's gradient: 2 * l2 * kernel

    def body(i, state, losses, correct):
        step = step0 + tf.cast(i, tf.int64)
        rows = order[i * batch_size:tf.minimum((i + 1) * batch_size, n)]
        xb, yb = tf.gather(x, rows), tf.gather(y, rows)
        if rate > 0:
            xb = tf.nn.experimental.stateless_dropout(xb, rate=rate, seed=_dropout_seed(mask_seed, step))
        kernel, bias = state["kernel"], state["bias"]
        z = tf.matmul(xb, kernel) + bias
        kinds, n_rows = _by_kind(z, yb, spec), tf.shape(z)[0]
        loss = _head_loss(kinds, n_rows, kernel, spec, has_l2)
        dz = _logit_gradient(kinds, n_rows)  # heads share no weights: each gets its own gradient
        g = tf.matmul(xb, dz, transpose_a=True)
        grads = [tf.cond(has_l2, lambda: g + l2_column * (kernel * 2.0), lambda: g),
                 tf.reduce_sum(dz, axis=0)]
        new = {}
        for name, var, grad, lr, decay in (("kernel", kernel, grads[0], spec["lr"], spec["decay"]),
                                           ("bias", bias, grads[1], spec["lr"], spec["decay"])):
            slots = {s: state[f"{s}/{name}"] for s in SLOTS[optimizer]}
            new[name], slots = _update(optimizer, var, grad, slots, lr, decay, has_decay, step)
            new.update({f"{s}/{name}": value for s, value in slots.items()})
        _, predicted = _outputs(z, spec)
        correct = tf.ensure_shape(correct + _correct(predicted, yb), correct.shape)
        return i + 1, new, losses.write(i, loss), correct

    _, state, losses, correct = tf.while_loop(
        lambda i, *_: i < steps, body,
        (tf.constant(0), state, tf.TensorArray(tf.float32, size=steps), tf.zeros([n_heads], tf.int32)))
    return state, losses.stack(), correct


@tf.function(autograph=False)
def _evaluate(x, y, val, kernel, bias, spec):
    """Inference on every row of ``x``: P(label 1) per row and head, and on the validation rows
    ``val`` Keras's loss and count of right predictions per head."""
    z = tf.matmul(x, kernel) + bias
    positive, predicted = _outputs(z, spec)
    y_val = tf.gather(y, val)
    loss = _head_loss(_by_kind(tf.gather(z, val), y_val, spec), tf.shape(val)[0], kernel, spec,
                      tf.reduce_any(spec["l2"] > 0))
    return positive, loss, _correct(tf.gather(predicted, val), y_val)


GRAPHS = ("train", "evaluate")  # in the order they are built, and needed
_BUILT: dict[tuple[str, float], dict[str, threading.Event]] = {}  # each set once built


def _graphs(optimizer: str, rate: float, *, wait: str | None) -> None:
    """Build (trace) the graphs of passes with this optimizer and dropout rate, once per process,
    for inputs of any size, on a background thread; with ``wait`` (one of :data:`GRAPHS`),
    return once that graph is built.

    The training graph is built first: a pass starts on it while the evaluation graph, needed
    at the end of the first epoch, is still being built, which takes that build off the path
    to the first step. The wait is on an event, not ``Thread.join``: Ctrl-C during a join can
    leave Python 3.11 taking the still running thread for stopped (python/cpython issue
    90882), and then exit does not wait for the trace and the process can hang.
    """
    key = (optimizer, rate)
    if key not in _BUILT:
        built = _BUILT[key] = {name: threading.Event() for name in GRAPHS}

        def build() -> None:
            try:
                for name in GRAPHS:
                    _trace(name, optimizer, rate)
                    built[name].set()
            finally:
                for event in built.values():
                    event.set()

        # Not a daemon: a process that exits (Ctrl-C) while TensorFlow traces on a daemon
        # thread aborts ("terminate called ..."); exit waits for the trace instead.
        threading.Thread(target=build, name="fused-graphs").start()
    if wait:
        _BUILT[key][wait].wait()


def _trace(graph: str, optimizer: str, rate: float) -> None:
    """Trace ``graph`` (``train``: :func:`_train_epoch`, ``evaluate``: :func:`_evaluate`) for
    inputs of any size, then run it once on two rows, which makes TensorFlow optimise and
    instantiate it here rather than in the first pass."""
    vector = tf.TensorSpec([None], tf.float32)
    matrix = tf.TensorSpec([None, None], tf.float32)
    rows = tf.TensorSpec([None], tf.int32)
    spec = {"counts": rows, "lr": vector, "decay": vector, "col_head": rows, "l2": vector,
            "keep": vector, "add": vector, "softmax": tf.TensorSpec([None], tf.bool),
            "linear": tf.TensorSpec([None], tf.bool)}
    head = TrialConfig(optimizer=optimizer, dropout=rate)
    two, x = tf.zeros([2], tf.int32), tf.zeros([2, 1])
    if graph == "evaluate":
        _evaluate.get_concrete_function(matrix, rows, rows, matrix, vector, spec)
        _evaluate(x, two, two, tf.zeros([1, 1]), tf.zeros([1]), _spec([head], _Layout.of([head])))
        return
    state = {"kernel": matrix, "bias": vector,
             **{f"{slot}/{name}": spec_ for slot in SLOTS[optimizer]
                for name, spec_ in (("kernel", matrix), ("bias", vector))}}
    scalar = tf.TensorSpec([], tf.int64)
    _train_epoch.get_concrete_function(matrix, rows, rows, tf.TensorSpec([], tf.int32), scalar, scalar,
                                       state, spec, optimizer=optimizer, rate=rate)
    state = {name: tf.zeros([1, 1] if name.endswith("kernel") else [1]) for name in state}
    _train_epoch(x, two, two, tf.constant(2), tf.constant(0, tf.int64), tf.constant(0, tf.int64), state,
                 _spec([head], _Layout.of([head])), optimizer=optimizer, rate=rate)
