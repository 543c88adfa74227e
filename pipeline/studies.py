"""Optuna studies: storage URLs, create-or-resume, and the trial budget as a queue.

A study's budget is put in its storage as WAITING trials when the study is created: one per
grid point (params fixed), or ``n_trials`` blank ones that the sampler fills in. Workers only
ever take WAITING trials, so a study runs exactly its budget however many processes share it,
and rerunning the same command resumes it: finished trials stay, waiting ones are run.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import optuna
from optuna.trial import TrialState

from pipeline.config import FloatRange, SweepSpec, freeze_params
from pipeline.errors import UserError

JOURNAL_NAME = "optuna-journal.log"
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
SPACE_ATTR = "sweep_space"
FEATURES_ATTR = "features_sha256"
PARENT_ATTR = "mlflow_parent_run_id"


def make_storage(url: str | None) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL.

    ``sqlite:///f.db``, ``postgresql://...`` and ``mysql://...`` give an RDB storage; a path
    (``*.log``/``*.journal``, or ``journal:PATH``) gives a journal file storage, which several
    local processes can share safely. ``None`` is :func:`default_storage`.
    """
    url = url or default_storage()
    scheme = url.split(":", 1)[0].split("+", 1)[0] if "://" in url else ""
    if scheme in RDB_SCHEMES:
        return optuna.storages.RDBStorage(url)
    if "://" in url:
        raise UserError(f"storage '{redact(url)}': unknown scheme (use sqlite:///, postgresql://, "
                        f"mysql:// or a journal file path)")
    path = Path(url.removeprefix("journal:"))
    path.parent.mkdir(parents=True, exist_ok=True)
    backend = optuna.storages.journal.JournalFileBackend(
        str(path), lock_obj=optuna.storages.journal.JournalFileOpenLock(str(path)))
    return optuna.storages.JournalStorage(backend)


def default_storage() -> str:
    """A journal file beside the MLflow store (so a fresh store starts fresh studies).

    ``sqlite:///dir/mlflow.db`` and ``file:///dir`` give ``dir/optuna-journal.log``; a remote
    tracking server gives ``./optuna-journal.log``.
    """
    from urllib.parse import urlparse

    import mlflow

    uri = mlflow.get_tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        return str(Path(uri.removeprefix("sqlite:///")).parent / JOURNAL_NAME)
    if parsed.scheme in ("file", ""):
        return str(Path(parsed.path) / JOURNAL_NAME)
    return JOURNAL_NAME


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to log as a tag)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    """The seeded sampler of a sweep. A grid's points are all enqueued, so it samples nothing."""
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=spec.sampler_seed)
    return optuna.samplers.RandomSampler(seed=spec.sampler_seed)


def open_study(spec: SweepSpec, storage: str | None, name: str | None,
               features_sha: str) -> optuna.Study:
    """Create the study ``name`` (default: the sweep's name) or resume it, and fill its queue.

    Resuming refuses a study made from a different search space or features file, which
    would mix incomparable trials. ``n_trials`` may grow a study: the missing trials are queued.
    """
    name = name or spec.name
    study = optuna.create_study(study_name=name, storage=make_storage(storage),
                                sampler=make_sampler(spec), load_if_exists=True,
                                direction=spec.objective.direction)
    space = json.dumps(describe_space(spec), sort_keys=True)
    attrs = study.user_attrs
    if SPACE_ATTR in attrs:
        if attrs[SPACE_ATTR] != space:
            raise UserError(f"study '{name}' exists with a different search space; resume it with "
                            f"the sweep file it was made from, or choose another --study")
        if attrs.get(FEATURES_ATTR) != features_sha:
            raise UserError(f"study '{name}' was run on another features file "
                            f"(sha256 {str(attrs.get(FEATURES_ATTR))[:12]}...); choose another --study")
    else:
        study.set_user_attr(SPACE_ATTR, space)
        study.set_user_attr(FEATURES_ATTR, features_sha)
        study.set_user_attr("sweep", spec.name)
        study.set_user_attr("objective", spec.objective_metric)
    _fill_queue(study, spec)
    return study


def describe_space(spec: SweepSpec) -> dict:
    """The parts of a sweep that make its trials comparable: axes, fixed settings, objective."""
    axes = {k: (v.model_dump() if isinstance(v, FloatRange) else list(v))
            for k, v in spec.axes().items()}
    return {"axes": axes, "base": spec.base(), "objective": spec.objective.model_dump(),
            "sampler": spec.sampler}


def _fill_queue(study: optuna.Study, spec: SweepSpec) -> None:
    trials = study.get_trials(deepcopy=False)
    if spec.sampler == "grid":
        queued = {freeze_params(t.system_attrs.get("fixed_params", t.params)) for t in trials}
        for params in spec.grid()[:spec.budget()]:
            if freeze_params(params) not in queued:
                study.enqueue_trial(params)
    else:
        for _ in range(spec.budget() - len(trials)):
            study.enqueue_trial({})


def next_trial(study: optuna.Study) -> optuna.Trial | None:
    """Take the next WAITING trial of the study, or None when its budget is used up."""
    if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return None
    return study.ask()


def suggest(trial: optuna.Trial, spec: SweepSpec) -> dict:
    """The searched params of ``trial``: fixed for a grid point, else drawn by the sampler."""
    params = {}
    for name, axis in spec.axes().items():
        if isinstance(axis, FloatRange):
            params[name] = trial.suggest_float(name, axis.low, axis.high, log=axis.log)
        else:
            params[name] = trial.suggest_categorical(name, list(axis))
    return params


def study_url(storage: str | None, name: str) -> str:
    """How to open the study elsewhere: ``optuna-dashboard <storage>`` and the study name."""
    storage = redact(storage or os.path.abspath(default_storage()))
    return f"{storage}#study={name}"
