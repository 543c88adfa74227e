"""The head atlas: heads as people write them, routed, trained, judged and reported."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline import atlas, naming
from pipeline.config import TrialConfig, parse_config
from pipeline.engine_fused import FusedEngine, engine_for
from pipeline.engine_keras import KerasEngine
from pipeline.errors import UserError
from pipeline.export import export
from pipeline.features import write_features
from pipeline.findings import atlas_rows
from pipeline.labels import labels_for
from pipeline.metrics import positive_probability
from pipeline.results import EPOCH_METRICS
from pipeline.split import make_split
from pipeline.sweep import run_sweep
from pipeline.sweep_file import load_sweep
from tests.helpers import make_features

BASE = {"epochs": 4, "batch_size": 32, "dropout": 0.0, "optimizer": "adam", "learning_rate": 0.01}
COLLAPSING = TrialConfig(**BASE, activation="softmax", units=1)
REFUSED = TrialConfig(**BASE, activation="softmax", units=2, loss="categorical_crossentropy", labels="column")
RAW_LINEAR = TrialConfig(**BASE, activation="linear", units=1)
SIGMOID = TrialConfig(**BASE, activation="sigmoid", units=1)
CELLS = (COLLAPSING, REFUSED, RAW_LINEAR, SIGMOID)


@pytest.fixture(scope="module")
def data():
    return make_features(n=240, d=32, seed=0)


def test_the_atlas_sweep_holds_every_cell_once_per_seed():
    spec = load_sweep("sweeps/atlas.yaml")
    assert spec.report == "atlas" and spec.kind == "heads" and spec.seeds == (0, 1, 2)
    configs = [spec.trial_config(point) for point in spec.grid()]
    cells = {tuple(getattr(c, f) for f in atlas.CELL) for c in configs}
    assert len(configs) == 3 * len(cells) == 216
    assert {c[0] for c in cells} == {"sigmoid", "softmax", "linear"}
    assert len({naming.trial_run_name(c) for c in configs}) == len(configs)  # one name per trial
    # each cell gives its loss the labels it expects or the usual mistake, never both names for one
    assert all(c.labels == "expected" or atlas.label_mismatch(c.units, c.loss, c.labels) for c in configs)


def test_head_settings_are_validated_and_named():
    config = parse_config(TrialConfig, {"activation": "linear", "units": "2", "from_logits": "True",
                                        "labels": "column"}, "t")
    assert (config.activation, config.from_logits, config.labels) == ("linear", True, "column")
    with pytest.raises(UserError, match=r"'index' is not allowed \(allowed: expected, column, onehot\)"):
        parse_config(TrialConfig, {"labels": "index"}, "t")
    with pytest.raises(UserError, match="activation: 'relu' is not allowed"):
        parse_config(TrialConfig, {"activation": "relu"}, "t")
    assert naming.trial_run_name(config) == "linear-2u-bce-lr1e-3-glorot-logits-y-column-s0"
    assert naming.trial_run_name(TrialConfig()) == "sigmoid-1u-bce-lr1e-3-glorot-s0"  # defaults unchanged
    # the comparisons' roles are for heads as they train them; a 1-unit softmax collapses whatever
    assert naming.role_of(TrialConfig(activation="linear")) is None
    assert naming.role_of(TrialConfig(from_logits=True)) is None
    assert naming.role_of(TrialConfig(activation="softmax", units=1, labels="onehot")) == "softmax_1unit"


def test_labels_are_what_the_config_names():
    y = np.array([0, 1, 1])
    assert labels_for(y, TrialConfig(units=2, loss="categorical_crossentropy")).shape == (3, 2)
    column = TrialConfig(units=2, loss="categorical_crossentropy", labels="column")
    assert labels_for(y, column).shape == (3, 1)
    onehot = labels_for(y, TrialConfig(units=1, labels="onehot"))
    np.testing.assert_array_equal(onehot, [[1, 0], [0, 1], [0, 1]])
    sparse = labels_for(y, TrialConfig(units=2, loss="sparse_categorical_crossentropy"))
    assert sparse.dtype == np.int64 and sparse.shape == (3,)


def test_a_linear_heads_outputs_are_logits():
    z = np.array([[-2.0], [0.0], [800.0]])
    np.testing.assert_allclose(positive_probability(z, "linear"), [1 / (1 + np.e ** 2), 0.5, 1.0])
    z2 = np.array([[1.0, 3.0], [-900.0, 900.0]])
    np.testing.assert_allclose(positive_probability(z2, "linear"), [1 / (1 + np.e ** -2), 1.0])
    np.testing.assert_allclose(positive_probability(np.array([[0.2, 0.9]])), [0.9])  # unit 1 of a sigmoid


def test_the_effective_model_of_a_cell():
    assert atlas.effective_model("sigmoid", 2, "binary_crossentropy", False, "expected") == (
        "two independent logistic regressions, one per unit; P(class 1) read as unit 1's sigmoid")
    assert atlas.effective_model("linear", 1, "binary_crossentropy", False, "expected").startswith(
        "outputs taken as probabilities: z clipped to [1e-7, 1 - 1e-7]")
    assert atlas.effective_model("softmax", 2, "categorical_crossentropy", True, "expected").startswith(
        "from_logits ignored")
    assert "constant" in atlas.effective_model("softmax", 1, "binary_crossentropy", False, "expected")
    assert atlas.effective_model("linear", 2, "categorical_crossentropy", False, "column") == (
        "labels do not fit: a 0/1 column (N x 1) against 2 outputs")


TOLD = (TrialConfig(**BASE, activation="sigmoid", units=1, from_logits=True),
        TrialConfig(**BASE, activation="linear", units=1, from_logits=True),
        TrialConfig(**BASE, activation="softmax", units=2, loss="categorical_crossentropy", from_logits=True),
        TrialConfig(**BASE, activation="linear", units=2, loss="sparse_categorical_crossentropy",
                    from_logits=True))


def test_heads_as_written_go_to_keras():
    assert engine_for(RAW_LINEAR) == engine_for(REFUSED) == "keras"
    assert {engine_for(c) for c in TOLD} == {"fused"}


@pytest.mark.parametrize("config", [*TOLD[:2], *(pytest.param(c, marks=pytest.mark.slow) for c in TOLD[2:])],
                         ids=naming.trial_run_name)
def test_a_loss_on_logits_trains_fused_as_keras_trains_it(config, data):
    # Keras reads a sigmoid's or a softmax's cached logits whatever from_logits says; a linear
    # head's are its outputs (and Keras's accuracy thresholds a 1-unit head's logit at 0.5)
    x, y = data
    result = FusedEngine().train_many([config], x, y)[0]
    expected = KerasEngine().train(config, make_split(x, y, 0.2, 0, False))
    assert result.engine == "fused"
    for metric in EPOCH_METRICS:
        np.testing.assert_allclose(result.history[metric], expected.history[metric], atol=1e-4,
                                   err_msg=metric)


def trial_frame(configs, outcomes) -> pd.DataFrame:
    """Trials as :func:`pipeline.runs.trial_records` reads them from their runs."""
    rows = []
    for i, (config, outcome) in enumerate(zip(configs, outcomes, strict=True)):
        failed = isinstance(outcome, Exception)
        finals = {f"final_{m}": (np.nan if failed else outcome.final(m)) for m in EPOCH_METRICS}
        rows.append({"run_id": f"run{i}", "status": "FAILED" if failed else "FINISHED", "pruned": False,
                     "collapsed": (not failed) and outcome.collapsed, **config.params(), **finals,
                     "positive_fraction": np.nan if failed else outcome.positive_fraction,
                     "error": f"{type(outcome).__name__}: {outcome}" if failed else ""})
    return pd.DataFrame(rows)


def test_verdicts_of_real_heads(data):
    x, y = data
    frame = trial_frame(CELLS, FusedEngine().train_many(CELLS, x, y))
    cells = atlas.cell_verdicts(frame)
    verdict = {(c.activation, c.units): c.verdict for c in cells.itertuples(index=False)}
    assert verdict["softmax", 1] == "collapsed"
    assert verdict["softmax", 2] == "refused"
    refused = cells[cells["verdict"] == "refused"].iloc[0]
    assert "must have the same shape" in refused["note"] and "(None, 1)" in refused["note"]
    assert verdict["linear", 1] != "healthy"  # the raw outputs read as probabilities
    assert verdict["sigmoid", 1] == "healthy"
    header, rows = atlas_rows(frame)
    assert len(rows) == 4
    assert header[:6] == ["activation", "units", "loss", "from_logits", "labels", "verdict"]
    row = {r[0] + r[1]: r for r in rows}
    assert row["softmax2"][5] == "refused" and row["softmax2"][8] == "–"
    assert "must have the same shape" in row["softmax2"][-1]
    assert row["sigmoid1"][12] == "logistic regression on z"


def judged_trial(activation, accuracy, keras, run, status="FINISHED", error=""):
    """One trial record of a cell as :func:`pipeline.runs.trial_records` gives it."""
    return {"run_id": run, "status": status, "pruned": False, "collapsed": False, "error": error,
            "positive_fraction": 0.5,
            **TrialConfig(activation=activation).params(), "final_loss": 0.5, "final_val_loss": 0.5,
            "final_val_accuracy": accuracy, "final_keras_val_accuracy": keras}


def verdicts_of(frame: pd.DataFrame) -> dict[str, str]:
    cells = atlas.cell_verdicts(frame)
    return dict(zip(cells["activation"], cells["verdict"], strict=True))


def test_a_misleading_metric_and_a_poor_head_are_told_apart():
    trial = judged_trial
    frame = pd.DataFrame([trial("sigmoid", 0.90, 0.90, "a"), trial("softmax", 0.60, 0.60, "b"),
                          trial("linear", 0.895, 0.70, "c")])
    assert verdicts_of(frame) == {"sigmoid": "healthy", "softmax": "degenerate",
                                  "linear": "trains but metric misleading"}


def test_an_interrupted_attempt_does_not_make_its_cell_refused():
    # A trial interrupted and run again leaves a KILLED run beside its finished one.
    frame = pd.DataFrame([judged_trial("sigmoid", 0.90, 0.90, "a", "KILLED", "lost: interrupted"),
                          judged_trial("sigmoid", 0.90, 0.90, "b"),
                          judged_trial("softmax", 0.90, 0.90, "c", "FAILED", "ValueError: refused")])
    assert verdicts_of(frame) == {"sigmoid": "healthy", "softmax": "refused"}


def test_no_cell_is_healthy_when_none_beats_the_majority_class():
    frame = pd.DataFrame([judged_trial("sigmoid", 0.45, 0.45, "a"), judged_trial("softmax", 0.40, 0.40, "b")])
    assert verdicts_of(frame) == {"sigmoid": "degenerate", "softmax": "degenerate"}


def test_the_atlas_view_groups_runs_by_verdict():
    tags = naming.experiment_tags("d", 0, naming.views_for("atlas"))
    view = json.loads(tags[naming.SAVED_VIEW + "atlas"])
    state = json.loads(view["state"])
    assert state["groupBy"] == {"aggregateFunction": "average",
                                "groupByKeys": [{"mode": "tag", "groupByData": naming.VERDICT}]}
    assert "tags.`atlas.verdict`" in state["selectedColumns"]
    assert "metrics.`keras_val_accuracy`" in state["selectedColumns"]


@pytest.mark.slow
def test_an_atlas_sweep_tags_its_verdicts_and_exports_its_table(tracking, tmp_path):
    x, y = make_features()
    features = write_features(tmp_path / "f.h5", x, y, {})
    spec = {"name": "atlas-t", "experiment": "atlas-exp", "report": "atlas", "seeds": [0, 1],
            "fixed": BASE,
            "space": [{"activation": "softmax", "units": 1},
                      {"activation": "softmax", "units": 2, "loss": "categorical_crossentropy",
                       "labels": "column"},
                      {"activation": ["sigmoid", "linear"], "units": 1}]}
    path = tmp_path / "atlas.yaml"
    path.write_text(yaml.safe_dump(spec))
    outcome = run_sweep(str(features), str(path), progress=False)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`{naming.PARENT}` = '{outcome.parent_run_id}'")
    by_name = {r.info.run_name: r.data.tags for r in runs}
    assert len(by_name) == 8
    assert by_name["softmax-1u-bce-lr1e-2-glorot-adam-s0"][naming.VERDICT] == "collapsed"
    assert by_name["softmax-2u-cce-lr1e-2-glorot-adam-y-column-s1"][naming.VERDICT] == "refused"
    assert by_name["sigmoid-1u-bce-lr1e-2-glorot-adam-s0"][naming.VERDICT] == "healthy"
    sigmoid = by_name["sigmoid-1u-bce-lr1e-2-glorot-adam-s0"]
    assert sigmoid[naming.EFFECTIVE_MODEL] == "logistic regression on z"
    assert by_name["linear-1u-bce-lr1e-2-glorot-adam-s0"][naming.ENGINE] == "keras"
    export(outcome.parent_run_id, str(tmp_path / "out"), "md,tex", log_to_run=False)
    report = (tmp_path / "out" / "findings.md").read_text()
    assert "## The head atlas" in report and "python -m pipeline sweep --features" in report
    assert "| softmax | 2 | cce | false | column | refused | 0/2 |" in report
    assert naming.SAVED_VIEW + "atlas" in mlflow.get_experiment_by_name("atlas-exp").tags
    assert "The head atlas" in (tmp_path / "out" / "findings.tex").read_text()
