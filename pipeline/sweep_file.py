"""Sweep files: the one place that owns the search space.

A sweep file (YAML, one per study in ``sweeps/``) names the study and its MLflow experiment,
the sampler, the replicate seeds, the settings held ``fixed`` and the ``space`` searched.
Both ``fixed`` and ``space`` speak of the fields of the sweep's ``kind``'s config
(:mod:`pipeline.config`); a field is either fixed or searched, never both, and every field
not mentioned keeps its default (the seed notebook's settings). ``space`` is one mapping of
axes, or for ``sampler: grid`` a list of mappings whose grids are joined (as scikit-learn's
``ParameterGrid`` takes a list), so a study can hold exactly the heads it compares instead of
a cross product of mostly invalid ones.

Everything is validated before any run is created; a problem raises :class:`UserError` with
one line naming the key and what is allowed.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline import paths
from pipeline.config import (
    CONFIG_MODELS,
    HEAD_METRICS,
    PARITY_METRICS,
    ParityConfig,
    TrainingSettings,
    TrialConfig,
    describe_error,
    not_a_boolean,
)
from pipeline.errors import UserError

Sampler = Literal["grid", "tpe", "random"]
Engine = Literal["fused", "keras"]
Kind = Literal["heads", "parity"]
Report = Literal["summary", "collapse", "parity", "breakers", "parity_deep", "atlas"]
ObjectiveMetric = Literal[HEAD_METRICS + PARITY_METRICS]
HeadMetric = Literal[HEAD_METRICS]
MAXIMIZED = ("val_accuracy", "accuracy")  # every other metric is a loss or a gap
MAX_TRIALS = 100_000  # trials a study queues: a grid's points (seeds included), or n_trials
MAX_EXPERIMENT_NAME = 500  # MLflow's limits (mlflow.utils.validation), checked before any write
MAX_DESCRIPTION = 20_000  # the description is the experiment's note, an experiment tag


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

    After each epoch a trial reports ``metric`` (by default the objective's:
    :attr:`SweepSpec.pruner_metric`); once ``n_startup_trials`` trials have
    completed, a trial past ``n_warmup_steps`` epochs whose best value so far is worse than the
    median of the trials completed before it at the same epoch is pruned at that epoch
    (PRUNED in Optuna; its MLflow run FINISHED with the tag ``pruned``), whichever engine
    trains it (:class:`pipeline.trial.Reporter`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["none", "median"] = "none"
    metric: HeadMetric | None = None
    n_startup_trials: int = Field(5, ge=0)
    n_warmup_steps: int = Field(0, ge=0)


Axis = tuple[Any, ...] | FloatRange


class SweepSpec(BaseModel):
    """A validated sweep file. Build it with :func:`load_sweep`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    experiment: str = Field(min_length=1, max_length=MAX_EXPERIMENT_NAME)
    description: str = Field("", max_length=MAX_DESCRIPTION)
    kind: Kind = "heads"
    report: Report = "summary"
    sampler: Sampler = "grid"
    sampler_seed: int = Field(0, ge=0, le=2**32 - 1)  # numpy's seed range, which samplers use
    n_trials: int | None = Field(None, ge=1, le=MAX_TRIALS)
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

    _not_booleans = field_validator("sampler_seed", "n_trials", mode="before")(not_a_boolean("an integer"))

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
            maximized = self.pruner_metric in MAXIMIZED
            if maximized != (self.objective.direction == "maximize"):
                raise ValueError(f"pruner.metric: {self.pruner_metric} is "
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
    def pruner_metric(self) -> str | None:
        """The per-epoch metric the pruner judges: ``pruner.metric``, else the objective's (so
        that a head is pruned on what the study optimises); None without a pruner."""
        if self.pruner.type == "none":
            return None
        return self.pruner.metric or self.objective_metric

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
    if n_trials is not None and (isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1):
        raise UserError(f"n_trials {n_trials!r}: must be an integer >= 1")
    path = paths.existing_file(sweep_path(path), "sweep file")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except DuplicateKeyError as exc:
        raise UserError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({os.strerror(exc.errno) if exc.errno else exc})") from None
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
    fixed = raw.get("fixed")
    raw["fixed"] = _check_fixed(source, model, {} if fixed is None else fixed)  # `fixed:` alone: none
    raw["space"] = _check_space(source, model, raw.get("space"), raw.get("sampler", "grid"), raw["fixed"])
    try:
        spec = SweepSpec(**raw)
    except ValidationError as exc:
        raise UserError(f"{source}: {describe_error(exc)}") from None
    allowed = spec.config_model.METRICS
    if spec.objective.metric and spec.objective.metric not in allowed:
        raise UserError(f"{source}: objective.metric: {spec.objective.metric!r} is not a metric of "
                        f"kind {spec.kind} (allowed: {', '.join(allowed)})")
    if spec.sampler != "grid" and spec.n_trials is None:
        raise UserError(f"{source}: n_trials: required for sampler '{spec.sampler}'")
    if spec.sampler == "grid":
        size = len(spec.seeds) * sum(math.prod(len(axis) for axis in sub.values()) for sub in spec.space)
        if size > MAX_TRIALS:
            raise UserError(f"{source}: space: the grid holds {size:,} points with its seeds, more than "
                            f"{MAX_TRIALS:,}; search a space this large with sampler tpe or random and "
                            f"n_trials")
        for point in spec.grid():
            try:
                spec.trial_config(point)
            except ValidationError as exc:
                raise UserError(f"{source}: space: the point {_short(point)} is not a valid "
                                f"{spec.kind} config: {describe_error(exc)}") from None
    return spec


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
            raise UserError(f"{source}: {where}: {describe_error(exc)}") from None
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
        raise UserError(f"{source}: {where}: {describe_error(exc, model, name)}") from None
    if isinstance(checked, float) and not math.isfinite(checked):
        raise UserError(f"{source}: {where}: must be finite")
    return checked


def _check_keys(source: str, where: str, raw: dict, allowed) -> None:
    for key in raw:
        if key not in allowed:
            raise UserError(f"{source}: {where}{key}: unknown key (allowed: {', '.join(allowed)})")


def freeze_params(params: dict[str, Any]) -> tuple:
    """A hashable form of a params mapping, for telling grid points apart."""
    return tuple(sorted((k, repr(v)) for k, v in params.items()))
