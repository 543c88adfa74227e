"""What a trained head leaves in its MLflow run: the one place that decides a head's record.

A sweep trial and each head of a parity experiment are recorded the same way: the config as
params, every per-epoch metric (step = epoch), ``step_loss`` per training step, the
``positive_fraction`` of the validation labels and the ``collapsed`` tag. A head that can only
collapse (a 1-unit softmax) or did collapse also gets the values a constant P(label 1) = 1
must score, computed from the label counts, and the measured minus the expected value, so the
collapse is checked in every run rather than asserted in prose.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from mlflow.entities import Metric

from pipeline import metrics, naming, tracking
from pipeline.config import TrialConfig
from pipeline.engine_keras import TrialResult


def head_tags(config: TrialConfig) -> dict[str, str]:
    """Tags known before training: activation, the parity role, and ``collapsed`` when certain.

    A softmax over one unit is 1.0 whatever its input, so such a run is tagged collapsed from
    the start (a run that then fails, like sparse cross-entropy on one unit, keeps the tag).
    """
    tags = {"activation": config.activation}
    role = naming.role_of(config)
    if role:
        tags[naming.ROLE] = role
    if role == "softmax_1unit":
        tags[naming.COLLAPSED] = "true"
    return tags


def collapse_check(result: TrialResult, y_val: np.ndarray) -> dict[str, float]:
    """Expected collapse values from the validation labels ``y_val`` and measured minus expected."""
    expected = metrics.collapse_expectation(y_val)
    out = {}
    for name in ("accuracy", "prob_loss"):
        measured = result.final(f"val_{name}")
        out[f"expected_val_{name}"] = expected[name]
        out[f"val_{name}_minus_expected"] = measured - expected[name]
    return out


def head_metrics(result: TrialResult, y_val: np.ndarray, config: TrialConfig) -> list[Metric]:
    """All metric points of a trained head's run (see the module docstring)."""
    points = [m for name, values in result.history.items() for m in tracking.series(name, values)]
    points += tracking.series("step_loss", result.step_loss)
    scalars: dict[str, float] = {"positive_fraction": result.positive_fraction}
    if result.collapsed or naming.role_of(config) == "softmax_1unit":
        scalars |= collapse_check(result, y_val)
    return points + tracking.scalars(scalars)


def log_head(run_id: str, result: TrialResult, y_val: np.ndarray, config: TrialConfig,
             extra_tags: Mapping[str, str] | None = None, with_params: bool = False) -> None:
    """Log a trained head's metrics and final tags on ``run_id``; ``y_val`` are the validation
    labels of its split. Its params are logged when the run is created, or here in the same
    request ``with_params`` (a batched sweep writes a run once, after training)."""
    tags = {naming.COLLAPSED: str(result.collapsed).lower(), **(extra_tags or {})}
    tracking.log_batch(run_id, params=config.params() if with_params else None,
                       metrics=head_metrics(result, y_val, config), tags=tags)
