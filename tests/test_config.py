"""Sweep-file validation: one-line UserErrors naming the key, and the grid a valid file gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import TrialConfig
from pipeline.errors import UserError
from pipeline.sweep_file import FloatRange, load_sweep, parse_sweep, sweep_path

REPO = Path(__file__).resolve().parents[1]
BASE = {"name": "t", "experiment": "e"}


def sweep(**keys) -> dict:
    """A minimal valid sweep mapping, with ``keys`` added or replaced."""
    return {**BASE, "space": {"activation": ["sigmoid"]}, **keys}


def rejected(raw, *fragments: str) -> str:
    """Assert ``parse_sweep(raw)`` raises a one-line UserError containing every fragment."""
    with pytest.raises(UserError) as info:
        parse_sweep(raw)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


# --- rejections --------------------------------------------------------------------------------

def test_unknown_top_level_key_names_key_and_allowed():
    rejected(sweep(bogus=1), "bogus", "unknown key", "allowed:", "space", "fixed", "sampler")


def test_unknown_key_in_fixed():
    rejected(sweep(fixed={"lr": 0.1}), "fixed.lr", "unknown key", "learning_rate")


def test_unknown_key_in_space_mapping():
    rejected(sweep(space={"activation": ["sigmoid"], "act": ["relu"]}), "space.act", "unknown key",
             "activation")


def test_unknown_key_in_space_list_entry_names_the_entry():
    rejected(sweep(space=[{"units": [1]}, {"untis": [2]}]), "space[1].untis", "unknown key", "units")


def test_seed_is_not_a_searchable_key():
    # seeds are given by the top-level `seeds`, never fixed or searched
    rejected(sweep(fixed={"seed": 3}), "fixed.seed", "unknown key")
    rejected(sweep(space={"seed": [1, 2]}), "space.seed", "unknown key")


def test_epochs_as_word_is_rejected():
    rejected(sweep(fixed={"epochs": "five"}), "fixed.epochs", "integer")


def test_fractional_epochs_rejected():
    rejected(sweep(fixed={"epochs": 2.5}), "fixed.epochs", "integer")


@pytest.mark.parametrize("where", ["fixed", "space"])
def test_units_three_names_allowed_values(where):
    raw = sweep(fixed={"units": 3}) if where == "fixed" else sweep(space={"units": [1, 3]})
    key = "fixed.units" if where == "fixed" else "space.units[1]"
    rejected(raw, key, "3", "allowed: 1, 2")


def test_non_boolean_standardize_rejected():
    rejected(sweep(space={"standardize": ["maybe"]}), "space.standardize[0]", "boolean")


@pytest.mark.parametrize("key", ["units", "epochs", "learning_rate"])
def test_boolean_in_numeric_field_rejected(key):
    rejected(sweep(fixed={key: True}), f"fixed.{key}")


def test_empty_space_mapping():
    rejected(sweep(space={}), "space", "non-empty")


def test_empty_space_list():
    rejected(sweep(space=[]), "space", "empty")


def test_empty_entry_in_space_list():
    rejected(sweep(space=[{"units": [1]}, {}]), "space[1]", "non-empty")


def test_missing_space():
    rejected({**BASE}, "space", "required")


def test_empty_axis_list():
    rejected(sweep(space={"units": []}), "space.units", "empty list")


@pytest.mark.parametrize("value", [0, 0.0, -1e-3])
def test_non_positive_learning_rate_in_fixed(value):
    rejected(sweep(fixed={"learning_rate": value}), "fixed.learning_rate", "greater than 0")


@pytest.mark.parametrize("value", [0, -0.01])
def test_non_positive_learning_rate_in_space(value):
    rejected(sweep(space={"learning_rate": [1e-3, value]}), "space.learning_rate[1]", "greater than 0")


def test_non_positive_learning_rate_in_range():
    raw = sweep(sampler="tpe", n_trials=3,
                space={"learning_rate": {"low": -1.0, "high": 1.0, "log": False}})
    rejected(raw, "space.learning_rate", "greater than 0")


def test_non_finite_learning_rate():
    rejected(sweep(space={"learning_rate": [float("inf")]}), "space.learning_rate[0]", "finite")


@pytest.mark.parametrize(("key", "bad", "allowed"), [
    ("activation", "relu", "sigmoid, softmax"),
    ("loss", "mse", "binary_crossentropy, categorical_crossentropy, sparse_categorical_crossentropy"),
    ("optimizer", "lbfgs", "sgd, momentum, nesterov, adam"),
    ("init", "ones", "glorot_uniform, glorot_centered, zeros, he_normal, transfer"),
])
def test_unknown_choice_names_allowed_values(key, bad, allowed):
    rejected(sweep(fixed={key: bad}), f"fixed.{key}", repr(bad), f"allowed: {allowed}")
    rejected(sweep(space={key: [bad]}), f"space.{key}[0]", repr(bad), f"allowed: {allowed}")


def test_key_both_fixed_and_searched():
    rejected(sweep(fixed={"units": 1}, space={"units": [1, 2]}), "space.units", "also in fixed")


def test_key_both_fixed_and_searched_in_sub_space():
    raw = sweep(fixed={"optimizer": "adam"},
                space=[{"units": [1]}, {"units": [2], "optimizer": ["sgd"]}])
    rejected(raw, "space[1].optimizer", "also in fixed")


def test_range_with_grid_sampler():
    rejected(sweep(space={"learning_rate": {"low": 1e-4, "high": 1e-1}}),
             "space.learning_rate", "grid", "list of values")


def test_range_for_non_float_axis():
    rejected(sweep(sampler="tpe", n_trials=2, space={"units": {"low": 1, "high": 2}}),
             "space.units", "range is allowed only for learning_rate and dropout")


def test_range_low_above_high():
    rejected(sweep(sampler="random", n_trials=2,
                   space={"learning_rate": {"low": 1e-2, "high": 1e-3}}),
             "space.learning_rate", "low must be below high")


def test_list_of_sub_spaces_with_tpe():
    rejected(sweep(sampler="tpe", n_trials=4, space=[{"units": [1]}, {"units": [2]}]),
             "space", "sampler: grid")


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_tpe_and_random_need_n_trials(sampler):
    rejected(sweep(sampler=sampler, space={"units": [1, 2]}), "n_trials", "required", sampler)


def test_unknown_sampler():
    rejected(sweep(sampler="cmaes"), "sampler", "'grid'", "'tpe'", "'random'")


def test_duplicate_seeds():
    rejected(sweep(seeds=[0, 0]), "seeds", "distinct")


def test_not_a_mapping():
    rejected([1, 2], "mapping")


def test_load_sweep_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found") as info:
        load_sweep(tmp_path / "nope.yaml")
    assert "\n" not in str(info.value)


def test_the_projects_sweeps_load_from_any_folder_and_a_local_file_comes_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sweep_path("sweeps/collapse.yaml") == REPO / "sweeps" / "collapse.yaml"
    assert load_sweep("sweeps/default.yaml").name == "default"
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "default.yaml").write_text("name: mine\nexperiment: e\nspace: {units: [1]}\n")
    assert sweep_path("sweeps/default.yaml") == Path("sweeps/default.yaml")
    assert load_sweep("sweeps/default.yaml").name == "mine"
    with pytest.raises(UserError, match="sweep file not found: sweeps/nope.yaml"):
        load_sweep("sweeps/nope.yaml")


def test_load_sweep_invalid_yaml_is_one_line(tmp_path):
    path = write_yaml(tmp_path, "name: t\nspace: {units: [1, 2\n  experiment: e\n")
    with pytest.raises(UserError, match="not valid YAML") as info:
        load_sweep(path)
    assert "\n" not in str(info.value)


def test_load_sweep_error_names_the_file(tmp_path):
    path = write_yaml(tmp_path, "name: t\nexperiment: e\nspace: {units: [3]}\n")
    with pytest.raises(UserError) as info:
        load_sweep(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "space.units[0]" in message and "\n" not in message


# --- valid files -------------------------------------------------------------------------------

def test_default_sweep_loads_and_matches_its_file():
    path = REPO / "sweeps" / "default.yaml"
    raw = yaml.safe_load(path.read_text())
    spec = load_sweep(path)
    assert spec.name == raw["name"] and spec.sampler == "grid"
    assert spec.seeds == tuple(raw["seeds"])
    assert spec.fixed == raw["fixed"]
    assert len(spec.space) == len(raw["space"])


def test_default_sweep_grid_size_is_points_times_seeds():
    path = REPO / "sweeps" / "default.yaml"
    raw = yaml.safe_load(path.read_text())
    points = 0
    for sub in raw["space"]:
        size = 1
        for axis in sub.values():
            size *= len(axis) if isinstance(axis, list) else 1
        points += size
    spec = load_sweep(path)
    assert len(spec.grid()) == points * len(raw["seeds"])
    assert spec.budget() == len(spec.grid())


def test_grid_size_is_cross_product_times_seeds():
    spec = parse_sweep(sweep(seeds=[0, 1, 5], space={"units": [1, 2], "learning_rate": [1e-3, 1e-2, 0.1]}))
    grid = spec.grid()
    assert len(grid) == 2 * 3 * 3
    assert {(p["units"], p["learning_rate"], p["seed"]) for p in grid} == {
        (u, lr, s) for u in (1, 2) for lr in (1e-3, 1e-2, 0.1) for s in (0, 1, 5)}


def test_union_of_sub_grids_dedups():
    spec = parse_sweep(sweep(seeds=[0, 1], space=[{"units": [1, 2]}, {"units": [2]},
                                                   {"units": [1], "activation": ["sigmoid"]}]))
    grid = spec.grid()
    # sub-grid 3 restates the default activation, so all three sub-grids give the same 2 points
    assert len(grid) == 2 * 2
    assert sorted((p["units"], p["seed"]) for p in grid) == [(1, 0), (1, 1), (2, 0), (2, 1)]


def test_sub_grid_leaving_an_axis_out_uses_the_fixed_value():
    spec = parse_sweep(sweep(fixed={"learning_rate": 0.05},
                             space=[{"activation": ["softmax"], "units": [2]},
                                    {"optimizer": ["adam"]}]))
    grid = spec.grid()
    assert len(grid) == 2
    by_opt = {p["optimizer"]: p for p in grid}
    assert by_opt["adam"]["activation"] == "sigmoid" and by_opt["adam"]["units"] == 1
    assert by_opt["sgd"]["activation"] == "softmax" and by_opt["sgd"]["units"] == 2
    assert all(spec.trial_config(p).learning_rate == 0.05 for p in grid)


def test_grid_queues_every_config_at_one_seed_before_the_next_seed():
    spec = parse_sweep(sweep(n_trials=4, seeds=[3, 0], space={"units": [1, 2], "dropout": [0.0, 0.5]}))
    grid = spec.grid()
    assert [p["seed"] for p in grid] == [3] * 4 + [0] * 4
    assert grid[4:] == [p | {"seed": 0} for p in grid[:4]]
    assert {(p["units"], p["dropout"]) for p in grid[:spec.budget()]} == {
        (u, d) for u in (1, 2) for d in (0.0, 0.5)}  # a budget cut covers the whole space


def test_n_trials_caps_a_grid():
    spec = parse_sweep(sweep(n_trials=5, seeds=[0, 1], space={"units": [1, 2], "dropout": [0.0, 0.5]}))
    assert len(spec.grid()) == 8
    assert spec.budget() == 5
    uncapped = parse_sweep(sweep(n_trials=50, seeds=[0, 1], space={"units": [1, 2], "dropout": [0.0, 0.5]}))
    assert uncapped.budget() == 8


def test_load_sweep_n_trials_override(tmp_path):
    path = write_yaml(tmp_path, "name: t\nexperiment: e\nseeds: [0, 1, 2]\nspace: {units: [1, 2]}\n")
    assert load_sweep(path).budget() == 6
    assert load_sweep(path, n_trials=4).budget() == 4


def test_tpe_budget_is_n_trials():
    spec = parse_sweep(sweep(sampler="tpe", n_trials=7,
                             space={"learning_rate": {"low": 1e-4, "high": 1e-1}}))
    assert spec.budget() == 7
    assert spec.axes()["learning_rate"] == FloatRange(low=1e-4, high=1e-1, log=True)


def test_axes_hold_every_grid_value_and_are_the_same_for_every_trial():
    spec = parse_sweep(sweep(seeds=[0, 3], space=[
        {"activation": ["softmax"], "units": [1, 2], "learning_rate": [1e-3]},
        {"activation": ["sigmoid"], "units": [1], "learning_rate": [2e-3], "init": ["transfer", "zeros"]},
    ]))
    axes = spec.axes()
    assert axes == spec.axes()
    assert axes["seed"] == (0, 3)
    assert set(axes["activation"]) == {"softmax", "sigmoid"}
    assert set(axes["learning_rate"]) == {1e-3, 2e-3}
    # the first sub-grid leaves init out, so its default value is a choice too
    assert set(axes["init"]) == {"transfer", "zeros", "glorot_uniform"}
    for point in spec.grid():
        assert set(point) == set(axes)
        for name, value in point.items():
            assert value in axes[name], (name, value)
    for name, choices in axes.items():
        assert len(choices) == len(set(choices)), name


def test_learning_rate_written_1e_minus_3_is_a_float(tmp_path):
    text = ("name: t\nexperiment: e\nfixed: {learning_rate: 1e-3}\n"
            "space: {units: [1, 2]}\n")
    assert yaml.safe_load(text)["fixed"]["learning_rate"] == "1e-3"  # YAML 1.1 reads it as text
    spec = load_sweep(write_yaml(tmp_path, text))
    assert spec.fixed["learning_rate"] == 0.001 and isinstance(spec.fixed["learning_rate"], float)
    assert spec.trial_config(spec.grid()[0]).learning_rate == 0.001


def test_learning_rate_strings_in_space_are_floats(tmp_path):
    text = "name: t\nexperiment: e\nspace: {learning_rate: [1e-3, 2.5e-2]}\n"
    spec = load_sweep(write_yaml(tmp_path, text))
    assert spec.axes()["learning_rate"] == (0.001, 0.025)
    assert all(isinstance(v, float) for v in spec.axes()["learning_rate"])


def test_trial_config_reads_mlflow_string_params():
    config = TrialConfig(activation="softmax", units=2, loss="categorical_crossentropy",
                         learning_rate=0.002, init="zeros", seed=3, optimizer="adam", dropout=0.0,
                         epochs=7, batch_size=16, validation_fraction=0.25, standardize=True)
    as_strings = {key: str(value) for key, value in config.params().items()}
    assert as_strings["units"] == "2"
    back = TrialConfig(**as_strings)
    assert back == config
    assert back.units == 2 and isinstance(back.units, int)


def test_trial_config_rejects_units_text_out_of_range():
    with pytest.raises(ValueError):
        TrialConfig(units="3")


def test_trial_config_from_grid_point_has_seed_and_fixed_values():
    spec = parse_sweep(sweep(seeds=[4], fixed={"epochs": 2, "optimizer": "adam"}, space={"units": [2]}))
    (point,) = spec.grid()
    config = spec.trial_config(point)
    assert (config.seed, config.units, config.epochs, config.optimizer) == (4, 2, 2, "adam")
    assert config.batch_size == TrialConfig().batch_size


def test_grid_point_that_no_head_can_be_is_rejected_before_any_run():
    raw = {"name": "x", "experiment": "e", "fixed": {"label_smoothing": 0.1},
           "space": {"loss": ["binary_crossentropy", "sparse_categorical_crossentropy"]}}
    with pytest.raises(UserError, match="loss=sparse_categorical_crossentropy is not a valid heads config: "
                                        ".*no label smoothing"):
        parse_sweep(raw)


def test_optional_settings_read_back_from_mlflow_strings():
    config = TrialConfig(weight_decay="None", mask_seed="None", order_seed="3", transfer_bias="False")
    assert config.weight_decay is None and config.mask_seed is None
    assert config.batch_seed == 3 and config.dropout_seed == config.seed
    assert config.transfer_bias is False


def test_sweep_files_hold_mlflows_limits():
    """The limits checked before any write are MLflow's own."""
    from mlflow.utils import validation

    from pipeline import sweep_file

    assert sweep_file.MAX_EXPERIMENT_NAME == validation.MAX_EXPERIMENT_NAME_LENGTH
    assert sweep_file.MAX_DESCRIPTION == validation.MAX_EXPERIMENT_TAG_VAL_LENGTH
