"""Regenerate the README's pictures: ``python -m tests.screenshots [--output docs/img]``.

Runs the default job (``mlflow run . --env-manager local``, as ``make run`` does) and a
``parity`` run on its features, in a store of its own in a temporary folder, then opens ``mlflow ui`` over it
in Debian's headless chromium (see tests/mlflow_ui.py) and photographs the pages the README
describes. The figures ``export`` wrote are copied beside them. Takes a few minutes on 2 cores;
needs the ``chromium`` and ``chromium-driver`` packages and the ``test`` extra (Selenium).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import yaml

from tests.mlflow_ui import MlflowPages, chromium, mlflow_ui

ROOT = Path(__file__).resolve().parents[1]
PARITY_ARGS = ("--learning_rate", "0.001", "--epochs", "10", "--batch_size", "32", "--standardize", "true")
FIGURES = ("accuracy.png", "loss_curves.png", "loss_gaps.png")


def run(command: list[str], folder: Path, store: str) -> None:
    """``command`` in ``folder`` against ``store``, as a user runs it."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_RUN_ID", None)
    print(f"$ {' '.join(command)}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", *command], cwd=folder, env=env, check=True)


def runs_of(store: str, filter_string: str) -> list:
    mlflow.set_tracking_uri(store)
    try:
        return mlflow.search_runs(search_all_experiments=True, filter_string=filter_string,
                                  output_format="list")
    finally:
        mlflow.set_tracking_uri(None)


def take(output: Path, folder: Path) -> list[Path]:
    """Run the jobs in ``folder`` and write the screenshots and figures into ``output``."""
    store = f"sqlite:///{folder / 'mlflow.db'}"
    # Experiments made here keep their artifacts here, not in the project directory, which is
    # the working directory of what `mlflow run` runs.
    experiment = yaml.safe_load((ROOT / "sweeps/default.yaml").read_text())["experiment"]
    run(["mlflow", "experiments", "create", "--experiment-name", experiment], folder, store)
    # make run's command
    run(["mlflow", "run", str(ROOT), "--env-manager", "local", "-P", f"output={folder / 'outputs'}"],
        folder, store)
    run(["pipeline", "parity", "--features", "outputs/features.h5", *PARITY_ARGS], folder, store)
    sweep = runs_of(store, "tags.`pipeline.step` = 'sweep'")[0]
    nested = "tags.`mlflow.parentRunId` = '{}'"
    trials = {r.info.run_name: r for r in runs_of(store, nested.format(sweep.info.run_id))}
    parity = runs_of(store, "tags.`pipeline.step` = 'parity'")[0]
    heads = runs_of(store, nested.format(parity.info.run_id))
    collapsed = trials["softmax-1u-bce-lr1e-3-glorot-s0"]
    shots = []
    with mlflow_ui(store) as base, chromium(1800, 1150) as driver:
        pages = MlflowPages(driver, base)
        pages.runs(sweep.info.experiment_id, viewStateShareKey="heads")
        pages.expand_all()
        pages.widen_names()
        shots.append(pages.screenshot(output / "ui_runs.png"))
        pages.run(sweep.info.experiment_id, sweep.info.run_id)
        pages.wait_for_text("How to read it")
        shots.append(pages.screenshot(output / "ui_sweep_run.png"))
        pages.run(collapsed.info.experiment_id, collapsed.info.run_id)
        shots.append(pages.screenshot(output / "ui_trial.png"))
        pages.runs(parity.info.experiment_id)
        pages.expand_all()
        pages.select([h.info.run_name for h in heads])
        pages.compare_selected("loss")
        shots.append(pages.screenshot(output / "ui_parity_loss.png"))
        pages.runs(parity.info.experiment_id, viewStateShareKey="parity")
        pages.expand_all()
        pages.show_charts()
        shots.append(pages.screenshot(output / "ui_parity_charts.png"))
    for name in FIGURES:
        shots.append(Path(shutil.copyfile(folder / "outputs" / "export" / name, output / name)))
    print((folder / "outputs" / "export" / "summary.md").read_text(), file=sys.stderr)  # the README's table
    return shots


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.screenshots", description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=str(ROOT / "docs" / "img"), help="folder for the PNGs")
    parser.add_argument("--keep", action="store_true", help="keep the temporary store and print its path")
    args = parser.parse_args(argv)
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="screenshots-"))
    try:
        for path in take(output, folder):
            print(path)
    finally:
        if args.keep:
            print(f"store: sqlite:///{folder / 'mlflow.db'}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
