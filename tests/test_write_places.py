"""Places the project writes, through the real command line.

An output, an Optuna storage (journal file or SQLite) or the MLflow store that cannot be
written ends with one line naming the path and the problem, exit 2, and nothing written: no
file, no MLflow run or experiment, no Optuna study. The cases: a file in the way (or a folder
where a file belongs), no permission (root emulates it with an immutable folder), a read-only
filesystem (a read-only bind mount in a private mount namespace). Missing folders are made.
Also: commands started together on a fresh MLflow store all succeed, and ``mlflow run``
against a tracking server that does not answer fails fast with MLflow's HTTP settings.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import mlflow
import numpy as np
import optuna
import pytest
import yaml

from pipeline import cli, naming
from pipeline.features import write_features
from pipeline.tracking import create_run, log_batch, series
from tests.services import ROOT, audit, tiny_study, unreachable_server

SWEEP = {"name": "places", "experiment": "places-exp", "fixed": {"epochs": 1},
         "space": {"activation": ["sigmoid"]}}
X, Y = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32), np.array([0, 1] * 20)
LOCKED = ("Operation not permitted", "Permission denied")  # root (immutable) / others (mode)


def a_file(path):
    path.write_text("in the way\n")
    return path


@pytest.fixture(scope="session")
def template(tmp_path_factory):
    """An MLflow store holding a finished sweep (made without training: a parent run and two
    trial runs), made once since MLflow's migrations take seconds; tests copy it. Yields its
    file and the parent run's id."""
    folder = tmp_path_factory.mktemp("template")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        point_mlflow(mp, f"sqlite:///{folder / 'mlflow.db'}")
        parent = fake_sweep()
        mlflow.set_tracking_uri(None)
    return folder / "mlflow.db", parent


def with_sweep(template, argv, store) -> tuple[list[str], int]:
    """For ``export``: the template store copied to ``store`` and its sweep named in ``argv``;
    returns the command line and the number of runs in the store."""
    if argv[0] != "export":
        return argv, 0
    shutil.copyfile(template[0], store)
    return [*argv, "--run_id", template[1]], 3


def fake_sweep() -> str:
    """A finished sweep's parent run with two trial runs in the current store; returns the
    parent's id."""
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("fake-sweep")
    parent = create_run(experiment, "fake", tags={naming.STEP: "sweep", naming.SWEEP_NAME: "fake"})
    for seed in (0, 1):
        run = create_run(experiment, f"trial-{seed}", parent, {naming.COLLAPSED: "false"})
        log_batch(run, params={"activation": "sigmoid", "units": 1, "loss": "binary_crossentropy",
                               "learning_rate": 0.1, "seed": seed},
                  metrics=[m for name in ("loss", "val_loss", "accuracy", "val_accuracy")
                           for m in series(name, [0.7, 0.6])])
        client.set_terminated(run, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    return parent


@pytest.fixture
def place(tmp_path, monkeypatch):
    """``tmp_path`` as the current folder with good inputs in it (``good.h5``, ``ok.yaml``) and
    MLflow pointed at ``tmp_path/mlflow.db`` (not made yet)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    point_mlflow(monkeypatch, f"sqlite:///{tmp_path / 'mlflow.db'}")
    write_features(tmp_path / "good.h5", X, Y, {})
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(SWEEP))
    yield tmp_path
    mlflow.set_tracking_uri(None)


def point_mlflow(monkeypatch, uri: str) -> None:
    """MLflow's store for this process and the commands it starts."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)


def one_error_line(argv, capsys) -> str:
    """Run the command line in this process; it must exit 2 with one line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def snapshot(folder):
    """Every path under ``folder`` with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in folder.rglob("*")}


def assert_store_untouched(uri: str, runs_before: int = 0) -> None:
    """No experiment but Default (and a fake sweep's), no run made, no artifact exported."""
    path = uri.removeprefix("sqlite:///")
    if not os.path.exists(path):
        return
    client = mlflow.MlflowClient(uri)
    experiments = client.search_experiments()
    assert {e.name for e in experiments} <= {"Default", "fake-sweep"}
    runs = client.search_runs([e.experiment_id for e in experiments])
    assert len(runs) == runs_before
    for run in runs:
        assert client.list_artifacts(run.info.run_id) == []


def assert_no_study(folder) -> None:
    """No Optuna study in any journal or SQLite file under ``folder``."""
    for path in folder.rglob("*"):
        if path.suffix in (".log", ".db") and path.name != "mlflow.db" and path.stat().st_size:
            storage = (f"sqlite:///{path}" if path.suffix == ".db"
                       else optuna.storages.JournalStorage(
                           optuna.storages.journal.JournalFileBackend(str(path))))
            assert optuna.get_all_study_names(storage) == []


SWEEP_ARGS = ["sweep", "--features", "good.h5", "--sweep", "ok.yaml"]
EXTRACT_ARGS = ["extract", "--images", "builtin:digits", "--weights", "random"]
MAIN_ARGS = ["main", "--features", "good.h5", "--sweep", "ok.yaml"]


def in_the_way_cases():
    """(setup, argv, the error line): ``{d}`` is the folder the command runs in."""
    yield pytest.param(lambda d: a_file(d / "out.txt"), ["export", "--output", "out.txt"],
                       "error: output out.txt: is a file, not a folder", id="export output: a file")
    yield pytest.param(lambda d: a_file(d / "f"), ["export", "--output", "f/out"],
                       "error: output f/out: f is a file, not a folder", id="export output: under a file")
    yield pytest.param(lambda d: a_file(d / "f"), [*SWEEP_ARGS, "--storage", "f/j.log"],
                       "error: storage f/j.log: f is a file, not a folder", id="journal: under a file")
    yield pytest.param(lambda d: (d / "jdir").mkdir(), [*SWEEP_ARGS, "--storage", "jdir"],
                       "error: storage jdir: is a folder, not a file", id="journal: a folder")
    yield pytest.param(lambda d: a_file(d / "f"), [*SWEEP_ARGS, "--storage", "sqlite:///f/o.db"],
                       "error: storage f/o.db: f is a file, not a folder",
                       id="sqlite storage: under a file")
    yield pytest.param(lambda d: a_file(d / "f"), SWEEP_ARGS,
                       "error: MLflow store {d}/f/mlflow.db: {d}/f is a file, not a folder",
                       id="MLflow store: under a file")
    yield pytest.param(lambda d: (d / "fdir").mkdir(), [*EXTRACT_ARGS, "--output", "fdir"],
                       "error: output fdir: is a folder, not a file", id="extract output: a folder")
    yield pytest.param(lambda d: a_file(d / "f"), [*EXTRACT_ARGS, "--output", "f/x.h5"],
                       "error: output f/x.h5: f is a file, not a folder",
                       id="extract output: under a file")
    yield pytest.param(lambda d: (d / "o" / "summary.md").mkdir(parents=True), ["export", "--output", "o"],
                       "error: output o/summary.md: is a folder, not a file",
                       id="export output: a folder where a table goes")
    yield pytest.param(lambda d: (d / "o" / "features.h5").mkdir(parents=True),
                       ["main", "--sweep", "ok.yaml", "--weights", "random", "--output", "o"],
                       "error: output o/features.h5: is a folder, not a file",
                       id="main output: a folder where the features go")
    yield pytest.param(lambda d: a_file(d / "f"), [*MAIN_ARGS, "--output", "f"],
                       "error: output f: is a file, not a folder", id="main output: a file")
    yield pytest.param(lambda d: ((d / "o").mkdir(), a_file(d / "o" / "export")),
                       [*MAIN_ARGS, "--output", "o"],
                       "error: output o/export: is a file, not a folder", id="main output: export a file")


@pytest.mark.parametrize(("setup", "argv", "line"), list(in_the_way_cases()))
def test_a_file_in_the_way_is_one_line_exit_2_and_writes_nothing(setup, argv, line, place,
                                                                 template, monkeypatch, capsys):
    argv, runs = with_sweep(template, argv, place / "mlflow.db")
    setup(place)
    if "MLflow store" in line:
        point_mlflow(monkeypatch, f"sqlite:///{place / 'f' / 'mlflow.db'}")
    before = snapshot(place)
    assert one_error_line(argv, capsys) == line.format(d=place)
    assert snapshot(place) == before
    assert_store_untouched(f"sqlite:///{place / 'mlflow.db'}", runs)


@pytest.fixture
def locked(place):
    """A folder ``locked`` in which no file can be made and an existing journal ``frozen.log``
    that cannot be written: immutable for root (``chattr +i``), read-only modes for anyone
    else; skipped where root cannot make them immutable."""
    folder, frozen = place / "locked", place / "frozen.log"
    folder.mkdir()
    frozen.write_text("")
    both = [str(folder), str(frozen)]
    if os.geteuid() == 0:
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", *both],
                                                        capture_output=True).returncode:
            pytest.skip("chattr +i is not available here (needs CAP_LINUX_IMMUTABLE and ext4, "
                        "xfs, btrfs or tmpfs)")
        undo = ["chattr", "-i", *both]
    else:
        folder.chmod(0o555)
        frozen.chmod(0o444)
        undo = ["chmod", "u+w", *both]
    try:
        yield folder
    finally:
        subprocess.run(undo, check=True)


def locked_cases():
    yield pytest.param([*SWEEP_ARGS, "--storage", "locked/new.log"],
                       "error: storage locked/new.log: cannot write in locked (", id="journal in it")
    yield pytest.param([*SWEEP_ARGS, "--storage", "frozen.log"],
                       "error: storage frozen.log: cannot write to it (", id="journal, existing")
    yield pytest.param([*SWEEP_ARGS, "--storage", "sqlite:///locked/o.db"],
                       "error: storage locked/o.db: cannot write in locked (", id="sqlite storage")
    yield pytest.param(SWEEP_ARGS, "error: MLflow store {d}/locked/mlflow.db: cannot write in {d}/locked (",
                       id="MLflow store")
    yield pytest.param(["export", "--output", "locked/out"],
                       "error: output locked/out: cannot write in locked (", id="export output")
    yield pytest.param([*EXTRACT_ARGS, "--output", "locked/x.h5"],
                       "error: output locked/x.h5: cannot write in locked (", id="extract output")
    yield pytest.param([*MAIN_ARGS, "--output", "locked/out"],
                       "error: output locked/out: cannot write in locked (", id="main output")


@pytest.mark.parametrize(("argv", "line"), list(locked_cases()))
def test_no_permission_is_one_line_exit_2_and_writes_nothing(argv, line, place, locked, template,
                                                            monkeypatch, capsys):
    argv, runs = with_sweep(template, argv, place / "mlflow.db")
    if "MLflow store" in line:
        point_mlflow(monkeypatch, f"sqlite:///{locked / 'mlflow.db'}")
    before = snapshot(place)
    error = one_error_line(argv, capsys)
    prefix = line.format(d=place)
    assert error.startswith(prefix) and error[len(prefix):-1] in LOCKED, error
    assert snapshot(place) == before
    assert_store_untouched(f"sqlite:///{place / 'mlflow.db'}", runs)


# --- A read-only filesystem: a read-only bind mount that only the command sees -----------------

def read_only_run(folder, argv, uri: str) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGV`` in ``folder``, in a private mount namespace where
    ``folder/ro`` is a read-only bind mount of itself (nobody else sees it read-only)."""
    mount = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.run(["unshare", "--mount", "sh", "-c", mount, "sh", str(folder / "ro"),
                           sys.executable, "-m", "pipeline", *argv],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def read_only(place, template):
    """``place/ro``, with an MLflow store in it; skipped where a private read-only bind mount
    cannot be made (no ``unshare``, no CAP_SYS_ADMIN)."""
    folder = place / "ro"
    folder.mkdir()
    probe = subprocess.run(["unshare", "--mount", "sh", "-c",
                            'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1"', "sh",
                            str(folder)], capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode:
        pytest.skip("no private read-only bind mount here (needs unshare and CAP_SYS_ADMIN)")
    shutil.copyfile(template[0], folder / "mlflow.db")
    return folder


def read_only_cases():
    yield pytest.param([*SWEEP_ARGS, "--storage", "ro/j.log"], False,
                       "error: storage ro/j.log: cannot write in ro (Read-only file system)",
                       id="journal")
    yield pytest.param([*SWEEP_ARGS, "--storage", "sqlite:///ro/o.db"], False,
                       "error: storage ro/o.db: cannot write in ro (Read-only file system)",
                       id="sqlite storage")
    yield pytest.param(SWEEP_ARGS, True,
                       "error: MLflow store {d}/ro/mlflow.db: cannot write in {d}/ro (Read-only "
                       "file system)", id="MLflow store")
    yield pytest.param(["export", "--output", "ro/out"], False,
                       "error: output ro/out: cannot write in ro (Read-only file system)",
                       id="export output")


@pytest.mark.slow  # a fresh process each, importing MLflow (and for export, matplotlib and plotly)
@pytest.mark.parametrize(("argv", "store_in_ro", "line"), list(read_only_cases()))
def test_a_read_only_filesystem_is_one_line_exit_2_and_writes_nothing(argv, store_in_ro, line,
                                                                     place, read_only, template):
    uri = f"sqlite:///{(read_only if store_in_ro else place) / 'mlflow.db'}"
    argv, runs = with_sweep(template, argv, place / "mlflow.db")
    runs = 3 if store_in_ro else runs  # the template's
    before = snapshot(place)
    result = read_only_run(place, argv, uri)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [line.format(d=place)]
    assert snapshot(place) == before
    assert_store_untouched(uri, runs)
    assert_no_study(place)


# --- Missing folders are made ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("storage", ["new/journal/j.log", "sqlite:///new/optuna/o.db"])
def test_missing_folders_of_the_store_the_storage_and_the_output_are_made(storage, place,
                                                                         monkeypatch, capsys):
    features, sweep, _ = tiny_study(place, n_seeds=1)
    budget = 1  # the folders are made before the first trial
    point_mlflow(monkeypatch, f"sqlite:///{place / 'new' / 'store' / 'mlflow.db'}")
    cli.main(["sweep", "--features", features, "--sweep", sweep, "--storage", storage,
              "--n_trials", str(budget)])
    cli.main(["export", "--output", "new/out/tables", "--formats", "csv"])
    assert (place / "new" / "store" / "mlflow.db").is_file()
    assert (place / "new" / "out" / "tables" / "trials.csv").is_file()
    result = audit(storage, None, mlflow.get_tracking_uri(), budget)
    assert result["runs"] == budget


# --- Concurrent starts on a fresh MLflow store ---------------------------------------------------

# argv: a folder to sign in, how many sign in, the command. TensorFlow and MLflow are loaded
# before signing in, so that the commands start, and reach the store, within milliseconds.
START_TOGETHER = """
import os, pathlib, sys, time
from pipeline.cli import main
import pipeline.sweep
ready = pathlib.Path(sys.argv[1])
(ready / str(os.getpid())).touch()
while len(list(ready.iterdir())) < int(sys.argv[2]):
    time.sleep(0.005)
main(sys.argv[3:])
"""


@pytest.mark.slow
def test_four_sweeps_started_together_on_a_fresh_store_all_succeed(tmp_path):
    """Four ``sweep`` commands, each with a study of its own, reach a fresh SQLite store (and
    its missing folder) within milliseconds of each other: MLflow creates the tables once, all
    four exit 0, and each study runs its budget under its parent run. (Commands sharing one
    study would not race: only the one that creates the study makes its parent run, the
    others wait for it.) One trial each: the race is over before the first trial starts."""
    features, sweep, _ = tiny_study(tmp_path, n_seeds=1)
    budget = 1
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_RUN_ID", None)
    ready = tmp_path / "ready"
    ready.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", START_TOGETHER, str(ready), "4", "sweep",
                               "--features", features, "--sweep", sweep, "--study", f"s{i}",
                               "--n_trials", str(budget)],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(4)]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-3000:]
    for i in range(4):
        assert audit(str(tmp_path / "store" / "optuna-journal.log"), f"s{i}", uri, budget)["runs"] == budget


# --- mlflow run against a tracking server that does not answer ----------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("server", ["refusing", "silent"])
def test_mlflow_run_fails_fast_with_mlflow_http_settings(tmp_path, server):
    """MLflow's launcher creates its run on the server before the project's command starts and
    retries it for minutes by default; with ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` and
    ``MLFLOW_HTTP_REQUEST_TIMEOUT=5`` it gives up at once (refused) or after 5 s (silent)."""
    features, sweep, _ = tiny_study(tmp_path, n_seeds=1)
    with unreachable_server(server) as uri:
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
               "PYTHONPATH": str(ROOT), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "TMPDIR": str(tmp_path)}
        env.pop("MLFLOW_RUN_ID", None)
        started = time.monotonic()
        result = subprocess.run(
            [shutil.which("mlflow") or "mlflow", "run", str(ROOT), "--env-manager", "local",
             "-e", "sweep", "-P", f"features={features}", "-P", f"sweep={sweep}",
             "-P", f"storage={tmp_path / 'journal.log'}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "Running command" not in result.stderr  # the project's command never started
    assert elapsed < 60, f"{elapsed:.1f} s"
    assert not (tmp_path / "journal.log").exists()
    print(f"mlflow run, tracking server {server}: failed after {elapsed:.1f} s (MLflow's start-up "
          f"included)")
