"""The trainers a sweep can use, behind one interface, found by name in one registry.

An :class:`Engine` trains heads (:class:`~pipeline.config.TrialConfig`): one on a given split
(:meth:`Engine.train`), or many on a features file's rows (:meth:`Engine.train_many`), each
config on its own seeded split. Every trial of every sweep goes through ``train_many``; an
engine says how many trials it takes at once (:attr:`Engine.batch_trials`): the fused engine
trains up to 256 heads per pass, the Keras reference one ``model.fit`` after another, so it
takes one trial at a time (its progress is then shown trial by trial).

This module imports no TensorFlow: an engine's module is imported when the engine is made.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from pipeline.config import TrialConfig
from pipeline.results import EpochCallback, TrialResult

if TYPE_CHECKING:
    from pipeline.split import Split


class Engine(ABC):
    """A trainer of heads. Both methods give the numbers of :class:`~pipeline.engine_keras.KerasEngine`
    (the reference) to 1e-4 on every metric of every epoch."""

    name: ClassVar[str]
    batch_trials: ClassVar[int]  # trials a sweep hands over at once

    @abstractmethod
    def train(self, config: TrialConfig, split: Split,
              on_epoch: EpochCallback | None = None) -> TrialResult:
        """Train the head of ``config`` on ``split``; ``on_epoch(epoch, metrics)`` after each epoch.

        Raises what Keras raises for a combination it refuses, and what ``on_epoch`` raises
        (``optuna.TrialPruned`` stops the head)."""

    @abstractmethod
    def train_many(self, configs: Sequence[TrialConfig], x: np.ndarray, y: np.ndarray,
                   callbacks: Sequence[EpochCallback | None] | None = None) -> list[TrialResult | Exception]:
        """Train every config on its split of features ``x`` and labels ``y``: an outcome per
        config, in order, the config's result or the exception that ended it (one head's
        failure does not stop the others). ``callbacks[i]`` is config i's ``on_epoch``."""

    def trained_by(self, config: TrialConfig) -> str:
        """The name of the engine that trains ``config`` (the tag ``engine`` of its run)."""
        return self.name


ENGINES = {"fused": "pipeline.engine_fused:FusedEngine", "keras": "pipeline.engine_keras:KerasEngine"}


def make_engine(name: str) -> Engine:
    """The engine named in a sweep file (:data:`ENGINES`)."""
    module, _, cls = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), cls)()
