"""The sweep stage: an Optuna study over classifier heads, every trial one MLflow run.

:func:`run_sweep` validates the sweep file and the features before it creates anything, opens
(or resumes) the study, and runs its queued trials with the chosen engine. Each trial is a
run nested under the sweep's parent run, with its config as params, per-epoch metrics
(step = epoch) and tags for the useful filters; the Optuna trial carries the run's id.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna

from pipeline import naming, parity, records, studies, tracking
from pipeline.config import ParityConfig, SweepSpec, TrialConfig, load_sweep
from pipeline.errors import UserError
from pipeline.features import FeatureSet, read_features, resolve_features, sha256_file
from pipeline.split import Split, make_split

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass(frozen=True)
class SweepOutcome:
    """What a finished sweep leaves: its parent run, study and trial counts."""

    parent_run_id: str
    experiment_id: str
    study_name: str
    counts: dict[str, int]


class Objective:
    """Trains trials of one sweep on one features file, loaded once, splits cached by seed.

    A trial of a ``heads`` sweep trains one head; a trial of a ``parity`` sweep trains the
    seed's three heads (:mod:`pipeline.parity`) as runs nested under the trial's run.
    """

    def __init__(self, spec: SweepSpec, features: FeatureSet, engine):
        self.spec, self.features, self.engine = spec, features, engine
        self._splits: dict[tuple, Split] = {}

    def split(self, config: TrialConfig | ParityConfig) -> Split:
        """The train/validation split of ``config`` (shared by all trials of the same seed)."""
        key = (config.seed, config.validation_fraction, config.standardize)
        if key not in self._splits:
            self._splits[key] = make_split(self.features.x, self.features.y,
                                           config.validation_fraction, config.seed,
                                           config.standardize)
        return self._splits[key]

    def run_name(self, config: TrialConfig | ParityConfig) -> str:
        """The MLflow run name of a trial (:mod:`pipeline.naming`)."""
        if isinstance(config, ParityConfig):
            return naming.parity_run_name(config)
        return naming.trial_run_name(config)

    def tags(self, config: TrialConfig | ParityConfig) -> dict[str, str]:
        """Tags a trial's run gets when it is created."""
        return {} if isinstance(config, ParityConfig) else records.head_tags(config)

    def train_and_log(self, config: TrialConfig | ParityConfig, run_id: str, experiment: str,
                      tags: dict[str, str]) -> float:
        """Train ``config``, record the results on ``run_id``, return the objective's value."""
        split = self.split(config)
        metric = self.spec.objective_metric
        if isinstance(config, ParityConfig):
            result = parity.train_parity(config, split, self.engine)
            return parity.log_parity(run_id, experiment, result, split, tags)[metric]
        result = self.engine.train(config, split)
        records.log_head(run_id, result, split, config)
        return result.final(metric)


def make_engine(name: str):
    """The trainer named in a sweep file."""
    from pipeline.engine_keras import KerasEngine

    engines = {"keras": KerasEngine}
    return engines[name]()


@dataclass(frozen=True)
class Job:
    """What a worker needs to run a study's trials; picklable, for worker processes."""

    features: str
    sweep: str
    n_trials: int | None
    storage: str | None
    study: str
    experiment: str
    parent: str
    tags: dict
    tracking_uri: str


def run_sweep(features: str, sweep: str, n_trials: int | None = None, storage: str | None = None,
              study: str | None = None, launcher_run_id: str | None = None,
              progress: bool | None = None, workers: int = 1) -> SweepOutcome:
    """Run (or resume) the study a sweep file describes, on a features file or ``runs:/`` URI.

    ``workers`` processes of this machine take the study's trials side by side (this one and
    ``workers - 1`` started here); ``0`` only sets the study and its parent run up, for workers
    to be started elsewhere (its parent run is then SCHEDULED). Any number of such commands on
    any machines may share one study (same ``storage`` and ``study``); all trial runs nest under
    the one parent run, which the last worker out ends. ``launcher_run_id`` is the run this
    sweep was started under (``main``'s, or the one ``mlflow run`` opened): the parent run
    nests under it when both are in the study's experiment, and the two are linked by tags
    otherwise. Returns the parent run and the trial counts.
    """
    if workers < 0:
        raise UserError(f"workers {workers}: must be >= 0 (0 sets the study up and runs nothing)")
    spec = load_sweep(sweep, n_trials)
    features_path = resolve_features(features)
    data = read_features(features_path)
    features_sha = sha256_file(features_path)
    tracking.install_sigterm_handler()
    experiment = tracking.experiment_id(spec.experiment)

    def make_parent(the_study: optuna.Study) -> str:
        return _create_parent(the_study, spec, experiment, launcher_run_id, storage,
                              features_sha, str(features_path), sweep)

    with tracking.deferred_interrupts():
        the_study = studies.open_study(spec, storage, study, features_sha, make_parent, _end_lost_run)
        parent = _reopen_parent(the_study, experiment, make_parent)
    job = Job(str(features_path), sweep, n_trials, storage, the_study.study_name, experiment, parent,
              {naming.STUDY: the_study.study_name, naming.FEATURES_SHA: features_sha,
               naming.WEIGHTS: str(data.attrs.get("weights", "unknown")), naming.STEP: "trial",
               naming.SWEEP_NAME: spec.name, **tracking.versions()},
              mlflow.get_tracking_uri())
    with _closing_parent(the_study, parent) as counts, _helpers(job, max(workers - 1, 0)):
        if workers:
            _work(the_study, Objective(spec, data, make_engine(spec.engine)), job,
                  _progress(spec.budget(), the_study, progress))
    return SweepOutcome(parent, experiment, the_study.study_name, counts)


@contextlib.contextmanager
def _closing_parent(study: optuna.Study, parent: str):
    """Yield a dict that holds the trial counts once the block is done; on the way out log them
    on the parent run and end it (FINISHED, KILLED on an interrupt, FAILED on an error) unless
    other workers still run trials: the last worker out ends it. Finished with trials still
    queued (``workers 0``) it is SCHEDULED."""
    counts: dict[str, int] = {}
    status = "FINISHED"
    try:
        yield counts
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        with tracking.deferred_interrupts():
            counts.update(_summarise(study, parent))
            if not counts["running"]:
                client = mlflow.MlflowClient()
                if status == "FINISHED" and counts["waiting"]:
                    client.update_run(parent, status="SCHEDULED")
                else:
                    client.set_terminated(parent, status)


def _work(study: optuna.Study, objective: Objective, job: Job, bar) -> None:
    """Claim and run the study's trials until none is left; an interrupt fails and re-queues the
    trial in hand (its MLflow run KILLED) and propagates."""
    while True:
        trial = None
        try:
            with tracking.deferred_interrupts():
                trial = studies.next_trial(study, _end_lost_run)
            if trial is None:
                break
            with studies.heartbeat(study, trial):
                _run_trial(study, trial, objective, job)
        except KeyboardInterrupt:
            if trial is not None:
                with tracking.deferred_interrupts():
                    studies.finish(study, trial, reason="interrupted", retry=True)
            raise
        if bar is not None:  # trials done by every worker
            counts = studies.tally(study)
            bar.update(counts["complete"] + counts["fail"] + counts["pruned"] - bar.n)
    if bar is not None:
        bar.close()


@contextlib.contextmanager
def _helpers(job: Job, n: int):
    """Start ``n`` worker processes on ``job`` for the block; on the way out wait for them
    (after passing on an interrupt as SIGTERM) and report any that did not end cleanly."""
    context = multiprocessing.get_context("spawn")  # no forked TensorFlow or DB connections
    procs = [context.Process(target=_worker_main, args=(job,), name=f"sweep-worker-{i + 1}")
             for i in range(n)]
    for proc in procs:
        proc.start()
    try:
        yield
    except BaseException:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        raise
    finally:
        for proc in procs:
            proc.join()
            if proc.exitcode not in (0, 130):
                print(f"warning: worker process {proc.pid} ended with status {proc.exitcode}; "
                      f"its trial, if any, was queued again", file=sys.stderr)


def _worker_main(job: Job) -> None:
    """A worker process: load what :func:`run_sweep` set up and run trials (exit 130 when
    interrupted)."""
    from pipeline.quiet import quiet_tensorflow

    quiet_tensorflow()
    mlflow.set_tracking_uri(job.tracking_uri)
    tracking.install_sigterm_handler()
    try:
        spec = load_sweep(job.sweep, job.n_trials)
        data = read_features(job.features)
        storage = studies.make_storage(job.storage, _end_lost_run)
        the_study = studies.patiently(optuna.load_study, study_name=job.study, storage=storage,
                                      sampler=studies.make_sampler(spec))
        with _closing_parent(the_study, job.parent):
            _work(the_study, Objective(spec, data, make_engine(spec.engine)), job, None)
    except KeyboardInterrupt:
        sys.exit(130)


def _end_lost_run(trial: optuna.trial.FrozenTrial, reason: str) -> None:
    """A lost trial's MLflow run ends KILLED (see :func:`studies.make_storage`)."""
    tracking.end_lost_run(trial.user_attrs.get(studies.RUN_ATTR), reason)


def _reopen_parent(study: optuna.Study, experiment: str, make_parent) -> str:
    """The study's parent run, set RUNNING again; a new one if it is not in this tracking
    store's ``experiment`` (the store has changed since the study was made)."""
    client = mlflow.MlflowClient()
    parent = study.user_attrs.get(studies.PARENT_ATTR)
    try:
        run = client.get_run(parent)
        if run.info.experiment_id == experiment:
            if run.info.status != "RUNNING":
                client.update_run(parent, status="RUNNING")
            return parent
    except mlflow.exceptions.MlflowException:
        pass
    parent = make_parent(study)
    studies.patiently(study.set_user_attr, studies.PARENT_ATTR, parent)
    return parent


def _create_parent(study: optuna.Study, spec: SweepSpec, experiment: str, launcher: str | None,
                   storage: str | None, features_sha: str, features_path: str, sweep: str) -> str:
    """A new parent run for the study: tags, params and the sweep file."""
    client = mlflow.MlflowClient()
    launcher_experiment = client.get_run(launcher).info.experiment_id if launcher else None
    nest = launcher if launcher_experiment == experiment else None
    tags = {naming.STEP: "sweep", naming.SWEEP_NAME: spec.name, naming.STUDY: study.study_name,
            naming.KIND: spec.kind, naming.REPORT: spec.report,
            naming.STORAGE: studies.study_url(storage, study.study_name),
            naming.FEATURES_SHA: features_sha, naming.NOTE: _description(spec),
            **tracking.versions()}
    if launcher and not nest:
        tags[naming.MAIN_RUN] = launcher
    parent = tracking.create_run(experiment, naming.parent_run_name(spec.name), nest, tags)
    if launcher and not nest:
        client.set_tag(launcher, "pipeline.sweep_run_id", parent)
    params = {"sweep": spec.name, "sweep_file": sweep, "kind": spec.kind, "sampler": spec.sampler,
              "sampler_seed": spec.sampler_seed,
              "n_trials": spec.budget(), "seeds": list(spec.seeds), "engine": spec.engine,
              "objective": f"{spec.objective.direction} {spec.objective_metric}",
              "features": features_path, "study": study.study_name,
              **{f"fixed.{k}": v for k, v in spec.fixed.items()}}
    tracking.log_batch(parent, params=params)
    client.log_artifact(parent, sweep, "sweep")
    return parent


def _description(spec: SweepSpec) -> str:
    if spec.kind == "parity":
        return (f"{spec.description.strip()}\n\n"
                f"Each nested run is one trial: a parity experiment (the softmax at lr, the "
                f"transferred and the random sigmoid at ratio x lr, nested under it). Sort by "
                f"`max_gap_softmax_transfer`; at ratio 2 it is float32 rounding.").strip()
    return (f"{spec.description.strip()}\n\n"
            f"Each nested run is one trial: a head trained with the config in its name and "
            f"params. Compare `val_accuracy` with `positive_fraction` and `val_prob_loss` "
            f"(the loss of the actual probabilities) with `val_loss` (Keras's, from logits); "
            f"filter `tags.collapsed = 'true'` for heads whose prediction never varies.").strip()


def _run_trial(study: optuna.Study, trial: optuna.Trial, objective: Objective, job: Job) -> None:
    """Train one trial, record it in MLflow and tell Optuna; a failure fails only this trial.

    Ctrl-C or SIGTERM ends the trial's run KILLED and propagates (the caller re-queues the
    trial); a trial taken for lost meanwhile (no heartbeat within the grace period) has its run
    KILLED too, since its retry carries the result.
    """
    spec = objective.spec
    try:
        config = spec.trial_config(studies.suggest(trial, spec))
    except Exception as exc:
        with tracking.deferred_interrupts():
            studies.finish(study, trial, reason=f"{type(exc).__name__}: {exc}")
        return
    tags = {**job.tags, naming.TRIAL_NUMBER: trial.number, **objective.tags(config)}
    run_id = None
    try:
        with tracking.deferred_interrupts():
            run_id = tracking.create_run(job.experiment, objective.run_name(config), job.parent, tags)
            studies.patiently(trial.set_user_attr, studies.RUN_ATTR, run_id)
        tracking.log_batch(run_id, params=config.params())
        with tracking.terminal_run(run_id):
            value = objective.train_and_log(config, run_id, job.experiment, job.tags)
            if not math.isfinite(value):
                raise FloatingPointError(f"{spec.objective_metric} is {value}: training diverged")
    except KeyboardInterrupt:
        with tracking.deferred_interrupts():
            tracking.end_lost_run(run_id, "interrupted")
        raise
    except Exception as exc:
        with tracking.deferred_interrupts():
            studies.finish(study, trial, reason=f"{type(exc).__name__}: {' '.join(str(exc).split())}")
        return
    with tracking.deferred_interrupts():
        if not studies.finish(study, trial, value):
            tracking.end_lost_run(run_id, "its worker was taken for lost before it reported")


def _summarise(study: optuna.Study, parent: str) -> dict[str, int]:
    """Log trial counts and the best trial on the parent run; return the counts."""
    counts = studies.tally(study)
    tags = {}
    metrics = {f"trials.{k}": v for k, v in counts.items()}
    if counts["complete"]:
        best = studies.patiently(lambda: study.best_trial)
        metrics["best.value"] = best.value
        tags = {"best.trial_number": best.number,
                "best.run_id": best.user_attrs.get(studies.RUN_ATTR, ""),
                "best.params": json.dumps(best.params, sort_keys=True)}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, "best_trial.json")
            path.write_text(json.dumps({"number": best.number, "value": best.value,
                                        "params": best.params,
                                        "user_attrs": best.user_attrs}, indent=2, default=str))
            mlflow.MlflowClient().log_artifact(parent, str(path))
    tracking.log_batch(parent, metrics=tracking.scalars(metrics), tags=tags)
    return counts


def _progress(total: int, study: optuna.Study, enabled: bool | None):
    """A tqdm bar over the study's budget (quiet when stderr is not a terminal)."""
    from tqdm.auto import tqdm

    done = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
    disable = (not sys.stderr.isatty()) if enabled is None else not enabled
    return tqdm(total=total, initial=done, desc="sweep", unit="trial", disable=disable)
