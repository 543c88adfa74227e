"""Real services for the scale-out tests: a PostgreSQL server and an MLflow tracking server.

PostgreSQL is Debian's package (``.ci/run`` installs it), run as the unprivileged ``postgres``
user when the tests run as root, on 127.0.0.1 and a free port, from a data folder in /tmp
that is removed afterwards. The MLflow server keeps its runs in that PostgreSQL and its
artifacts in a temporary folder. A service that cannot be started fails the tests that need
it: it is never skipped.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest

PG_USER = "postgres"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    which = shutil.which("pg_ctl")
    if which:
        return Path(which).resolve().parent
    raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql; "
                       ".ci/run does it)")


class Postgres:
    """A throwaway PostgreSQL cluster: ``start``, ``restart``, ``stop``, ``url(db)``."""

    def __init__(self):
        self.bin = _pg_bin()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="pg-test-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            try:
                user = pwd.getpwnam(PG_USER)
            except KeyError:
                raise RuntimeError(f"no '{PG_USER}' user to run PostgreSQL as (it comes with "
                                   f"Debian's postgresql package)") from None
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", PG_USER, "--"]

    def _run(self, *args: str) -> None:
        # Output to a file, not a pipe: a server started by pg_ctl would hold a pipe open.
        with open(self.root / "ctl.log", "a") as out:
            code = subprocess.run([*self.as_user, *args], stdout=out, stderr=out, timeout=120).returncode
        if code:
            logs = [(self.root / "ctl.log").read_text()[-1000:],
                    self.log.read_text()[-1000:] if self.log.exists() else ""]
            raise RuntimeError(f"{Path(args[0]).name} {args[-1]} failed: {' '.join(logs)}")

    def start(self) -> Postgres:
        if not self.data.exists():
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", PG_USER, "-A", "trust",
                      "-E", "UTF8", "--no-sync")
        options = (f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
                   f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                  "-t", "60", "-o", options, "start")
        return self

    def restart(self) -> None:
        """A fast restart: open connections are cut, as in a server reboot."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-m", "fast",
                  "-w", "-t", "60", "restart")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{db}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a PostgreSQL backend store."""

    def __init__(self, backend_uri: str, root: Path):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "mlflow-server.log"
        mlflow = Path(sys.executable).parent / "mlflow"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--backend-store-uri", backend_uri, "--artifacts-destination",
                 str(root / "artifacts"), "--workers", "2"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer in 120 s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="session")
def postgres():
    """A running PostgreSQL (fails, never skips, when it cannot be started)."""
    try:
        server = Postgres().start()
    except RuntimeError as exc:
        pytest.fail(f"PostgreSQL could not be started: {exc}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(postgres, tmp_path_factory):
    """A running ``mlflow server`` whose backend store is a database of ``postgres``."""
    try:
        server = MlflowServer(postgres.create_database("mlflow"), tmp_path_factory.mktemp("mlflow"))
    except RuntimeError as exc:
        pytest.fail(f"mlflow server could not be started: {exc}")
    yield server
    server.stop()


# --- Studies the scale-out tests run, and what they must leave -------------------------------

ROOT = Path(__file__).resolve().parents[1]
HEADS = [
    {"activation": "softmax", "units": 1, "loss": "binary_crossentropy", "learning_rate": 0.05},
    {"activation": "softmax", "units": 2, "loss": "categorical_crossentropy", "learning_rate": 0.05},
    {"activation": "sigmoid", "units": 1, "loss": "binary_crossentropy", "learning_rate": 0.1},
    # Keras rejects the sparse loss on one unit: a trial that FAILs with a reason.
    {"activation": "softmax", "units": 1, "loss": "sparse_categorical_crossentropy",
     "learning_rate": 0.05},
]


@contextlib.contextmanager
def unreachable_server(kind: str):
    """The URL of a tracking server that does not answer, for the block: ``refusing`` (nothing
    listens on its port) or ``silent`` (it accepts connections and never answers)."""
    with socket.socket() as listener:
        if kind == "silent":
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            port = listener.getsockname()[1]
        else:
            port = free_port()
        yield f"http://127.0.0.1:{port}"


def tiny_study(folder: Path, n_seeds: int, epochs: int = 1, name: str = "scale",
               engine: str = "keras") -> tuple[str, str, int]:
    """A small features file and a grid sweep of 4 heads x ``n_seeds`` seeds, one epoch each.

    ``keras`` trains trial by trial, so workers share the queue trial by trial; ``fused`` takes
    batches. Returns (features path, sweep path, budget); a quarter of the trials FAIL by design.
    """
    import yaml

    from pipeline.features import write_features
    from tests.helpers import make_features

    x, y = make_features(n=160, d=16)
    features = write_features(folder / "features.h5", x, y, {})
    sweep = folder / f"{name}.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": name, "experiment": f"{name}-exp", "sampler": "grid", "engine": engine,
        "seeds": list(range(n_seeds)), "fixed": {"epochs": epochs, "batch_size": 64},
        "space": HEADS}))
    return str(features), str(sweep), 4 * n_seeds


def start_sweep(folder: Path, tracking_uri: str, *args: str, env: dict | None = None,
                log: str = "sweep") -> subprocess.Popen:
    """``python -m pipeline sweep ARGS`` in the background, output in ``folder/<log>.log``."""
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": str(ROOT),
                **(env or {})}
    full_env.pop("MLFLOW_RUN_ID", None)
    out = open(folder / f"{log}.log", "w")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "sweep", *args], cwd=folder,
                            env=full_env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.log_path = folder / f"{log}.log"
    return proc


@pytest.fixture
def launch(tmp_path):
    """:func:`start_sweep` in ``tmp_path``; whatever still runs at the end (a failed test) is
    killed with its worker processes."""
    procs = []

    def start(tracking_uri: str, *args: str, env: dict | None = None, log: str = "sweep"):
        procs.append(start_sweep(tmp_path, tracking_uri, *args, env=env, log=log))
        return procs[-1]
    yield start
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def audit(storage: str, study_name: str | None, tracking_uri: str, budget: int) -> dict:
    """Check what a finished study (``study_name``, or the storage's one study) left in Optuna
    and MLflow; return its counts.

    Invariants: ``complete + fail`` is the budget and nothing waits or runs; trial numbers are
    unique; every counted FAIL has a reason; every finished trial has exactly one MLflow run
    under the one parent run and every run there belongs to exactly one trial; no run is
    RUNNING; retried attempts' runs are KILLED, counted trials' runs FINISHED or FAILED.
    """
    import mlflow
    import optuna

    from pipeline import naming, studies
    from tests.helpers import load_study

    study = load_study(storage, study_name)
    trials = study.get_trials()
    counts = studies.tally(study)
    assert counts["complete"] + counts["fail"] == budget, counts
    assert counts["running"] == counts["waiting"] == counts["pruned"] == 0, counts
    assert len({t.number for t in trials}) == len(trials)
    retried = studies.retried_numbers(trials)
    assert all(t.state.is_finished() for t in trials)
    for t in trials:
        if t.state == optuna.trial.TrialState.FAIL and t.number not in retried:
            assert t.user_attrs.get(studies.REASON_ATTR), t
    client = mlflow.MlflowClient(tracking_uri)
    parent = client.get_run(study.user_attrs[studies.PARENT_ATTR])
    assert parent.info.status == "FINISHED"
    runs = client.search_runs([parent.info.experiment_id], max_results=5000,
                              filter_string=f"tags.`{naming.PARENT}` = '{parent.info.run_id}'")
    everything = client.search_runs([parent.info.experiment_id], max_results=5000)
    assert [r.info.run_id for r in everything if r.info.status == "RUNNING"] == []
    by_run = {r.info.run_id: r for r in runs}
    trial_runs = [t.user_attrs.get(studies.RUN_ATTR) for t in trials]
    assert len(set(trial_runs)) == len(trials) and set(trial_runs) == set(by_run)
    for t in trials:
        run = by_run[t.user_attrs[studies.RUN_ATTR]]
        assert run.data.tags[naming.TRIAL_NUMBER] == str(t.number)
        expected = ("KILLED",) if t.number in retried else (
            ("FINISHED",) if t.state == optuna.trial.TrialState.COMPLETE else ("FAILED",))
        assert run.info.status in expected, (t.number, run.info.status, run.data.tags.get("error"))
    return {**counts, "workers": len({t.user_attrs.get(studies.WORKER_ATTR) for t in trials}),
            "runs": len(runs), "trials": trials, "by_run": by_run}


def wait_for(condition, timeout: float = 120.0, every: float = 0.05):
    """Poll ``condition()`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {condition.__doc__}")


def trials_of(storage: str, study_name: str | None, pid: int) -> list:
    """The trials process ``pid`` has worked on in study ``study_name`` (or the storage's one
    study); none before the study exists."""
    from pipeline import studies
    from tests.helpers import load_study

    try:
        study = load_study(storage, study_name)
    except KeyError:  # not created yet
        return []
    return [t for t in study.get_trials() if t.user_attrs.get(studies.WORKER_ATTR, "").endswith(f":{pid}")]


def running_trial_of(storage: str, study_name: str | None, pid: int, started_within: float | None = None,
                     started_before: float = 0.0):
    """A RUNNING trial of process ``pid`` whose MLflow run exists, claimed at least
    ``started_before`` seconds ago (so it is training, not one of the study's trials that fail
    at once by design) and, with ``started_within``, at most that many (so that most of its
    training is still ahead), or None."""
    from optuna.trial import TrialState

    from pipeline import studies

    def find():
        """a trial in training"""
        now = datetime.now()
        return next((t for t in trials_of(storage, study_name, pid)
                     if t.state == TrialState.RUNNING and studies.RUN_ATTR in t.user_attrs
                     and started_before <= (now - t.datetime_start).total_seconds()
                     < (started_within or float("inf"))), None)
    return find


def finished_trial_of(storage: str, study_name: str | None, pid: int):
    """Whether process ``pid`` has finished a trial."""
    def find():
        """a trial finished by the process"""
        return any(t.state.is_finished() for t in trials_of(storage, study_name, pid))
    return find
