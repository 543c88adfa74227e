"""The parity experiment: exact at ratio 2 for every optimizer, broken and restored as claimed."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from pipeline import cli, naming
from pipeline.config import PARITY_METRICS, ParityConfig, TrialConfig
from pipeline.engine_keras import KerasEngine
from pipeline.findings import BREAKERS, EXACT, matching
from pipeline.parity import ROLES, train_parity
from pipeline.results import TrialResult
from pipeline.split import make_split
from pipeline.sweep_file import load_sweep
from tests.helpers import make_features

OPTIMIZERS = {"sgd": 0.05, "momentum": 0.05, "nesterov": 0.05, "adagrad": 0.05, "adam": 0.005,
              "rmsprop": 0.005, "adamw": 0.005, "adadelta": 1.0}
SMALL = {"epochs": 5, "batch_size": 32, "dropout": 0.5}


@pytest.fixture(scope="module")
def split():
    x, y = make_features(n=200, d=24, seed=4)
    return make_split(x, y, 0.2, seed=0, standardized=True)


class OnceEach(KerasEngine):
    """The Keras reference, training each head config once on the module's one split: parity
    experiments share heads (the ratios of an optimizer, and most breakers and their
    corrections, differ only in the sigmoids: 65 heads of 81 here), and a config trained twice
    on one split gives the same result (test_engine_keras checks)."""

    def __init__(self):
        super().__init__()
        self.trained: dict[TrialConfig, TrialResult] = {}

    def train(self, config: TrialConfig, split, on_epoch=None) -> TrialResult:
        if config not in self.trained:
            self.trained[config] = super().train(config, split, on_epoch)
        return self.trained[config]


_engine = OnceEach()
_cache: dict[ParityConfig, dict[str, float]] = {}


def summary(split, **settings) -> dict[str, float]:
    """The summary of one parity experiment on the module's split (memoised: rows share a base)."""
    config = ParityConfig(**(SMALL | settings))
    if config not in _cache:
        _cache[config] = train_parity(config, split, _engine).summary()
    return _cache[config]


def test_heads_of_a_parity_config():
    heads = ParityConfig(optimizer="adamw", learning_rate=0.01, ratio=2, weight_decay=0.1,
                         sigmoid_decay_scale=0.5, l2=0.2, sigmoid_l2_scale=0.5, share_masks=False,
                         seed=3).heads()
    soft, transfer, rand = (heads[r] for r in ROLES)
    assert (soft.activation, soft.units, soft.loss) == ("softmax", 2, "categorical_crossentropy")
    assert (transfer.init, rand.init) == ("transfer", "glorot_uniform")
    assert transfer.learning_rate == pytest.approx(2 * soft.learning_rate)
    assert (soft.weight_decay, transfer.weight_decay) == pytest.approx((0.1, 0.05))
    assert (soft.l2, transfer.l2) == pytest.approx((0.2, 0.1))
    assert soft.dropout_seed == 3 and transfer.dropout_seed != 3 and transfer.batch_seed == 3
    # AdamW's default decay is what gets scaled when none is given
    assert ParityConfig(optimizer="adamw", sigmoid_decay_scale=0.5).heads()[
        "sigmoid_transfer"].weight_decay == pytest.approx(0.002)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_ratio_two_is_exact_for_every_optimizer(split, optimizer):
    # AdamW's decoupled decay is not scale-free: at equal decay it is a breaker (tested below),
    # so its exact case halves the sigmoid's decay.
    decay = {"sigmoid_decay_scale": 0.5} if optimizer == "adamw" else {}
    exact = summary(split, optimizer=optimizer, learning_rate=OPTIMIZERS[optimizer], **decay)
    assert set(exact) == set(PARITY_METRICS)
    assert exact["max_gap_softmax_transfer"] <= EXACT
    assert exact["max_step_gap_softmax_transfer"] <= EXACT
    assert exact["beta_distance"] <= EXACT and exact["bias_distance"] <= EXACT
    assert exact["max_prob_gap"] <= EXACT
    # the start matters and the heads do move, so the equality above is not vacuous
    assert exact["max_gap_transfer_random"] > 100 * EXACT


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("ratio", [1.0, 4.0])
def test_other_ratios_are_not_exact(split, optimizer, ratio):
    off = summary(split, optimizer=optimizer, learning_rate=OPTIMIZERS[optimizer], ratio=ratio)
    assert off["max_gap_softmax_transfer"] > 100 * EXACT


RESTORED = {  # what docs/parity.md claims for each row of findings.BREAKERS
    "halve the sigmoid's decay": True,
    "halve the sigmoid's L2": {"sgd": True, "momentum": True, "adam": False},
    "halve the sigmoid's L2 and start the softmax at w0 = -w1": True,
    "none needed (compared with no smoothing)": True,
    "share the masks": True,
    "transfer b = b1 - b0": True,
    "share the order": True,
}


@pytest.mark.slow
@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda b: f"{b.name}-{b.optimizer}-{b.correction}")
def test_breakers_break_and_corrections_restore_as_documented(split, breaker):
    lr = OPTIMIZERS[breaker.optimizer]
    broken = summary(split, optimizer=breaker.optimizer, learning_rate=lr, **breaker.broken)
    fixed = summary(split, optimizer=breaker.optimizer, learning_rate=lr, **breaker.corrected)
    judged = ("max_prob_gap", "beta_distance")
    if "smoothing" in breaker.name:  # equal smoothing on both heads keeps the parity
        assert max(broken[m] for m in judged) <= EXACT
    else:
        assert max(broken[m] for m in judged) > 10 * EXACT
    expected = RESTORED[breaker.correction]
    restored = expected if isinstance(expected, bool) else expected[breaker.optimizer]
    assert (max(fixed[m] for m in judged) <= EXACT) is restored


def test_breakers_study_holds_every_pair():
    import pandas as pd

    spec = load_sweep("sweeps/breakers.yaml")
    points = pd.DataFrame([spec.trial_config(p).params() | {"status": "FINISHED"} for p in spec.grid()])
    for breaker in BREAKERS:
        for settings in (breaker.broken, breaker.corrected):
            assert not matching(points, breaker.optimizer, settings).empty, (breaker, settings)


def test_parity_study_is_optimizers_by_ratios_by_seeds():
    spec = load_sweep("sweeps/parity.yaml")
    configs = [spec.trial_config(p) for p in spec.grid()]
    assert spec.kind == "parity" and len(configs) == 8 * 4 * 3
    assert {c.optimizer for c in configs} == set(OPTIMIZERS)
    assert {c.ratio for c in configs} == {0.5, 1.0, 2.0, 4.0}
    assert {c.seed for c in configs} == {0, 1, 2}


def test_parity_entry_point_records_three_nested_runs_and_the_gaps(tracking, features_file, capsys):
    cli.main(["parity", "--features", str(features_file), "--optimizer", "adam",
              "--learning_rate", "0.01", "--epochs", "3", "--batch_size", "32"])
    client = mlflow.MlflowClient()
    parents = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                 filter_string=f"tags.`{naming.STEP}` = 'parity'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "parity-adam-lr1e-2-x2-s0"
    assert parent.data.params["optimizer"] == "adam" and parent.data.params["ratio"] == "2.0"
    gaps = client.get_metric_history(parent.info.run_id, "gap_softmax_transfer")
    assert [p.step for p in gaps] == [0, 1, 2] and max(p.value for p in gaps) <= EXACT
    assert len(client.get_metric_history(parent.info.run_id, "gap_transfer_random")) == 3
    assert parent.data.metrics["max_gap_softmax_transfer"] == pytest.approx(max(p.value for p in gaps))
    assert parent.data.metrics["beta_distance"] <= EXACT
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert figures == {"figures/loss_curves.png", "figures/loss_gaps.png"}

    children = mlflow.search_runs(experiment_ids=[parent.info.experiment_id], output_format="list",
                                  filter_string=f"tags.`{naming.PARENT}` = '{parent.info.run_id}'")
    roles = {run.data.tags[naming.ROLE]: run for run in children}
    assert set(roles) == set(ROLES)
    soft, transfer = roles["softmax"], roles["sigmoid_transfer"]
    assert float(transfer.data.params["learning_rate"]) == pytest.approx(
        2 * float(soft.data.params["learning_rate"]))
    for run in children:
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "loss")) == 3
        steps = client.get_metric_history(run.info.run_id, "step_loss")
        assert len(steps) == 3 * int(np.ceil(0.8 * 240 / 32))
    soft_loss = [p.value for p in client.get_metric_history(soft.info.run_id, "loss")]
    transfer_loss = [p.value for p in client.get_metric_history(transfer.info.run_id, "loss")]
    np.testing.assert_allclose(soft_loss, transfer_loss, atol=EXACT)
    assert "max |softmax - sigmoid_transfer| loss gap" in capsys.readouterr().err


def test_parity_entry_point_rejects_a_bad_setting_before_any_run(tracking, features_file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["parity", "--features", str(features_file), "--optimizer", "lbfgs"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: parity: optimizer: 'lbfgs' is not allowed (allowed: sgd,")
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


# --- heads with a hidden layer ---------------------------------------------------------------

DEEP = {"hidden_units": 8, "hidden_activation": "relu"}


def test_deep_heads_train_their_output_layer_at_the_ratio_and_their_body_by_scope():
    output = ParityConfig(**DEEP, learning_rate=0.01, ratio=2).heads()
    every = ParityConfig(**DEEP, learning_rate=0.01, ratio=2, ratio_scope="all").heads()
    for heads in (output, every):
        assert {h.hidden_units for h in heads.values()} == {8}
        assert heads["softmax"].body_rate == pytest.approx(0.01)
        assert heads["sigmoid_transfer"].learning_rate == pytest.approx(0.02)
    assert output["sigmoid_transfer"].body_rate == pytest.approx(0.01)
    assert output["sigmoid_random"].body_rate == pytest.approx(0.01)
    assert every["sigmoid_transfer"].body_rate == pytest.approx(0.02)
    assert not every["sigmoid_transfer"].two_rates  # one optimizer, as a linear head has
    # without a hidden layer the scope changes nothing: the same heads, the same names
    flat = ParityConfig(learning_rate=0.01, ratio_scope="all")
    assert flat.heads() == ParityConfig(learning_rate=0.01).heads()
    assert naming.parity_run_name(flat) == "parity-sgd-lr1e-2-x2-s0"
    assert naming.parity_run_name(ParityConfig(**DEEP, ratio_scope="all")) == \
        "parity-sgd-h8relu-lr1e-2-x2-scope-all-s0"


@pytest.mark.parametrize("settings", [{"hidden_units": -1}, {"hidden_units": True},
                                      {"hidden_activation": "softmax"}, {"ratio_scope": "body"}])
def test_deep_settings_are_validated(settings):
    with pytest.raises(ValueError):
        ParityConfig(**settings)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_deep_parity_doubles_the_output_layer_only(split, optimizer):
    lr = OPTIMIZERS[optimizer]
    exact = summary(split, optimizer=optimizer, learning_rate=lr, **DEEP)
    assert exact["max_gap_softmax_transfer"] <= EXACT and exact["max_step_gap_softmax_transfer"] <= EXACT
    assert exact["beta_distance"] <= EXACT and exact["max_prob_gap"] <= EXACT
    assert exact["max_gap_transfer_random"] > 100 * EXACT
    doubled = summary(split, optimizer=optimizer, learning_rate=lr, ratio_scope="all", **DEEP)
    assert doubled["max_gap_softmax_transfer"] > 1000 * EXACT and doubled["max_prob_gap"] > 1000 * EXACT


def test_parity_deep_study_is_optimizers_by_ratio_and_scope_by_seeds():
    spec = load_sweep("sweeps/parity_deep.yaml")
    configs = [spec.trial_config(p) for p in spec.grid()]
    assert spec.kind == "parity" and spec.report == "parity_deep" and len(configs) == 8 * 3 * 3
    assert {c.optimizer for c in configs} == set(OPTIMIZERS)
    assert {(c.ratio, c.ratio_scope) for c in configs} == {(1.0, "output"), (2.0, "output"), (2.0, "all")}
    assert {c.hidden_units for c in configs} == {32} and {c.seed for c in configs} == {0, 1, 2}


def test_parity_entry_point_takes_the_deep_settings():
    args = cli.build_parser().parse_args(["parity", "--features", "f.h5", "--hidden_units=16",
                                          "--hidden_activation=tanh", "--ratio_scope=all"])
    config = cli.parity_config({n: getattr(args, n) for n in ParityConfig.model_fields})
    assert (config.hidden_units, config.hidden_activation, config.ratio_scope) == (16, "tanh", "all")
    with pytest.raises(cli.UserError, match="ratio_scope: 'body' is not allowed"):
        cli.parity_config({"ratio_scope": "body"})


@pytest.mark.slow
def test_parity_entry_point_records_a_deep_experiment(tracking, features_file):
    cli.main(["parity", "--features", str(features_file), "--optimizer", "adam", "--learning_rate",
              "0.01", "--epochs", "2", "--batch_size", "32", "--hidden_units", "4"])
    parent = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                filter_string=f"tags.`{naming.STEP}` = 'parity'")[0]
    assert parent.info.run_name == "parity-adam-h4relu-lr1e-2-x2-s0"
    assert parent.data.params["hidden_units"] == "4" and parent.data.params["ratio_scope"] == "output"
    assert parent.data.metrics["max_gap_softmax_transfer"] <= EXACT
    assert parent.data.metrics["max_prob_gap"] <= EXACT
    children = mlflow.search_runs(experiment_ids=[parent.info.experiment_id], output_format="list",
                                  filter_string=f"tags.`{naming.PARENT}` = '{parent.info.run_id}'")
    transfer = next(r for r in children if r.data.tags[naming.ROLE] == "sigmoid_transfer")
    assert transfer.data.params["body_learning_rate"] == "0.01"
    assert {r.data.tags[naming.ENGINE] for r in children} == {"keras"}
