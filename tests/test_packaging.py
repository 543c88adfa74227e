"""The project's declarations agree with each other."""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_conda_env_and_package_declare_the_same_dependencies():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(p for p in pip if not p.startswith("-e")) == sorted(declared)


def test_mlproject_entry_points_and_parameters():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    assert project["conda_env"] == "conda.yaml"
    points = project["entry_points"]
    expected = {"main": {"images", "weights", "sweep", "output"},
                "extract": {"images", "weights", "input_size", "batch_size", "output"},
                "sweep": {"features", "sweep", "n_trials", "storage", "study", "workers"},
                "export": {"run_id", "output", "formats"}}
    for name, params in expected.items():
        assert set(points[name]["parameters"]) >= params, name
        for param in params:
            assert "{" + param + "}" in points[name]["command"], (name, param)


@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning])
def test_a_deprecated_call_of_ours_fails_the_tests_one_of_a_library_does_not(category):
    """pyproject's filterwarnings: warnings attributed to pipeline.* are errors, a library's are not."""
    with pytest.raises(category):
        warnings.warn_explicit("deprecated", category, "pipeline/sweep.py", 1, module="pipeline.sweep")
    warnings.warn_explicit("deprecated", category, "x.py", 1, module="mlflow.store.tracking.sqlalchemy_store")
