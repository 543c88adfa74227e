"""The extract stage: images -> Keras Xception (ImageNet or random weights) -> features HDF5.

The inputs are checked first, before TensorFlow is imported; the backbone and the ``tf.data``
pipeline that decodes, resizes and batches the images are :mod:`pipeline.backbone`. A file
that cannot be decoded is skipped, counted and listed, not fatal. The output is written
atomically in the seed's layout (see :mod:`pipeline.features`), with attributes that say which
weights were actually used. ``weights=auto`` falls back to random weights when ImageNet's
cannot be had, and says so on stderr and in the ``backbone.weights`` tag: never silently.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import lineage, naming, paths, tracking
from pipeline.errors import UserError
from pipeline.features import read_features, sha256_file, write_features
from pipeline.sources import MAX_INPUT_SIZE, MIN_INPUT_SIZE, ImageSource, open_source

WEIGHT_CHOICES = ("imagenet", "random", "auto")


@dataclass(frozen=True)
class Extraction:
    """The written features file and what went into it."""

    output: Path
    n_images: int
    n_features: int
    skipped: tuple[str, ...]
    weights: str
    class_names: tuple[str, ...]
    fingerprint: str


def checked_input_size(value: str | int) -> int | None:
    """``None`` for ``auto`` (the source's natural size: 299 for folders, 71 for digits); else
    the integer, from 71 to 1,024."""
    if str(value) == "auto":
        return None
    try:
        size = int(value)
    except ValueError:
        raise UserError(f"input_size '{value}': must be 'auto' or an integer from {MIN_INPUT_SIZE} to "
                        f"{MAX_INPUT_SIZE}") from None
    if size < MIN_INPUT_SIZE:
        raise UserError(f"input_size {size}: Xception needs at least {MIN_INPUT_SIZE}")
    if size > MAX_INPUT_SIZE:
        raise UserError(f"input_size {size}: at most {MAX_INPUT_SIZE} (Xception's activations of a batch "
                        f"grow with its square)")
    return size


def check_inputs(images: str, weights: str, input_size: str | int,
                 batch_size: int) -> tuple[ImageSource, int]:
    """The image source and input size, or :class:`UserError` for an unusable folder, weights,
    size or batch size: checked before anything is written, and before TensorFlow is imported
    (the values first, then the images, which for ``builtin:digits`` are loaded)."""
    if batch_size < 1:
        raise UserError(f"batch_size {batch_size}: must be >= 1")
    if weights not in WEIGHT_CHOICES and not Path(weights).is_file():
        raise UserError(f"weights '{weights}': not imagenet, random, auto or an existing file")
    size = checked_input_size(input_size)
    source = open_source(images)
    return source, size or source.default_input_size


def extract(images: str, weights: str = "auto", input_size: str | int = "auto",
            batch_size: int = 32, output: str = "features.h5",
            progress: bool | None = None) -> Extraction:
    """Extract Xception features of ``images`` into the HDF5 file ``output``.

    Raises :class:`UserError` for an unusable source, size, weights or an input in which no
    image decodes; in every such case nothing is written at ``output``.
    """
    source, size = check_inputs(images, weights, input_size, batch_size)
    from pipeline import backbone  # TensorFlow, once the inputs are known to be good

    model, used = backbone.load_backbone(weights, size)
    kept, x = backbone.forward(model, source, size, batch_size, progress)
    skipped = tuple(source.paths[i] for i in sorted(set(range(len(source))) - set(kept.tolist())))
    if len(kept) == 0:
        raise UserError(f"images {images}: none of the {len(source)} files could be decoded")
    labels = source.labels[kept]
    if len(np.unique(labels)) < 2:
        raise UserError(f"images {images}: after skipping {len(skipped)} undecodable files only "
                        f"one class is left")
    attrs = {"backbone": backbone.BACKBONE, "weights": used, "input_size": size,
             "class_names": list(source.class_names), "source": source.description,
             "skipped": len(skipped), "versions": tracking.versions()}
    path = write_features(output, x, labels, attrs)
    print(f"extract: {len(kept)} images -> {path} ({x.shape[1]} features, weights {used}, "
          f"{len(skipped)} skipped)", file=sys.stderr)
    return Extraction(output=path, n_images=len(kept), n_features=x.shape[1], skipped=skipped,
                      weights=used, class_names=source.class_names,
                      fingerprint=source.fingerprint())


FEATURES_ARTIFACT_DIR = "features"


def features_uri(run_id: str, output: str | Path) -> str:
    """The ``runs:/`` URI of the features file an extract run wrote at ``output`` (logged as
    its artifact ``features/<name>``): what a sweep takes as ``--features``."""
    return f"runs:/{run_id}/{FEATURES_ARTIFACT_DIR}/{Path(output).name}"


def run_extract(images: str, weights: str = "auto", input_size: str | int = "auto",
                batch_size: int = 32, output: str = "features.h5", experiment_id: str | None = None,
                run_id: str | None = None, parent_run_id: str | None = None,
                progress: bool | None = None) -> tuple[str, Extraction]:
    """:func:`extract` recorded as an MLflow run; returns the run id and the extraction.

    Logs into ``run_id`` if given (the run ``mlflow run`` opened), else into a new run of
    ``experiment_id`` (default: experiment ``features``) nested under ``parent_run_id``. The
    run gets the parameters, the input's fingerprint, the weights actually used (tag
    ``backbone.weights``), the features file as artifact ``features/<name>`` (so
    ``runs:/<id>/features/<name>`` feeds a sweep) and the list of skipped files. It ends FAILED,
    with nothing at ``output``, if extraction fails, and KILLED on Ctrl-C or SIGTERM.
    """
    check_inputs(images, weights, input_size, batch_size)  # bad input: no run, no file
    paths.writable_file(output, "output")
    if run_id is not None:
        tracking.launcher_run(run_id)
    # TensorFlow is imported before the run opens: the run times the extraction, not the
    # import, and Ctrl-C during the import leaves no run behind.
    from pipeline import backbone  # noqa: F401
    tracking.install_sigterm_handler()  # SIGTERM ends the run KILLED, as Ctrl-C does
    if run_id is None:
        exp = experiment_id or tracking.experiment_id("features")
        run_id = tracking.create_run(exp, f"extract-{Path(output).stem}", parent_run_id,
                                     {naming.STEP: "extract"})
    else:
        tracking.client().set_tag(run_id, naming.STEP, "extract")
    with tracking.terminal_run(run_id), tracking.system_metrics(run_id):
        try:
            result = extract(images, weights, input_size, batch_size, output, progress)
        except Exception:
            tracking.raise_swallowed_interrupt()  # a signal TensorFlow turned into another error
            raise
        _record(run_id, result, {"images": images, "weights": weights, "input_size": input_size,
                                 "batch_size": batch_size, "output": output})
    return run_id, result


def _record(run_id: str, result: Extraction, params: dict) -> None:
    """The extraction's record on its run: the parameters, counts, weights used, fingerprints,
    the features file (artifact and output dataset) and the list of skipped files."""
    sha = sha256_file(result.output)
    tracking.log_new_params(run_id, params)
    tracking.log_batch(
        run_id,
        metrics=tracking.scalars({"n_images": result.n_images, "n_skipped": len(result.skipped),
                                  "n_features": result.n_features}),
        tags={naming.WEIGHTS: result.weights, "input.fingerprint": result.fingerprint,
              naming.FEATURES_SHA: sha, "class_names": ",".join(result.class_names),
              **tracking.versions()})
    client = tracking.client()
    client.log_artifact(run_id, str(result.output), FEATURES_ARTIFACT_DIR)
    _log_dataset(run_id, result.output, sha)
    client.log_text(run_id, "\n".join(result.skipped) + ("\n" if result.skipped else ""),
                    "skipped_images.txt")


def _log_dataset(run_id: str, path: Path, sha: str) -> None:
    """The features file (digest ``sha``) as the extract run's output dataset, its source the
    run's artifact."""
    data = read_features(path)
    source = features_uri(run_id, path)
    tracking.log_features(run_id, lineage.features_dataset(source, sha, data.x.shape, data.class_names,
                                                           float(data.y.mean())), "output")
