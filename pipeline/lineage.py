"""Where runs come from: MLflow's source context tags and the features file as an MLflow dataset.

Runs the project creates with :class:`mlflow.MlflowClient` get the context tags that
``mlflow.start_run`` would set (user, source name and type, git commit and repository),
resolved once per process (:func:`context_tags`). A features file is an MLflow dataset
(:func:`features_dataset`): its name, a digest from its sha256, its source (path or
``runs:/`` URI), its schema (N x D float32 features, labels) and a profile (rows, width, class
names, positive fraction, the whole sha256). It is the extract run's output and the input of
every run trained on it (:func:`pipeline.tracking.log_features` records it), so the UI's
*Datasets* column, its dataset filter and the search ``datasets.digest = '...'`` find them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from mlflow.entities import Dataset

from pipeline import naming

DIGEST_CHARS = 36  # MLflow stores at most 36 characters of a dataset's digest


@functools.cache
def context_tags() -> dict[str, str]:
    """MLflow's context tags for runs this process creates (``mlflow.user``,
    ``mlflow.source.name``/``type``, ``mlflow.source.git.commit``/``repoURL`` in a git checkout)."""
    from mlflow.tracking.context.registry import resolve_tags

    return {k: v for k, v in resolve_tags().items()
            if k not in (naming.PARENT, naming.NOTE) and not k.startswith("mlflow.databricks")}


def digest(sha256: str) -> str:
    """A features file's dataset digest: the first 36 hex digits of its sha256."""
    return sha256[:DIGEST_CHARS]


def features_dataset(source: str, sha256: str, shape: tuple[int, int], class_names: list[str],
                     positive_fraction: float) -> Dataset:
    """The MLflow dataset of a features file at ``source`` (a path or a ``runs:/`` URI)."""
    remote = source.startswith("runs:/") or "://" in source
    uri = source if remote else str(Path(source).absolute())
    schema = {"mlflow_tensorspec": {"features": _tensor("train", "float32", [-1, shape[1]]),
                                    "targets": _tensor("label", "int64", [-1])}}
    profile = {"rows": shape[0], "features": shape[1], "class_names": class_names,
               "positive_fraction": round(positive_fraction, 6), "sha256": sha256}
    return Dataset(name=Path(uri).stem or "features", digest=digest(sha256),
                   source_type="mlflow_run" if remote else "local", source=json.dumps({"uri": uri}),
                   schema=json.dumps(schema), profile=json.dumps(profile))


def _tensor(name: str, dtype: str, shape: list[int]) -> str:
    return json.dumps([{"type": "tensor", "tensor-spec": {"dtype": dtype, "shape": shape}, "name": name}])
