"""The private Optuna attributes the exact-budget queue reads (pipeline/optuna_internals.py) exist
in the installed Optuna: an Optuna release that changes one fails here, naming it."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from pipeline import optuna_internals


@pytest.fixture
def objects():
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    study.enqueue_trial({})
    waiting = study.trials[0]
    assert optuna_internals.take_waiting(study, waiting)
    trial = optuna.Trial(study, optuna_internals.trial_id(waiting))
    return {"Study": study, "Trial": trial, "FrozenTrial": study.trials[0]}


@pytest.mark.parametrize(("owner", "attribute"), optuna_internals.USED)
def test_every_private_attribute_used_exists(objects, owner, attribute):
    assert hasattr(objects[owner], attribute), (
        f"optuna {optuna.__version__}: {owner}.{attribute} is gone; pipeline/optuna_internals.py "
        f"needs another way to claim a queued trial")


def test_taking_a_waiting_trial_claims_it_once_and_never_creates_one():
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    study.enqueue_trial({})
    study.enqueue_trial({})
    first, second = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert optuna_internals.take_waiting(study, first)
    assert [t.state for t in study.trials] == [TrialState.RUNNING, TrialState.WAITING]
    assert not optuna_internals.take_waiting(study, first)  # another worker's claim came first
    study.tell(optuna_internals.trial_id(first), 1.0)
    assert not optuna_internals.take_waiting(study, first)  # already finished
    assert optuna_internals.take_waiting(study, second)
    assert len(study.trials) == 2
    assert optuna_internals.storage_of(study).get_trial(optuna_internals.trial_id(second)).number == 1
