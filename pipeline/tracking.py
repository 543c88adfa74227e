"""MLflow plumbing shared by the stages: versions, run lifecycle, batched logging.

Trial runs are created with :class:`mlflow.MlflowClient` and an explicit parent run id rather
than the fluent API, because MLflow's active-run stack is per thread and a sweep may log from
several. :func:`terminal_run` guarantees that a run never stays RUNNING: it ends FINISHED,
FAILED (an exception, with the message as the ``error`` tag) or KILLED (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import signal
from collections.abc import Iterator, Mapping, Sequence

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.time import get_current_time_millis

from pipeline import naming

MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so it unwinds like Ctrl-C."""


def install_sigterm_handler() -> None:
    """Turn SIGTERM into :class:`Terminated` so runs and trials are closed on the way out."""
    def _raise(signum, frame):
        raise Terminated(f"terminated by signal {signum}")
    with contextlib.suppress(ValueError):  # not in the main thread: leave the default
        signal.signal(signal.SIGTERM, _raise)


def versions() -> dict[str, str]:
    """Tags ``version.<package>`` for the packages whose behaviour the results depend on."""
    out = {}
    for package in ("tensorflow", "keras", "mlflow", "optuna", "numpy", "h5py"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[f"version.{package}"] = importlib.metadata.version(package)
    return out


def experiment_id(name: str) -> str:
    """The id of experiment ``name``, created if it does not exist."""
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    return client.create_experiment(name)


def describe_experiment(experiment: str, description: str) -> None:
    """Set up a study's experiment for the UI (:func:`naming.experiment_tags`): its description,
    kind and saved views, each only if the experiment does not have it yet (a user's edit stays).
    """
    client = mlflow.MlflowClient()
    existing = client.get_experiment(experiment).tags
    for key, value in naming.experiment_tags(description, get_current_time_millis()).items():
        if key not in existing:
            client.set_experiment_tag(experiment, key, value)


def create_run(experiment: str, name: str, parent_run_id: str | None = None,
               tags: Mapping[str, str] | None = None) -> str:
    """Create a RUNNING run (nested under ``parent_run_id`` if given) and return its id."""
    all_tags = {naming.PARENT: parent_run_id} if parent_run_id else {}
    all_tags.update(tags or {})
    run = mlflow.MlflowClient().create_run(experiment, run_name=name,
                                           tags={k: str(v) for k, v in all_tags.items()})
    return run.info.run_id


@contextlib.contextmanager
def terminal_run(run_id: str) -> Iterator[str]:
    """Yield ``run_id`` and end the run FINISHED, FAILED or KILLED depending on how the block ends."""
    client = mlflow.MlflowClient()
    try:
        yield run_id
    except KeyboardInterrupt:
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException as exc:
        client.set_tag(run_id, naming.ERROR, _one_line(exc))
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def log_batch(run_id: str, params: Mapping | None = None, metrics: Sequence[Metric] = (),
              tags: Mapping | None = None) -> None:
    """Log params, metrics and tags in as few requests as MLflow's batch limits allow."""
    client = mlflow.MlflowClient()
    param_list = [Param(k, str(v)) for k, v in (params or {}).items()]
    tag_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    metrics = list(metrics)
    client.log_batch(run_id, params=param_list[:MAX_PARAMS_PER_BATCH],
                     metrics=metrics[:MAX_METRICS_PER_BATCH], tags=tag_list)
    for i in range(MAX_PARAMS_PER_BATCH, len(param_list), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=param_list[i:i + MAX_PARAMS_PER_BATCH])
    for i in range(MAX_METRICS_PER_BATCH, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])


def log_new_params(run_id: str, params: Mapping) -> None:
    """Log the params ``run_id`` does not have yet (``mlflow run`` logs its own first)."""
    existing = mlflow.MlflowClient().get_run(run_id).data.params
    log_batch(run_id, params={k: v for k, v in params.items() if k not in existing})


def series(name: str, values: Sequence[float], first_step: int = 0) -> list[Metric]:
    """Metric points ``name`` at steps ``first_step, first_step + 1, ...``."""
    now = get_current_time_millis()
    return [Metric(name, float(v), now, first_step + i) for i, v in enumerate(values)]


def scalars(values: Mapping[str, float]) -> list[Metric]:
    """Single metric points at step 0."""
    now = get_current_time_millis()
    return [Metric(k, float(v), now, 0) for k, v in values.items()]


def _one_line(exc: BaseException, limit: int = 4000) -> str:
    """``exc`` as one line of at most ``limit`` characters, keeping its start and its end (a
    TensorFlow error puts a long traceback between its name and what went wrong)."""
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    if len(text) <= limit:
        return text
    return f"{text[:limit // 4]} … {text[-(limit - limit // 4 - 3):]}"
