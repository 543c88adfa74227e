"""Run names, descriptions and the UI's saved views, as a reader of the MLflow UI meets them."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import mlflow
import pytest

from pipeline import naming
from pipeline.config import ParityConfig, TrialConfig
from pipeline.kinds import kind_of
from pipeline.sweep_file import load_sweep
from pipeline.tracking import describe_experiment
from tests.helpers import SMALL_STUDY, write_sweep

PARITY_STUDY = {"name": "par", "experiment": "par-exp", "kind": "parity",
                "description": "Does the sigmoid follow the softmax?",
                "fixed": {"epochs": 2}, "space": {"optimizer": ["sgd", "adam"], "ratio": [1, 2]}}


@pytest.mark.parametrize(("value", "text"), [(0.001, "1e-3"), (0.0025, "2.5e-3"), (0.1, "1e-1"),
                                             (2.0, "2e0"), (1.5e-5, "1.5e-5")])
def test_learning_rates_read_short_and_exact(value, text):
    assert naming.format_lr(value) == text


@pytest.mark.parametrize(("config", "name"), [
    (TrialConfig(activation="softmax", units=1, loss="binary_crossentropy", learning_rate=1e-3),
     "softmax-1u-bce-lr1e-3-glorot-s0"),
    (TrialConfig(activation="softmax", units=2, loss="categorical_crossentropy", learning_rate=0.05,
                 seed=2, optimizer="adam"), "softmax-2u-cce-lr5e-2-glorot-adam-s2"),
    (TrialConfig(activation="sigmoid", units=1, loss="binary_crossentropy", learning_rate=2e-3,
                 init="transfer", seed=1), "sigmoid-1u-bce-lr2e-3-transfer-s1"),
    (TrialConfig(activation="softmax", units=1, loss="sparse_categorical_crossentropy",
                 init="he_normal"), "softmax-1u-scce-lr1e-3-he-s0"),
])
def test_trial_runs_are_named_for_their_config(config, name):
    assert naming.trial_run_name(config) == name


def test_parity_runs_name_only_the_settings_off_their_defaults():
    assert naming.parity_run_name(ParityConfig()) == "parity-sgd-lr1e-2-x2-s0"
    broken = ParityConfig(optimizer="adamw", learning_rate=1e-3, ratio=4, weight_decay=0.01,
                          sigmoid_decay_scale=0.5, share_masks=False, transfer_bias=False, seed=3)
    assert (naming.parity_run_name(broken)
            == "parity-adamw-lr1e-3-x4-wd0.01-decay0.5-own-masks-no-bias-transfer-s3")


def test_parity_heads_are_named_for_their_role_once():
    heads = ParityConfig().heads()
    names = {role: naming.parity_head_run_name(role, head) for role, head in heads.items()}
    assert names == {"softmax": "softmax-2u-cce-lr1e-2-glorot-s0",
                     "sigmoid_transfer": "sigmoid_transfer-1u-bce-lr2e-2-transfer-s0",
                     "sigmoid_random": "sigmoid_random-1u-bce-lr2e-2-glorot-s0"}


def test_parent_runs_are_named_for_the_sweep_and_its_start():
    when = datetime(2026, 3, 4, 5, 6, tzinfo=UTC)
    assert naming.parent_run_name("default", when) == "default-20260304-0506"


@pytest.mark.parametrize(("config", "role"), [
    (TrialConfig(activation="softmax", units=1), "softmax_1unit"),
    (TrialConfig(activation="softmax", units=2, loss="categorical_crossentropy"), "softmax"),
    (TrialConfig(activation="sigmoid", units=1, init="transfer"), "sigmoid_transfer"),
    (TrialConfig(activation="sigmoid", units=1), "sigmoid_random"),
    (TrialConfig(activation="sigmoid", units=2), None),
    (TrialConfig(activation="sigmoid", units=1, loss="categorical_crossentropy"), None),
    (TrialConfig(activation="linear", units=1), None),
    (TrialConfig(activation="softmax", units=2, loss="categorical_crossentropy", labels="column"), None),
])
def test_role_of_each_head(config, role):
    assert naming.role_of(config) == role


def test_trial_descriptions_say_what_was_trained_and_what_to_look_at():
    collapsed = naming.head_description(TrialConfig(activation="softmax", units=1), 3, "tiny")
    assert collapsed.startswith("Trial 3 of sweep `tiny`: a softmax over one unit trained with "
                                "binary_crossentropy (sgd, lr 1e-3, glorot_uniform init, seed 0, 5 epochs).")
    assert collapsed.endswith(naming.ROLE_NOTES["softmax_1unit"])
    other = naming.head_description(TrialConfig(activation="sigmoid", units=2), 0, "tiny")
    assert "over 2 units" in other and not any(note in other for note in naming.ROLE_NOTES.values())
    parity = naming.parity_description(ParityConfig(learning_rate=0.05, ratio=4), 7, "par")
    assert parity.startswith("Trial 7 of sweep `par`: one parity experiment (the softmax at lr 5e-2, "
                             "the transferred and the random sigmoid at 4x it")


@pytest.mark.parametrize(("kind", "objective", "sentence"), [
    ("heads", None, "The study minimizes `val_prob_loss`."),
    ("heads", {"metric": "val_accuracy", "direction": "maximize"}, "The study maximizes `val_accuracy`."),
    ("parity", None, "The study minimizes `max_gap_softmax_transfer`."),
    ("parity", {"metric": "beta_distance"}, "The study minimizes `beta_distance`."),
    ("parity", {"direction": "maximize"}, "The study maximizes `max_gap_softmax_transfer`."),
])
def test_parent_description_names_the_resolved_objective(tmp_path, kind, objective, sentence):
    spec = {**(SMALL_STUDY if kind == "heads" else PARITY_STUDY)}
    if objective is not None:
        spec["objective"] = objective
    sweep = load_sweep(write_sweep(tmp_path, spec))
    text = kind_of(sweep).parent_description(sweep)
    assert text.startswith(spec["description"] + "\n\n**How to read it.** Each nested run is one trial: ")
    assert sentence in text
    assert "None" not in text
    assert ("a parity experiment" in text) == (kind == "parity")
    assert text.endswith("(`python -m pipeline export`)." if kind == "parity"
                         else "The experiment's *Views* menu holds the columns and filters above.")


@pytest.mark.parametrize("text", ["../../etc/passwd", "a/b\\c", "run\x00name", "...", ""])
def test_safe_filename_is_one_harmless_path_component(text):
    name = naming.safe_filename(text)
    assert name and "/" not in name and "\\" not in name and "\x00" not in name
    assert not name.startswith(".")


def test_experiment_tags_set_up_the_ui_once_and_keep_a_users_edit(tracking):
    experiment = mlflow.MlflowClient().create_experiment("naming-exp")
    describe_experiment(experiment, "What the study asks.")
    tags = mlflow.MlflowClient().get_experiment(experiment).tags
    assert tags[naming.NOTE] == "What the study asks."
    assert tags[naming.EXPERIMENT_KIND] == "custom_model_development"
    views = {key[len(naming.SAVED_VIEW):]: json.loads(value) for key, value in tags.items()
             if key.startswith(naming.SAVED_VIEW)}
    assert set(views) == {"heads", "parity"}  # the atlas's only where an atlas study runs
    heads, parity = json.loads(views["heads"]["state"]), json.loads(views["parity"]["state"])
    assert heads["selectedColumns"] == parity["selectedColumns"]
    assert "params.`activation`" in heads["selectedColumns"]
    assert "metrics.`val_prob_loss`" in heads["selectedColumns"]
    assert f"tags.`{naming.ROLE}`" in heads["selectedColumns"]
    assert parity["searchFilter"] == "tags.`parity.role` != 'softmax_1unit'"
    assert parity["chartsSearchFilter"] == "loss"

    mlflow.MlflowClient().set_experiment_tag(experiment, naming.NOTE, "edited in the UI")
    describe_experiment(experiment, "What the study asks.", naming.views_for("atlas"))
    tags = mlflow.MlflowClient().get_experiment(experiment).tags
    assert tags[naming.NOTE] == "edited in the UI" and naming.SAVED_VIEW + "atlas" in tags


def test_an_empty_description_sets_no_note():
    assert naming.NOTE not in naming.experiment_tags("  ", 0)
