"""The private Optuna attributes the exact-budget queue needs, in one place.

Optuna's public ``study.ask()`` claims a WAITING trial but creates a new one when the queue is
empty; a study shared by many workers must run exactly its budget, so a worker claims with the
storage's atomic WAITING -> RUNNING transition alone (:func:`take_waiting`), the step of
``ask()``'s pop, and builds the trial from its id.
Heartbeats and a lost trial's state need the storage and the trial's id, which Optuna keeps
private too. tests/test_optuna_internals.py fails, naming the attribute, when an Optuna release
changes one of them.
"""

from __future__ import annotations

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

# What each function below reads: (the object's type, the attribute).
USED = (("Study", "_storage"), ("Study", "_thread_local"), ("Trial", "_trial_id"),
        ("FrozenTrial", "_trial_id"))


def take_waiting(study: optuna.Study, waiting: FrozenTrial) -> bool:
    """Claim a trial listed WAITING: the storage's atomic WAITING -> RUNNING, as ``ask()``'s pop
    makes it. False when another worker took or finished it first."""
    try:
        return study._storage.set_trial_state_values(waiting._trial_id, state=TrialState.RUNNING)
    except UpdateFinishedTrialError:
        return False


def forget_cached_trials(study: optuna.Study) -> None:
    """Drop the study's per-thread cache of its trials, as ``ask()`` does after a claim, so that
    the sampler sees the latest trials."""
    study._thread_local.cached_all_trials = None


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study reads and writes."""
    return study._storage


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """A trial's id in its storage (its number counts within the study; the id across studies)."""
    return trial._trial_id


def retries_of(trial: optuna.Trial) -> tuple[int, ...]:
    """The numbers of the earlier attempts that ``trial`` runs again (Optuna's system attr
    ``retry_history``, which its retry callback writes; empty for a first attempt), as the trial
    read them when it was claimed."""
    return tuple(trial._cached_frozen_trial.system_attrs.get("retry_history", ()))
