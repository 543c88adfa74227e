"""What a trained head leaves in its MLflow run: tags, metrics, collapse checks, step losses."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from pipeline import metrics, naming, records
from pipeline.config import TrialConfig
from pipeline.engine_keras import EPOCH_METRICS, TrialResult
from pipeline.split import make_split
from pipeline.tracking import create_run
from tests.helpers import make_features

X, Y = make_features(n=100, d=8, positive=0.3)
SPLIT = make_split(X, Y, 0.2, 0, False)
EPOCHS, STEPS = 2, 3  # steps per epoch

COLLAPSED_SOFTMAX = TrialConfig(activation="softmax", units=1)
SIGMOID = TrialConfig(activation="sigmoid", units=1, learning_rate=2e-3)


def result_of(p_val: np.ndarray, y_val: np.ndarray = SPLIT.y_val) -> TrialResult:
    """The result an engine leaves for a head whose validation P(label 1) was ``p_val`` at every
    epoch (metrics from :mod:`pipeline.metrics`, as the engines compute them)."""
    history = {name: [0.5 - 0.1 * epoch for epoch in range(EPOCHS)] for name in EPOCH_METRICS}
    history["val_accuracy"] = [metrics.accuracy(p_val, y_val)] * EPOCHS
    history["val_prob_loss"] = [metrics.prob_loss(p_val, y_val)] * EPOCHS
    return TrialResult(history=history, step_loss=[0.7 - 0.01 * s for s in range(EPOCHS * STEPS)],
                       positive_fraction=float(np.mean(y_val)), collapsed=metrics.is_collapsed(p_val),
                       kernel=np.zeros((8, 1), np.float32), bias=np.zeros(1, np.float32))


@pytest.mark.parametrize(("config", "tags"), [
    (COLLAPSED_SOFTMAX, {"activation": "softmax", naming.ROLE: "softmax_1unit", naming.COLLAPSED: "true"}),
    (TrialConfig(activation="softmax", units=2, loss="categorical_crossentropy"),
     {"activation": "softmax", naming.ROLE: "softmax"}),
    (TrialConfig(activation="sigmoid", units=1, init="transfer"),
     {"activation": "sigmoid", naming.ROLE: "sigmoid_transfer"}),
    (TrialConfig(activation="sigmoid", units=2), {"activation": "sigmoid"}),
])
def test_head_tags_are_known_before_training(config, tags):
    assert records.head_tags(config) == tags


def test_step_loss_csv_has_a_row_per_step_with_its_epoch():
    result = result_of(np.full(len(SPLIT.y_val), 0.4))
    lines = records.step_loss_csv(result).splitlines()
    assert lines[0] == "step,epoch,loss"
    rows = [line.split(",") for line in lines[1:]]
    assert [int(r[0]) for r in rows] == list(range(EPOCHS * STEPS))
    assert [int(r[1]) for r in rows] == [0, 0, 0, 1, 1, 1]
    assert [float(r[2]) for r in rows] == pytest.approx(result.step_loss, abs=1e-9)


def by_name(points) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for m in points:
        out.setdefault(m.key, []).append((m.step, m.value))
    return out


def test_a_collapsed_one_unit_softmax_scores_what_the_label_counts_say():
    y_val = SPLIT.y_val
    positive = float(np.mean(y_val))
    points = by_name(records.head_metrics(result_of(np.ones(len(y_val))), y_val, COLLAPSED_SOFTMAX))
    assert points["positive_fraction"] == [(0, positive)]
    assert points["expected_val_accuracy"] == [(0, positive)]
    assert points["val_accuracy_minus_expected"] == [(0, 0.0)]
    [(_, expected_loss)] = points["expected_val_prob_loss"]
    assert expected_loss == pytest.approx((1 - positive) * 16.1181, abs=1e-4)
    [(_, gap)] = points["val_prob_loss_minus_expected"]
    assert abs(gap) < positive * 1.1e-7  # the positives' clipped -ln(1 - 1e-7) each, ~1e-7
    for name in EPOCH_METRICS:
        assert [step for step, _ in points[name]] == list(range(EPOCHS))
    assert "step_loss" not in points


def test_a_head_that_collapsed_elsewhere_is_measured_against_the_same_expectation():
    y_val = SPLIT.y_val
    positive = float(np.mean(y_val))
    stuck = result_of(np.full(len(y_val), 0.2))  # says label 0 for every example
    assert stuck.collapsed
    points = by_name(records.head_metrics(stuck, y_val, SIGMOID))
    assert points["val_accuracy_minus_expected"] == [(0, pytest.approx((1 - positive) - positive))]


def test_a_healthy_head_has_no_collapse_check_and_parity_heads_chart_every_step():
    y_val = SPLIT.y_val
    healthy = result_of(np.where(y_val == 1, 0.9, 0.1))
    assert not healthy.collapsed
    points = by_name(records.head_metrics(healthy, y_val, SIGMOID, step_series=True))
    assert not any(name.startswith("expected_") or name.endswith("_minus_expected") for name in points)
    assert points["val_accuracy"][-1] == (EPOCHS - 1, 1.0)
    assert points["step_loss"] == [(s, pytest.approx(v)) for s, v in enumerate(healthy.step_loss)]


def test_log_head_writes_the_record_on_a_real_store(tracking, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    client = mlflow.MlflowClient()
    run_id = create_run(client.create_experiment("records-exp"), "softmax-1u",
                        tags=records.head_tags(COLLAPSED_SOFTMAX))
    result = result_of(np.ones(len(SPLIT.y_val)))
    records.log_head(run_id, result, SPLIT.y_val, COLLAPSED_SOFTMAX)
    run = client.get_run(run_id)
    assert run.data.tags[naming.COLLAPSED] == "true"
    assert run.data.metrics["val_accuracy_minus_expected"] == 0.0
    history = client.get_metric_history(run_id, "val_loss")
    assert sorted((m.step, m.value) for m in history) == list(enumerate(result.history["val_loss"]))
    assert client.get_metric_history(run_id, "step_loss") == []
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=records.STEP_LOSS_FILE,
                                               dst_path=str(tmp_path / "down"))
    with open(path) as fh:
        assert fh.read() == records.step_loss_csv(result)
