"""A claimed trial's life, from its MLflow run's opening to the state Optuna is told.

Every trial of every sweep, whatever its kind, engine or worker, goes through one
:class:`TrialLife`: :meth:`~TrialLife.open` creates its run (RUNNING, its config as params)
and records the run's id on the Optuna trial; :attr:`~TrialLife.reporter` keeps its epochs'
metrics and reports them to the pruner; :meth:`~TrialLife.record` records what training left
and ends the run (FINISHED; FAILED with the reason as its ``error`` tag); :meth:`~TrialLife.tell`
tells Optuna the final state (COMPLETE, PRUNED or FAIL with the reason), the one place that
does; :meth:`~TrialLife.abandon` ends both sides of a trial an interrupt cut short (its run
KILLED, the trial FAIL and queued again). No run or trial is left RUNNING.
"""

from __future__ import annotations

import contextlib
import math

import optuna
from optuna.trial import TrialState

from pipeline import naming, optuna_internals, studies, tracking
from pipeline.config import TrainingSettings
from pipeline.kinds import Recording, TrialKind
from pipeline.storages import patiently
from pipeline.sweep_file import SweepSpec


class Reporter:
    """A head's ``on_epoch`` callback: keeps the epochs' metrics and, with a pruner, judges them.

    A trial is judged as Optuna judges trials run one after another: at each epoch its metric
    is reported and the pruner compares it with the trials completed before it; when the
    pruner says stop, ``optuna.TrialPruned`` ends it there. A head trained alone is judged as
    each epoch ends (``alone``), so a pruned head stops training. Heads trained side by side
    train to the end and are judged afterwards, in trial order, each once the trials before it
    are told (:meth:`judged`): judged during training they would meet none of their batch, and
    the engine and batch size would decide which trials are pruned.
    """

    def __init__(self, trial: optuna.Trial, metric: str | None, alone: bool):
        self.trial, self.metric, self.alone = trial, metric, alone  # metric: the pruner's, if any
        self.history: dict[str, list[float]] = {}

    def __call__(self, epoch: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.history.setdefault(name, []).append(value)
        if self.alone and self.metric is not None:
            self._judge(epoch, values[self.metric])

    @property
    def judges_after(self) -> bool:
        """Whether the head is judged after training (:meth:`judged`), not as it trains."""
        return not self.alone and self.metric is not None

    def judged(self, outcome):
        """``outcome`` of a head trained side by side, judged epoch by epoch now: unchanged;
        ``optuna.TrialPruned`` with :attr:`history` cut after the epoch the pruner stopped it at
        (a head that failed later is pruned too, as it would have stopped before failing); or
        the storage's error, which fails this trial alone, as it would in a callback."""
        if not self.judges_after:
            return outcome
        for epoch, value in enumerate(self.history.get(self.metric, ())):
            try:
                self._judge(epoch, value)
            except optuna.TrialPruned as pruned:
                self.history = {name: values[:epoch + 1] for name, values in self.history.items()}
                return pruned
            except Exception as exc:
                return exc
        return outcome

    def _judge(self, epoch: int, value: float) -> None:
        """Report the pruner's metric ``value`` at ``epoch``; ``optuna.TrialPruned`` if it says stop."""
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned", f"after epoch {epoch}: {self.metric} {value:.6g}")
            raise optuna.TrialPruned(f"pruned after epoch {epoch}")


class TrialLife:
    """One claimed trial: its config (None when its params make no config), run and record;
    ``alone`` when its batch is this trial alone (see :class:`Reporter`)."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, spec: SweepSpec, kind: TrialKind,
                 alone: bool):
        self.study, self.trial, self.spec, self.kind = study, trial, spec, kind
        self.reporter = Reporter(trial, spec.pruner_metric, alone)
        self.run_id: str | None = None
        self.told = False  # Optuna knows how the trial ended (:meth:`tell`)
        self.error: Exception | None = None  # what ended the trial before training
        try:
            self.config: TrainingSettings | None = spec.trial_config(studies.suggest(trial, spec))
        except Exception as exc:
            self.config, self.error = None, exc

    def open(self, experiment: str, parent: str, tags: dict, engine, dataset) -> None:
        """Create the trial's RUNNING run under ``parent``, with its config as params and the
        features ``dataset`` as its input; the trial records the run's id at once, so a worker
        that takes it for lost can end the run."""
        if self.config is None:
            return
        try:
            run_tags = {**tags, naming.TRIAL_NUMBER: self.trial.number,
                        naming.ENGINE: self.kind.trained_by(engine, self.config),
                        naming.NOTE: self.kind.description(self.config, self.trial.number, self.spec.name),
                        **self.kind.run_tags(self.config)}
            if retries := optuna_internals.retries_of(self.trial):
                run_tags[naming.RETRIES] = ",".join(map(str, retries))
            self.run_id = tracking.create_run(experiment, self.kind.run_name(self.config), parent, run_tags)
            patiently(self.trial.set_user_attr, studies.RUN_ATTR, self.run_id)
            tracking.log_batch(self.run_id, params=self.config.params())
            tracking.log_features(self.run_id, dataset)
        except Exception as exc:
            self.error = exc

    def write_files(self, outcome):
        """Write a trained trial's files on its run; return ``outcome``, or the error that kept
        them from being written (which then fails the trial, as a failure to record does)."""
        if self.run_id is None or isinstance(outcome, BaseException):
            return outcome
        try:
            self.kind.write_files(self.run_id, self.config, outcome)
        except Exception as exc:
            return exc
        return outcome

    def record(self, outcome, where: Recording) -> float | None | Exception:
        """Record ``outcome`` (a result, ``optuna.TrialPruned`` or the exception that ended
        training) on the run and end it: the objective's value, None when pruned, or the
        exception that fails the trial (the run then ends FAILED with it as tag ``error``)."""
        if self.run_id is None:
            return self.error or RuntimeError("the trial's run was not opened")
        try:
            with tracking.terminal_run(self.run_id):
                if self.error is not None:  # the run opened, but not all of it was written
                    raise self.error
                if isinstance(outcome, optuna.TrialPruned):
                    return self._record_pruned()
                if isinstance(outcome, Exception):
                    raise outcome
                return _finite(self.kind.record(where, self.config, outcome), where.metric)
        except Exception as exc:
            return exc

    def _record_pruned(self) -> None:
        """A pruned head's record: the epochs it trained and the tag ``pruned``."""
        points = [m for name, values in self.reporter.history.items() for m in tracking.series(name, values)]
        tracking.log_batch(self.run_id, metrics=points, tags={naming.PRUNED: "true"})

    def tell(self, recorded: float | None | Exception) -> None:
        """Tell Optuna how the trial ended (see :meth:`record`). A trial taken for lost meanwhile
        keeps its FAIL, and its run ends KILLED: its retry carries the result."""
        if isinstance(recorded, Exception):
            studies.finish(self.study, self.trial, TrialState.FAIL, reason=_reason(recorded))
        else:
            state = TrialState.PRUNED if recorded is None else TrialState.COMPLETE
            if not studies.finish(self.study, self.trial, state, recorded):
                tracking.end_lost_run(self.run_id, "its worker was taken for lost before it reported")
        self.told = True

    def abandon(self, error: BaseException) -> None:
        """End a trial cut short by ``error`` outside it: an interrupt ends its run KILLED and
        queues the trial again (FAIL "interrupted"); any other error, the sweep's own, ends the
        run FAILED and the trial FAIL with it as the reason."""
        if isinstance(error, KeyboardInterrupt):
            tracking.end_lost_run(self.run_id, "interrupted")
            studies.finish(self.study, self.trial, TrialState.FAIL, reason="interrupted", retry=True)
            return
        if self.run_id is not None:
            with contextlib.suppress(BaseException), tracking.terminal_run(self.run_id):
                raise error
        studies.finish(self.study, self.trial, TrialState.FAIL, reason=_reason(error))


def _finite(value: float, metric: str) -> float:
    """``value`` of the objective's ``metric``; FloatingPointError (a failed trial) if not finite."""
    if not math.isfinite(value):
        raise FloatingPointError(f"{metric} is {value}: training diverged")
    return value


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:2000]
