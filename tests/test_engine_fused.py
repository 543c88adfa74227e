"""The fused engine against the Keras reference, config by config, and the sweep on it.

Every config is trained by both engines on the same small data; every per-epoch metric, every
step's loss and the final weights must agree within 1e-4. The fused engine reproduces Keras's
dropout masks, so the comparison holds with dropout too.
"""

from __future__ import annotations

import mlflow
import numpy as np
import optuna
import pytest
import tensorflow as tf
import yaml

from pipeline import kernels, naming
from pipeline.config import ParityConfig, TrialConfig
from pipeline.engine_fused import FusedEngine, engine_for, pass_key
from pipeline.engine_keras import EPOCH_METRICS, KerasEngine
from pipeline.features import read_features, write_features
from pipeline.kinds import KINDS
from pipeline.split import make_split
from pipeline.start_weights import initial_weights
from pipeline.sweep import run_sweep
from pipeline.tracking import default_study_storage
from tests.helpers import TINY, load_study, make_features

TOLERANCE = 1e-4
BASE = {"epochs": 3, "batch_size": 32, "learning_rate": 0.05, "dropout": 0.0}
HEADS = [{"activation": a, "units": u, "loss": loss}
         for a in ("sigmoid", "softmax") for u in (1, 2)
         for loss in ("binary_crossentropy", "categorical_crossentropy", "sparse_categorical_crossentropy")
         if not (u == 1 and loss.startswith("sparse"))]
INITS = ("glorot_uniform", "zeros", "he_normal", "glorot_centered")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "rmsprop", "adagrad", "adadelta", "adamw")
SETTINGS = [  # with dropout: the masks must be Keras's too
    {"dropout": 0.5},
    {"dropout": 0.5, "init": "transfer", "learning_rate": 0.1},
    {"dropout": 0.5, "init": "transfer", "transfer_bias": False, "bias_init": "random_normal"},
    {"dropout": 0.3, "l2": 0.01, "activation": "softmax", "units": 2, "loss": "categorical_crossentropy"},
    {"dropout": 0.3, "label_smoothing": 0.2, "units": 2, "loss": "binary_crossentropy"},
    {"dropout": 0.3, "label_smoothing": 0.1, "activation": "softmax", "units": 2,
     "loss": "categorical_crossentropy"},
    {"dropout": 0.5, "weight_decay": 0.05, "optimizer": "adam"},
    {"dropout": 0.5, "optimizer": "adamw", "activation": "softmax", "units": 1},
    {"dropout": 0.5, "mask_seed": 7, "order_seed": 3, "seed": 1},
    {"dropout": 0.5, "batch_size": 36},  # a partial last batch
    {"dropout": 0.5, "activation": "softmax", "units": 1, "validation_fraction": 0.25},  # 60 rows
    {"dropout": 0.5, "standardize": True, "validation_fraction": 0.25, "seed": 2},
    {"dropout": 0.5, "l2": 0.001, "weight_decay": 0.01, "optimizer": "rmsprop", "label_smoothing": 0.1},
    {"dropout": 0.5, "batch_size": 1000},  # one batch an epoch: the batch is the training rows
]
CONFIGS = list(dict.fromkeys(
    [TrialConfig(**BASE, **head) for head in HEADS]
    + [TrialConfig(**BASE, **head, init=init) for init in INITS for head in (HEADS[0], HEADS[8])]
    + [TrialConfig(**BASE, **head, optimizer=opt) for opt in OPTIMIZERS
       for head in (HEADS[0], HEADS[8], {"activation": "softmax", "units": 1})]
    + [TrialConfig(**{**BASE, **setting}) for setting in SETTINGS]))

# The fast subset compares five of them: a collapsing 1-unit softmax, a 2-unit softmax under Adam,
# a transferred sigmoid with dropout, RMSprop with L2, decay and smoothing, and Adadelta; the rest
# are marked slow. QUIRKS are the heads
# test_keras_quirks_are_reproduced_not_fixed and test_train_of_one_head_equals_its_place_in_a_pass read.
FAST = (TrialConfig(**BASE, **HEADS[5]), TrialConfig(**BASE, **HEADS[8], optimizer="adam"),
        TrialConfig(**{**BASE, **SETTINGS[1]}), TrialConfig(**{**BASE, **SETTINGS[12]}),
        TrialConfig(**BASE, **HEADS[0], optimizer="adadelta"))
QUIRKS = (TrialConfig(**BASE, **HEADS[0]), TrialConfig(**BASE, **HEADS[1]), TrialConfig(**BASE, **HEADS[5]))


def name(config: TrialConfig) -> str:
    changed = {k: v for k, v in config.params().items() if v != TrialConfig.model_fields[k].default}
    return ",".join(f"{k}={v}" for k, v in changed.items() if k not in BASE)


@pytest.fixture(scope="module")
def data():
    return make_features(n=240, d=32, seed=0)


@pytest.fixture(scope="module")
def fused(data, request):
    """The configs this session's tests of this module compare (all of them, unless the slow
    ones are deselected) and the ones the quirks test reads, trained by the fused engine in one
    call (several passes)."""
    x, y = data
    compared = {item.callspec.params["config"] for item in request.session.items
                if item.module is request.module and "config" in getattr(getattr(item, "callspec", None),
                                                                          "params", {})}
    configs = [c for c in CONFIGS if c in compared or c in QUIRKS]
    return dict(zip(configs, FusedEngine().train_many(configs, x, y), strict=True))


def reference(config: TrialConfig, data):
    x, y = data
    split = make_split(x, y, config.validation_fraction, config.seed, config.standardize)
    return KerasEngine().train(config, split)


def assert_same(fused_result, keras_result):
    for metric in EPOCH_METRICS:
        np.testing.assert_allclose(fused_result.history[metric], keras_result.history[metric],
                                   rtol=0, atol=TOLERANCE, err_msg=metric)
    np.testing.assert_allclose(fused_result.step_loss, keras_result.step_loss, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(fused_result.kernel, keras_result.kernel, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(fused_result.bias, keras_result.bias, rtol=0, atol=TOLERANCE)
    assert fused_result.collapsed == keras_result.collapsed
    assert fused_result.positive_fraction == keras_result.positive_fraction


@pytest.mark.parametrize("config", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow)
                                    for c in CONFIGS], ids=name)
def test_every_epoch_matches_the_keras_reference(config, fused, data):
    result = fused[config]
    assert result.engine == "fused"
    expected = reference(config, data)
    start, _ = initial_weights(config, data[0].shape[1])
    assert np.abs(expected.kernel - start).max() > 1e-3  # it trained: the comparison is not vacuous
    assert_same(result, expected)


def test_keras_quirks_are_reproduced_not_fixed(fused):
    collapse = fused[TrialConfig(**BASE, activation="softmax", units=1, loss="binary_crossentropy")]
    sigmoid = fused[TrialConfig(**BASE, activation="sigmoid", units=1, loss="binary_crossentropy")]
    # the 1-unit softmax trains exactly as the sigmoid on the logits, while its outputs are all 1.0
    assert collapse.history["loss"] == sigmoid.history["loss"]
    assert collapse.collapsed and not sigmoid.collapsed
    assert len(set(collapse.history["val_prob_loss"])) == 1
    # categorical cross-entropy on one unit is 0, yet its gradient (softmax - label) moves the weights
    zero = fused[TrialConfig(**BASE, activation="sigmoid", units=1, loss="categorical_crossentropy")]
    assert set(zero.history["loss"]) == {0.0}
    assert len(set(zero.history["val_prob_loss"])) == BASE["epochs"]


def test_heads_keras_refuses_fall_back_to_keras_and_raise_its_error(data):
    x, y = data
    sparse = TrialConfig(**BASE, activation="softmax", units=1, loss="sparse_categorical_crossentropy")
    transfer = TrialConfig(**BASE, activation="softmax", units=2, init="transfer")
    assert engine_for(sparse) == engine_for(transfer) == "keras"
    assert engine_for(TrialConfig()) == "fused"
    outcomes = FusedEngine().train_many([sparse, TrialConfig(**BASE), transfer], x, y)
    assert isinstance(outcomes[0], tf.errors.InvalidArgumentError)
    assert outcomes[1].engine == "fused"
    assert isinstance(outcomes[2], ValueError) and "transfer" in str(outcomes[2])
    split = make_split(x, y, 0.2, 0, False)
    with pytest.raises(tf.errors.InvalidArgumentError):
        FusedEngine().train(sparse, split)


def test_heads_with_a_hidden_layer_are_trained_by_keras_and_tagged_so(data):
    x, y = data
    deep = TrialConfig(**BASE, hidden_units=4, hidden_activation="tanh")
    two_rates = deep.model_copy(update={"body_learning_rate": 0.5 * deep.learning_rate})
    assert engine_for(deep) == engine_for(two_rates) == FusedEngine().trained_by(deep) == "keras"
    fused, reference = FusedEngine().train_many([deep, TrialConfig(**BASE)], x, y)
    assert (fused.engine, reference.engine) == ("keras", "fused")
    assert fused.hidden_kernel.shape == (x.shape[1], 4) and fused.kernel.shape == (4, 1)
    assert_same(fused, KerasEngine().train(deep, make_split(x, y, 0.2, deep.seed, False)))
    # a parity trial's tag names the engine of its heads
    parity = ParityConfig(**{k: v for k, v in BASE.items() if k in ParityConfig.model_fields})
    assert KINDS["parity"].trained_by(FusedEngine(), parity) == "fused"
    assert KINDS["parity"].trained_by(FusedEngine(), parity.model_copy(update={"hidden_units": 4})) == "keras"


def test_train_of_one_head_equals_its_place_in_a_pass(fused, data):
    x, y = data
    config = CONFIGS[0]
    alone = FusedEngine().train(config, make_split(x, y, 0.2, config.seed, False))
    assert_same(alone, fused[config])


def test_passes_group_what_must_be_shared():
    config = TrialConfig()
    assert pass_key(config) == pass_key(config.model_copy(update={
        "learning_rate": 0.5, "activation": "softmax", "units": 2, "init": "zeros", "l2": 0.1,
        "label_smoothing": 0.1, "weight_decay": 0.1, "bias_init": "random_normal"}))
    for change in ({"seed": 1}, {"order_seed": 1}, {"mask_seed": 1}, {"dropout": 0.1},
                   {"batch_size": 64}, {"epochs": 2}, {"optimizer": "adam"}, {"standardize": True},
                   {"validation_fraction": 0.3}):
        assert pass_key(config.model_copy(update=change)) != pass_key(config), change


def test_a_callback_that_raises_ends_only_its_head(data):
    x, y = data
    configs = [TrialConfig(**{**BASE, "learning_rate": lr}) for lr in (0.01, 0.05, 0.1)]
    seen = []

    def stop_after_first_epoch(epoch, values):
        seen.append((epoch, values))
        raise optuna.TrialPruned("enough")

    outcomes = FusedEngine().train_many(configs, x, y, [None, stop_after_first_epoch, None])
    assert isinstance(outcomes[1], optuna.TrialPruned)
    assert [epoch for epoch, _ in seen] == [0]
    assert set(seen[0][1]) == set(EPOCH_METRICS)
    alone = FusedEngine().train_many([configs[0], configs[2]], x, y)
    assert_same(outcomes[0], alone[0])
    assert_same(outcomes[2], alone[1])


def test_callbacks_get_each_epochs_metrics(data):
    x, y = data
    calls = []
    result = FusedEngine().train_many([TrialConfig(**BASE)], x, y,
                                      [lambda epoch, values: calls.append((epoch, values))])[0]
    assert [epoch for epoch, _ in calls] == list(range(BASE["epochs"]))
    for metric in EPOCH_METRICS:
        assert [values[metric] for _, values in calls] == result.history[metric]


def test_features_are_trained_on_in_place_not_copied(tmp_path, data, monkeypatch):
    x, y = data
    features = read_features(write_features(tmp_path / "f.h5", x, y, {}))
    seen = []
    train_epoch = kernels.train_epoch
    monkeypatch.setattr(kernels, "train_epoch", lambda x, *args: seen.append(x) or train_epoch(x, *args))
    FusedEngine().train_many([TrialConfig(**BASE)], features.x, features.y)
    assert seen and all(np.shares_memory(x, features.x) for x in seen)


def test_features_of_a_width_apart_from_4_and_odd_types_match_the_reference():
    """Dropout masks where Philox's words straddle rows (30 features), features in float64 and
    labels in int32: the same numbers as the reference."""
    x, y = make_features(n=200, d=30, seed=3)
    config = TrialConfig(**{**BASE, "dropout": 0.5, "batch_size": 48})
    result = FusedEngine().train_many([config], x.astype(np.float64), y.astype(np.int32))[0]
    assert_same(result, reference(config, (x, y)))


# --- the sweep with either engine -----------------------------------------------------------

def sweep_runs(tmp_path, engine: str) -> dict[str, object]:
    """TINY run with ``engine`` in its own store: run name -> (run, metric histories)."""
    x, y = make_features()
    features = write_features(tmp_path / "features.h5", x, y, {})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(yaml.safe_dump({**TINY, "engine": engine}))
    outcome = run_sweep(str(features), str(sweep), storage=str(tmp_path / "journal.log"), progress=False)
    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(experiment_ids=[outcome.experiment_id], output_format="list",
                              filter_string=f"tags.`{naming.PARENT}` = '{outcome.parent_run_id}'")
    study = load_study(str(tmp_path / "journal.log"), outcome.study_name)
    records = {run.info.run_name: (run, {m: [p.value for p in sorted(
        client.get_metric_history(run.info.run_id, m), key=lambda p: p.step)] for m in EPOCH_METRICS})
        for run in runs}
    mlflow.set_tracking_uri(None)
    return outcome, records, study


@pytest.mark.slow
def test_a_sweep_records_the_same_runs_with_either_engine(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the experiments' artifacts go beside their stores, not into the repo
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    keras_outcome, keras_runs, keras_study = sweep_runs(tmp_path / "keras", "keras")
    fused_outcome, fused_runs, fused_study = sweep_runs(tmp_path / "fused", "fused")
    assert keras_outcome.counts == fused_outcome.counts == {"complete": 8, "fail": 2, "pruned": 0}
    assert set(keras_runs) == set(fused_runs)
    ignored = {naming.PARENT, naming.FEATURES_SHA, naming.ENGINE, naming.ERROR}  # compared below
    for run_name, (keras_run, keras_history) in keras_runs.items():
        fused_run, fused_history = fused_runs[run_name]
        assert fused_run.info.status == keras_run.info.status
        assert fused_run.data.params == keras_run.data.params
        assert {k: v for k, v in fused_run.data.tags.items() if k not in ignored} == \
            {k: v for k, v in keras_run.data.tags.items() if k not in ignored}
        errors = [run.data.tags.get(naming.ERROR, "").split(":")[0] for run in (fused_run, keras_run)]
        assert errors[0] == errors[1]  # the same exception (its text holds a call stack)
        assert keras_run.data.tags[naming.ENGINE] == "keras"
        sparse_one_unit = keras_run.data.params["loss"].startswith("sparse")
        assert fused_run.data.tags[naming.ENGINE] == ("keras" if sparse_one_unit else "fused")
        for metric in EPOCH_METRICS:
            np.testing.assert_allclose(fused_history[metric], keras_history[metric], atol=TOLERANCE,
                                       rtol=0, err_msg=f"{run_name} {metric}")
        assert set(fused_run.data.metrics) == set(keras_run.data.metrics)
    for a, b in zip(keras_study.trials, fused_study.trials, strict=True):
        assert a.state == b.state and a.params == b.params
        assert a.value == pytest.approx(b.value, abs=TOLERANCE) if a.value is not None else b.value is None
        assert set(a.user_attrs) == set(b.user_attrs)


def test_an_interrupted_batch_leaves_no_running_run(tmp_path, tracking, monkeypatch):
    x, y = make_features()
    features = write_features(tmp_path / "features.h5", x, y, {})
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(yaml.safe_dump(TINY))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.engine_fused.train_pass", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(str(features), str(sweep), progress=False)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    statuses = {run.data.tags.get(naming.STEP): set() for run in runs}
    for run in runs:
        statuses[run.data.tags.get(naming.STEP)].add(run.info.status)
    assert statuses == {"sweep": {"KILLED"}, "trial": {"KILLED"}}
    study = load_study(default_study_storage())
    states = {t.state for t in study.trials}
    assert optuna.trial.TrialState.RUNNING not in states


