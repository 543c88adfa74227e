"""Trial configs: everything that determines one trial, and the rules its values obey.

A trial of a sweep's ``kind`` is a :class:`TrialConfig` (``heads``, the default: one trial
trains one head) or a :class:`ParityConfig` (``parity``: one trial trains the seed's three
heads and measures their gaps); every field keeps its default, the seed notebook's setting,
unless a sweep file (:mod:`pipeline.sweep_file`) or the command line sets it. Values are
validated before any run is created; a problem raises :class:`UserError` with one line naming
the field and what is allowed.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import UserError

Activation = Literal["sigmoid", "softmax", "linear"]
HiddenActivation = Literal["relu", "tanh", "sigmoid", "linear"]
Loss = Literal["binary_crossentropy", "categorical_crossentropy", "sparse_categorical_crossentropy"]
Labels = Literal["expected", "column", "onehot"]
Init = Literal["glorot_uniform", "glorot_centered", "zeros", "he_normal", "transfer"]
BiasInit = Literal["zeros", "random_normal"]
Optimizer = Literal["sgd", "momentum", "nesterov", "adam", "rmsprop", "adagrad", "adadelta", "adamw"]
OPTIMIZERS = get_args(Optimizer)  # in the order tables list them
HEAD_METRICS = ("val_prob_loss", "val_loss", "val_accuracy", "prob_loss", "loss", "accuracy")
PARITY_METRICS = ("max_gap_softmax_transfer", "max_val_gap_softmax_transfer", "max_gap_transfer_random",
                  "max_val_gap_transfer_random", "max_step_gap_softmax_transfer", "beta_distance",
                  "bias_distance", "max_prob_gap")  # what pipeline.parity.ParityResult.summary gives
DEFAULT_WEIGHT_DECAY = {"adamw": 0.004}  # Keras's own weight_decay when a config leaves it None


def not_a_boolean(hint: str):
    """A pydantic "before" validator that refuses a boolean where ``hint`` (e.g. "a number") is
    wanted: YAML's ``true`` would otherwise pass as 1."""
    def check(value):
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is a boolean; give {hint}")
        return value
    return check


def _none_from_text(value):
    # MLflow hands an unset optional back as the string "None".
    return None if value in ("None", "") else value


def _finite(value):
    # Every number of a config is finite: a sweep file and the command line share this rule.
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value!r}: must be finite")
    return value


def _finite_sigmoid_settings(config):
    # The sigmoids of a parity experiment train with products of two settings (their learning
    # rate is ratio x learning_rate): each product is finite as well.
    decay = config.weight_decay if config.weight_decay is not None else 0.0
    for names, a, b in (("ratio x learning_rate", config.ratio, config.learning_rate),
                        ("l2 x sigmoid_l2_scale", config.l2, config.sigmoid_l2_scale),
                        ("weight_decay x sigmoid_decay_scale", decay, config.sigmoid_decay_scale)):
        if not math.isfinite(a * b):
            raise ValueError(f"{names}: {a!r} x {b!r} is not finite (the sigmoids train with it)")
    return config


class TrainingSettings(BaseModel):
    """The settings every trial config has: how its heads train, and on which split.

    ``hidden_units`` > 0 puts a hidden layer (``hidden_units`` units, ``hidden_activation``)
    between the dropout and the output layer: the head's *body*, which every head of one seed
    starts from the same weights (0: no hidden layer, the output layer reads the features).
    The fields after ``standardize`` are the settings that can break the sigmoid/softmax
    parity (see docs/parity.md): decoupled weight decay, an L2 kernel penalty on the output
    layer, label smoothing, a non-zero initial bias, and a transfer that leaves the bias out. A config
    model also declares its trial kind's facts: ``KIND`` (the sweep file's ``kind``), the
    metrics a trial reports (``METRICS``: what a study may optimise) and the default one.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    KIND: ClassVar[str]
    METRICS: ClassVar[tuple[str, ...]]
    DEFAULT_METRIC: ClassVar[str]
    PRUNABLE: ClassVar[bool]  # whether a trial trains one head epoch by epoch, so can be pruned

    optimizer: Optimizer = Field("sgd", description="the optimizer")
    learning_rate: float = Field(1e-3, gt=0, description="the learning rate")
    epochs: int = Field(5, ge=1, description="training epochs")
    batch_size: int = Field(128, ge=1, le=2**31 - 1, description="examples per batch")
    dropout: float = Field(0.5, ge=0, lt=1, description="dropout rate on the features")
    seed: int = Field(0, ge=0, description="seeds the split, the batch order, the initial "
                                           "weights and the dropout masks")
    validation_fraction: float = Field(0.2, gt=0, lt=1, description="the stratified validation split")
    hidden_units: int = Field(0, ge=0, le=16_384, description="units of a hidden layer before the "
                                                              "output layer; 0: none")
    hidden_activation: HiddenActivation = Field("relu", description="the hidden layer's activation")
    standardize: bool = Field(False, description="standardize the features (the training "
                                                 "split's statistics)")
    weight_decay: float | None = Field(None, ge=0, description="decoupled weight decay (none: the "
                                       "optimizer's own: " + ", ".join(
                                           f"{k} {v}" for k, v in DEFAULT_WEIGHT_DECAY.items()) + ", else 0)")
    l2: float = Field(0.0, ge=0, description="L2 penalty on the output layer's kernel")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the loss")
    bias_init: BiasInit = Field("zeros", description="the output layer's initial bias")
    transfer_bias: bool = Field(True, description="a transferred sigmoid starts at b = b1 - b0 "
                                                  "(false: at 0)")

    _numbers = field_validator("learning_rate", "seed", "dropout", "epochs", "batch_size",
                               "validation_fraction", "hidden_units", "weight_decay", "l2",
                               "label_smoothing", mode="before")(not_a_boolean("a number"))
    _optional = field_validator("weight_decay", mode="before")(_none_from_text)
    _finite_numbers = field_validator("*")(_finite)

    @property
    def decay(self) -> float:
        """The decoupled weight decay the optimizer applies: ``weight_decay``, or Keras's default
        for the optimizer when it is None (0.004 for AdamW, 0 for the others)."""
        if self.weight_decay is not None:
            return self.weight_decay
        return DEFAULT_WEIGHT_DECAY.get(self.optimizer, 0.0)

    def params(self) -> dict[str, Any]:
        """The config as MLflow/Optuna params, in field order."""
        return self.model_dump()


class TrialConfig(TrainingSettings):
    """Everything that determines one trained head; two equal configs give equal numbers.

    Defaults are the seed notebook's: SGD, dropout 0.5, 5 epochs, batch 128, 20% validation.
    Beyond the shared settings, dropout masks or batch order may be drawn from another seed
    than the head's (``mask_seed``, ``order_seed``), which breaks the parity too, and a head
    with a hidden layer may train it at its own rate, ``body_learning_rate`` (None: at
    ``learning_rate``, which the output layer trains at; a head without a hidden layer has
    no body, and the setting does not apply).

    The head is what people write: ``activation`` ``linear`` outputs the logits themselves,
    ``from_logits`` is the Keras loss's flag, and ``labels`` is what ``y`` the loss is given:
    ``expected`` the encoding the loss needs (:func:`pipeline.labels.encode_labels`),
    ``column`` a 0/1 column (N x 1) and ``onehot`` an N x 2 one-hot, whatever the loss
    (the usual mistakes; ``column`` on a 1-unit binary or categorical head, like ``onehot``
    on a 2-unit one, is the expected encoding under another name).
    """

    KIND: ClassVar[str] = "heads"
    METRICS: ClassVar[tuple[str, ...]] = HEAD_METRICS
    DEFAULT_METRIC: ClassVar[str] = "val_prob_loss"
    PRUNABLE: ClassVar[bool] = True

    activation: Activation = "sigmoid"
    units: Literal[1, 2] = 1
    loss: Loss = "binary_crossentropy"
    init: Init = "glorot_uniform"
    mask_seed: int | None = Field(None, ge=0)
    order_seed: int | None = Field(None, ge=0)
    body_learning_rate: float | None = Field(None, gt=0)
    from_logits: bool = False
    labels: Labels = "expected"

    _head_numbers = field_validator("units", "mask_seed", "order_seed", "body_learning_rate",
                                    mode="before")(not_a_boolean("a number"))
    _head_optional = field_validator("mask_seed", "order_seed", "body_learning_rate",
                                     mode="before")(_none_from_text)

    @field_validator("units", mode="before")
    @classmethod
    def _units_from_text(cls, value):
        # MLflow hands params back as strings; "2" must read as the unit count 2.
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value

    @model_validator(mode="after")
    def _smoothing_needs_dense_labels(self):
        if self.label_smoothing and self.loss == "sparse_categorical_crossentropy":
            raise ValueError("label_smoothing: sparse_categorical_crossentropy has no label smoothing")
        return self

    @property
    def body_rate(self) -> float | None:
        """The learning rate of the hidden layer: ``body_learning_rate``, else ``learning_rate``;
        None for a head without one."""
        if not self.hidden_units:
            return None
        return self.learning_rate if self.body_learning_rate is None else self.body_learning_rate

    @property
    def two_rates(self) -> bool:
        """Whether the head's body trains with an optimizer of its own (``body_learning_rate``
        given, on a head with a hidden layer)."""
        return bool(self.hidden_units) and self.body_learning_rate is not None

    @property
    def dropout_seed(self) -> int:
        """The seed of the dropout masks: ``mask_seed``, else the head's ``seed``."""
        return self.seed if self.mask_seed is None else self.mask_seed

    @property
    def batch_seed(self) -> int:
        """The seed of the batch order: ``order_seed``, else the head's ``seed``."""
        return self.seed if self.order_seed is None else self.order_seed


TRIAL_FIELDS = tuple(TrialConfig.model_fields)


class ParityConfig(TrainingSettings):
    """One parity experiment: the seed's three heads, trained on one batch order.

    The 2-unit softmax (categorical cross-entropy) trains at ``learning_rate``; the 1-unit
    sigmoid started from its initial weights (beta = w1 - w0, b = b1 - b0) and a 1-unit
    sigmoid with glorot init train at ``ratio`` x ``learning_rate``. With a hidden layer
    (``hidden_units`` > 0) all three start from the same body weights, and ``ratio_scope``
    says which layers of the sigmoids train at the ratio: ``output`` (the output layer, the
    body at ``learning_rate``) or ``all``; without one the output layer is the whole head and
    both scopes are the same experiment. The remaining fields are
    the settings that can break the parity and their corrections: ``sigmoid_decay_scale`` and
    ``sigmoid_l2_scale`` scale the sigmoid's weight decay and L2 penalty against the
    softmax's; ``share_masks``/``share_batch_order`` off give the sigmoids their own dropout
    masks / batch order; ``transfer_bias`` off starts the sigmoid's bias at 0; ``center_softmax``
    starts the softmax at w0 = -w1 (``init: glorot_centered``, same beta = w1 - w0).
    """

    KIND: ClassVar[str] = "parity"
    METRICS: ClassVar[tuple[str, ...]] = PARITY_METRICS
    DEFAULT_METRIC: ClassVar[str] = "max_gap_softmax_transfer"
    PRUNABLE: ClassVar[bool] = False

    learning_rate: float = Field(1e-2, gt=0, description="the softmax's learning rate; the "
                                                         "sigmoids train at ratio x it")
    ratio: float = Field(2.0, gt=0, description="sigmoid learning rate / softmax learning rate")
    ratio_scope: Literal["output", "all"] = Field("output", description="the sigmoids' layers "
                                                  "that train at ratio x learning_rate (output: "
                                                  "the body trains at learning_rate)")
    sigmoid_decay_scale: float = Field(1.0, ge=0, description="the sigmoids' weight decay / "
                                                              "the softmax's")
    sigmoid_l2_scale: float = Field(1.0, ge=0, description="the sigmoids' L2 penalty / the softmax's")
    share_masks: bool = Field(True, description="the sigmoids use the softmax's dropout masks")
    share_batch_order: bool = Field(True, description="the sigmoids see the softmax's batch order")
    center_softmax: bool = Field(False, description="start the softmax at w0 = -w1 (the same "
                                                    "beta = w1 - w0)")

    _parity_numbers = field_validator("ratio", "sigmoid_decay_scale", "sigmoid_l2_scale",
                                      mode="before")(not_a_boolean("a number"))
    _sigmoid_settings = model_validator(mode="after")(_finite_sigmoid_settings)

    def heads(self) -> dict[str, TrialConfig]:
        """The :class:`TrialConfig` of each role: ``softmax``, ``sigmoid_transfer``, ``sigmoid_random``."""
        common = {"optimizer": self.optimizer, "epochs": self.epochs, "batch_size": self.batch_size,
                  "dropout": self.dropout, "seed": self.seed, "standardize": self.standardize,
                  "validation_fraction": self.validation_fraction, "bias_init": self.bias_init,
                  "label_smoothing": self.label_smoothing, "hidden_units": self.hidden_units,
                  "hidden_activation": self.hidden_activation}
        other = self.seed + 1  # a seed the softmax does not use, for unshared masks or order
        sigmoid = {**common, "activation": "sigmoid", "units": 1, "loss": "binary_crossentropy",
                   "learning_rate": self.ratio * self.learning_rate, "l2": self.l2 * self.sigmoid_l2_scale,
                   "weight_decay": self._sigmoid_decay(),
                   "mask_seed": None if self.share_masks else other,
                   "order_seed": None if self.share_batch_order else other,
                   "body_learning_rate": (self.learning_rate if self.hidden_units
                                          and self.ratio_scope == "output" else None)}
        return {
            "softmax": TrialConfig(**common, activation="softmax", units=2,
                                   loss="categorical_crossentropy", learning_rate=self.learning_rate,
                                   init="glorot_centered" if self.center_softmax else "glorot_uniform",
                                   l2=self.l2, weight_decay=self.weight_decay),
            "sigmoid_transfer": TrialConfig(**sigmoid, init="transfer", transfer_bias=self.transfer_bias),
            "sigmoid_random": TrialConfig(**sigmoid, init="glorot_uniform"),
        }

    def _sigmoid_decay(self) -> float | None:
        if self.sigmoid_decay_scale == 1.0:
            return self.weight_decay
        return self.decay * self.sigmoid_decay_scale


CONFIG_MODELS: dict[str, type[TrainingSettings]] = {m.KIND: m for m in (TrialConfig, ParityConfig)}




def parse_config(model: type[BaseModel], values: dict[str, Any], source: str) -> BaseModel:
    """``model`` built from ``values`` (strings allowed), or :class:`UserError` naming the field."""
    for name in values:
        if name not in model.model_fields:
            raise UserError(f"{source}: {name}: unknown setting (allowed: {', '.join(model.model_fields)})")
    try:
        return model(**values)
    except ValidationError as exc:
        name = str(exc.errors()[0]["loc"][0]) if exc.errors()[0]["loc"] else None
        raise UserError(f"{source}: {name}: {describe_error(exc, model, name)}" if name
                        else f"{source}: {describe_error(exc, model)}") from None


def describe_error(exc: Exception, model: type[BaseModel] = TrialConfig, name: str | None = None) -> str:
    """One line from a pydantic error: where, and what is allowed."""
    if not isinstance(exc, ValidationError):
        return str(exc).splitlines()[0]
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if p != name)
    msg = err["msg"].removeprefix("Value error, ")
    annotation = model.model_fields[name].annotation if name else None
    choices = get_args(annotation) if annotation is not None else ()
    if choices and all(isinstance(c, (str, int)) for c in choices):
        msg = f"{err['input']!r} is not allowed (allowed: {', '.join(map(str, choices))})"
    elif err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "string_too_long":  # the text itself could fill a screen
        msg = f"{len(err['input']):,} characters, more than {err['ctx']['max_length']:,}"
    elif "greater_than" in err["type"] or "less_than" in err["type"]:
        given = err["input"] if isinstance(err["input"], str) else repr(err["input"])  # a flag's text
        msg = f"{given}: {msg[0].lower()}{msg[1:]}"
    return f"{loc}: {msg}" if loc else msg
