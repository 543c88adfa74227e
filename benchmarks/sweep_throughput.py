"""Sweep throughput on the seed's workload: the project's sweep with each engine against a peer.

Usage (from the repository root)::

    python benchmarks/sweep_throughput.py [--keras-trials 6] [--peer-trials 6]
    python benchmarks/sweep_throughput.py --whole [--peer-trials 4] [--repeats 3]

It writes a seed-sized features file (20,000 x 2,048 float32, half of each class; 80/20
split) to a temporary folder and times, each in a fresh Python process (TensorFlow imported
before the clock starts; features read, trained, and every record written after):

- ``fused``: ``run_sweep`` on ``sweeps/seed_grid64.yaml`` (64 trials), engine fused, first
  and again last (the machine's speed drifts over the minutes the others take; the ratios use
  the mean of the two);
- ``keras``: the same sweep with engine keras, its first ``--keras-trials`` trials;
- ``peer``: the loop users write today: an Optuna objective written as Optuna's Keras
  example (optuna-examples ``keras/keras_simple.py``) writes it: ``clear_session``, build,
  compile, fit with the validation data, score by ``model.evaluate``; logging to MLflow with
  the fluent API after every epoch; its first ``--peer-trials`` grid points;
- ``floor``: the bare fused computation (``FusedEngine.train_many`` on arrays in memory) and
  the bare MLflow records of its 64 runs, one after the other with the project's own calls;
  also with the per-step losses as a metric series instead of ``step_loss.csv`` (what the
  series would cost).

``--whole`` times instead whole commands as a user waits for them, start to exit, side by side:
``python -m pipeline sweep`` on ``sweeps/seed_grid64.yaml`` into an MLflow store that already
exists, and into a new one; the same command with every head's result replayed from a file
(``replay``: the fused engine's results of these 64 heads, trained beforehand in another
process, handed back by an engine that trains nothing and imports no TensorFlow: everything a
sweep does but training, with nothing for the MLflow writer thread to overlap); and the peer's
whole process (interpreter, imports, its sampled trials; its 64 trials extrapolated as below,
its start-up counted once). Each sweep command runs ``--repeats`` times, the three in turn,
each run into a store and study of its own (a study already finished in a store would only be
resumed); the ratios use the medians. The peer runs once.

Sampled runs are extrapolated per trial to 64 (stated in the output). Every run records into
its own SQLite MLflow store, as ``make run`` does. The fused run also reports its peak RSS
against the features' size. It prints trials per second and the ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ROOT / "sweeps" / "seed_grid64.yaml"
ROWS, DIM = 20_000, 2_048


def rss_mb() -> float:
    """This process's resident memory now, in MiB."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its threads so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def extrapolate(result: dict, total: int = 64) -> float:
    """Seconds for ``total`` trials from a sample: everything outside the trials once, the first
    trial (which pays the process's warm-up) once, the mean of the others for the rest."""
    trials = result["trial_seconds"]
    outside = result["seconds"] - sum(trials)
    rest = trials[1:] or trials
    return outside + trials[0] + sum(rest) / len(rest) * (total - 1)


def make_features(path: Path) -> None:
    """Seed-sized features: non-negative like pooled ReLU outputs, the classes slightly apart."""
    import numpy as np

    from pipeline.features import write_features

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], ROWS // 2)
    x = np.abs(rng.standard_normal((ROWS, DIM), dtype=np.float32)) * 0.5
    x[:, :64] += (y[:, None] * 0.2).astype(np.float32)
    write_features(path, x, y, {"source": "benchmarks/sweep_throughput.py (random)"})


def use_store(folder: Path) -> None:
    import mlflow

    folder.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    mlflow.MlflowClient().search_experiments()  # create the store's tables before the clock starts


# --- the parts, each in its own process ------------------------------------------------------

def part_sweep(features: Path, folder: Path, engine: str, trials: int | None) -> dict:
    import mlflow
    import yaml

    from pipeline import naming
    from pipeline.sweep import run_sweep

    use_store(folder)
    sweep = folder / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({**yaml.safe_load(SWEEP.read_text()), "engine": engine}))
    baseline = rss_mb()
    cpu = cpu_seconds()
    start = time.perf_counter()
    outcome = run_sweep(str(features), str(sweep), n_trials=trials, progress=False)
    seconds = time.perf_counter() - start
    runs = mlflow.search_runs(experiment_ids=[outcome.experiment_id], output_format="list",
                              filter_string=f"tags.`{naming.PARENT}` = '{outcome.parent_run_id}'",
                              order_by=["attributes.start_time ASC"])
    return {"trials": sum(outcome.counts.values()), "seconds": seconds, "counts": outcome.counts,
            "cpu_seconds": cpu_seconds() - cpu, "baseline_rss_mb": baseline, "peak_rss_mb": peak_rss_mb(),
            "trial_seconds": [(r.info.end_time - r.info.start_time) / 1000 for r in runs]}


def part_peer(features: Path, folder: Path, trials: int) -> dict:
    """What users write today: Optuna objective -> Keras build + fit -> MLflow fluent logging.

    The objective follows Optuna's Keras example (optuna-examples ``keras/keras_simple.py``):
    it clears the Keras session first and scores the trial with ``model.evaluate`` on the
    validation data; MLflow gets the params, and the metrics after every epoch."""
    import h5py
    import keras
    import mlflow
    import numpy as np
    import optuna
    import yaml
    from sklearn.model_selection import train_test_split

    use_store(folder)
    spec = yaml.safe_load(SWEEP.read_text())
    fixed, space = spec["fixed"], spec["space"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trial_seconds = []
    cpu = cpu_seconds()
    start = time.perf_counter()
    with h5py.File(features) as h5:
        x, y = h5["train"][()], h5["label"][()]
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=fixed["validation_fraction"],
                                                      stratify=y, random_state=0)

    class LogEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            mlflow.log_metrics(logs, step=epoch)

    def objective(trial: optuna.Trial) -> float:
        begin = time.perf_counter()
        keras.backend.clear_session()  # as Optuna's Keras example starts each trial
        params = {name: trial.suggest_categorical(name, values) for name, values in space.items()}
        with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True):
            mlflow.log_params({**fixed, **params})
            model = keras.Sequential([
                keras.Input((x.shape[1],)), keras.layers.Dropout(fixed["dropout"]),
                keras.layers.Dense(params["units"], activation=params["activation"],
                                   kernel_initializer=params["init"])])
            model.compile(optimizer=keras.optimizers.SGD(params["learning_rate"]), loss=params["loss"],
                          metrics=["accuracy"])
            labels = (lambda t: t.reshape(-1, 1)) if params["units"] == 1 else (lambda t: np.eye(2)[t])
            model.fit(x_train, labels(y_train), batch_size=fixed["batch_size"], epochs=fixed["epochs"],
                      validation_data=(x_val, labels(y_val)), callbacks=[LogEpoch()], verbose=0)
            score = model.evaluate(x_val, labels(y_val), verbose=0)  # the example's score
            trial_seconds.append(time.perf_counter() - begin)
            return score[0]

    study = optuna.create_study(sampler=optuna.samplers.GridSampler(space, seed=0))
    mlflow.set_experiment("peer")
    with mlflow.start_run(run_name="peer-sweep"):
        study.optimize(objective, n_trials=trials)
    return {"trials": trials, "seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds() - cpu,
            "trial_seconds": trial_seconds}


def part_floor(features: Path, folder: Path) -> dict:
    """The bare fused computation on arrays in memory, and the bare MLflow records of its 64 runs.

    The records are what a sweep writes, with the project's own calls, one run after the
    other: create (with the sweep's tags), params, then :func:`pipeline.records.log_head`
    (per-epoch metrics, ``collapsed``, ``step_loss.csv``) and end; and the same with the
    per-step losses as a metric series (``step_series``: 625 more points per run).
    """
    import mlflow

    from pipeline import naming, records, tracking
    from pipeline.engine_fused import FusedEngine
    from pipeline.features import read_features
    from pipeline.split import stratified_split
    from pipeline.sweep_file import load_sweep

    gc.freeze()  # as run_sweep does: the libraries' objects out of the cyclic collector
    spec = load_sweep(SWEEP)
    configs = [spec.trial_config(point) for point in spec.grid()]
    data = read_features(features)
    y_val = data.y[stratified_split(data.y, configs[0].validation_fraction, configs[0].seed)[1]]
    cpu = cpu_seconds()
    start = time.perf_counter()
    results = FusedEngine().train_many(configs, data.x, data.y)
    compute, compute_cpu = time.perf_counter() - start, cpu_seconds() - cpu

    use_store(folder)
    client = mlflow.MlflowClient()
    tags = {f"tag{i}": "value" for i in range(16)}

    def record(experiment: str, step_series: bool = False) -> float:
        start = time.perf_counter()
        for config, result in zip(configs, results, strict=True):
            run_id = tracking.create_run(experiment, naming.trial_run_name(config), tags=tags)
            tracking.log_batch(run_id, params=config.params())
            records.log_head(run_id, result, y_val, config, step_series=step_series)
            client.set_terminated(run_id)
        return time.perf_counter() - start

    return {"trials": len(configs), "compute_seconds": compute, "compute_cpu_seconds": compute_cpu,
            "logging_seconds": record(client.create_experiment("floor")),
            "series_logging_seconds": record(client.create_experiment("floor-series"), step_series=True),
            "points_per_run": len(records.head_metrics(results[0], y_val, configs[0]))}


# --- the orchestration -----------------------------------------------------------------------

def part_results(features: Path, folder: Path) -> dict:
    """Train the grid's 64 heads with the fused engine and pickle their results for ``replay``."""
    from pipeline.engine_fused import FusedEngine
    from pipeline.features import read_features
    from pipeline.sweep_file import load_sweep

    spec = load_sweep(SWEEP)
    configs = [spec.trial_config(point) for point in spec.grid()]
    data = read_features(features)
    results = FusedEngine().train_many(configs, data.x, data.y)
    with open(folder / "results.pkl", "wb") as out:
        pickle.dump({_config_key(c): r for c, r in zip(configs, results, strict=True)}, out)
    return {"trials": len(configs)}


def _config_key(config) -> str:
    return json.dumps(config.params(), sort_keys=True)


def replay_sweep(results: Path, argv: list[str]) -> None:
    """Run the sweep command ``argv`` with an engine that trains nothing: it hands back the
    results pickled by :func:`part_results`. Exits non-zero if TensorFlow was imported."""
    from pipeline import sweep
    from pipeline.cli import main as cli_main
    from pipeline.engines import Engine

    with open(results, "rb") as held:
        replayed = pickle.load(held)

    class ReplayEngine(Engine):
        name, batch_trials = "fused", 256

        def train(self, config, split, on_epoch=None):
            return replayed[_config_key(config)]

        def train_many(self, configs, x, y, callbacks=None):
            return [replayed[_config_key(config)] for config in configs]

    sweep.make_engine = lambda name: ReplayEngine()
    cli_main(argv)
    gc.freeze()  # as `python -m pipeline` does before it exits
    if "tensorflow" in sys.modules:
        sys.exit("replay: TensorFlow was imported")
    sys.exit(0)


def run_part(args: list[str], cwd: Path) -> dict:
    """A part in its own process, in folder ``cwd`` (where its MLflow stores put artifacts)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, check=False)
    if done.returncode != 0:
        sys.exit(f"part {args[1]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def timed_command(argv: list[str], env: dict, cwd: Path) -> tuple[float, float, str]:
    """Wall and CPU seconds of a command run in folder ``cwd`` from start to exit, and its stdout.
    (A SQLite MLflow store puts the artifacts of the experiments it creates in the working
    folder's ``mlruns``.)"""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if status:
            sys.exit(f"{' '.join(argv)} failed:\n{err.read()[-3000:]}")
        return wall, usage.ru_utime + usage.ru_stime, out.read()


def whole_commands(tmp: Path, peer_trials: int, repeats: int) -> None:
    """The sweep command into an existing and into a new store, the replay, each ``repeats``
    times in turn (each run into a store of its own: a study already finished there would
    only be resumed), and the peer's whole process once."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_RUN_ID", None)
    features = tmp / "features.h5"
    sweep = [sys.executable, "-m", "pipeline", "sweep", "--features", str(features), "--sweep", str(SWEEP)]
    timed_command([sys.executable, __file__, "--part", "results", "--folder", str(tmp)], env, tmp)
    replay = [sys.executable, __file__, "--replay", str(tmp / "results.pkl"), *sweep[3:]]
    commands = {"sweep, existing store": (sweep, True, "sweep-existing"),
                "sweep, new store": (sweep, False, "sweep-new"),
                "replay (no training), existing store": (replay, True, "replay-existing")}
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for i in range(repeats):
        for name, (argv, existing, label) in commands.items():
            folder = tmp / f"{label}-{i}"
            folder.mkdir()
            uri = f"sqlite:///{folder / 'mlflow.db'}"
            if existing:  # MLflow creates the store's tables before the clock starts
                timed_command([sys.executable, "-c", "import mlflow, sys; mlflow.MlflowClient(sys.argv[1])"
                               ".search_experiments()", uri], env, folder)
            rows[name].append(timed_command(argv, {**env, "MLFLOW_TRACKING_URI": uri}, folder)[:2])
    wall, cpu, out = timed_command([sys.executable, __file__, "--part", "peer", "--folder", str(tmp),
                                    "--peer-trials", str(peer_trials)], env, tmp)
    peer = json.loads(out.strip().splitlines()[-1])
    start_up = wall - peer["seconds"]
    peer_wall = start_up + extrapolate(peer)
    peer_cpu = (cpu - peer["cpu_seconds"]) + peer["cpu_seconds"] * extrapolate(peer) / peer["seconds"]
    report_whole(rows, f"peer ({peer_trials} trials timed, 64 extrapolated)", peer_wall, peer_cpu)


def report_whole(rows: dict[str, list[tuple[float, float]]], peer_name: str, peer_wall: float,
                 peer_cpu: float) -> None:
    """Print each sweep command's median wall and CPU seconds and its runs, the peer's, and the
    ratios of the peer to each median (and to the fastest and slowest run)."""
    repeats = len(next(iter(rows.values())))
    print(f"whole commands, {SWEEP.relative_to(ROOT)} on {ROWS} x {DIM} features; load "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; each sweep command {repeats} times in "
          f"turn (median, and the runs), the peer once")
    print(f"{'command':<46} {'wall s':>7} {'CPU s':>7}  runs (wall s)")
    for name, runs in rows.items():
        walls = [w for w, _ in runs]
        print(f"{name:<46} {median(walls):>7.1f} {median([c for _, c in runs]):>7.1f}  "
              f"{' '.join(f'{w:.1f}' for w in walls)}")
    print(f"{peer_name:<46} {peer_wall:>7.1f} {peer_cpu:>7.1f}")
    for name, runs in rows.items():
        walls = [w for w, _ in runs]
        print(f"peer / {name}: {peer_wall / median(walls):.1f}x wall (runs {peer_wall / max(walls):.1f}-"
              f"{peer_wall / min(walls):.1f}x), {peer_cpu / median([c for _, c in runs]):.1f}x CPU")


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keras-trials", type=int, default=6, help="trials of the keras engine timed")
    parser.add_argument("--peer-trials", type=int, default=6, help="trials of the peer loop timed")
    parser.add_argument("--whole", action="store_true", help="time whole commands, start to exit")
    parser.add_argument("--repeats", type=_at_least_one, default=3,
                        help="with --whole: runs of each sweep command, in turn (default 3)")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--replay", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.replay:
        sys.path.insert(0, str(ROOT))
        replay_sweep(Path(args.replay), rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.part:
        from pipeline.quiet import quiet_tensorflow

        quiet_tensorflow()
        import tensorflow  # noqa: F401  (imported before any clock starts)

        folder, features = Path(args.folder), Path(args.folder) / "features.h5"
        part = {"fused": lambda: part_sweep(features, folder / "fused", "fused", None),
                "fused-again": lambda: part_sweep(features, folder / "fused-again", "fused", None),
                "keras": lambda: part_sweep(features, folder / "keras", "keras", args.keras_trials),
                "peer": lambda: part_peer(features, folder / "peer", args.peer_trials),
                "floor": lambda: part_floor(features, folder / "floor"),
                "results": lambda: part_results(features, folder)}[args.part]
        print(json.dumps(part()))
        return

    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        sys.path.insert(0, str(ROOT))
        make_features(Path(tmp) / "features.h5")
        os.sync()  # the file's pages on disk before any clock starts, not written back during one
        if args.whole:
            whole_commands(Path(tmp), args.peer_trials, args.repeats)
            return
        size_mb = (Path(tmp) / "features.h5").stat().st_size / 2**20
        load = os.getloadavg()
        common = ["--folder", tmp, "--keras-trials", str(args.keras_trials),
                  "--peer-trials", str(args.peer_trials)]
        results = {name: run_part(["--part", name, *common], Path(tmp))
                   for name in ("fused", "floor", "keras", "peer", "fused-again")}
        load = max(load[0], os.getloadavg()[0])

    # The fused sweep runs first and last: the machine's speed drifts over the minutes the others
    # take (a VM's neighbours), and the ratios use the mean of the two.
    first, again = results["fused"], results.pop("fused-again")
    print(f"fused sweep: {first['seconds']:.2f} s first, {again['seconds']:.2f} s after the others")
    for key in ("seconds", "cpu_seconds"):
        first[key] = (first[key] + again[key]) / 2

    seconds = {name: r["seconds"] if r["trials"] == 64 else extrapolate(r)
               for name, r in results.items() if name != "floor"}
    cpu = {name: r["cpu_seconds"] * (seconds[name] / r["seconds"]) for name, r in results.items()
           if name != "floor"}
    fused, floor = results["fused"], results["floor"]
    print(f"seed-sized features: {ROWS} x {DIM} float32 ({size_mb:.0f} MiB), {SWEEP.relative_to(ROOT)}; "
          f"highest 1-min load average seen: {load:.1f} on {os.cpu_count()} CPUs")
    print(f"{'':>6} {'timed':>6} {'seconds':>8} {'64 trials':>10} {'trials/s':>9} {'CPU s':>7}")
    for name in ("fused", "keras", "peer"):
        r = results[name]
        note = "" if r["trials"] == 64 else "  (64 extrapolated from the timed trials)"
        print(f"{name:>6} {r['trials']:>6} {r['seconds']:>8.2f} {seconds[name]:>10.2f} "
              f"{64 / seconds[name]:>9.3f} {cpu[name]:>7.1f}{note}")
    print(f"fused / peer: {seconds['peer'] / seconds['fused']:.1f}x   fused / keras engine: "
          f"{seconds['keras'] / seconds['fused']:.1f}x   keras engine / peer: "
          f"{seconds['peer'] / seconds['keras']:.2f}x   (CPU time: fused / peer "
          f"{cpu['peer'] / cpu['fused']:.1f}x)")
    bare = floor["compute_seconds"] + floor["logging_seconds"]
    print(f"floor: bare compute {floor['compute_seconds']:.2f} s ({floor['compute_cpu_seconds']:.1f} CPU s) "
          f"+ bare MLflow records {floor['logging_seconds']:.2f} s = {bare:.2f} s; the fused sweep takes "
          f"{fused['seconds'] / bare:.2f}x that ({fused['seconds'] - bare:+.2f} s)")
    print(f"records: {floor['points_per_run']} metric points and step_loss.csv per run; 64 runs written "
          f"{floor['logging_seconds']:.2f} s; with the per-step losses as a metric series instead "
          f"{floor['series_logging_seconds']:.2f} s")
    grown = fused["peak_rss_mb"] - fused["baseline_rss_mb"]
    print(f"fused sweep memory: peak RSS {fused['peak_rss_mb']:.0f} MiB, {grown:.0f} MiB above the "
          f"{fused['baseline_rss_mb']:.0f} MiB of the imported libraries = {grown / size_mb:.2f}x the "
          f"features ({size_mb:.0f} MiB)")


if __name__ == "__main__":
    main()
