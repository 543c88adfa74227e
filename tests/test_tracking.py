"""MLflow plumbing on a real SQLite store: run lifecycle, batched logging, artifacts, experiments."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

import pipeline.tracking as track
from pipeline import naming, sqlite_wal
from pipeline.errors import UserError
from pipeline.features import write_features
from tests.helpers import SMALL_STUDY, make_features, write_sweep


def client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient()


@pytest.fixture
def experiment(tracking):
    return client().create_experiment("tracking-exp")


def test_create_run_nests_under_its_parent_with_its_tags(experiment):
    parent = track.create_run(experiment, "parent")
    child = track.create_run(experiment, "child", parent_run_id=parent, tags={"seed": 3})
    run = client().get_run(child)
    assert run.info.status == "RUNNING" and run.info.run_name == "child"
    assert run.data.tags[naming.PARENT] == parent
    assert run.data.tags["seed"] == "3"
    assert naming.PARENT not in client().get_run(parent).data.tags


def test_terminal_run_finishes_a_run_whose_block_ends(experiment):
    run_id = track.create_run(experiment, "ok")
    with track.terminal_run(run_id) as yielded:
        assert yielded == run_id
    run = client().get_run(run_id)
    assert run.info.status == "FINISHED" and naming.ERROR not in run.data.tags


def test_terminal_run_fails_a_run_on_an_error_and_tags_it(experiment):
    run_id = track.create_run(experiment, "broken")
    with pytest.raises(ValueError, match="bad head"), track.terminal_run(run_id):
        raise ValueError("bad head:\n  units   2")
    run = client().get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[naming.ERROR] == "ValueError: bad head: units 2"


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, track.Terminated])
def test_terminal_run_kills_a_run_on_ctrl_c_or_sigterm(experiment, interrupt):
    run_id = track.create_run(experiment, "interrupted")
    with pytest.raises(interrupt), track.terminal_run(run_id):
        raise interrupt()
    run = client().get_run(run_id)
    assert run.info.status == "KILLED" and naming.ERROR not in run.data.tags


def test_end_lost_run_kills_it_with_the_reason_whatever_its_state(experiment):
    run_id = track.create_run(experiment, "lost")
    client().set_terminated(run_id, "FAILED")
    track.end_lost_run(run_id, "worker 123 gone")
    run = client().get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags[naming.ERROR] == "lost: worker 123 gone"
    track.end_lost_run(None, "nothing to end")
    track.end_lost_run("0" * 32, "a run of another store")  # no error


def test_log_batch_splits_past_mlflows_limits(experiment, monkeypatch):
    run_id = track.create_run(experiment, "big")
    calls = []
    original = mlflow.MlflowClient.log_batch

    def counting(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        calls.append((len(metrics), len(params), len(tags)))
        return original(self, run_id, metrics=metrics, params=params, tags=tags, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", counting)
    params = {f"p{i:03d}": i for i in range(250)}
    points = track.series("loss", [i / 10 for i in range(2500)])
    track.log_batch(run_id, params=params, metrics=points, tags={"t": 1})
    assert calls == [(1000, 100, 1), (0, 100, 0), (0, 50, 0), (1000, 0, 0), (500, 0, 0)]
    run = client().get_run(run_id)
    assert run.data.params == {k: str(v) for k, v in params.items()}
    assert run.data.tags["t"] == "1"
    history = client().get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(2500))
    assert {m.step: m.value for m in history}[2499] == pytest.approx(249.9)


def test_log_batch_of_little_is_one_request(experiment, monkeypatch):
    run_id = track.create_run(experiment, "small")
    calls = []
    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", lambda self, *a, **k: calls.append(k))
    track.log_batch(run_id, params={"a": 1}, metrics=track.scalars({"m": 2.0}))
    assert len(calls) == 1


def test_series_and_scalars_are_metric_points():
    points = track.series("val_loss", [0.5, 0.25], first_step=3)
    assert [(m.key, m.value, m.step) for m in points] == [("val_loss", 0.5, 3), ("val_loss", 0.25, 4)]
    assert [(m.key, m.value, m.step) for m in track.scalars({"positive_fraction": 0.5})] == [
        ("positive_fraction", 0.5, 0)]


@pytest.mark.parametrize("created_here", [True, False])
def test_log_text_writes_an_artifact_at_the_runs_root(experiment, tmp_path, monkeypatch, created_here):
    monkeypatch.chdir(tmp_path)  # the experiment's artifacts go beside the store
    if created_here:
        run_id = track.create_run(experiment, "with-file")
    else:  # a run made elsewhere: its artifact location is asked of the store
        run_id = client().create_run(experiment).info.run_id
    track.log_text(run_id, "step,epoch,loss\n0,0,0.5\n", "step_loss.csv")
    assert [f.path for f in client().list_artifacts(run_id)] == ["step_loss.csv"]
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="step_loss.csv",
                                                dst_path=str(tmp_path / "down"))
    with open(local) as fh:
        assert fh.read() == "step,epoch,loss\n0,0,0.5\n"


def test_log_new_params_keeps_the_params_a_run_has(experiment):
    run_id = track.create_run(experiment, "params")
    track.log_batch(run_id, params={"images": "builtin:digits"})
    track.log_new_params(run_id, {"images": "other", "weights": "random"})
    assert client().get_run(run_id).data.params == {"images": "builtin:digits", "weights": "random"}


def test_experiment_id_creates_restores_or_only_looks_up(tracking):
    assert track.experiment_id("new-exp", create=False) is None
    assert mlflow.get_experiment_by_name("new-exp") is None  # nothing written
    created = track.experiment_id("new-exp")
    assert track.experiment_id("new-exp") == created
    client().delete_experiment(created)
    assert track.experiment_id("new-exp", create=False) == created
    assert client().get_experiment(created).lifecycle_stage == "deleted"
    assert track.experiment_id("new-exp") == created
    assert client().get_experiment(created).lifecycle_stage == "active"


def test_versions_name_the_libraries_the_numbers_depend_on():
    versions = track.versions()
    packages = ("tensorflow", "keras", "mlflow", "optuna", "numpy", "h5py")
    assert set(versions) == {f"version.{p}" for p in packages}
    assert versions["version.mlflow"] == mlflow.__version__


def test_check_reachable_skips_local_stores_and_fails_fast_on_a_dead_server(tracking, monkeypatch):
    track.check_reachable()  # sqlite: nothing to ask
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    mlflow.set_tracking_uri("http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(UserError, match=r"^tracking server http://127.0.0.1:9 cannot be reached \("):
        track.check_reachable(timeout=2)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"  # restored
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


def test_one_line_keeps_the_start_and_end_of_a_long_error():
    exc = RuntimeError("head\n" + "x " * 5000 + "what went wrong")
    text = track._one_line(exc, limit=400)
    assert len(text) <= 400 and "\n" not in text
    assert text.startswith("RuntimeError: head x") and text.endswith("what went wrong")


def test_signals_wait_for_a_deferred_block_then_raise():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        track.install_sigterm_handler()
        done = []
        with pytest.raises(track.Terminated), track.deferred_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("the block ran to its end")
        assert done == ["the block ran to its end"]
        with pytest.raises(track.Terminated):
            track.raise_swallowed_interrupt()  # the signal is remembered
        with pytest.raises(KeyboardInterrupt, match="Ctrl-C"):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        track._deferral.update(received=None, pending=None)


@pytest.mark.parametrize(("uri", "local"), [
    ("sqlite:////tmp/s/mlflow.db", ("/tmp/s/mlflow.db", True)),
    ("file:///tmp/my%20store", ("/tmp/my store", False)),
    ("/tmp/runs", ("/tmp/runs", False)),
    ("databricks", None), ("databricks://profile", None), ("http://localhost:5000", None),
    ("postgresql://user@host/db", None),
], ids=["sqlite", "file URI, encoded", "plain path", "databricks", "databricks profile", "server",
        "postgresql"])
def test_local_store_is_where_mlflow_keeps_a_local_store(uri, local, monkeypatch, tmp_path):
    """One reading of a tracking URI for the store's checks, export's refusal and the default
    journal's place: a server (databricks included) has no local store, and its journal is
    ./optuna-journal.log."""
    found = track.local_store(uri)
    assert (None if found is None else (str(found[0]), found[1])) == local
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    try:
        folder = tmp_path if local is None else os.path.dirname(local[0]) if local[1] else local[0]
        assert track.default_study_storage() == os.path.join(folder, "optuna-journal.log")
    finally:
        mlflow.set_tracking_uri(None)


MOUNTS = r"""27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 27 0:51 / /mnt/lab\040share rw,relatime - nfs4 server:/lab rw,vers=4.2
41 40 0:52 / /mnt/lab\040share/scratch rw,relatime - tmpfs tmpfs rw
42 27 0:53 / /mnt/lab rw,relatime - xfs /dev/vdb rw
43 27 0:54 / /mnt/lab rw,relatime - cifs //nas/lab rw
44 27 0:55 / /mnt/données\040x rw,relatime - nfs4 server:/d rw"""


@pytest.mark.parametrize(("path", "filesystem"), [
    ("/home/me/mlflow.db", "ext4"), ("/mnt/lab share/runs", "nfs4"), ("/mnt/lab share", "nfs4"),
    ("/mnt/lab share/scratch/x", "tmpfs"), ("/mnt/lab/x", "cifs"), ("/mnt/labx", "ext4"),
    ("/mnt/données x/runs", "nfs4"),
], ids=["root", "network", "mount point", "local inside network", "mounted over", "name prefix",
        "non-ASCII"])
def test_filesystem_of_reads_the_closest_mount_in_linuxs_table(path, filesystem):
    """The mount point closest to the path holds it (a mount point's escapes decoded, its
    other characters kept); of two mounts on one point the later one; a name that only starts
    like a mount point is not under it."""
    assert sqlite_wal.filesystem_of(Path(path), MOUNTS) == filesystem


def test_filesystem_of_a_path_under_a_hidden_mount_is_its_devices():
    """A mount hidden under a later mount of its parent does not hold the path: the path's
    device tells which mount does; a device no mount on the way shows (a btrfs subvolume)
    leaves the closest mount."""
    table = ("27 1 254:0 / / rw - ext4 /dev/vda rw\n40 27 0:51 / /srv/data/x rw - nfs4 s:/ rw\n"
             "41 27 0:52 / /srv/data rw - tmpfs tmpfs rw")
    path = Path("/srv/data/x/mlflow.db")
    assert sqlite_wal.filesystem_of(path, table, (0, 52)) == "tmpfs"
    assert sqlite_wal.filesystem_of(path, table, (0, 51)) == "nfs4"
    assert sqlite_wal.filesystem_of(path, table, (0, 99)) == "nfs4"
    assert sqlite_wal.filesystem_of(path, table) == "nfs4"


def test_filesystem_of_a_path_no_mount_holds_is_none():
    assert sqlite_wal.filesystem_of(Path("/x"), "40 27 0:51 / /mnt rw - nfs4 s:/ rw") is None


def journal_mode(database: Path) -> str:
    with contextlib.closing(sqlite3.connect(database)) as db:
        return db.execute("PRAGMA journal_mode").fetchone()[0]


@pytest.mark.parametrize(("local", "write_ahead"), [(True, True), (False, True), (True, False)],
                         ids=["local disk", "network file system", "a command that writes no rows"])
def test_a_sqlite_store_writes_ahead_only_on_a_local_disk(tmp_path, monkeypatch, local, write_ahead):
    """A SQLite store opened after ``prepare_store`` runs in write-ahead mode with
    ``synchronous=NORMAL`` on a local disk, and keeps SQLite's rollback journal elsewhere and
    for a command that writes no rows; closed, it is a rollback-journal file on its own, and
    stays one when the process uses it again."""
    monkeypatch.setattr(sqlite_wal, "on_local_disk", lambda folder: local)
    monkeypatch.chdir(tmp_path)
    database = tmp_path / "mlflow.db"
    mlflow.set_tracking_uri(f"sqlite:///{database}")
    try:
        track.prepare_store(write_ahead)
        store = mlflow.MlflowClient()
        store.create_experiment("wal")
        engine = store._tracking_client.store.engine
        with engine.connect() as connection:
            modes = [connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                     for name in ("journal_mode", "synchronous")]
        sqlite_wal.close()
        store.create_experiment("after")  # used after the command, a store is a plain one
        after = sorted(p.name for p in tmp_path.iterdir() if p.name != "mlruns")
        sqlite_wal.close()
    finally:
        mlflow.set_tracking_uri(None)
    switched = local and write_ahead
    assert modes == (["wal", 1] if switched else ["delete", 2])  # NORMAL, else SQLite's FULL
    assert journal_mode(database) == "delete"
    assert after == ["mlflow.db"]


@pytest.mark.slow
def test_a_sweep_leaves_its_store_whole_and_plain_at_exit(tmp_path):
    """``python -m pipeline sweep`` into a store on a local disk, registering its best head
    (MLflow's model registry opens the file with an engine of its own), folds the log into
    the database and switches it back to the rollback journal as it exits: beside the
    journal and the artifacts only ``mlflow.db`` is left, holding every run."""
    if not sqlite_wal.on_local_disk(tmp_path):
        pytest.skip("the test folder is not on a local file system: the store is not switched")
    features = write_features(tmp_path / "features.h5", *make_features(), {})
    sweep = write_sweep(tmp_path, {**SMALL_STUDY, "seeds": [0], "engine": "fused"})
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("MLFLOW_RUN_ID", None)
    subprocess.run([sys.executable, "-m", "pipeline", "sweep", "--features", str(features), "--sweep",
                    sweep, "--register_model", "wal-best"], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=300)
    left = {p.name for p in tmp_path.iterdir()} - {"mlruns", "features.h5", "sweep.yaml"}
    assert left == {"mlflow.db", "optuna-journal.log"}
    assert journal_mode(tmp_path / "mlflow.db") == "delete"
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as db:
        assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1 + 4  # parent, 4 trials
        assert db.execute("SELECT name FROM registered_models").fetchall() == [("wal-best",)]
