"""MLflow plumbing shared by the stages: versions, run lifecycle, batched logging.

Trial runs are created with :class:`mlflow.MlflowClient` and an explicit parent run id rather
than the fluent API, because MLflow's active-run stack is per thread and a sweep may log from
several. :func:`terminal_run` guarantees that a run never stays RUNNING: it ends FINISHED,
FAILED (an exception, with the message as the ``error`` tag) or KILLED (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.metadata
import logging
import os
import signal
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.utils.time import get_current_time_millis

from pipeline import lineage, naming, paths, sqlite_wal
from pipeline.errors import Terminated, UserError

STUDY_JOURNAL = "optuna-journal.log"  # the default Optuna storage's file, beside the store
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
DATASET_CONTEXT = "mlflow.data.context"  # a dataset input's tag: its role for the run (MLflow's key)
_ARTIFACT_URIS: dict[str, str] = {}  # run id -> artifact URI of runs created here (see log_text)

_deferral = {"depth": 0, "pending": None, "received": None}


def install_sigterm_handler() -> None:
    """Turn SIGTERM into :class:`Terminated` (and SIGINT into KeyboardInterrupt, as usual), so
    runs and trials are closed on the way out; inside :func:`deferred_interrupts` both wait
    until the block ends. The signal is also remembered, for :func:`raise_swallowed_interrupt`."""
    _deferral["received"] = None

    def _raise(signum, frame):
        _deferral["received"] = signum
        if _deferral["depth"]:
            _deferral["pending"] = signum
            return
        _interrupt(signum)
    with contextlib.suppress(ValueError):  # not in the main thread: leave the defaults
        signal.signal(signal.SIGTERM, _raise)
        signal.signal(signal.SIGINT, _raise)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends (a storage update that must not be cut in
    half, such as claiming a trial or telling its result), then raise them."""
    _deferral["depth"] += 1
    try:
        yield
    finally:
        _deferral["depth"] -= 1
        if not _deferral["depth"] and _deferral["pending"] is not None:
            signum, _deferral["pending"] = _deferral["pending"], None
            _interrupt(signum)


def raise_swallowed_interrupt() -> None:
    """Raise the interrupt of a signal received since :func:`install_sigterm_handler` whose
    exception never reached the sweep, if there was one.

    The handler raises wherever the main thread is, and there it can come out of a C
    extension's call back into Python and be turned into another error (TensorFlow's
    ``nest.flatten`` turns it into a ``SystemError``), which would fail the trial as an error
    of its own and let the sweep go on. Called where such an error would be taken for a
    trial's own.
    """
    if _deferral["received"] is not None:
        _interrupt(_deferral["received"])


def _interrupt(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt("Ctrl-C")
    raise Terminated(f"terminated by signal {signum}")


def check_reachable(timeout: float = 3.0) -> None:
    """Fail fast, with one line, when the tracking server does not answer.

    MLflow retries an unreachable server for minutes by default; this asks once, within
    ``timeout`` seconds (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``/``_TIMEOUT`` for one request), before
    a stage writes anything. Local stores (``sqlite:``, files) are not checked.
    """
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                                             "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout))})
    try:
        client().search_experiments(max_results=1)
    except Exception as exc:  # connection refused, timeout, 5xx, auth: all say the same to the user
        raise UserError(f"tracking server {uri} cannot be reached ({_one_line(exc)[:200]}); start "
                        f"it or point MLFLOW_TRACKING_URI elsewhere") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def local_store(uri: str) -> tuple[Path, bool] | None:
    """Where tracking URI ``uri`` keeps its store on this machine, and whether that is a file
    (a SQLite database) or a folder (a file store); None for a server (``http(s)``,
    ``databricks``, ``postgresql`` ...). A ``file:`` URI is decoded as MLflow decodes it."""
    from mlflow.utils.file_utils import local_file_uri_to_path
    from mlflow.utils.uri import is_local_uri

    database = paths.database_file(uri)
    if database is not None:
        return database, True
    return (Path(local_file_uri_to_path(uri)), False) if is_local_uri(uri) else None


def require_store() -> None:
    """Raise :class:`UserError` when the tracking URI names a local store that does not exist:
    a command that only reads runs (``export``) would otherwise create an empty store and then
    find no runs in it."""
    uri = mlflow.get_tracking_uri()
    local = local_store(uri)
    if local is not None and not local[0].exists():
        raise UserError(f"no MLflow store at {uri}: run export where the sweep's store is, or set "
                        f"MLFLOW_TRACKING_URI to it")


def prepare_store(write_ahead: bool = True) -> None:
    """Check the place of a local MLflow store and make its creation safe to race; call once per
    process, before the store is first used.

    A ``sqlite:`` store's file and a file store's folder are checked as every written place is
    (:mod:`pipeline.paths`: a missing folder is made, anything else unusable is a
    :class:`UserError`). MLflow creates a fresh SQLite store's tables in the first process that
    opens it, and processes doing that at the same moment break each other's migrations; so
    from here on, opening a SQLite store holds an exclusive lock on its folder (``flock`` on
    the folder itself: no lock file) until MLflow has created or checked the tables. With
    ``write_ahead`` (a command that records runs; not ``export``, which writes no rows) its
    connections then write ahead when it is on a local disk (:mod:`pipeline.sqlite_wal`). The
    store itself is not opened here, so a command that stops on bad input still leaves none.
    """

    local = local_store(mlflow.get_tracking_uri())
    if local is not None:
        path, is_file = local
        (paths.writable_file if is_file else paths.writable_dir)(path, "MLflow store")
    # MLflow's table of store builders by URI scheme (the one its tracking-store plugins join)
    from mlflow.tracking._tracking_service import utils as store_utils

    builder = store_utils._tracking_store_registry.get_store_builder("sqlite://")
    mlflows = getattr(builder, "mlflows", builder)  # MLflow's own, under an earlier call's wrapper
    store_utils._register("sqlite", _folder_locked(mlflows))
    if write_ahead:
        sqlite_wal.begin()


def _folder_locked(builder):
    """``builder`` (MLflow's SQLite store constructor) run under an exclusive lock on the
    database's folder, so that one process at a time creates or checks the tables (and, in a
    command's write-ahead period, switches the journal: :func:`pipeline.sqlite_wal.use_wal`)."""
    @functools.wraps(builder)
    def build(store_uri, artifact_uri=None):
        database = paths.database_file(store_uri)
        if database is None:
            return builder(store_uri=store_uri, artifact_uri=artifact_uri)
        try:
            folder = os.open(database.parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # no folder to lock: MLflow reports the store's problem itself
            return builder(store_uri=store_uri, artifact_uri=artifact_uri)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            store = builder(store_uri=store_uri, artifact_uri=artifact_uri)
            sqlite_wal.use_wal(store.engine, database)
            return store
        finally:
            os.close(folder)  # releases the lock

    build.mlflows = builder
    return build


def end_lost_run(run_id: str | None, reason: str) -> None:
    """End the run of a trial that lost its worker (killed, interrupted, silent): KILLED, with
    ``lost: <reason>`` as its ``error`` tag, whatever state it was left in, since a lost trial is
    queued again and its retry carries the result. A run of another tracking store is skipped."""
    if not run_id:
        return
    store = client()
    try:
        store.set_tag(run_id, naming.ERROR, f"lost: {reason}")
        store.set_terminated(run_id, "KILLED")
    except mlflow.exceptions.MlflowException:
        pass


def versions() -> dict[str, str]:
    """Tags ``version.<package>`` for the packages whose behaviour the results depend on."""
    out = {}
    for package in ("tensorflow", "keras", "mlflow", "optuna", "numpy", "h5py"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[f"version.{package}"] = importlib.metadata.version(package)
    return out


def experiment_id(name: str, create: bool = True) -> str | None:
    """The id of experiment ``name``, created if it does not exist and restored if deleted;
    without ``create``, only looked up: None if it does not exist (nothing is written)."""
    store = client()
    experiment = store.get_experiment_by_name(name)
    if experiment is None:
        return store.create_experiment(name) if create else None
    if create and experiment.lifecycle_stage == "deleted":
        store.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def describe_experiment(experiment: str, description: str,
                        views: tuple[str, ...] = naming.BASE_VIEWS) -> None:
    """Set up a study's experiment for the UI (:func:`naming.experiment_tags`): its description,
    kind and saved ``views``, each only if the experiment does not have it yet (a user's edit
    stays; a study of another kind adds its own views).
    """
    store = client()
    existing = store.get_experiment(experiment).tags
    for key, value in naming.experiment_tags(description, get_current_time_millis(), views).items():
        if key not in existing:
            store.set_experiment_tag(experiment, key, value)


def client() -> mlflow.MlflowClient:
    """The process's MLflow client of the current tracking URI, made once per URI.

    A client resolves its model registry's URI when it is made, and MLflow looks for an active
    Spark session on the way (an attempt to import pyspark that walks ``sys.path``): a trial's
    records share one client instead of making one per call.
    """
    return _client(mlflow.get_tracking_uri())


@functools.lru_cache(maxsize=8)
def _client(tracking_uri: str) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri)


def find_run(run_id: str | None) -> mlflow.entities.Run | None:
    """Run ``run_id`` of the tracking store, deleted ones included; None if it has none."""
    try:
        return client().get_run(run_id) if run_id else None
    except mlflow.exceptions.MlflowException:
        return None


def launcher_run(run_id: str) -> mlflow.entities.Run:
    """The run a command records into (``MLFLOW_RUN_ID``: the run ``mlflow run`` opened, or
    ``main``'s), or :class:`UserError` unless it is a live run of this store: checked before
    anything is recorded, so that a stale id leaves no run RUNNING."""
    run = find_run(run_id)
    if run is None or run.info.lifecycle_stage == "deleted":
        state = "not in" if run is None else "deleted from"
        raise UserError(f"launcher run {run_id} (MLFLOW_RUN_ID): {state} the tracking store "
                        f"({mlflow.get_tracking_uri()}); unset MLFLOW_RUN_ID to start a run of its own")
    return run


def create_run(experiment: str, name: str, parent_run_id: str | None = None,
               tags: Mapping[str, str] | None = None) -> str:
    """Create a RUNNING run (nested under ``parent_run_id`` if given) and return its id; it
    carries MLflow's context tags (:func:`pipeline.lineage.context_tags`)."""
    all_tags = dict(lineage.context_tags())
    if parent_run_id:
        all_tags[naming.PARENT] = parent_run_id
    all_tags.update(tags or {})
    run = client().create_run(experiment, run_name=name, tags={k: str(v) for k, v in all_tags.items()})
    if len(_ARTIFACT_URIS) > 4096:
        _ARTIFACT_URIS.clear()
    _ARTIFACT_URIS[run.info.run_id] = run.info.artifact_uri
    return run.info.run_id


@contextlib.contextmanager
def terminal_run(run_id: str) -> Iterator[str]:
    """Yield ``run_id`` and end the run FINISHED, FAILED or KILLED depending on how the block ends."""
    store = client()
    try:
        yield run_id
    except KeyboardInterrupt:
        store.set_terminated(run_id, "KILLED")
        raise
    except BaseException as exc:
        store.set_tag(run_id, naming.ERROR, _one_line(exc))
        store.set_terminated(run_id, "FAILED")
        raise
    store.set_terminated(run_id, "FINISHED")


def log_batch(run_id: str, params: Mapping | None = None, metrics: Sequence[Metric] = (),
              tags: Mapping | None = None) -> None:
    """Log params, metrics and tags in as few requests as MLflow's batch limits allow."""
    store = client()
    param_list = [Param(k, str(v)) for k, v in (params or {}).items()]
    tag_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    metrics = list(metrics)
    store.log_batch(run_id, params=param_list[:MAX_PARAMS_PER_BATCH],
                    metrics=metrics[:MAX_METRICS_PER_BATCH], tags=tag_list)
    for i in range(MAX_PARAMS_PER_BATCH, len(param_list), MAX_PARAMS_PER_BATCH):
        store.log_batch(run_id, params=param_list[i:i + MAX_PARAMS_PER_BATCH])
    for i in range(MAX_METRICS_PER_BATCH, len(metrics), MAX_METRICS_PER_BATCH):
        store.log_batch(run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])


def log_features(run_id: str, dataset: Dataset, context: str = "training") -> None:
    """Record the features ``dataset`` (:func:`pipeline.lineage.features_dataset`) on ``run_id``
    with its role (``training``, or ``output`` for the run that made it)."""
    client().log_inputs(run_id, datasets=[DatasetInput(dataset, [InputTag(DATASET_CONTEXT, context)])])


def log_text(run_id: str, text: str | bytes, artifact_file: str) -> None:
    """Write ``text`` (or bytes) as the file ``artifact_file`` at the root of the run's artifacts.

    For a run made by :func:`create_run` the artifact location is already known, so this writes
    the file without asking the tracking store for the run (which ``MlflowClient.log_text``
    does for a run's first artifact: most of its cost for a sweep's small per-trial files).
    """
    uri = _ARTIFACT_URIS.get(run_id) or client().get_run(run_id).info.artifact_uri
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, artifact_file)
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        get_artifact_repository(uri, tracking_uri=mlflow.get_tracking_uri()).log_artifact(str(path))


def log_new_params(run_id: str, params: Mapping) -> None:
    """Log the params ``run_id`` does not have yet (``mlflow run`` logs its own first)."""
    existing = client().get_run(run_id).data.params
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


def default_study_storage() -> str:
    """The default Optuna storage: a journal file beside the MLflow store, so a fresh store
    starts fresh studies (``sqlite:///dir/mlflow.db`` and ``file:///dir`` give
    ``dir/optuna-journal.log``; a tracking server or ``databricks`` gives
    ``./optuna-journal.log``), as an
    absolute path."""
    local = local_store(mlflow.get_tracking_uri())
    folder = Path() if local is None else local[0].parent if local[1] else local[0]
    return str((folder / STUDY_JOURNAL).absolute())


@contextlib.contextmanager
def system_metrics(run_id: str, interval: float = 5.0) -> Iterator[None]:
    """Record MLflow's system metrics (CPU, memory, disk, network: ``system/...``) on ``run_id``
    every ``interval`` seconds while the block runs, and once more at its end (a block shorter
    than ``interval`` gets one point), so a long stage shows its load in the UI."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start/stop notices
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, samples_before_logging=1)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        with contextlib.suppress(Exception):  # the load record is best effort, never the stage's error
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
