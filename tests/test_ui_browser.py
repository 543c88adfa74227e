"""The MLflow UI in a real browser, over the store a small sweep wrote: what a reader looks for.

``mlflow ui`` serves the small study's store on 127.0.0.1; Debian's chromium (headless, driven
by Selenium through chromium-driver) opens the pages a reader opens. Screenshots of every
page go to ``$UI_SCREENSHOTS`` (default: a temporary folder, printed); ``python -m
tests.screenshots`` takes the README's from the default job.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest

from pipeline import naming
from pipeline.config import TRIAL_FIELDS, TrialConfig
from tests.helpers import SMALL_STUDY
from tests.mlflow_ui import MlflowPages, chromium, mlflow_ui

pytestmark = pytest.mark.slow  # a sweep, `mlflow ui` and chromium

COMPARED = ("activation", "units", "loss", "learning_rate", "init", "val_accuracy", "val_prob_loss",
            "collapsed")


@pytest.fixture(scope="module")
def store(small_study):
    """The small study's runs as MLflow's client sees them: experiment, parent, trials by name."""
    mlflow.set_tracking_uri(small_study.store)
    try:
        parent = mlflow.get_run(small_study.outcome.parent_run_id)
        trials = mlflow.search_runs(experiment_ids=[small_study.outcome.experiment_id], output_format="list",
                                    filter_string=f"tags.`{naming.PARENT}` = '{parent.info.run_id}'")
    finally:
        mlflow.set_tracking_uri(None)
    return parent, {run.info.run_name: run for run in trials}


@pytest.fixture(scope="module")
def pages(small_study, tmp_path_factory):
    """A browser on ``mlflow ui`` over the small study's store, and where screenshots go."""
    shots = Path(os.environ.get("UI_SCREENSHOTS") or tmp_path_factory.mktemp("ui_screenshots"))
    with mlflow_ui(small_study.store) as base, chromium(2400, 1300) as driver:
        ui = MlflowPages(driver, base)
        ui.shots = shots
        yield ui
    print(f"screenshots in {shots}")


def test_experiment_lists_the_parent_run_with_its_trials_nested(pages, small_study, store):
    parent, trials = store
    pages.runs(small_study.outcome.experiment_id)
    assert pages.run_names() == [parent.info.run_name]  # trials are folded under their parent
    pages.expand_all()
    names = pages.run_names()
    assert names[0] == parent.info.run_name
    assert sorted(names[1:]) == sorted(trials) and len(trials) == 8
    assert parent.info.run_name.startswith(f"{SMALL_STUDY['name']}-20")  # sweep and date
    pages.screenshot(pages.shots / "runs_nested.png")


def test_run_names_say_the_config(pages, small_study, store):
    _, trials = store
    pages.runs(small_study.outcome.experiment_id)
    pages.expand_all()
    for name in pages.run_names()[1:]:
        params = {k: v for k, v in trials[name].data.params.items() if k in TRIAL_FIELDS}
        assert naming.trial_run_name(TrialConfig(**params)) == name


def test_saved_view_shows_the_compared_params_metrics_and_tags(pages, small_study):
    pages.runs(small_study.outcome.experiment_id, viewStateShareKey="heads")
    pages.expand_all()
    headers = pages.column_headers()
    for column in (*COMPARED, "positive_fraction", "val_loss", "seed", naming.ROLE):
        assert column in headers, column
    assert "Heads: config and results" in pages.text()  # the view's name, in the Views menu button
    pages.screenshot(pages.shots / "runs_compared.png")


def test_collapsed_filter_keeps_the_one_unit_softmax(pages, small_study, store):
    _, trials = store
    pages.runs(small_study.outcome.experiment_id, searchFilter="tags.collapsed = 'true'")
    pages.expand_all()
    shown = [n for n in pages.run_names() if n in trials]
    assert shown and all(n.startswith("softmax-1u-") for n in shown)
    assert sorted(shown) == sorted(n for n, r in trials.items() if r.data.tags[naming.COLLAPSED] == "true")


def test_trial_page_shows_its_params_metrics_and_tags(pages, small_study, store):
    _, trials = store
    name, run = next((n, r) for n, r in trials.items() if r.data.tags[naming.COLLAPSED] == "true")
    pages.run(small_study.outcome.experiment_id, run.info.run_id)
    text = pages.text()
    assert name in text
    for key in COMPARED:
        assert key in text, key
    for value in ("softmax", "binary_crossentropy", "0.05"):
        assert value in text, value
    pages.screenshot(pages.shots / "trial.png")


def test_parent_page_says_what_the_study_asks(pages, small_study, store):
    parent, _ = store
    pages.run(small_study.outcome.experiment_id, parent.info.run_id)
    pages.wait_for_text("How to read it")
    assert "Does the 1-unit softmax collapse" in pages.text()


@pytest.fixture(scope="module")
def parity(small_study):
    """The parity run of the small study's store and its three heads: ``parity.role`` -> run."""
    mlflow.set_tracking_uri(small_study.store)
    try:
        run = mlflow.get_run(small_study.parity_run)
        heads = mlflow.search_runs(experiment_ids=[run.info.experiment_id], output_format="list",
                                   filter_string=f"tags.`{naming.PARENT}` = '{run.info.run_id}'")
    finally:
        mlflow.set_tracking_uri(None)
    return run, {head.data.tags[naming.ROLE]: head for head in heads}


def test_parity_run_nests_its_three_heads(pages, parity):
    run, heads = parity
    assert set(heads) == {"softmax", "sigmoid_transfer", "sigmoid_random"}
    pages.runs(run.info.experiment_id)
    pages.expand_all()
    names = pages.run_names()
    assert names[0] == run.info.run_name and run.info.run_name.startswith("parity-sgd-lr5e-2-x2")
    assert sorted(names[1:]) == sorted(h.info.run_name for h in heads.values())
    assert all(heads[role].info.run_name.startswith(f"{role}-") for role in heads)


def test_parity_runs_three_loss_curves_in_one_chart(pages, parity):
    run, heads = parity
    pages.runs(run.info.experiment_id)
    pages.expand_all()
    pages.select([h.info.run_name for h in heads.values()])
    pages.compare_selected("loss")  # tick the three heads, Compare, click loss: what a user does
    assert "x_axis=step" in pages.driver.current_url
    assert sorted(pages.legend()) == sorted(f"{h.info.run_name} (loss)" for h in heads.values())
    pages.screenshot(pages.shots / "parity_loss.png")


def test_parity_view_charts_the_losses(pages, parity):
    run, heads = parity
    pages.runs(run.info.experiment_id, viewStateShareKey="parity")
    pages.expand_all()
    assert sorted(pages.run_names()[1:]) == sorted(h.info.run_name for h in heads.values())
    pages.show_charts()
    titles = pages.chart_titles()
    assert {"loss", "val_loss", "val_prob_loss"} <= set(titles) and "val_accuracy" not in titles
    pages.screenshot(pages.shots / "parity_charts.png")
