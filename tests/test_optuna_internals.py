"""The private Optuna attributes the exact-budget queue reads (pipeline/optuna_internals.py) exist
in the installed Optuna: an Optuna release that changes one fails here, naming it."""

from __future__ import annotations

import optuna
import pytest

from pipeline import optuna_internals


@pytest.fixture
def objects():
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    study.enqueue_trial({})
    trial = optuna.Trial(study, optuna_internals.pop_waiting_trial_id(study))
    return {"Study": study, "Trial": trial, "FrozenTrial": study.trials[0]}


@pytest.mark.parametrize(("owner", "attribute"), optuna_internals.USED)
def test_every_private_attribute_used_exists(objects, owner, attribute):
    assert hasattr(objects[owner], attribute), (
        f"optuna {optuna.__version__}: {owner}.{attribute} is gone; pipeline/optuna_internals.py "
        f"needs another way to claim a queued trial")


def test_the_pop_claims_queued_trials_only_and_never_creates_one():
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    study.enqueue_trial({})
    claimed = optuna_internals.pop_waiting_trial_id(study)
    assert study.trials[0].state == optuna.trial.TrialState.RUNNING
    assert optuna_internals.trial_id(study.trials[0]) == claimed
    assert optuna_internals.pop_waiting_trial_id(study) is None
    assert len(study.trials) == 1
    assert optuna_internals.storage_of(study).get_trial(claimed).number == 0
