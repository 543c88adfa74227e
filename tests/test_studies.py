"""The Optuna queue (pipeline/studies.py) in-process: two "workers" are two storages on one
journal file. Workers only take queued trials and never create one, grid points are queued with
their params, and a trial whose worker is gone is failed, queued again and reported."""

from __future__ import annotations

import time

from optuna.trial import TrialState

GRID = {"name": "g", "experiment": "g", "sampler": "grid", "seeds": [0, 1],
        "space": {"activation": ["sigmoid", "softmax"], "learning_rate": [0.01, 0.1]}}


def queue_study(path, n: int, grace: str | None = None, monkeypatch=None):
    import optuna

    from pipeline import storages

    if grace is not None:
        monkeypatch.setenv(storages.GRACE_ENV, grace)
    storage = storages.make_storage(str(path))
    study = optuna.create_study(study_name="q", storage=storage)
    for _ in range(n):
        study.enqueue_trial({})
    return study


def other_worker(path):
    import optuna

    from pipeline import storages

    return optuna.load_study(study_name="q", storage=storages.make_storage(str(path)))


def next_trial(study, on_lost=None):
    """One claimed trial of ``study``, or None when its queue is empty."""
    from pipeline import studies

    claimed = studies.claim(study, 1, on_lost)
    return claimed[0] if claimed else None


def test_workers_only_take_queued_trials_and_never_create_one(tmp_path):
    from pipeline import studies
    from pipeline.heartbeats import worker_id

    a = queue_study(tmp_path / "j.log", 5)
    b = other_worker(tmp_path / "j.log")
    claimed = [next_trial(w) for w in (a, b, a, b, a)]
    assert sorted(t.number for t in claimed) == [0, 1, 2, 3, 4]
    assert all(t.user_attrs[studies.WORKER_ATTR] == worker_id() for t in
               (a.trials[t.number] for t in claimed))
    for trial in claimed:
        assert studies.finish(a, trial, TrialState.COMPLETE, 1.0)
    assert next_trial(a) is None and next_trial(b) is None
    assert len(b.trials) == 5
    assert studies.tally(b) == {"complete": 5, "fail": 0, "pruned": 0, "running": 0, "waiting": 0,
                                "retried": 0}
    assert not studies.finish(b, claimed[0], TrialState.COMPLETE, 2.0)  # already told: not taken twice


def test_grid_trials_are_queued_with_their_params_so_a_claim_writes_no_params(tmp_path):
    from pipeline import studies
    from pipeline.sweep_file import parse_sweep

    spec = parse_sweep(GRID)
    journal = tmp_path / "j.log"
    study, setup = studies.open_study(spec, str(journal), None, "sha")
    assert setup
    assert [t.params for t in study.trials] == spec.grid()  # queued with params set, in grid order
    assert {t.state for t in study.trials} == {TrialState.WAITING}
    trial = next_trial(study)
    writes = journal.read_text().count("\n")
    assert studies.suggest(trial, spec) == spec.grid()[trial.number]
    assert journal.read_text().count("\n") == writes  # the five suggestions wrote nothing
    assert studies.finish(study, trial, TrialState.COMPLETE, 0.5)
    assert study.trials[trial.number].params == spec.grid()[trial.number]
    studies.mark_ready(study, "parent-run")
    again, setup = studies.open_study(spec, str(journal), None, "sha")
    assert not setup and studies.parent_of(again) == "parent-run"
    assert len(again.trials) == len(spec.grid())  # resuming queues nothing twice


def test_a_studys_default_name_is_its_sweep_and_a_digest_of_what_makes_its_trials_comparable():
    """The digest is pinned: workers on several machines and later versions of the tool find a
    study by it, so a change of :func:`describe_space` that changes it must be deliberate."""
    from pipeline import studies
    from pipeline.sweep_file import parse_sweep

    sha = "ab" * 32
    name = studies.default_study_name(parse_sweep(GRID), sha)
    assert name == "g-102a9272"
    changed = [parse_sweep({**GRID, "seeds": [0]}), parse_sweep({**GRID, "experiment": "h"}),
               parse_sweep({**GRID, "fixed": {"epochs": 3}})]
    assert len({name, studies.default_study_name(parse_sweep(GRID), "cd" * 32),
                *(studies.default_study_name(spec, sha) for spec in changed)}) == 5
    same = [parse_sweep({**GRID, "n_trials": 2}), parse_sweep({**GRID, "description": "other"})]
    assert {studies.default_study_name(spec, sha) for spec in same} == {name}


def test_a_study_under_the_sweeps_plain_name_resumes_when_its_space_and_features_match(tmp_path):
    """Studies were named for their sweep alone before version 0.2: such a study resumes, and
    one of another features file is left alone for a study of the digest's name."""
    from pipeline import studies
    from pipeline.sweep_file import parse_sweep

    spec, journal = parse_sweep(GRID), str(tmp_path / "j.log")
    studies.open_study(spec, journal, "g", "sha-a")
    assert studies.open_study(spec, journal, None, "sha-a")[0].study_name == "g"
    other, setup = studies.open_study(spec, journal, None, "sha-b")
    assert setup and other.study_name == studies.default_study_name(spec, "sha-b")


def test_trial_of_a_dead_local_worker_is_failed_requeued_and_its_run_reported(tmp_path):
    import subprocess

    from pipeline import studies
    from pipeline.heartbeats import worker_id

    a = queue_study(tmp_path / "j.log", 2)
    lost = next_trial(a)
    lost.set_user_attr(studies.RUN_ATTR, "run-of-the-dead")
    dead = subprocess.Popen(["true"])
    dead.wait()
    lost.set_user_attr(studies.WORKER_ATTR, f"{worker_id().rpartition(':')[0]}:{dead.pid}")
    reported = []
    b = other_worker(tmp_path / "j.log")
    first = next_trial(b, lambda trial, why: reported.append((trial.user_attrs[studies.RUN_ATTR], why)))
    assert reported == [("run-of-the-dead", "its worker process is gone")]
    studies.finish(b, first, TrialState.COMPLETE, 1.0)
    retry = next_trial(b)
    assert b.trials[lost.number].state.name == "FAIL"
    frozen = b.trials[retry.number]
    assert frozen.system_attrs["failed_trial"] == lost.number and studies.RUN_ATTR not in frozen.user_attrs
    studies.finish(b, retry, TrialState.COMPLETE, 1.0)
    assert next_trial(b) is None
    assert studies.tally(b) == {"complete": 2, "fail": 0, "pruned": 0, "running": 0, "waiting": 0,
                                "retried": 1}


def test_trial_claimed_but_never_signed_is_requeued_after_the_grace_period(tmp_path, monkeypatch):
    from pipeline.optuna_internals import take_waiting

    a = queue_study(tmp_path / "j.log", 1, grace="1", monkeypatch=monkeypatch)
    assert take_waiting(a, a.trials[0])  # a worker killed right after its claim
    started = time.monotonic()
    retry = next_trial(other_worker(tmp_path / "j.log"))
    assert time.monotonic() - started >= 0.9
    assert a.trials[retry.number].system_attrs["failed_trial"] == 0
    assert [t.state.name for t in a.trials] == ["FAIL", "RUNNING"]


def test_a_batch_is_claimed_with_one_read_of_the_queue_and_skips_trials_taken_meanwhile(tmp_path):
    from pipeline import optuna_internals, studies

    a = queue_study(tmp_path / "j.log", 6)
    b = other_worker(tmp_path / "j.log")
    storage = optuna_internals.storage_of(a)
    reads, list_waiting = [], storage.get_all_trials

    def counted(study_id, deepcopy=True, states=None):
        listed = list_waiting(study_id, deepcopy=deepcopy, states=states)
        if states is not None and TrialState.WAITING in states:
            reads.append(len(listed))
            if len(reads) == 1:  # another worker takes trial 1 between the read and the claims
                assert optuna_internals.take_waiting(b, b.trials[1])
        return listed

    storage.get_all_trials = counted
    claimed = studies.claim(a, 4)
    assert [t.number for t in claimed] == [0, 2, 3, 4]
    assert reads == [6]  # one listing for the whole batch
    assert [t.number for t in studies.claim(a, 4)] == [5]  # what is left; nothing taken twice
    assert reads == [6, 1, 0]  # the last claim read again after a short read, and found none
