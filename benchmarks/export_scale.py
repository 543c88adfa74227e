"""Export at scale, and the start-up of commands that train nothing.

Usage (from the repository root)::

    python benchmarks/export_scale.py [--sizes 64,256,1024,4096] [--workdir DIR] [--before TREE]
    python benchmarks/export_scale.py startup [--before TREE] [--repeat 5]

``export`` (the default) times ``python -m pipeline export --formats csv,md,tex,png`` (``md``
brings Optuna's HTML pages, parameter importances among them) on sweeps of each size. The
sweeps are made without training them:

1. a template: a real ``sweeps/seed_grid64.yaml`` sweep (64 trials) on a small random
   features file (2,000 x 64), run once by ``python -m pipeline sweep`` into
   ``WORKDIR/template`` (kept and reused; ``--template DIR`` points at another such folder);
2. for each size N, a copy of the template's MLflow SQLite store and a new Optuna journal
   holding the template N/64 times over: replica r is the template's 64 trials at ``seed`` r, each trial
   its own run nested under one parent run, with the template run's params, tags (trial
   number, run name and description renumbered), every metric's per-epoch series and its
   ``step_loss.csv``; values of replica r > 0 are the template's times a seeded factor in
   [0.97, 1.03], so that trials differ. The Optuna study holds the N trials COMPLETE, with the
   grid's distributions (``seed`` over 0..N/64-1) and the template's attributes.

Each export runs in a fresh process, as a user runs it; the script reports its wall time, CPU
time (user + system, from the child's rusage), peak RSS and, with ``--profile``, the functions
of the pipeline where its time went. ``--before TREE`` also times the same export with the code
in TREE (e.g. ``git archive`` of an older commit) for a side-by-side comparison; an export
that takes longer than ``--timeout`` seconds is stopped and reported as such.

``startup`` times commands that train nothing (``--help``s, an error on a missing sweep file,
``export`` on an empty store) in fresh processes, this tree and ``--before`` alternating, and
says which of them import TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ROOT / "sweeps" / "seed_grid64.yaml"
GRID = 64
FORMATS = "csv,md,tex,png"


# --- the template: one real sweep -----------------------------------------------------------

def make_template(folder: Path, tree: Path = ROOT) -> Path:
    """Run a real 64-trial ``seed_grid64`` sweep into ``folder`` (once; reused when present)."""
    if (folder / "mlflow.db").exists() and (folder / "optuna-journal.log").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    features = folder / "features.h5"
    subprocess.run([sys.executable, "-c", _FEATURES, str(features)], check=True, env=_env(tree))
    print(f"template: a real {GRID}-trial sweep into {folder} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "pipeline", "sweep", "--features", str(features),
                    "--sweep", str(SWEEP)], cwd=folder, check=True,
                   env=_env(tree, f"sqlite:///{folder / 'mlflow.db'}"))
    return folder


_FEATURES = """
import sys
import numpy as np
from pipeline.features import write_features
rng = np.random.default_rng(0)
y = np.repeat([0, 1], 1000)
x = (np.abs(rng.standard_normal((2000, 64))) * 0.5 + y[:, None] * 0.2).astype(np.float32)
write_features(sys.argv[1], x, y, {"source": "benchmarks/export_scale.py (random)"})
"""


def _env(tree: Path, tracking_uri: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("MLFLOW_RUN_ID", None)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


RUN_TABLES = ("params", "tags", "metrics", "latest_metrics")  # rows keyed by run_uuid


def read_template(folder: Path) -> dict:
    """The template sweep: its store's rows of the parent and trial runs, and its Optuna study."""
    import optuna

    from pipeline import naming, storages

    db = sqlite3.connect(folder / "mlflow.db")
    parent = db.execute("SELECT run_uuid FROM tags WHERE key = ? AND value = 'sweep'",
                        (naming.STEP,)).fetchone()[0]
    trial_ids = [r for (r,) in db.execute("SELECT run_uuid FROM tags WHERE key = ? AND value = ?",
                                          (naming.PARENT, parent))]
    number = dict(db.execute(f"SELECT run_uuid, CAST(value AS INTEGER) FROM tags WHERE key = ? "
                             f"AND run_uuid IN ({','.join('?' * len(trial_ids))})",
                             (naming.TRIAL_NUMBER, *trial_ids)))
    trial_ids.sort(key=number.get)
    study_name = dict(db.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (parent,)))[naming.STUDY]
    study = optuna.load_study(study_name=study_name,
                              storage=storages.read_storage(str(folder / "optuna-journal.log")))
    db.close()
    return {"folder": folder, "parent": parent, "trials": trial_ids, "study": study}


# --- a clone of it, N trials ----------------------------------------------------------------

def fabricate(template: dict, n: int, folder: Path) -> str:
    """A sweep of ``n`` trials in ``folder`` (``mlflow.db``, ``mlruns/``, ``optuna-journal.log``):
    the template ``n / 64`` times over (see the module docstring). Returns the parent run's id.

    The store is the template's, copied, with the new trial runs' rows written into its tables
    directly (the template's own rows with new ids and the changes above): MLflow's client would
    take ~0.3 s a run on this machine, and the export reads the same rows either way."""
    from pipeline import naming, storages

    folder.mkdir(parents=True, exist_ok=True)
    source = template["folder"]
    shutil.copyfile(source / "mlflow.db", folder / "mlflow.db")
    replicas = n // GRID
    journal = folder / "optuna-journal.log"
    db = sqlite3.connect(folder / "mlflow.db")
    with db:
        _relocate_artifacts(db, source, folder, [template["parent"], *template["trials"]])
        parent = template["parent"]
        study_name = template["study"].study_name
        db.execute("UPDATE tags SET value = ? WHERE run_uuid = ? AND key = ?",
                   (storages.study_url(str(journal), study_name), parent, naming.STORAGE))
        for key, value in (("n_trials", str(n)), ("seeds", str(list(range(replicas))))):
            db.execute("UPDATE params SET value = ? WHERE run_uuid = ? AND key = ?", (value, parent, key))
        run_ids = list(template["trials"])
        for replica in range(1, replicas):
            run_ids += [_clone_run(db, folder, run_id, replica, replica * GRID + k)
                        for k, run_id in enumerate(template["trials"])]
    db.close()
    study = _new_study(template["study"], str(journal), parent, replicas)
    study.add_trials([_clone_trial(template["study"].trials[number % GRID], number // GRID,
                                   replicas, run_id) for number, run_id in enumerate(run_ids)])
    return parent


def _relocate_artifacts(db, source: Path, folder: Path, run_ids: list[str]) -> None:
    """Point the copied store's experiment and runs at ``folder/mlruns`` and copy the runs'
    artifacts there (the parent's ``export/`` left behind: the export writes it again)."""
    old, new = str(source / "mlruns"), str(folder / "mlruns")
    db.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (old, new))
    for run_id, uri in db.execute("SELECT run_uuid, artifact_uri FROM runs").fetchall():
        if run_id in run_ids:
            db.execute("UPDATE runs SET artifact_uri = ? WHERE run_uuid = ?", (uri.replace(old, new), run_id))
            shutil.copytree(uri, uri.replace(old, new), ignore=shutil.ignore_patterns("export"),
                            dirs_exist_ok=True)


def _factor(replica: int, k: int) -> float:
    import numpy as np

    return 1.0 if replica == 0 else float(np.random.default_rng([replica, k]).uniform(0.97, 1.03))


def _clone_run(db, folder: Path, run_id: str, replica: int, number: int) -> str:
    """Trial run ``number``: a copy of template trial run ``run_id`` at seed ``replica`` (name,
    description and trial number to match, losses times :func:`_factor`); returns its id."""
    from pipeline import naming

    new = uuid.uuid4().hex
    k = number % GRID
    factor = _factor(replica, k)
    run = list(db.execute("SELECT * FROM runs WHERE run_uuid = ?", (run_id,)).fetchone())
    columns = [c[1] for c in db.execute("PRAGMA table_info(runs)")]
    row = dict(zip(columns, run, strict=True))
    old_uri = row["artifact_uri"]
    row.update(run_uuid=new, name=re.sub(r"-s\d+$", f"-s{replica}", row["name"]),
               artifact_uri=old_uri.replace(run_id, new))
    db.execute(f"INSERT INTO runs ({','.join(columns)}) VALUES ({','.join('?' * len(columns))})",
               [row[c] for c in columns])
    Path(row["artifact_uri"]).mkdir(parents=True)
    shutil.copyfile(Path(old_uri, "step_loss.csv"), Path(row["artifact_uri"], "step_loss.csv"))
    tags = {naming.TRIAL_NUMBER: str(number), "mlflow.runName": row["name"]}
    for table in RUN_TABLES:
        columns = [c[1] for c in db.execute(f"PRAGMA table_info({table})")]
        rows = []
        for values in db.execute(f"SELECT * FROM {table} WHERE run_uuid = ?", (run_id,)).fetchall():
            item = dict(zip(columns, values, strict=True), run_uuid=new)
            if table == "params" and item["key"] == "seed":
                item["value"] = str(replica)
            elif table == "tags" and item["key"] in tags:
                item["value"] = tags[item["key"]]
            elif table == "tags" and item["key"] == naming.NOTE:
                item["value"] = re.sub(r"seed \d+", f"seed {replica}",
                                       item["value"].replace(f"Trial {k} ", f"Trial {number} ", 1))
            elif table.endswith("metrics") and "loss" in item["key"]:
                item["value"] *= factor
            rows.append([item[c] for c in columns])
        db.executemany(f"INSERT INTO {table} ({','.join(columns)}) VALUES "
                       f"({','.join('?' * len(columns))})", rows)
    return new


def _clone_trial(old, replica: int, replicas: int, run_id: str):
    """The Optuna trial of a cloned run: the template trial ``old`` at seed ``replica``."""
    import optuna

    from pipeline import studies

    factor = _factor(replica, old.number)
    params = {**old.params, "seed": replica}
    distributions = {**old.distributions,
                     "seed": optuna.distributions.CategoricalDistribution(tuple(range(replicas)))}
    return optuna.trial.create_trial(
        params=params, distributions=distributions, value=old.value * factor,
        user_attrs={**old.user_attrs, studies.RUN_ATTR: run_id},
        system_attrs={**old.system_attrs, "fixed_params": params},
        intermediate_values={s: v * factor for s, v in old.intermediate_values.items()})


def _new_study(source, journal: str, parent: str, replicas: int):
    """An Optuna study like ``source`` (name, directions, user attributes) in ``journal``."""
    import optuna

    from pipeline import storages, studies

    storage = storages.make_storage(journal)
    study = optuna.create_study(study_name=source.study_name, storage=storage,
                                directions=source.directions)
    for key, value in source.user_attrs.items():
        if key == studies.SPACE_ATTR:
            space = json.loads(value)
            space["axes"]["seed"] = list(range(replicas))
            value = json.dumps(space)
        study.set_user_attr(key, parent if key == studies.PARENT_ATTR else value)
    return study


# --- timing ---------------------------------------------------------------------------------

def time_command(argv: list[str], cwd: Path, env: dict, timeout: float) -> dict:
    """Wall and CPU seconds (user + system) and peak RSS of one command's process; killed after
    ``timeout`` seconds (``stopped``)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=err)
        stopper = threading.Timer(timeout, proc.kill)
        stopper.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        stopper.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024,
                "status": proc.returncode, "stopped": proc.returncode == -9,
                "stdout": out.read().decode(errors="replace"), "stderr": err.read().decode(errors="replace")}


def time_export(folder: Path, parent: str, tree: Path, timeout: float, profile: bool,
                label: str) -> dict:
    """``python -m pipeline export`` of the sweep in ``folder``, with the code in ``tree``, into
    ``folder/export-<label>``."""
    output = folder / f"export-{label.replace(' ', '-')}"
    prof = folder / "export.prof"
    python = [sys.executable] + (["-m", "cProfile", "-o", str(prof)] if profile else [])
    result = time_command(python + ["-m", "pipeline", "export", "--run_id", parent, "--output",
                                    str(output), "--formats", FORMATS],
                          folder, _env(tree, f"sqlite:///{folder / 'mlflow.db'}"), timeout)
    if result["status"] and not result["stopped"]:
        sys.exit(f"export failed in {folder}:\n{result['stderr'][-2000:]}")
    if profile and not result["stopped"]:
        result["profile"] = _profile_summary(prof)
    return result


def _profile_summary(path: Path, top: int = 12) -> str:
    """The pipeline's and the libraries' functions with the most cumulative time."""
    import io
    import pstats

    text = io.StringIO()
    stats = pstats.Stats(str(path), stream=text)
    stats.sort_stats("cumulative").print_stats(r"pipeline/|optuna/visualization|importance|"
                                               r"plotly/io|matplotlib/figure|search_runs", top)
    return "\n".join(line for line in text.getvalue().splitlines()
                     if re.match(r"\s*\d", line) or "ncalls" in line)


def run_export(args) -> None:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="export_scale-"))
    template_dir = make_template(Path(args.template) if args.template else workdir / "template")
    template = read_template(template_dir)
    print(f"{_load()}; template {template_dir} ({len(template['trials'])} trials)", file=sys.stderr)
    if len(template["trials"]) != GRID:
        sys.exit(f"the template holds {len(template['trials'])} trial runs, not {GRID}")
    sizes = [int(s) for s in args.sizes.split(",")]
    trees = [("this tree", ROOT)] + ([("before", Path(args.before))] if args.before else [])
    before_sizes = {int(s) for s in args.before_sizes.split(",")}
    rows = []
    for n in sizes:
        folder = workdir / f"n{n}"
        marker = folder / "parent_run_id"
        if not marker.exists():
            start = time.perf_counter()
            marker.parent.mkdir(parents=True, exist_ok=True)
            parent = fabricate(template, n, folder)
            marker.write_text(parent)
            print(f"fabricated {n} trials in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        parent = marker.read_text()
        for label, tree in trees:
            if label == "before" and n not in before_sizes:
                continue
            result = time_export(folder, parent, tree, args.timeout, False, label)
            if args.profile and label == "this tree":
                result["profile"] = time_export(folder, parent, tree, args.timeout, True,
                                                "profiled")["profile"]
            rows.append((n, label, result))
            done = f"stopped after {result['wall']:.0f} s" if result["stopped"] else \
                f"{result['wall']:.1f} s wall, {result['cpu']:.1f} s CPU, {result['rss_mb']:.0f} MiB peak"
            print(f"{n:>5} trials, {label}: {done}   ({_load()})", flush=True)
            if result.get("profile"):
                print(result["profile"], flush=True)
    print("\n| trials | code | wall, s | CPU, s | peak RSS, MiB |\n|---|---|---|---|---|")
    for n, label, r in rows:
        wall = f"stopped after {r['wall']:.0f}" if r["stopped"] else f"{r['wall']:.1f}"
        print(f"| {n:,} | {label} | {wall} | {r['cpu']:.1f} | {r['rss_mb']:.0f} |")


# --- start-up -------------------------------------------------------------------------------

STARTUP = {
    "--help": ["--help"],
    "sweep --help": ["sweep", "--help"],
    "export --help": ["export", "--help"],
    "sweep, missing sweep file": ["sweep", "--features", "features.h5", "--sweep", "missing.yaml"],
    "export, empty store": ["export", "--output", "out"],
}


def run_startup(args) -> None:
    trees = [("this tree", ROOT)] + ([("before", Path(args.before))] if args.before else [])
    times: dict[tuple[str, str], list[dict]] = {}
    imports_tf: dict[tuple[str, str], bool] = {}
    with tempfile.TemporaryDirectory() as tmp:
        env_store = f"sqlite:///{Path(tmp, 'mlflow.db')}"
        for name, argv in STARTUP.items():
            for label, tree in trees:
                probe = time_command([sys.executable, "-X", "importtime", "-m", "pipeline", *argv],
                                     Path(tmp), _env(tree, env_store), 300)
                imports_tf[name, label] = bool(re.search(r"\|\s+tensorflow$", probe["stderr"], re.M))
        for _ in range(args.repeat):
            for name, argv in STARTUP.items():
                for label, tree in trees:
                    result = time_command([sys.executable, "-m", "pipeline", *argv], Path(tmp),
                                          _env(tree, env_store), 300)
                    times.setdefault((name, label), []).append(result)
    print(f"{_load()}; median of {args.repeat} runs each, alternating\n")
    print("| command | code | imports TensorFlow | wall, s | CPU, s |\n|---|---|---|---|---|")
    for name in STARTUP:
        for label, _ in trees:
            runs = times[name, label]
            wall = statistics.median(r["wall"] for r in runs)
            cpu = statistics.median(r["cpu"] for r in runs)
            print(f"| `{name}` | {label} | {'yes' if imports_tf[name, label] else 'no'} | "
                  f"{wall:.2f} | {cpu:.2f} |")


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", nargs="?", default="export", choices=("export", "startup"))
    parser.add_argument("--sizes", default="64,256,1024,4096", help="trials per sweep")
    parser.add_argument("--workdir", help="folder for the template and the sweeps (kept; reused)")
    parser.add_argument("--template", help="folder of a real seed_grid64 sweep to clone")
    parser.add_argument("--before", help="another checkout of the project, timed side by side")
    parser.add_argument("--before-sizes", default="64,256,1024",
                        help="the sizes also timed with --before (its fANOVA takes minutes at 1,024)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before an export stops")
    parser.add_argument("--profile", action="store_true",
                        help="profile this tree's exports (a second, untimed run each)")
    parser.add_argument("--repeat", type=int, default=5, help="startup: runs of each command")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    run_export(args) if args.what == "export" else run_startup(args)


if __name__ == "__main__":
    main()
