"""How a sweep's cost grows with its study: per-trial cost, peak memory and export time.

Runs ``sweeps/seed_grid64.yaml`` with 1, 4, 16 and 64 seeds (64, 256, 1,024 and 4,096
trials) as a user runs it, ``python -m pipeline sweep`` into a fresh store each, on synthetic
features of the seed's width, then exports each sweep in every format. A sweep with one trial
measures the start-up, so the per-trial cost is ``(sweep - start-up) / (trials - 1)``; the
goal is a per-trial cost at 4,096 trials at most 1.25x the cost at 64.

The start-up (~20 s of CPU) dwarfs a 64-trial sweep's few seconds of trials, and this
machine's speed drifts by more than that difference within minutes, so each sweep is measured
against start-ups run right before and right after it (``S X S X S ...``): its per-trial cost
uses the mean of the two, and the sweeps of up to ``--repeat-below`` trials run ``--repeats``
times, the median per-trial cost taken. Both wall and CPU time are reported: CPU time per
trial is the steadier figure on a shared machine. ``--profile`` adds where the largest sweep's
time goes: cProfile of the same sweep in-process, every thread's total and the top functions
by own time over all threads (the MLflow writer thread is most of a sweep).

    python benchmarks/sweep_scale.py [--rows 2000] [--seeds 1,4,16,64] [--repeats 5] [--profile]

Results go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
GRID = ROOT / "sweeps" / "seed_grid64.yaml"


def features(folder: Path, rows: int, width: int = 2048) -> Path:
    from pipeline.features import write_features

    rng = np.random.default_rng(0)
    y = (rng.random(rows) < 0.5).astype(np.int64)
    x = (rng.normal(size=(rows, width)) + np.outer(2 * y - 1, rng.normal(size=width)) * 0.05)
    return write_features(folder / "features.h5", x.astype(np.float32), y, {})


def grid(folder: Path, seeds: int) -> Path:
    spec = yaml.safe_load(GRID.read_text()) | {"seeds": list(range(seeds)), "name": f"scale{seeds}"}
    path = folder / f"scale{seeds}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def timed(argv: list[str], cwd: Path) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (MiB) of a command."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_RUN_ID", None)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def sweep(folder: Path, feats: Path, sweep_file: Path, n_trials: int | None = None) -> tuple:
    argv = [sys.executable, "-m", "pipeline", "sweep", "--features", str(feats), "--sweep", str(sweep_file)]
    if n_trials:
        argv += ["--n_trials", str(n_trials)]
    return timed(argv, folder)


def bracketed(folder: Path, feats: Path, seeds: int, repeats: int) -> dict[str, float]:
    """``repeats`` sweeps of the grid with a one-trial sweep before, between and after them,
    each into a fresh store (``folder/s<i>``, ``folder/r<i>``; the last sweep's store is left in
    ``folder/r<repeats - 1>``): the medians of the sweeps' wall, CPU and peak RSS, of the
    start-ups, and of each sweep's per-trial wall and CPU ms against the start-ups beside it."""
    trials = 64 * seeds

    def start_up(i: int) -> tuple[float, float, float]:
        store = folder / f"s{i}"
        store.mkdir(parents=True)
        return sweep(store, feats, grid(store, 1), 1)

    starts, runs = [start_up(0)], []
    for i in range(repeats):
        store = folder / f"r{i}"
        store.mkdir(parents=True)
        runs.append(sweep(store, feats, grid(store, seeds)))
        starts.append(start_up(i + 1))
    per_trial = [[1000 * (run[k] - (before[k] + after[k]) / 2) / (trials - 1) for k in (0, 1)]
                 for run, before, after in zip(runs, starts[:-1], starts[1:], strict=True)]
    median = statistics.median
    return {"wall": median(r[0] for r in runs), "cpu": median(r[1] for r in runs),
            "rss": median(r[2] for r in runs), "start_wall": median(s[0] for s in starts),
            "start_cpu": median(s[1] for s in starts), "trial_wall": median(p[0] for p in per_trial),
            "trial_cpu": median(p[1] for p in per_trial)}


def parent_run(folder: Path) -> str:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.`pipeline.step` = 'sweep'", max_results=1)
    return runs[0].info.run_id


def profile(folder: Path, feats: Path, sweep_file: Path) -> None:
    """Where a sweep's CPU time goes, in every Python thread: the main thread (claims, training,
    files, Optuna) and the threads it starts (the MLflow writer, heartbeats). cProfile follows
    one thread, so each thread started during the sweep gets its own profiler when it first
    runs Python; each counts its thread's CPU time (``time.thread_time``: waits count nothing),
    printed per thread and then summed per function."""
    import cProfile
    import pstats
    import threading

    import mlflow

    from pipeline.sweep import run_sweep

    threads: list[tuple[threading.Thread, cProfile.Profile]] = []

    def start_profiler(*_) -> None:
        sys.setprofile(None)
        threads.append((threading.current_thread(), cProfile.Profile(time.thread_time)))
        threads[-1][1].enable()

    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    main_thread = cProfile.Profile(time.thread_time)
    threading.setprofile(start_profiler)
    try:
        main_thread.runcall(run_sweep, str(feats), str(sweep_file), progress=False)
    finally:
        threading.setprofile(None)
    # a thread still running (a library's idle monitor) has open frames, which a profiler can
    # only close with another thread's clock: it is named and left out
    ended = [(thread.name, profiler) for thread, profiler in threads if not thread.is_alive()]
    print("still running, left out:", ", ".join(t.name for t, _ in threads if t.is_alive()) or "none")
    stats = pstats.Stats(main_thread)
    for name, profiler in [("main", main_thread), *ended]:
        profiler.create_stats()
        print(f"thread {name}: {sum(t for _, _, t, _, _ in profiler.stats.values()):.1f} CPU s")
        if profiler is not main_thread:
            stats.add(profiler)
    stats.sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="rows of the synthetic features")
    parser.add_argument("--seeds", default="1,4,16,64", help="seed counts to run (64 trials each)")
    parser.add_argument("--profile", action="store_true", help="profile the largest sweep, every thread")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each small sweep (median)")
    parser.add_argument("--repeat-below", type=int, default=256,
                        help="sweeps of at most this many trials run --repeats times")
    args = parser.parse_args()
    print("| trials | sweep s | CPU s | start-up s (CPU s) | per trial ms | per trial CPU ms "
          "| peak RSS MiB | export s |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        feats = features(Path(tmp), args.rows)
        for seeds in (int(s) for s in args.seeds.split(",")):
            trials = 64 * seeds
            folder = Path(tmp, f"s{seeds}")
            repeats = args.repeats if trials <= args.repeat_below else 1
            m = bracketed(folder, feats, seeds, repeats)
            store = folder / f"r{repeats - 1}"
            export = timed([sys.executable, "-m", "pipeline", "export", "--run_id", parent_run(store),
                            "--output", str(store / "export"), "--formats", "csv,md,tex,png"], store)[0]
            print(f"| {trials} | {m['wall']:.1f} | {m['cpu']:.1f} | {m['start_wall']:.1f} "
                  f"({m['start_cpu']:.1f}) | {m['trial_wall']:.1f} | {m['trial_cpu']:.1f} | "
                  f"{m['rss']:.0f} | {export:.1f} |", flush=True)
        if args.profile:
            folder = Path(tmp, "profile")
            folder.mkdir()
            profile(folder, feats, grid(folder, max(int(s) for s in args.seeds.split(","))))


if __name__ == "__main__":
    sys.exit(main())
