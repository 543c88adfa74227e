"""A sweep or an extraction stopped by a signal (Ctrl-C, SIGTERM, SIGKILL) ends whole: the trials
in hand fail and are queued again, their runs KILLED, no partial file is left, and a rerun
finishes the work.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
from optuna.trial import TrialState

from pipeline import studies
from pipeline.features import read_features
from pipeline.runs import outcomes, trial_records
from tests.helpers import load_study
from tests.services import ROOT, audit, running_trial_of, tiny_study, wait_for

pytestmark = pytest.mark.slow  # commands in their own processes, signals, reruns


@pytest.mark.parametrize(("signum", "engine"), [(signal.SIGTERM, "keras"), (signal.SIGINT, "fused")],
                         ids=["SIGTERM-keras", "Ctrl-C-fused"])
def test_interrupt_fails_the_trial_kills_its_run_and_a_rerun_resumes(tmp_path, signum, engine,
                                                                     launch):
    """The trial in hand (the fused engine: the batch in hand) ends FAIL and is queued again,
    its run KILLED; the rerun finishes the study. (300 epochs keep a fused batch, 40 a Keras
    trial, training for about 4 s on a quiet machine, so that the signal lands while one is in
    hand. The signal goes to a trial claimed 0.5-1.5 s before: not one of the trials that fail
    at once by design, which could end before it, and not one about to end.)"""
    features, sweep, budget = tiny_study(tmp_path, n_seeds=1, engine=engine,
                                         epochs=300 if engine == "fused" else 40)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    journal = str(tmp_path / "optuna-journal.log")
    proc = launch(uri, "--features", features, "--sweep", sweep)
    trial = wait_for(running_trial_of(journal, None, proc.pid, started_before=0.5, started_within=1.5))
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == 128 + signum  # 143 for SIGTERM, 130 for Ctrl-C
    log = proc.log_path.read_text()
    # The sweep ends with its own line, not a traceback, and no thread died. (A traceback may be
    # printed on the way: Python's "Exception ignored in" when the signal lands in a weakref
    # callback, TensorFlow's when it lands in its nest.flatten; the sweep raises the interrupt
    # again: test_an_interrupt_turned_into_another_error_still_interrupts.)
    assert "interrupted" in log.strip().splitlines()[-1] and "Exception in thread" not in log
    study = load_study(journal)
    interrupted = [t for t in study.trials if t.user_attrs.get(studies.REASON_ATTR) == "interrupted"]
    assert trial.number in {t.number for t in interrupted}
    for t in interrupted:
        assert t.state == TrialState.FAIL
        assert any(w.state == TrialState.WAITING and w.system_attrs.get("failed_trial") == t.number
                   for w in study.trials)
        run = mlflow.MlflowClient(uri).get_run(t.user_attrs[studies.RUN_ATTR])
        assert run.info.status == "KILLED"
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    rerun = launch(uri, "--features", features, "--sweep", sweep, log="rerun")
    assert rerun.wait(timeout=300) == 0, rerun.log_path.read_text()[-3000:]
    result = audit(journal, None, uri, budget)
    assert result["retried"] == len(interrupted) and result["runs"] == budget + len(interrupted)
    # each interrupted attempt is listed by the run of the attempt that ran it again, and the
    # trials' outcomes are one run per trial of the budget
    client = mlflow.MlflowClient(uri)
    parent = client.get_run(load_study(journal).user_attrs[studies.PARENT_ATTR])
    mlflow.set_tracking_uri(uri)
    try:
        records = trial_records(parent.info.run_id, parent)
    finally:
        mlflow.set_tracking_uri(None)
    listed = {int(n) for text in records["retries"] for n in text.split(",") if n}
    assert listed == {t.number for t in interrupted}
    assert len(outcomes(records)) == budget and "KILLED" not in set(outcomes(records)["status"])


def test_ctrl_c_while_the_sweep_is_set_up_ends_its_parent_run_killed(tmp_path, tracking, monkeypatch):
    """Ctrl-C that lands while the study and its parent run are set up is held until they are,
    then ends the parent run KILLED, as one during the trials does: no run is left RUNNING,
    and the rerun resumes the study."""
    from pipeline import parent
    from pipeline.sweep import run_sweep

    attach = parent.attach

    def interrupted_attach(*args, **kwargs):
        made = attach(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # held: the set-up is not cut in half
        return made
    monkeypatch.setattr(parent, "attach", interrupted_attach)
    features, sweep, budget = tiny_study(tmp_path, n_seeds=1, engine="fused")
    with pytest.raises(KeyboardInterrupt):
        run_sweep(features, sweep, progress=False)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [run.info.status for run in runs] == ["KILLED"]  # the parent; no trial had started
    monkeypatch.setattr(parent, "attach", attach)
    outcome = run_sweep(features, sweep, progress=False)
    assert outcome.parent_run_id == runs[0].info.run_id and sum(outcome.counts.values()) == budget


def test_ctrl_c_while_a_batch_is_recorded_records_no_further_trial(tmp_path, tracking, monkeypatch):
    """Ctrl-C while the writer thread records a batch's first trial: that record is finished
    and told, and no other trial of the batch is recorded: each is queued again, its run
    KILLED, as soon as the record under way ends."""
    from pipeline.sweep import run_sweep
    from pipeline.tracking import default_study_storage
    from pipeline.trial import TrialLife

    record, recorded = TrialLife.record, []

    def interrupted_record(self, *args, **kwargs):
        if not recorded:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the main thread takes the interrupt while this record is under way
        recorded.append(self.trial.number)
        return record(self, *args, **kwargs)
    monkeypatch.setattr(TrialLife, "record", interrupted_record)
    features, sweep, budget = tiny_study(tmp_path, n_seeds=1, engine="fused")
    with pytest.raises(KeyboardInterrupt):
        run_sweep(features, sweep, progress=False)
    study = load_study(default_study_storage())
    assert len(recorded) == 1 and budget > 2
    complete = [t.number for t in study.trials if t.state == TrialState.COMPLETE]
    assert complete == recorded
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    for t in study.trials:
        if t.state == TrialState.FAIL:
            assert t.user_attrs[studies.REASON_ATTR] == "interrupted"
            assert mlflow.MlflowClient().get_run(t.user_attrs[studies.RUN_ATTR]).info.status == "KILLED"


@pytest.mark.parametrize("engine", ["keras", "fused"])
def test_an_interrupt_turned_into_another_error_still_interrupts(tmp_path, tracking, monkeypatch, engine):
    """A SIGTERM whose exception a library turns into another error (TensorFlow's nest.flatten
    can make it a SystemError, which would fail the trial and let the sweep finish with exit 0)
    still interrupts: the trials in hand are queued again, not failed as errors."""
    from pipeline import tracking as tracking_module
    from pipeline.engine_fused import FusedEngine
    from pipeline.engine_keras import KerasEngine
    from pipeline.sweep import run_sweep

    def swallowed():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in here
        except KeyboardInterrupt:
            return SystemError("<built-in function __import__> returned a result with an exception set")
        raise AssertionError("no SIGTERM came")

    def train(self, config, split, on_epoch=None):
        raise swallowed()

    def train_many(self, configs, x, y, on_epoch=None):
        return [swallowed()] * len(configs)

    monkeypatch.setattr(KerasEngine, "train", train)
    monkeypatch.setattr(FusedEngine, "train_many", train_many)
    features, sweep, _ = tiny_study(tmp_path, n_seeds=1, engine=engine)
    with pytest.raises(tracking_module.Terminated):
        run_sweep(features, sweep, progress=False)
    study = load_study(tracking_module.default_study_storage())
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert failed and all(t.user_attrs[studies.REASON_ATTR] == "interrupted" for t in failed)
    for t in failed:
        assert mlflow.MlflowClient().get_run(t.user_attrs[studies.RUN_ATTR]).info.status == "KILLED"
        assert any(w.system_attrs.get("failed_trial") == t.number for w in study.trials)
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.COMPLETE)]


def test_killed_extraction_leaves_no_file_and_a_rerun_finishes(tmp_path):
    """SIGKILL in the forward pass (no handler runs): no features file, not even a partial one;
    the rerun extracts every image."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "pipeline", "extract", "--images", "builtin:digits",
            "--weights", "random", "--output", "out.h5"]
    log = tmp_path / "extract.log"
    with log.open("w") as err:
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err)

    def extracting():
        """the stage's first line: the images are being extracted"""
        return "extract: 357 files to go" in log.read_text()
    wait_for(extracting, every=0.2)
    time.sleep(1.0)  # into the forward pass
    assert proc.poll() is None, "the extraction ended before it could be killed"
    proc.kill()
    proc.wait(timeout=30)
    assert not (tmp_path / "out.h5").exists()
    assert subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, timeout=600).returncode == 0
    assert len(read_features(tmp_path / "out.h5").y) == 357
