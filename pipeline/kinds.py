"""What one trial of a sweep is: the one place that tells ``heads`` and ``parity`` trials apart.

A sweep file's ``kind`` picks a :class:`TrialKind` (:func:`kind_of`). The kind names and
describes a trial's run, trains a batch of its trials with the sweep's engine, and records
one trained trial on its run; everything else on a trial's path (claiming it, opening its run,
pruning, ending the run, telling Optuna) is the same for every kind (:mod:`pipeline.trial`).

- ``heads``: a trial trains one head (:class:`~pipeline.config.TrialConfig`); the engine
  trains a batch of them at once, and each is recorded by :mod:`pipeline.records`.
- ``parity``: a trial trains the three heads of a parity experiment
  (:class:`~pipeline.config.ParityConfig`), one trial at a time, recorded by
  :func:`pipeline.parity.log_parity` as three runs nested under the trial's run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from optuna.trial import FrozenTrial

from pipeline import best_head, naming, parity, records, studies, tracking
from pipeline.config import ParityConfig, TrainingSettings, TrialConfig
from pipeline.engines import Engine
from pipeline.results import EpochCallback
from pipeline.split import Splits
from pipeline.sweep_file import SweepSpec


@dataclass(frozen=True)
class Recording:
    """Where a trained trial is recorded: its run, its sweep's experiment and common tags, the
    splits it trained on and the metric that is its objective value."""

    run_id: str
    experiment: str
    tags: dict
    splits: Splits
    metric: str


class TrialKind(ABC):
    """How the trials of one kind are named, trained and recorded."""

    name: str
    batch_trials: int | None = None  # trials trained at once; None: as many as the engine takes

    @abstractmethod
    def run_name(self, config: TrainingSettings) -> str:
        """The trial run's name (:mod:`pipeline.naming`)."""

    @abstractmethod
    def description(self, config: TrainingSettings, number: int, sweep_name: str) -> str:
        """The trial run's description."""

    @abstractmethod
    def parent_description(self, spec: SweepSpec) -> str:
        """The sweep's parent run description."""

    def run_tags(self, config: TrainingSettings) -> dict[str, str]:
        """Tags a trial's run gets when it is created, beyond the sweep's."""
        return {}

    def trained_by(self, engine: Engine, config: TrainingSettings) -> str:
        """The engine that trains ``config`` (the run's tag ``engine``)."""
        return engine.name

    @abstractmethod
    def train(self, engine: Engine, configs: Sequence[TrainingSettings], splits: Splits,
              callbacks: Sequence[EpochCallback]) -> list:
        """Train a batch: an outcome per config (its result, or the exception that ended it)."""

    def write_files(self, run_id: str, config: TrainingSettings, result) -> None:  # noqa: B027
        """Write a trained trial's files on its run (on the sweep's main thread, see
        :mod:`pipeline.trial`); nothing here."""

    @abstractmethod
    def record(self, where: Recording, config: TrainingSettings, result) -> float:
        """Record a trained trial's metrics and tags; return its objective value."""

    def log_best(self, parent: str, best: FrozenTrial, splits: Splits,  # noqa: B027
                 register_as: str | None) -> None:
        """Log what the finished sweep's best trial ``best`` trained, as a model of the parent
        run ``parent`` (and register it as ``register_as``); nothing here."""

    def prepare_best(self) -> None:  # noqa: B027
        """Do ahead, on the sweep's writer thread while a batch trains, what :meth:`log_best`
        would spend time on once the study is finished; nothing here."""


class HeadsKind(TrialKind):
    name = TrialConfig.KIND

    def run_name(self, config: TrialConfig) -> str:
        return naming.trial_run_name(config)

    def description(self, config: TrialConfig, number: int, sweep_name: str) -> str:
        return naming.head_description(config, number, sweep_name)

    def parent_description(self, spec: SweepSpec) -> str:
        return naming.heads_parent_description(spec)

    def run_tags(self, config: TrialConfig) -> dict[str, str]:
        return records.head_tags(config)

    def trained_by(self, engine: Engine, config: TrialConfig) -> str:
        return engine.trained_by(config)

    def train(self, engine: Engine, configs: Sequence[TrialConfig], splits: Splits,
              callbacks: Sequence[EpochCallback]) -> list:
        return engine.train_many(configs, splits.x, splits.y, callbacks)

    def write_files(self, run_id: str, config: TrialConfig, result) -> None:
        records.log_step_losses(run_id, result)

    def record(self, where: Recording, config: TrialConfig, result) -> float:
        y_val = where.splits.validation_labels(config.validation_fraction, config.seed)
        records.log_head_metrics(where.run_id, result, y_val, config)
        stats = (where.splits.standardization(config.validation_fraction, config.seed)
                 if config.standardize else None)
        tracking.log_text(where.run_id, best_head.head_file(result, config, stats), best_head.HEAD_FILE)
        return result.final(where.metric)

    def log_best(self, parent: str, best: FrozenTrial, splits: Splits, register_as: str | None) -> None:
        run = tracking.client().get_run(best.user_attrs[studies.RUN_ATTR])
        best_head.log_best_head(parent, run, best.number, splits.x[:2], register_as)

    def prepare_best(self) -> None:
        best_head.prepare()


class ParityKind(TrialKind):
    name = ParityConfig.KIND
    batch_trials = 1

    def run_name(self, config: ParityConfig) -> str:
        return naming.parity_run_name(config)

    def description(self, config: ParityConfig, number: int, sweep_name: str) -> str:
        return naming.parity_description(config, number, sweep_name)

    def parent_description(self, spec: SweepSpec) -> str:
        return naming.parity_parent_description(spec)

    def trained_by(self, engine: Engine, config: ParityConfig) -> str:
        """The engines that train the experiment's heads (the fused engine hands heads with a
        hidden layer to Keras), ``+``-joined should they differ."""
        return "+".join(sorted({engine.trained_by(head) for head in config.heads().values()}))

    def train(self, engine: Engine, configs: Sequence[ParityConfig], splits: Splits,
              callbacks: Sequence[EpochCallback]) -> list:
        outcomes = []
        for config in configs:
            try:
                split = splits.of(config.validation_fraction, config.seed, config.standardize)
                outcomes.append(parity.train_parity(config, split, engine))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    def record(self, where: Recording, config: ParityConfig, result: parity.ParityResult) -> float:
        split = where.splits.of(config.validation_fraction, config.seed, config.standardize)
        return parity.log_parity(where.run_id, where.experiment, result, split, where.tags)[where.metric]


KINDS: dict[str, TrialKind] = {kind.name: kind for kind in (HeadsKind(), ParityKind())}


def kind_of(spec: SweepSpec) -> TrialKind:
    """The trial kind of a sweep file."""
    return KINDS[spec.kind]
