"""One trial path: the same input gets the same outcome under both engines.

What can be checked before anything is written is bad input (one line, nothing written: no
run, no experiment, no study); what can only fail inside a trial fails that trial the same way
under both engines: FAIL in Optuna with the reason, its run FAILED with the reason, never
RUNNING.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import yaml

from pipeline import naming, studies
from pipeline.errors import UserError
from pipeline.features import write_features
from pipeline.sweep import run_sweep
from pipeline.tracking import default_study_storage
from tests.helpers import load_study, make_features

ENGINES = ("fused", "keras")


def sweep_file(folder, engine: str, **changes) -> str:
    spec = {"name": "edge", "experiment": "edge-exp", "sampler": "grid", "engine": engine,
            "seeds": [0], "fixed": {"epochs": 2, "batch_size": 16},
            "space": {"activation": ["sigmoid"]}, **changes}
    path = folder / f"edge-{engine}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def nothing_written(folder) -> None:
    assert not mlflow.MlflowClient().search_experiments(filter_string="name = 'edge-exp'")
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert not (folder / "optuna-journal.log").exists()


UNSPLITTABLE = {
    "one positive in 60 rows": (60, {"positive_rows": 1}, {}),
    "6 rows, validation_fraction 0.1": (6, {}, {"fixed": {"epochs": 2, "batch_size": 16,
                                                          "validation_fraction": 0.1}}),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", UNSPLITTABLE)
def test_an_unsplittable_file_is_bad_input_under_both_engines(tmp_path, tracking, case, engine):
    rows, label_changes, sweep_changes = UNSPLITTABLE[case]
    x, y = make_features(n=rows, d=4)
    if "positive_rows" in label_changes:
        y = np.zeros(rows, dtype=np.int64)
        y[-label_changes["positive_rows"]:] = 1
    features = write_features(tmp_path / "f.h5", x, y, {})
    with pytest.raises(UserError, match="cannot split"):
        run_sweep(str(features), sweep_file(tmp_path, engine, **sweep_changes), progress=False)
    nothing_written(tmp_path)


FAULTS = {  # each sub-grid but the first a way for a trial to fail once it has started
    "fixed": {"batch_size": 16},
    "space": [{"activation": ["sigmoid"], "epochs": [2]},
              {"units": [1], "loss": ["sparse_categorical_crossentropy"], "epochs": [2]},  # refused
              {"learning_rate": [1e38], "epochs": [1]}],  # its val_loss overflows to inf
    "objective": {"metric": "val_loss"},
}


def outcomes(folder, engine: str) -> dict:
    """Each trial's (params, Optuna state, run status, reason's exception type)."""
    x, y = make_features(n=120, d=8)
    features = write_features(folder / f"{engine}.h5", x, y, {})
    run_sweep(str(features), sweep_file(folder, engine, **FAULTS), study=engine, progress=False)
    study = load_study(default_study_storage(), engine)
    client = mlflow.MlflowClient()
    seen = {}
    for trial in study.trials:
        run = client.get_run(trial.user_attrs[studies.RUN_ATTR])
        reason = trial.user_attrs.get(studies.REASON_ATTR, "")
        assert reason.split(":")[0] == run.data.tags.get(naming.ERROR, "").split(":")[0]
        seen[str(sorted(trial.params.items()))] = (trial.state.name, run.info.status,
                                                    reason.split(":")[0])
    return seen


def test_trials_that_fail_inside_fail_the_same_way_under_both_engines(tmp_path, tracking):
    fused, keras = outcomes(tmp_path, "fused"), outcomes(tmp_path, "keras")
    assert fused == keras
    assert sorted(fused.values()) == [("COMPLETE", "FINISHED", ""), ("FAIL", "FAILED", "FloatingPointError"),
                                      ("FAIL", "FAILED", "InvalidArgumentError")]


@pytest.mark.parametrize("engine", ENGINES)
def test_an_error_of_the_sweep_itself_leaves_nothing_running(tmp_path, tracking, monkeypatch, engine):
    """An error outside any one trial (here the engine breaks) ends the sweep with it; the trials
    in hand FAIL with the reason, their runs and the parent run end FAILED, none RUNNING."""
    from pipeline.engine_fused import FusedEngine
    from pipeline.engine_keras import KerasEngine

    def broken(self, configs, x, y, callbacks=None):
        raise RuntimeError("the engine broke")

    monkeypatch.setattr({"fused": FusedEngine, "keras": KerasEngine}[engine], "train_many", broken)
    x, y = make_features(n=120, d=8)
    features = write_features(tmp_path / "f.h5", x, y, {})
    with pytest.raises(RuntimeError, match="the engine broke"):
        run_sweep(str(features), sweep_file(tmp_path, engine), progress=False)
    study = load_study(default_study_storage())
    assert [t.state.name for t in study.trials] == ["FAIL"]
    assert study.trials[0].user_attrs[studies.REASON_ATTR] == "RuntimeError: the engine broke"
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert {r.info.status for r in runs} == {"FAILED"} and len(runs) == 2  # the parent and the trial
