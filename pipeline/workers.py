"""Worker processes of one sweep command: started beside the main one, each on the same job.

Each worker loads what :func:`pipeline.sweep.run_sweep` set up (the sweep file, the features,
the study) and runs trials on the one trial path (:func:`pipeline.runner.work`) until the
study's queue is empty, under the study's one parent run.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import sys

import mlflow

from pipeline import lineage, parent, runner, studies, tracking
from pipeline.engines import make_engine
from pipeline.errors import INTERRUPT_STATUSES, interrupt_status
from pipeline.features import read_features
from pipeline.kinds import kind_of
from pipeline.split import Splits
from pipeline.sweep_file import load_sweep


@contextlib.contextmanager
def started_workers(job: runner.Job, n: int):
    """Start ``n`` worker processes on ``job`` for the block; on the way out wait for them
    (after passing on an interrupt as SIGTERM) and report any that did not end cleanly."""
    context = multiprocessing.get_context("spawn")  # no forked TensorFlow or DB connections
    procs = [context.Process(target=_worker_main, args=(job,), name=f"sweep-worker-{i + 1}")
             for i in range(n)]
    try:
        for proc in procs:
            proc.start()
        yield
    except BaseException:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        raise
    finally:
        for proc in procs:
            if proc.pid is None:  # never started: an interrupt or error while starting others
                continue
            proc.join()
            if proc.exitcode not in (0, *INTERRUPT_STATUSES):
                print(f"warning: worker process {proc.pid} ended with status {proc.exitcode}; "
                      f"its trial, if any, was queued again", file=sys.stderr)


def load_worker(job: runner.Job) -> runner.Worker:
    """The :class:`~pipeline.runner.Worker` of ``job`` in a worker process: the study, the
    sweep's kind and engine, and the features' splits."""
    spec = load_sweep(job.sweep, job.n_trials)
    data = read_features(job.features)
    study = studies.load_study(spec, job.storage, job.study, runner.end_lost_run)
    engine = make_engine(spec.engine)
    runner.freeze_imports()
    sha = study.user_attrs[studies.FEATURES_ATTR]
    dataset = lineage.features_dataset(job.source, sha, data.x.shape, data.class_names, float(data.y.mean()))
    return runner.Worker(job, study, spec, kind_of(spec), engine, Splits(data.x, data.y), dataset)


def _worker_main(job: runner.Job) -> None:
    """A worker process: run the job's trials (exit 130 on Ctrl-C, 143 on SIGTERM)."""
    from pipeline.quiet import quiet_tensorflow

    quiet_tensorflow()
    mlflow.set_tracking_uri(job.tracking_uri)
    tracking.prepare_store()
    tracking.install_sigterm_handler()
    try:
        worker = load_worker(job)
        with parent.closing(worker.study, job.parent, worker.finishing()):
            runner.work(worker)
    except KeyboardInterrupt as exc:
        sys.exit(interrupt_status(exc))
