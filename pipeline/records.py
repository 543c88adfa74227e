"""What a trained head leaves in its MLflow run: the one place that decides a head's record.

A sweep trial and each head of a parity experiment are recorded the same way: the config as
params, every per-epoch metric (step = epoch), the ``positive_fraction`` of the validation
labels, the ``collapsed`` tag, and the training loss of every step in the artifact
``step_loss.csv`` (columns ``step, epoch, loss``). A parity head also charts that series as the
metric ``step_loss``, since the parity claim is about the step-by-step trajectory; a sweep
trial does not, because MLflow stores a metric series point by point (one row and object
each), and a series of every step would cost a sweep more than the rest of its records.

A head that can only collapse (a 1-unit softmax) or did collapse also gets the values a
constant P(label 1) = 1 must score, computed from the label counts, and the measured minus the
expected value, so the collapse is checked in every run rather than asserted in prose.
"""

from __future__ import annotations

import numpy as np
from mlflow.entities import Metric

from pipeline import metrics, naming, tracking
from pipeline.config import TrialConfig
from pipeline.results import TrialResult

STEP_LOSS_FILE = "step_loss.csv"


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


def head_metrics(result: TrialResult, y_val: np.ndarray, config: TrialConfig,
                 step_series: bool = False) -> list[Metric]:
    """All metric points of a trained head's run (see the module docstring); ``step_series``
    adds the per-step training loss as the series ``step_loss``."""
    points = [m for name, values in result.history.items() for m in tracking.series(name, values)]
    if step_series:
        points += tracking.series("step_loss", result.step_loss)
    scalars: dict[str, float] = {"positive_fraction": result.positive_fraction}
    if result.collapsed or naming.role_of(config) == "softmax_1unit":
        scalars |= collapse_check(result, y_val)
    return points + tracking.scalars(scalars)


def step_loss_csv(result: TrialResult) -> str:
    """The per-step training losses of ``result`` as CSV text: ``step, epoch, loss``, one row
    per optimizer step (steps and epochs from 0; ``loss`` is the batch's mean loss)."""
    losses = [float(v) for v in result.step_loss]
    per_epoch = len(losses) // len(result.history["loss"])
    return "step,epoch,loss\n" + "".join(f"{step},{step // per_epoch},{loss:.9g}\n"
                                          for step, loss in enumerate(losses))


def log_head(run_id: str, result: TrialResult, y_val: np.ndarray, config: TrialConfig,
             step_series: bool = False) -> None:
    """Log a trained head's record on ``run_id``: :func:`log_head_metrics` and
    :func:`log_step_losses` (its params are logged when the run is created)."""
    log_head_metrics(run_id, result, y_val, config, step_series)
    log_step_losses(run_id, result)


def log_head_metrics(run_id: str, result: TrialResult, y_val: np.ndarray, config: TrialConfig,
                     step_series: bool = False) -> None:
    """Log a trained head's metrics (:func:`head_metrics`) and final tags on ``run_id``; ``y_val``
    are the validation labels of its split; ``step_series`` also logs the per-step losses as a
    metric series (parity heads)."""
    tracking.log_batch(run_id, metrics=head_metrics(result, y_val, config, step_series),
                       tags={naming.COLLAPSED: str(result.collapsed).lower()})


def log_step_losses(run_id: str, result: TrialResult) -> None:
    """Write a trained head's ``step_loss.csv`` (:func:`step_loss_csv`) on ``run_id``."""
    tracking.log_text(run_id, step_loss_csv(result), STEP_LOSS_FILE)
