"""Export of large sweeps: importances by a method that scales, named; histories read in bulk.

The sweeps here are written without training (:func:`tests.helpers.make_sweep`): every trial
run carries what a trained head's run carries (params, tags, per-epoch metrics from the
project's own record functions), and the Optuna study holds the trials COMPLETE.
"""

from __future__ import annotations

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest

from pipeline import figures, naming, study_figures
from pipeline.export import CURVE_METRICS, comparison_trials, epoch_records, export
from pipeline.runs import trial_records
from tests.helpers import EPOCHS, make_sweep


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory):
    """A 16-trial seed-grid-like sweep (no transferred sigmoid, so no loss curves), shared by the
    tests of this module, which read it only."""
    folder = tmp_path_factory.mktemp("scale")
    return make_sweep(folder)


@pytest.fixture
def tracking_at(monkeypatch, tmp_path):
    """Point MLflow at a store for one test; artifacts and outputs go to ``tmp_path``."""
    monkeypatch.chdir(tmp_path)

    def point(store: str) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
        mlflow.set_tracking_uri(store)

    yield point
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_export_draws_importances_by_ped_anova_and_says_so(sweep_store, tracking_at, tmp_path,
                                                            monkeypatch):
    tracking_at(sweep_store.store)
    def no_fanova(*args, **kwargs):
        raise AssertionError("fANOVA does not scale to large sweeps")

    evaluated = []
    ped_anova = optuna.importance.PedAnovaImportanceEvaluator.evaluate
    monkeypatch.setattr(optuna.importance.FanovaImportanceEvaluator, "evaluate", no_fanova)
    monkeypatch.setattr(optuna.importance.PedAnovaImportanceEvaluator, "evaluate",
                        lambda self, *a, **k: evaluated.append(self) or ped_anova(self, *a, **k))
    export(sweep_store.parent, str(tmp_path / "out"), "md")
    page = (tmp_path / "out" / "param_importances.html").read_text()
    assert evaluated, "the importances come from PED-ANOVA"
    assert (f"scale: Hyperparameter Importances ({study_figures.IMPORTANCE_METHOD}, "
            f"{sweep_store.n} completed trials)") in page
    assert "PED-ANOVA" in study_figures.IMPORTANCE_METHOD
    for param in ("activation", "units", "loss", "init"):  # the params that vary
        assert f'"{param}"' in page


def _count_history_reads(monkeypatch) -> list[str]:
    """Record every metric-history read of the tracking store: ``bulk`` or ``run``."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    reads = []
    bulk, single = SqlAlchemyStore.get_metric_history_bulk, SqlAlchemyStore.get_metric_history
    monkeypatch.setattr(SqlAlchemyStore, "get_metric_history_bulk",
                        lambda self, *a, **k: reads.append("bulk") or bulk(self, *a, **k))
    monkeypatch.setattr(SqlAlchemyStore, "get_metric_history",
                        lambda self, *a, **k: reads.append("run") or single(self, *a, **k))
    return reads


def test_no_history_is_read_when_no_loss_curve_is_drawn(sweep_store, tracking_at, tmp_path,
                                                        monkeypatch):
    tracking_at(sweep_store.store)
    reads = _count_history_reads(monkeypatch)
    export(sweep_store.parent, str(tmp_path / "out"), "csv")
    assert reads == []  # no transferred sigmoid, so no loss curves: the final values suffice
    assert not (tmp_path / "out" / "epochs.csv").exists()


def test_loss_curves_read_one_query_per_metric(tracking_at, tmp_path, monkeypatch):
    grid = {"activation": ["sigmoid", "softmax"], "units": [1, 2], "loss": ["binary_crossentropy"],
            "learning_rate": [0.01], "init": ["glorot_uniform", "transfer"]}
    sweep = make_sweep(tmp_path, seeds=(0, 1), grid=grid)
    tracking_at(sweep.store)
    reads = _count_history_reads(monkeypatch)
    shown = comparison_trials(trial_records(sweep.parent), ratio=1.0)
    assert set(shown["role"]) == {"softmax", "sigmoid_transfer", "sigmoid_random"}
    epochs = epoch_records(shown)
    assert reads == ["bulk"] * len(CURVE_METRICS)
    assert len(epochs) == len(shown) * EPOCHS
    assert list(epochs["run_id"].drop_duplicates()) == list(shown["run_id"])  # the trials' order


def test_accuracy_chart_stays_bounded_for_a_sampled_learning_rate(tmp_path, monkeypatch):
    n = 1000  # a TPE sweep's continuous learning rate: every trial its own config
    rng = np.random.default_rng(0)
    trials = pd.DataFrame({
        "run_name": [f"{'softmax' if i % 2 else 'sigmoid'}-1u-bce-lr{naming.format_lr(lr)}-glorot-s0"
                     for i, lr in enumerate(rng.uniform(1e-4, 1e-1, n))],
        "status": "FINISHED", "collapsed": [bool(i % 2) for i in range(n)],
        "final_val_accuracy": rng.uniform(0.4, 0.9, n), "positive_fraction": 0.5})
    shown = []
    monkeypatch.setattr(figures, "_finish", lambda fig, path, vector=(): shown.append(fig) or path)
    figures.accuracy_vs_collapse(trials, tmp_path / "accuracy.png", "tpe")
    ax = shown[0].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["sigmoid-1u-bce-lr*-glorot",
                                                            "softmax-1u-bce-lr*-glorot"]
    assert ax.get_title() == "tpe (learning rates pooled)"
    assert len(ax.patches) == 2 and shown[0].get_size_inches()[1] < 10
