"""`mlflow run .` end to end on the embedded default data, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.utils.file_utils import local_file_uri_to_path

from pipeline import naming

pytestmark = pytest.mark.slow  # `mlflow run .` twice, in subprocesses

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mlflow_run_twice(tmp_path_factory):
    """Two `mlflow run` of main with a tiny sweep against a temporary store."""
    tmp = tmp_path_factory.mktemp("e2e")
    sweep = yaml.safe_load((ROOT / "sweeps/default.yaml").read_text())
    sweep["seeds"] = [0]
    sweep["fixed"]["epochs"] = 2
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(sweep))
    (tmp / "tmp").mkdir()  # the runs' temporary folder, looked at after them
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "TMPDIR": str(tmp / "tmp")}
    env.pop("MLFLOW_RUN_ID", None)
    # `mlflow run` runs the entry point in the project's folder, where a new experiment would
    # keep its artifacts (./mlruns): the sweep's experiment is made here first, beside the store
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).create_experiment(sweep["experiment"])
    command = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local",
               "-P", f"sweep={tmp / 'tiny.yaml'}", "-P", f"output={tmp / 'out'}",
               "-P", "weights=random"]
    results = [subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True,
                              timeout=600) for _ in range(2)]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    yield tmp, results
    mlflow.set_tracking_uri(None)


def test_main_leaves_features_runs_and_exports(mlflow_run_twice):
    tmp, (first, _) = mlflow_run_twice
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp / "out" / "features.h5").is_file()
    export = tmp / "out" / "export"
    for name in ("trials.csv", "summary.md", "summary.tex", "loss_curves.png", "loss_gaps.png"):
        assert (export / name).is_file(), name
    trials = pd.read_csv(export / "trials.csv")
    assert len(trials) == 4 and (trials["status"] == "FINISHED").all()
    collapsed = trials[trials["collapsed"]]
    assert list(collapsed["run_name"]) == ["softmax-1u-bce-lr1e-3-glorot-s0"]
    assert (collapsed["final_val_accuracy"] == collapsed["positive_fraction"]).all()


def test_main_leaves_no_temporary_file(mlflow_run_twice):
    """What the two runs leave in their temporary folder is MLflow's and TensorFlow's own: an
    empty folder per `mlflow run` (its projects' storage), MLflow's store-creation lock and
    TensorFlow's autograph sources. No copy of the features, no head, no export."""
    tmp, results = mlflow_run_twice
    assert all(result.returncode == 0 for result in results)
    left = list((tmp / "tmp").iterdir())
    theirs = [p for p in left if (p.is_dir() and not any(p.iterdir()))
              or p.name.startswith(("db_init_lock-", "__autograph_generated_file"))]
    assert sorted(p.name for p in set(left) - set(theirs)) == []
    assert sum(p.is_dir() for p in theirs) == 2  # the check sees the runs' folder


def test_runs_nest_under_the_main_run(mlflow_run_twice):
    tmp, (first, _) = mlflow_run_twice
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    artifacts = [Path(local_file_uri_to_path(r.info.artifact_uri)) for r in runs]
    assert all(path.is_relative_to(tmp) for path in artifacts), artifacts  # none in the repo
    by_step = {}
    for run in runs:
        by_step.setdefault(run.data.tags.get(naming.STEP), []).append(run)
    assert len(by_step["extract"]) == 1 and len(by_step["sweep"]) == 1
    assert len(by_step["main"]) == 2 and len(by_step["trial"]) == 4
    assert all(r.info.status == "FINISHED" for r in runs)
    sweep = by_step["sweep"][0]
    assert all(t.data.tags[naming.PARENT] == sweep.info.run_id for t in by_step["trial"])
    assert by_step["extract"][0].data.tags[naming.WEIGHTS] == "random"
    main_ids = {r.info.run_id for r in by_step["main"]}
    assert by_step["extract"][0].data.tags[naming.PARENT] in main_ids


def test_second_run_reuses_extraction_and_resumes_the_study(mlflow_run_twice):
    _, (_, second) = mlflow_run_twice
    assert second.returncode == 0, second.stderr[-3000:]
    assert "extract: reusing FINISHED run" in second.stderr
    trials = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                filter_string=f"tags.`{naming.STEP}` = 'trial'")
    assert len(trials) == 4


def test_parity_entry_point_through_mlflow_run(mlflow_run_twice):
    tmp, _ = mlflow_run_twice
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'parity.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_RUN_ID", None)
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "parity", "--env-manager", "local",
         "--experiment-name", "parity-e2e", "-P", f"features={tmp / 'out' / 'features.h5'}",
         "-P", "optimizer=momentum", "-P", "epochs=2", "-P", "standardize=true"],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("parity-e2e")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get(naming.STEP) == "parity")
    children = [r for r in runs if r.data.tags.get(naming.PARENT) == parent.info.run_id]
    assert sorted(r.data.tags[naming.ROLE] for r in children) == [
        "sigmoid_random", "sigmoid_transfer", "softmax"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert parent.data.metrics["max_gap_softmax_transfer"] <= 1e-5
    assert parent.data.params["optimizer"] == "momentum"


def test_the_features_file_is_a_dataset_from_extraction_to_every_trial(mlflow_run_twice, tmp_path):
    """Lineage: the extract run's output dataset is every sweep run's input, found by digest;
    every run the project creates carries MLflow's source context tags."""
    import hashlib

    tmp, _ = mlflow_run_twice
    digest = hashlib.sha256((tmp / "out" / "features.h5").read_bytes()).hexdigest()[:36]
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    by_digest = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                   filter_string=f"datasets.digest = '{digest}'")
    steps = [r.data.tags[naming.STEP] for r in by_digest]
    assert sorted(set(steps)) == ["extract", "sweep", "trial"] and steps.count("trial") == 4
    extract = next(r for r in by_digest if r.data.tags[naming.STEP] == "extract")
    (dataset_input,) = extract.inputs.dataset_inputs
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "output"
    source = yaml.safe_load(dataset_input.dataset.source)["uri"]
    assert source.startswith(f"runs:/{extract.info.run_id}/")
    fetched = Path(mlflow.artifacts.download_artifacts(source, dst_path=str(tmp_path)))
    assert hashlib.sha256(fetched.read_bytes()).hexdigest()[:36] == digest
    assert "system/cpu_utilization_percentage" in extract.data.metrics
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    for run in runs:
        assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.type"], run.info.run_name
        if commit.returncode == 0:
            assert run.data.tags["mlflow.source.git.commit"] == commit.stdout.strip(), run.info.run_name
