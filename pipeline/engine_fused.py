"""The fused trainer: many heads per pass over the features, with the reference's numbers.

:class:`~pipeline.engine_keras.KerasEngine` builds and fits one Keras model per trial; on the
seed's workload nearly all of its time is per-model overhead. This engine trains the heads of
many trials at once, without TensorFlow. Heads of one *pass* (:func:`pass_key`: same split,
batch order, dropout masks, epochs and optimizer) read each batch once, through one matrix
product with all their kernels side by side; each keeps its own learning rate, activation,
unit count, loss, label smoothing, L2 penalty, weight decay, start weights and optimizer state.
The arithmetic is compiled (:mod:`pipeline.kernels`): an epoch runs without the GIL, beside
the sweep's MLflow writer thread.

It reproduces the reference step for step rather than approximately
(tests/test_engine_fused.py holds every metric of every epoch to 1e-4):

- start weights from :func:`pipeline.start_weights.initial_weights`: Keras's seeded
  initializers, computed as TensorFlow computes them (:mod:`pipeline.stateless_random`);
- batches in :func:`~pipeline.split.batch_order`, and the dropout masks of the head's seeded
  Keras ``Dropout``: TensorFlow's ``stateless_dropout`` with seed ``[mask seed, step]``, the
  seeds its ``SeedGenerator`` hands out step after step, bit for bit;
- the loss Keras computes. Keras 3's cross-entropies on a sigmoid or softmax output use the
  cached pre-activation logits, so the loss depends on the unit count and the loss only: a
  1-unit softmax with ``binary_crossentropy`` trains as a sigmoid while its outputs stay 1.0,
  and ``categorical_crossentropy`` on one unit is 0 while its gradient (softmax - label) is
  not. The gradient is what TensorFlow's autodiff of the losses gives, in closed form;
- Keras 3's update rules of the eight optimizers, constants and epsilons where Keras puts
  them, decoupled weight decay first;
- KerasEngine's per-epoch metrics: Keras's running training loss and accuracy (training mode,
  before each step's update), its validation loss and accuracy, and ours from the
  probabilities in inference mode (:mod:`pipeline.metrics`).

Heads Keras refuses (sparse cross-entropy on one unit, a transfer onto anything but a 1-unit
sigmoid) are trained by KerasEngine, which raises the reference's error, and so are heads with
a hidden layer (``hidden_units`` > 0, whatever their body's rate: a pass holds single-layer
heads only) and the heads of the atlas this engine does not reproduce: a ``linear`` output
whose loss reads it as probabilities (``from_logits`` false), labels other than the ones the
loss expects (:func:`engine_for`). TensorFlow is imported for those only. A sigmoid or softmax
head whose loss is told ``from_logits`` stays here (Keras reads its cached logits whatever the
flag says, and warns), and so does a ``linear`` one told ``from_logits``: the same loss on the
same logits; only its outputs are read otherwise.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from pipeline import kernels, metrics, stateless_random
from pipeline.config import TrialConfig
from pipeline.engines import Engine
from pipeline.kernels import LOSS_KINDS
from pipeline.results import EPOCH_METRICS, EpochCallback, TrialResult
from pipeline.split import Split, batch_order, make_split, standardize, stratified_split
from pipeline.start_weights import initial_weights, layer_seeds

MAX_HEADS = 256  # heads per pass; more are split into several passes
_METRIC_HEADS = 16  # heads whose accuracies and losses are computed together (_scores)
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
    """A split as rows of one matrix: features ``x`` (float32, C order: the kernels' layout; the
    features as read are already, and are not copied), labels ``y`` (int64), training and
    validation rows."""

    x: np.ndarray
    y: np.ndarray
    train: np.ndarray
    val: np.ndarray

    def __post_init__(self) -> None:
        self.x = np.ascontiguousarray(self.x, np.float32)
        self.y = np.asarray(self.y, np.int64)

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


class FusedEngine(Engine):
    """Trains many heads per pass over the features; KerasEngine's numbers, far fewer passes."""

    name = "fused"
    batch_trials = 256

    def trained_by(self, config: TrialConfig) -> str:
        """The engine that trains ``config``: see :func:`engine_for`."""
        return engine_for(config)

    def train(self, config: TrialConfig, split: Split,
              on_epoch: EpochCallback | None = None) -> TrialResult:
        """Train one head, as :meth:`KerasEngine.train` does (and raising what it raises)."""
        if engine_for(config) == "keras":
            return _keras().train(config, split, on_epoch)
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
        for i, config in enumerate(configs):
            if engine_for(config) == "keras":
                split = make_split(x, y, config.validation_fraction, config.seed, config.standardize)
                outcomes[i] = _guarded(_keras().train, config, split, callbacks[i])
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


def _keras() -> Engine:
    """The Keras reference, for the heads it trains here (:func:`engine_for`): imported then,
    so that a sweep of heads this engine trains imports no TensorFlow."""
    from pipeline.engine_keras import KerasEngine

    return KerasEngine()


def _guarded(train, config, split, callback) -> Outcome:
    try:
        return train(config, split, callback)
    except Exception as exc:
        return exc


# --- one pass --------------------------------------------------------------------------------

def _columns(heads: Sequence[TrialConfig]) -> list[slice]:
    """Each head's kernel columns in a pass: side by side, in order, one per unit."""
    ends = np.cumsum([head.units for head in heads])
    return [slice(int(end) - head.units, int(end)) for head, end in zip(heads, ends, strict=True)]


def train_pass(configs: Sequence[TrialConfig], rows: Rows,
               callbacks: Sequence[EpochCallback | None]) -> list[Outcome]:
    """Train heads that share :func:`pass_key` together on ``rows``; an outcome per config
    (:func:`_blas_threads` BLAS threads).

    After each epoch every head still training gets its metrics and its callback; a head
    whose callback raises stops there (its outcome is the exception) and the pass goes on
    while any head trains.
    """
    with threadpool_limits(_blas_threads(), user_api="blas"):
        return _train_pass(configs, rows, callbacks)


def _blas_threads() -> int:
    """BLAS threads for a pass: one fewer than the cores this process may run on, at least one,
    and never more than BLAS already has (``OPENBLAS_NUM_THREADS`` and the like stand). The
    core left is the sweep's MLflow writer thread's, which opens the batch's runs while it
    trains; BLAS threads that wait between products spin, and would take it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    now = min((lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"), default=cores)
    return max(1, min(cores - 1, now))


def _train_pass(configs: Sequence[TrialConfig], rows: Rows,
                callbacks: Sequence[EpochCallback | None]) -> list[Outcome]:
    first = configs[0]
    columns = _columns(configs)
    state = _start_state(configs, columns, rows.x.shape[1], first.optimizer)
    spec = _Spec.of(configs, columns)
    mask_seed = layer_seeds(first.dropout_seed)[2]
    n_train, y_val = len(rows.train), rows.y[rows.val]
    sizes = np.array([len(b) for b in batch_order(n_train, first.batch_size, first.batch_seed, 0)])
    history = [{name: [] for name in EPOCH_METRICS} for _ in configs]
    step_loss: list[list[float]] = [[] for _ in configs]
    ended: dict[int, Exception] = {}
    p = None  # the last epoch's P(label 1) of every row and head
    try:
        for epoch in range(first.epochs):
            batches = batch_order(n_train, first.batch_size, first.batch_seed, epoch)
            order = rows.train[np.concatenate(batches)]
            losses, correct = _train_epoch(rows.x, rows.y, order, first.batch_size, epoch * len(sizes),
                                           mask_seed, float(first.dropout), state, spec, first.optimizer)
            p, val_loss, val_correct = _evaluate(rows.x, rows.y, rows.val, state, spec)
            losses = losses.astype(np.float64)
            per_head = _epoch_values(rows, sizes, losses, correct, p, val_loss, val_correct)
            for j, values in enumerate(per_head):
                if j in ended:
                    continue
                for name, value in values.items():
                    history[j][name].append(value)
                step_loss[j].extend(losses[:, j].tolist())
                if callbacks[j] is not None:
                    try:
                        callbacks[j](epoch, values)
                    except Exception as exc:
                        ended[j] = exc
            if len(ended) == len(configs):
                break
    except Exception as exc:  # the computation failed: every head still training fails with it
        ended.update({j: exc for j in range(len(configs)) if j not in ended})
    kernel, bias = state["kernel"], state["bias"]
    p_val = p[rows.val] if len(ended) < len(configs) else None
    outcomes: list[Outcome | None] = [None] * len(configs)
    for j in range(len(configs)):
        if j in ended:
            outcomes[j] = ended[j]
            continue
        cols = columns[j]
        outcomes[j] = TrialResult(history=history[j], step_loss=step_loss[j],
                                  positive_fraction=float(np.mean(y_val)),
                                  collapsed=metrics.is_collapsed(p_val[:, j]),
                                  kernel=kernel[:, cols].copy(), bias=bias[0, cols].copy(), engine="fused")
    return outcomes


def _epoch_values(rows: Rows, sizes: np.ndarray, losses: np.ndarray, correct: np.ndarray,
                  p: np.ndarray, val_loss: np.ndarray, val_correct: np.ndarray) -> list[dict[str, float]]:
    """Each head's metrics of an epoch (:data:`EPOCH_METRICS`), as KerasEngine records them:
    Keras's running training loss (each step's ``losses``, weighted by its batch ``sizes``) and
    counts of right predictions, its validation loss, and ours from the probabilities ``p`` of
    every row in inference mode (:func:`_scores`)."""
    epoch_loss = sizes @ losses / len(rows.train)
    scores = _scores(p, rows)
    return [{"loss": float(np.float32(epoch_loss[j])),
             "val_loss": float(val_loss[j]),
             **{name: float(values[j]) for name, values in scores.items()},
             "keras_accuracy": float(np.float32(correct[j] / len(rows.train))),
             "keras_val_accuracy": float(np.float32(val_correct[j] / len(rows.val)))}
            for j in range(len(val_loss))]


def _scores(p: np.ndarray, rows: Rows) -> dict[str, np.ndarray]:
    """Each head's accuracy and probability loss on the training and validation rows, from the
    probabilities ``p`` (rows x heads), each head reduced as it is on its own. Heads go
    :data:`_METRIC_HEADS` at a time: the float64 copies of a block are a few MiB, where all 64
    heads' at once (tens of MiB) take longer than one head at a time."""
    y_train, y_val = rows.y[rows.train], rows.y[rows.val]
    p_train, p_val = p[rows.train], p[rows.val]
    names = ("accuracy", "val_accuracy", "prob_loss", "val_prob_loss")
    scores = {name: np.empty(p.shape[1]) for name in names}
    for start in range(0, p.shape[1], _METRIC_HEADS):
        heads = slice(start, start + _METRIC_HEADS)
        for prefix, probabilities, y in (("", p_train, y_train), ("val_", p_val, y_val)):
            scores[f"{prefix}accuracy"][heads] = metrics.accuracies(probabilities[:, heads].T, y)
            scores[f"{prefix}prob_loss"][heads] = metrics.prob_losses(probabilities[:, heads].T, y)
    return scores


def _start_state(heads: Sequence[TrialConfig], columns: list[slice], n_features: int,
                 optimizer: str) -> dict[str, np.ndarray]:
    """Kernels (D x columns) and biases (1 x columns) side by side, from each head's Keras start
    weights, and the optimizer's slots for both."""
    kernel = np.zeros((n_features, columns[-1].stop), np.float32)
    bias = np.zeros((1, columns[-1].stop), np.float32)
    cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    for head, cols in zip(heads, columns, strict=True):
        # the start weights depend on these fields only (the initializers' seeds come from `seed`)
        key = (head.seed, head.init, head.units, head.activation, head.bias_init, head.transfer_bias)
        if key not in cache:
            cache[key] = initial_weights(head, n_features)
        kernel[:, cols], bias[0, cols] = cache[key]
    state = {"kernel": kernel, "bias": bias}
    for slot in SLOTS[optimizer]:
        for name, value in (("kernel", kernel), ("bias", bias)):
            state[f"{slot}/{name}"] = np.full(value.shape, SLOT_START.get(slot, 0.0), np.float32)
    return state


@dataclass
class _Spec:
    """Per-head and per-column settings of a pass, in layout order, as
    :mod:`pipeline.kernels` reads them.

    Label smoothing is kept as Keras applies it, ``y * keep + add`` with ``keep = 1 - s`` and
    ``add = s / 2`` (binary; categorical: ``s / units``), both rounded to float32 as Keras
    rounds them, so smoothed labels are bit for bit Keras's.
    """

    kind: np.ndarray       # per head: its index in LOSS_KINDS
    first: np.ndarray      # per head: its first column
    keep: np.ndarray       # per head
    add: np.ndarray        # per head
    softmax: np.ndarray    # per head: P(label 1) is a softmax of its logits
    linear: np.ndarray     # per head
    l2: np.ndarray         # per head
    col_head: np.ndarray   # per column: its head
    lr: np.ndarray         # per column
    decay: np.ndarray      # per column

    @classmethod
    def of(cls, heads: Sequence[TrialConfig], columns: list[slice]) -> _Spec:
        kinds = {k: i for i, k in enumerate(LOSS_KINDS)}
        col_head = np.concatenate([[j] * (c.stop - c.start) for j, c in enumerate(columns)])
        return cls(
            kind=np.array([kinds[h.units, h.loss] for h in heads], np.int64),
            first=np.array([c.start for c in columns], np.int64),
            keep=np.array([np.float32(1.0 - h.label_smoothing) for h in heads], np.float32),
            add=np.array([np.float32(0.5 * h.label_smoothing) if h.loss == "binary_crossentropy"
                          else np.float32(h.label_smoothing) / np.float32(h.units) for h in heads],
                         np.float32),
            softmax=np.array([h.activation == "softmax" or (h.activation, h.units) == ("linear", 2)
                              for h in heads]),
            linear=np.array([h.activation == "linear" for h in heads]),
            l2=np.array([h.l2 for h in heads], np.float32), col_head=col_head,
            lr=np.array([heads[j].learning_rate for j in col_head], np.float32),
            decay=np.array([heads[j].decay for j in col_head], np.float32))

    def heads_step(self, z: np.ndarray, y: np.ndarray, kernel: np.ndarray, dz: np.ndarray,
                   correct: np.ndarray) -> np.ndarray:
        """Each head's loss on logits ``z`` (plus its L2 penalty on ``kernel``), its logits'
        gradient into ``dz`` and its right predictions added to ``correct``."""
        loss = np.empty(len(self.kind), np.float32)
        kernels.heads_step(z, y, self.kind, self.first, self.keep, self.add, self.softmax,
                           self.linear, loss, dz, correct)
        if self.l2.any():
            kernels.add_l2_penalty(kernel, self.l2, self.col_head, loss)
        return loss


def _train_epoch(x: np.ndarray, y: np.ndarray, order: np.ndarray, batch_size: int, step0: int,
                 mask_seed: int, rate: float, state: dict[str, np.ndarray], spec: _Spec,
                 optimizer: str) -> tuple[np.ndarray, np.ndarray]:
    """One epoch over the rows ``order`` (x's row indices in batch order) from optimizer step
    ``step0``, updating ``state`` in place (:func:`pipeline.kernels.train_epoch`). Returns
    each step's loss per head (steps x heads) and each head's count of right Keras predictions
    (training mode, before each update)."""
    steps = -(-len(order) // batch_size)
    losses = np.empty((steps, len(spec.kind)), np.float32)
    correct = np.zeros(len(spec.kind), np.int64)
    none = np.empty((0, 0), np.float32)  # in place of the slots an optimizer does not have
    slots = tuple(([state[f"{s}/{name}"] for s in SLOTS[optimizer]] + [none, none])[:2]
                  for name in ("kernel", "bias"))
    kernels.train_epoch(
        x, y, order, batch_size, step0, mask_seed, *stateless_random.dropout_constants(rate),
        state["kernel"], state["bias"],
        (*slots[0], *slots[1]), spec.lr, spec.decay, spec.l2, spec.col_head,
        kernels.OPTIMIZERS.index("adam" if optimizer == "adamw" else optimizer),
        spec.kind, spec.first, spec.keep, spec.add, spec.softmax, spec.linear, losses, correct)
    return losses, correct


def _evaluate(x: np.ndarray, y: np.ndarray, val: np.ndarray, state: dict[str, np.ndarray],
              spec: _Spec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inference on every row of ``x``: P(label 1) per row and head, and on the validation rows
    ``val`` Keras's loss and count of right predictions per head."""
    kernel = state["kernel"]
    z = x @ kernel + state["bias"]
    positive = np.empty((len(z), len(spec.kind)), np.float32)
    kernels.positive_probability(z, spec.kind, spec.first, spec.softmax, positive)
    z_val = np.ascontiguousarray(z[val])
    correct = np.zeros(len(spec.kind), np.int64)
    loss = spec.heads_step(z_val, y[val], kernel, np.empty_like(z_val), correct)
    return positive, loss, correct
