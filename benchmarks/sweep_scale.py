"""How a sweep's cost grows with its study: per-trial cost, peak memory and export time.

Runs ``sweeps/seed_grid64.yaml`` with 1, 4, 16 and 64 seeds (64, 256, 1,024 and 4,096
trials) as a user runs it, ``python -m pipeline sweep`` into a fresh store each, on synthetic
features of the seed's width, then exports each sweep in every format. A sweep with one trial
measures the start-up, so the per-trial cost is ``(sweep - start-up) / (trials - 1)``; the
goal is a per-trial cost at 4,096 trials at most 1.25x the cost at 64. The start-up's swing
(a second or two) is a large part of a 64-trial sweep's few seconds of trials, so the start-up
and every sweep of up to ``--repeat-below`` trials are run ``--repeats`` times and their
medians taken. Both wall and CPU time are reported: CPU time per trial is the steadier figure
on a shared machine. ``--profile`` adds where the
largest sweep's time goes (cProfile of the same sweep in-process, the top functions by own time).

    python benchmarks/sweep_scale.py [--rows 2000] [--seeds 1,4,16,64] [--repeats 3] [--profile]

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


def median_sweep(folder: Path, feats: Path, seeds: int, repeats: int,
                 n_trials: int | None = None) -> tuple[float, float, float]:
    """Median wall, CPU and peak RSS of ``repeats`` sweeps of the grid, each into a fresh store
    (``folder/r<i>``); the last one's store is left in ``folder/r<repeats - 1>``."""
    runs = []
    for i in range(repeats):
        store = folder / f"r{i}"
        store.mkdir(parents=True)
        runs.append(sweep(store, feats, grid(store, seeds), n_trials))
    return tuple(statistics.median(column) for column in zip(*runs, strict=True))


def parent_run(folder: Path) -> str:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.`pipeline.step` = 'sweep'", max_results=1)
    return runs[0].info.run_id


def profile(folder: Path, feats: Path, sweep_file: Path) -> None:
    import cProfile
    import pstats

    import mlflow

    from pipeline.sweep import run_sweep

    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    profiler = cProfile.Profile()
    profiler.runcall(run_sweep, str(feats), str(sweep_file), progress=False)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--seeds", default="1,4,16,64")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--repeat-below", type=int, default=256,
                        help="sweeps of at most this many trials run --repeats times")
    args = parser.parse_args()
    print("| trials | sweep s | CPU s | start-up s (CPU s) | per trial ms | per trial CPU ms "
          "| peak RSS MiB | export s |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        feats = features(Path(tmp), args.rows)
        start_up, start_cpu, _ = median_sweep(Path(tmp, "startup"), feats, 1, args.repeats, 1)
        for seeds in (int(s) for s in args.seeds.split(",")):
            trials = 64 * seeds
            folder = Path(tmp, f"s{seeds}")
            repeats = args.repeats if trials <= args.repeat_below else 1
            wall, cpu, rss = median_sweep(folder, feats, seeds, repeats)
            store = folder / f"r{repeats - 1}"
            export = timed([sys.executable, "-m", "pipeline", "export", "--run_id", parent_run(store),
                            "--output", str(store / "export"), "--formats", "csv,md,tex,png"], store)[0]
            print(f"| {trials} | {wall:.1f} | {cpu:.1f} | {start_up:.1f} ({start_cpu:.1f}) | "
                  f"{1000 * (wall - start_up) / (trials - 1):.1f} | "
                  f"{1000 * (cpu - start_cpu) / (trials - 1):.1f} | {rss:.0f} | {export:.1f} |", flush=True)
        if args.profile:
            folder = Path(tmp, "profile")
            folder.mkdir()
            profile(folder, feats, grid(folder, max(int(s) for s in args.seeds.split(","))))


if __name__ == "__main__":
    sys.exit(main())
