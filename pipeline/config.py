"""Sweep files and trial configs: the one place that owns the search space.

A sweep file (YAML, one per study in ``sweeps/``) names the study and its MLflow experiment,
the sampler, the replicate seeds, the settings held ``fixed`` and the ``space`` searched.
Both ``fixed`` and ``space`` speak of the fields of the sweep's ``kind``: :class:`TrialConfig`
(``heads``, the default: one trial trains one head) or :class:`ParityConfig` (``parity``: one
trial trains the seed's three heads and measures their gaps); a field is either fixed or
searched, never both, and every field not mentioned keeps its default (the seed
notebook's settings). ``space`` is one mapping of axes, or for ``sampler: grid`` a list of
mappings whose grids are joined (as scikit-learn's ``ParameterGrid`` takes a list), so a study
can hold exactly the heads it compares instead of a cross product of mostly invalid ones.

Everything is validated before any run is created; a problem raises :class:`UserError` with
one line naming the key and what is allowed.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import yaml
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
Sampler = Literal["grid", "tpe", "random"]
Engine = Literal["fused", "keras"]
Kind = Literal["heads", "parity"]
Report = Literal["summary", "collapse", "parity", "breakers", "parity_deep", "atlas"]
HEAD_METRICS = ("val_prob_loss", "val_loss", "val_accuracy", "prob_loss", "loss", "accuracy")
PARITY_METRICS = ("max_gap_softmax_transfer", "max_val_gap_softmax_transfer", "max_gap_transfer_random",
                  "max_val_gap_transfer_random", "max_step_gap_softmax_transfer", "beta_distance",
                  "bias_distance", "max_prob_gap")  # what pipeline.parity.ParityResult.summary gives
ObjectiveMetric = Literal[HEAD_METRICS + PARITY_METRICS]
DEFAULT_WEIGHT_DECAY = {"adamw": 0.004}  # Keras's own weight_decay when a config leaves it None
HeadMetric = Literal[HEAD_METRICS]
MAXIMIZED = ("val_accuracy", "accuracy")  # every other metric is a loss or a gap


def _not_a_boolean(value):
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is a boolean; give a number")
    return value


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
    batch_size: int = Field(128, ge=1, description="examples per batch")
    dropout: float = Field(0.5, ge=0, lt=1, description="dropout rate on the features")
    seed: int = Field(0, ge=0, description="seeds the split, the batch order, the initial "
                                           "weights and the dropout masks")
    validation_fraction: float = Field(0.2, gt=0, lt=1, description="the stratified validation split")
    hidden_units: int = Field(0, ge=0, description="units of a hidden layer before the output "
                                                   "layer; 0: none")
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
                               "label_smoothing", mode="before")(_not_a_boolean)
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
                                    mode="before")(_not_a_boolean)
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
                                      mode="before")(_not_a_boolean)
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




class FloatRange(BaseModel):
    """A continuous axis for ``tpe``/``random``: ``{low: 1e-4, high: 1e-1}``, log scale by default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    low: float
    high: float
    log: bool = True


class Objective(BaseModel):
    """The value Optuna optimises: a logged metric at the last epoch, and its direction.

    The metric defaults to ``val_prob_loss`` for heads and ``max_gap_softmax_transfer`` for
    parity experiments.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: ObjectiveMetric | None = None
    direction: Literal["minimize", "maximize"] = "minimize"


class Pruner(BaseModel):
    """Optuna's median pruner on a per-epoch metric, or none: ``pruner: {type: median}``.

    After each epoch a trial reports ``metric``; once ``n_startup_trials`` trials have
    completed, a trial past ``n_warmup_steps`` epochs whose value is worse than the median of
    the completed trials' at the same epoch stops there (PRUNED in Optuna; its MLflow run
    FINISHED with the tag ``pruned``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["none", "median"] = "none"
    metric: HeadMetric = "val_loss"
    n_startup_trials: int = Field(5, ge=0)
    n_warmup_steps: int = Field(0, ge=0)


Axis = tuple[Any, ...] | FloatRange


class SweepSpec(BaseModel):
    """A validated sweep file. Build it with :func:`load_sweep`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    experiment: str = Field(min_length=1)
    description: str = ""
    kind: Kind = "heads"
    report: Report = "summary"
    sampler: Sampler = "grid"
    sampler_seed: int = 0
    n_trials: int | None = Field(None, ge=1)
    seeds: tuple[int, ...] = Field((0,), min_length=1)
    engine: Engine = "fused"
    objective: Objective = Objective()
    pruner: Pruner = Pruner()
    fixed: dict[str, Any] = Field(default_factory=dict)
    space: tuple[dict[str, Axis], ...] = Field(min_length=1)

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds_not_booleans(cls, seeds):
        if isinstance(seeds, list) and any(isinstance(s, bool) for s in seeds):
            raise ValueError("seeds must be integers, not booleans")
        return seeds

    @field_validator("pruner", mode="before")
    @classmethod
    def _pruner_by_name(cls, pruner):
        return {"type": pruner} if isinstance(pruner, str) else pruner

    @model_validator(mode="after")
    def _pruner_agrees_with_objective(self):
        if self.pruner.type != "none":
            if not self.config_model.PRUNABLE:
                raise ValueError(f"pruner: only a heads sweep can be pruned (its trials train one head "
                                 f"epoch by epoch); this one is kind {self.kind}")
            maximized = self.pruner.metric in MAXIMIZED
            if maximized != (self.objective.direction == "maximize"):
                raise ValueError(f"pruner.metric: {self.pruner.metric} is "
                                 f"{'maximized' if maximized else 'minimized'} but the objective is to "
                                 f"{self.objective.direction}; prune on a metric that goes the same way")
        return self

    @field_validator("seeds")
    @classmethod
    def _seeds_unique(cls, seeds):
        if len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError("seeds must be distinct non-negative integers")
        return seeds

    def axes(self) -> dict[str, Axis]:
        """Every searched field with all its values (joined over sub-spaces), plus ``seed``.

        These are the Optuna distributions; they are the same for every trial of the study.
        """
        axes: dict[str, Axis] = {}
        for sub in self.space:
            for name, axis in sub.items():
                if isinstance(axis, FloatRange):
                    axes[name] = axis
                else:
                    axes[name] = tuple(dict.fromkeys((*axes.get(name, ()), *axis)))
        for name in axes:  # a sub-grid that leaves an axis out runs it at its fixed value
            if not isinstance(axes[name], FloatRange) and any(name not in s for s in self.space):
                axes[name] = tuple(dict.fromkeys((*axes[name], self.base()[name])))
        axes["seed"] = self.seeds
        return axes

    def values(self, name: str) -> tuple[Any, ...]:
        """Every value the study's trials give setting ``name``: its axis, or its one base value."""
        axis = self.axes().get(name)
        if axis is None:
            return (self.base()[name],)
        return (axis.low, axis.high) if isinstance(axis, FloatRange) else axis

    @property
    def objective_metric(self) -> str:
        """The metric Optuna optimises (the kind's default unless the file names one)."""
        return self.objective.metric or self.config_model.DEFAULT_METRIC

    @property
    def config_model(self) -> type[TrainingSettings]:
        """The config model of the sweep's kind: :class:`TrialConfig` or :class:`ParityConfig`."""
        return CONFIG_MODELS[self.kind]

    def base(self) -> dict[str, Any]:
        """The values of every trial field before the space applies: defaults, then ``fixed``."""
        return {**self.config_model().params(), **self.fixed}

    def grid(self) -> list[dict[str, Any]]:
        """Every grid point as the params Optuna fixes: sub-grids joined in order, then the whole
        of it once per seed.

        Seeds vary slowest, so the queue holds every config at the first seed before any at the
        second: a budget (``n_trials``) cut covers the whole space, and a claimed batch holds
        whole seeds, which a fused pass trains together (its heads share a seed's split and
        batch order; seeds varying fastest would split a batch into passes of batch / seeds
        heads, and the per-trial cost would grow with the number of seeds).
        """
        points: list[dict[str, Any]] = []
        names = [n for n in self.axes() if n != "seed"]
        base = self.base()
        for sub in self.space:
            keys = list(sub)
            points.extend({n: base[n] for n in names} | dict(zip(keys, values, strict=True))
                          for values in itertools.product(*(sub[k] for k in keys)))
        unique = list({freeze_params(p): p for p in points}.values())
        return [point | {"seed": seed} for seed in self.seeds for point in unique]

    def budget(self) -> int:
        """How many trials the study runs: the grid's size, capped by ``n_trials`` if given."""
        if self.sampler == "grid":
            size = len(self.grid())
            return min(size, self.n_trials) if self.n_trials else size
        return int(self.n_trials)

    def trial_config(self, params: dict[str, Any]) -> TrialConfig | ParityConfig:
        """The config (:class:`TrialConfig`, or :class:`ParityConfig` for ``kind: parity``) of a
        trial whose searched params are ``params``."""
        return self.config_model(**(self.base() | params))


class DuplicateKeyError(yaml.YAMLError):
    """A mapping of a YAML document gives ``key`` twice: on ``first_line`` and on ``line``."""

    def __init__(self, key: Any, first_line: int, line: int):
        super().__init__(f"line {line}: key {key!r} given twice (first on line {first_line})")
        self.key, self.first_line, self.line = key, first_line, line


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that gives a key twice at any depth.

    The safe loader alone keeps the last value of a repeated key, so one of two settings would
    be lost without a word. Keys merged in by ``<<`` may be overridden, as YAML intends.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in first_lines:
                        raise DuplicateKeyError(key, first_lines[key], line)
                    first_lines[key] = line
                except TypeError:  # an unhashable key: the safe loader's own error names it
                    continue
        return super().construct_mapping(node, deep)


PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the checkout: MLproject, sweeps/


def sweep_path(path: str | os.PathLike) -> Path:
    """The file a sweep path names: as given or, when a relative path is missing from the
    working directory, the project's own (``sweeps/default.yaml`` of the checkout that holds
    MLproject), so that the default and the findings' sweeps work from any folder."""
    given = Path(path)
    bundled = PROJECT_ROOT / given
    if given.is_file() or given.is_absolute() or not (PROJECT_ROOT / "MLproject").is_file():
        return given
    return bundled if bundled.is_file() else given


def load_sweep(path: str | os.PathLike, n_trials: int | None = None) -> SweepSpec:
    """Read and validate a sweep file (:func:`sweep_path`); ``n_trials`` overrides the file's
    value.

    Raises :class:`UserError` with one line naming the key and what is allowed.
    """
    path = sweep_path(path)
    if not path.is_file():
        raise UserError(f"sweep file not found: {path}")
    try:
        raw = yaml.load(path.read_text(), Loader=UniqueKeyLoader)
    except DuplicateKeyError as exc:
        raise UserError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if n_trials is not None:
        raw = {**(raw or {}), "n_trials": n_trials}
    return parse_sweep(raw, source=str(path))


def parse_sweep(raw: Any, source: str = "sweep") -> SweepSpec:
    """Validate a sweep given as a mapping (the parsed YAML). See :func:`load_sweep`."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a sweep file must be a mapping of keys, got {type(raw).__name__}")
    _check_keys(source, "", raw, SweepSpec.model_fields)
    raw = dict(raw)
    kind = raw.get("kind", "heads")
    if kind not in CONFIG_MODELS:
        raise UserError(f"{source}: kind: {kind!r} is not allowed (allowed: {', '.join(CONFIG_MODELS)})")
    model = CONFIG_MODELS[kind]
    raw["fixed"] = _check_fixed(source, model, raw.get("fixed") or {})
    raw["space"] = _check_space(source, model, raw.get("space"), raw.get("sampler", "grid"), raw["fixed"])
    try:
        spec = SweepSpec(**raw)
    except ValidationError as exc:
        raise UserError(f"{source}: {_describe(exc)}") from None
    allowed = spec.config_model.METRICS
    if spec.objective.metric and spec.objective.metric not in allowed:
        raise UserError(f"{source}: objective.metric: {spec.objective.metric!r} is not a metric of "
                        f"kind {spec.kind} (allowed: {', '.join(allowed)})")
    if spec.sampler != "grid" and spec.n_trials is None:
        raise UserError(f"{source}: n_trials: required for sampler '{spec.sampler}'")
    if spec.sampler == "grid":
        for point in spec.grid():
            try:
                spec.trial_config(point)
            except ValidationError as exc:
                raise UserError(f"{source}: space: the point {_short(point)} is not a valid "
                                f"{spec.kind} config: {_describe(exc)}") from None
    return spec


def parse_config(model: type[BaseModel], values: dict[str, Any], source: str) -> BaseModel:
    """``model`` built from ``values`` (strings allowed), or :class:`UserError` naming the field."""
    for name in values:
        if name not in model.model_fields:
            raise UserError(f"{source}: {name}: unknown setting (allowed: {', '.join(model.model_fields)})")
    try:
        return model(**values)
    except ValidationError as exc:
        name = str(exc.errors()[0]["loc"][0]) if exc.errors()[0]["loc"] else None
        raise UserError(f"{source}: {name}: {_describe(exc, model, name)}" if name
                        else f"{source}: {_describe(exc, model)}") from None


def _short(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items() if k != "seed")


def _check_fixed(source: str, model: type[BaseModel], fixed: Any) -> dict[str, Any]:
    if not isinstance(fixed, dict):
        raise UserError(f"{source}: fixed: must be a mapping of trial settings")
    _check_keys(source, "fixed.", fixed, _searchable(model))
    return {name: _check_value(source, model, f"fixed.{name}", name, v) for name, v in fixed.items()}


def _searchable(model: type[BaseModel]) -> tuple[str, ...]:
    return tuple(f for f in model.model_fields if f != "seed")


def _check_space(source: str, model: type[BaseModel], space: Any, sampler: str,
                 fixed: dict) -> tuple[dict, ...]:
    if space is None:
        raise UserError(f"{source}: space: required (a mapping of axes such as activation: "
                        f"[sigmoid, softmax])")
    subs = space if isinstance(space, list) else [space]
    if not subs:
        raise UserError(f"{source}: space: empty")
    if len(subs) > 1 and sampler != "grid":
        raise UserError(f"{source}: space: a list of sub-spaces needs sampler: grid")
    checked = []
    for i, sub in enumerate(subs):
        where = f"space[{i}]." if isinstance(space, list) else "space."
        if not isinstance(sub, dict) or not sub:
            raise UserError(f"{source}: {where.rstrip('.')}: must be a non-empty mapping of axes")
        _check_keys(source, where, sub, _searchable(model))
        for name in sub:
            if name in fixed:
                raise UserError(f"{source}: {where}{name}: also in fixed; a setting is fixed or "
                                f"searched, not both")
        checked.append({n: _check_axis(source, model, where + n, n, a, sampler) for n, a in sub.items()})
    return tuple(checked)


def _check_axis(source: str, model: type[BaseModel], where: str, name: str, axis: Any,
                sampler: str) -> Axis:
    if isinstance(axis, dict):
        if name not in ("learning_rate", "dropout"):
            raise UserError(f"{source}: {where}: a range is allowed only for learning_rate and "
                            f"dropout; give a list of values")
        if sampler == "grid":
            raise UserError(f"{source}: {where}: sampler grid needs a list of values, not a range")
        try:
            rng = FloatRange(**axis)
        except (ValidationError, TypeError) as exc:
            raise UserError(f"{source}: {where}: {_describe(exc)}") from None
        for bound in (rng.low, rng.high):
            _check_value(source, model, where, name, bound)
        if not rng.low < rng.high:
            raise UserError(f"{source}: {where}: low must be below high")
        if rng.log and rng.low <= 0:
            raise UserError(f"{source}: {where}: a log range needs low > 0")
        return rng
    if not isinstance(axis, list):
        axis = [axis]
    if not axis:
        raise UserError(f"{source}: {where}: empty list; give at least one value")
    return tuple(_check_value(source, model, f"{where}[{i}]", name, v) for i, v in enumerate(axis))


def _check_value(source: str, model: type[BaseModel], where: str, name: str, value: Any) -> Any:
    try:
        checked = getattr(model(**{name: value}), name)
    except ValidationError as exc:
        raise UserError(f"{source}: {where}: {_describe(exc, model, name)}") from None
    if isinstance(checked, float) and not math.isfinite(checked):
        raise UserError(f"{source}: {where}: must be finite")
    return checked


def _check_keys(source: str, where: str, raw: dict, allowed) -> None:
    for key in raw:
        if key not in allowed:
            raise UserError(f"{source}: {where}{key}: unknown key (allowed: {', '.join(allowed)})")


def _describe(exc: Exception, model: type[BaseModel] = TrialConfig, name: str | None = None) -> str:
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
    elif "greater_than" in err["type"] or "less_than" in err["type"]:
        msg = f"{err['input']!r}: {msg[0].lower()}{msg[1:]}"
    return f"{loc}: {msg}" if loc else msg


def freeze_params(params: dict[str, Any]) -> tuple:
    """A hashable form of a params mapping, for telling grid points apart."""
    return tuple(sorted((k, repr(v)) for k, v in params.items()))
