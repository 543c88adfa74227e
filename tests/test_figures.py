"""Figures of a sweep: what export writes and logs, what each figure shows, and when Optuna's cannot."""

from __future__ import annotations

import re

import matplotlib.image
import mlflow
import optuna
import pandas as pd
import pytest
from matplotlib.colors import to_rgba

from pipeline import figures, study_figures
from pipeline.export import _optuna_pages

PNGS = ("loss_curves.png", "loss_gaps.png", "accuracy.png")
PAGES = ("optimization_history.html", "param_importances.html", "parallel_coordinate.html")


@pytest.mark.slow
def test_export_writes_and_logs_every_figure(small_study):
    for name in PNGS:
        height, width, _ = matplotlib.image.imread(small_study.export / name).shape
        assert 1000 <= width <= 2400 and 300 <= height <= 1600, (name, width, height)  # ~6 in at 200 dpi
    for name in PAGES:
        page = (small_study.export / name).read_text()
        assert "<script src=" not in page, name  # plotly.js inline: opens offline
        assert "Plotly.newPlot" in page and len(page) > 1_000_000
    importances = (small_study.export / "param_importances.html").read_text()
    for param in ("activation", "units", "loss", "learning_rate", "init", "seed"):
        assert f'"{param}"' in importances
    summary = (small_study.export / "summary.md").read_text()
    assert "![accuracy](accuracy.png)" in summary and "(param_importances.html)" in summary
    mlflow.set_tracking_uri(small_study.store)
    try:
        logged = {f.path for f in mlflow.MlflowClient().list_artifacts(
            small_study.outcome.parent_run_id, "export")}
    finally:
        mlflow.set_tracking_uri(None)
    assert {f"export/{name}" for name in PNGS + PAGES} <= logged


def _captured(monkeypatch):
    """Make the figure functions hand over their matplotlib figure instead of closing it."""
    shown = []
    monkeypatch.setattr(figures, "_finish", lambda fig, path, vector=(): shown.append(fig) or path)
    return shown


def test_accuracy_chart_tells_collapsed_from_healthy(monkeypatch, tmp_path):
    trials = pd.DataFrame({
        "run_name": ["softmax-1u-bce-lr1e-3-glorot-s0", "softmax-1u-bce-lr1e-3-glorot-s1",
                     "sigmoid-1u-bce-lr2e-3-transfer-s0", "sigmoid-1u-bce-lr2e-3-transfer-s1",
                     "sigmoid-1u-bce-lr2e-3-zeros-s0"],
        "status": ["FINISHED"] * 4 + ["FAILED"],
        "collapsed": [True, True, False, False, False],
        "final_val_accuracy": [0.45, 0.45, 0.8, 0.9, float("nan")],
        "positive_fraction": [0.45] * 5,
    })
    shown = _captured(monkeypatch)
    figures.accuracy_vs_collapse(trials, tmp_path / "a.png", "t")
    ax = shown[0].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["softmax-1u-bce-lr1e-3-glorot",
                                                            "sigmoid-1u-bce-lr2e-3-transfer"]
    bars = ax.patches
    assert [round(b.get_width(), 6) for b in bars] == [0.45, 0.85]  # mean over seeds
    assert bars[0].get_facecolor()[:3] == to_rgba(figures.COLLAPSED_COLOR)[:3]
    assert bars[1].get_facecolor()[:3] == to_rgba(figures.HEALTHY_COLOR)[:3]
    chance = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert chance[0].get_xdata()[0] == pytest.approx(0.45)
    assert "accuracy" in ax.get_xlabel()
    assert any("positive fraction 0.450" in t.get_text() for t in ax.get_legend().get_texts())


def _study(params_of_trials, values):
    study = optuna.create_study(direction="minimize")
    study.set_user_attr("objective", "val_prob_loss")
    for params, value in zip(params_of_trials, values, strict=True):
        trial = optuna.trial.create_trial(
            params=params, value=value,
            distributions={k: optuna.distributions.CategoricalDistribution(
                sorted({p[k] for p in params_of_trials})) for k in params})
        study.add_trial(trial)
    return study


def test_importances_need_two_varying_params(tmp_path):
    study = _study([{"units": 1, "seed": 0}, {"units": 2, "seed": 0}, {"units": 1, "seed": 0}],
                   [0.5, 0.4, 0.6])
    written, skipped = study_figures.optuna_figures(study, tmp_path)
    assert [p.name for p in written] == ["optimization_history.html", "parallel_coordinate.html"]
    assert re.search(r"two or more params that vary, has \['units'\]", skipped["param_importances"])


def test_no_completed_trial_no_optuna_figure(tmp_path):
    study = optuna.create_study()
    study.enqueue_trial({"units": 1})
    written, skipped = study_figures.optuna_figures(study, tmp_path)
    assert written == [] and set(skipped) == set(study_figures.OPTUNA_FIGURES)
    assert list(tmp_path.iterdir()) == []


def test_study_that_cannot_be_opened_is_reported_not_fatal(tmp_path, capsys):
    missing = tmp_path / "gone" / "optuna-journal.log"
    parent = type("Run", (), {"data": type("Data", (), {"tags": {
        "optuna.storage": f"{missing}#study=lost", "optuna.study": "lost"}})})
    assert _optuna_pages(parent, tmp_path) == []
    assert "Optuna figures skipped: study 'lost'" in capsys.readouterr().err


def test_vector_figures_embed_their_fonts(tmp_path):
    """pdf and svg: the same figure beside the PNG, text as embedded TrueType (PDF) or outlines
    (SVG), so it prints as drawn where the fonts are not installed."""
    trials = pd.DataFrame({"run_name": ["softmax-1u-bce-lr1e-3-glorot-s0", "sigmoid-1u-bce-lr2e-3-zeros-s0"],
                           "status": ["FINISHED"] * 2, "collapsed": [True, False],
                           "final_val_accuracy": [0.45, 0.8], "positive_fraction": [0.45] * 2})
    png = figures.accuracy_vs_collapse(trials, tmp_path / "accuracy.png", "t", vector=("pdf", "svg"))
    assert png == tmp_path / "accuracy.png" and png.is_file()
    pdf = (tmp_path / "accuracy.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and b"/FontFile2" in pdf and b"/Type3" not in pdf
    svg = (tmp_path / "accuracy.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<text" not in svg and "<path" in svg
    assert re.search(r'<svg[^>]* width="4\d\d(\.\d+)?pt"', svg)  # about 6 in (432 pt) wide


def test_export_writes_and_logs_vector_figures(tmp_path):
    from pipeline.export import export
    from tests.helpers import make_sweep

    sweep = make_sweep(tmp_path)
    mlflow.set_tracking_uri(sweep.store)
    try:
        result = export(sweep.parent, str(tmp_path / "out"), "pdf,svg")
        logged = {f.path for f in mlflow.MlflowClient().list_artifacts(sweep.parent, "export")}
    finally:
        mlflow.set_tracking_uri(None)
    names = {p.name for p in result.files}
    assert {"accuracy.pdf", "accuracy.svg"} <= names
    assert {"export/accuracy.pdf", "export/accuracy.svg"} <= logged
