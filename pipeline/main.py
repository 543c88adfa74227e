"""The main job: extract, then sweep, then export, as steps under one parent run.

A FINISHED extraction with the same parameters and the same input (by content fingerprint) is
reused instead of rerun, as in MLflow's multistep workflow example: its features file is
copied from the run's artifact when ``output`` does not already hold it.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow

from pipeline import naming, paths, tracking
from pipeline.errors import UserError
from pipeline.features import read_features, resolve_features, sha256_file
from pipeline.sources import ImageSource, open_source
from pipeline.sweep_file import SweepSpec, load_sweep


@dataclass(frozen=True)
class MainOutcome:
    """The runs and files one main job left."""

    main_run_id: str
    extract_run_id: str
    reused_extraction: bool
    sweep_run_id: str
    export_files: tuple[Path, ...]
    sweep_run_ids: tuple[str, ...] = ()


def find_extraction(experiment_id: str, params: dict, fingerprint: str):
    """The newest FINISHED extract run with these params and input fingerprint, or None.

    The store is searched by the fingerprint (hex digits) and the params compared here: a
    user's value (an images path holding a quote) never becomes part of a filter string."""
    clauses = [f"tags.`{naming.STEP}` = 'extract'", "attributes.status = 'FINISHED'",
               f"tags.`input.fingerprint` = '{fingerprint}'"]
    runs = mlflow.search_runs(experiment_ids=[experiment_id], filter_string=" and ".join(clauses),
                              order_by=["attributes.start_time DESC"], output_format="list")
    wanted = {k: str(v) for k, v in params.items()}
    return next((run for run in runs
                 if all(run.data.params.get(k) == v for k, v in wanted.items())), None)


def run_main(images: str = "builtin:digits", weights: str = "auto",
             sweep: str = "sweeps/default.yaml", output: str = "outputs",
             launcher_run_id: str | None = None, storage: str | None = None,
             progress: bool | None = None, features: str | None = None) -> MainOutcome:
    """Run the whole pipeline; files go to ``output`` (``features.h5`` and ``export/``).

    ``sweep`` is one sweep file or a comma list, run in order on the same features and
    exported together (so the collapse, parity and breakers studies give one findings.md).
    ``features`` skips extraction and uses that file (e.g. the seed's gap_Xception.h5).
    The main run is ``launcher_run_id`` (the run ``mlflow run`` opened) or a new run in the
    first sweep's experiment; the extract step is nested under it, and so is a sweep's parent
    run when both live in the same experiment (otherwise they are linked by tags).
    """
    from pipeline.export import export
    from pipeline.sweep import check_splits, run_sweep

    sweeps = [part.strip() for part in sweep.split(",") if part.strip()]
    specs, source, out = _checked_inputs(sweeps, images, features, output)
    client = tracking.client()
    main_run, experiment = _main_run(launcher_run_id, specs[0])
    tracking.install_sigterm_handler()
    with tracking.terminal_run(main_run):
        client.set_tag(main_run, naming.STEP, "main")
        tracking.log_new_params(main_run, {"images": images, "weights": weights,
                                           "sweep": sweep, "output": output})
        extract_run, features_path, reused = _features_step(
            images, weights, source, features, out / "features.h5", experiment, main_run, progress)
        if extract_run:
            client.set_tag(main_run, naming.EXTRACT_RUN, extract_run)
            check_splits(read_features(features_path).y, specs)  # images may have been skipped
        given = features if features is not None else str(features_path)  # a runs:/ URI stays one
        parents = []
        for path in sweeps:
            outcome = run_sweep(given, path, storage=storage, launcher_run_id=main_run, progress=progress)
            print(outcome.line(), file=sys.stderr)
            parents.append(outcome.parent_run_id)
        exported = export(",".join(parents), str(out / "export"), "csv,md,tex,png")
    return MainOutcome(main_run, extract_run, reused, parents[0], exported.files, tuple(parents))


def _checked_inputs(sweeps: list[str], images: str, features: str | None,
                    output: str) -> tuple[list[SweepSpec], ImageSource | None, Path]:
    """The sweeps' specs, the image source (None when ``features`` is given) and the output
    folder, or :class:`UserError` for any input that cannot be: checked before a run exists."""
    from pipeline.sweep import check_splits

    specs = [load_sweep(path) for path in sweeps]
    if not specs:
        raise UserError("sweep: give at least one sweep file")
    if features is not None:  # bad features, or ones a sweep cannot split
        check_splits(read_features(resolve_features(features)).y, specs)
    source = open_source(images) if features is None else None
    if source is not None:  # images too few to split, before they are extracted
        check_splits(source.labels, specs)
    out = paths.writable_dir(output, "output", make=False)  # made when a file is written there
    paths.writable_dir(out / "export", "output", make=False)
    if features is None:
        paths.refuse_other_than_file(out / "features.h5", f"output {out / 'features.h5'}")
    return specs, source, out


def _main_run(launcher_run_id: str | None, spec: SweepSpec) -> tuple[str, str]:
    """The main run (the launcher's, or a new one in the first sweep's experiment) and its
    experiment's id."""
    if launcher_run_id:
        return launcher_run_id, tracking.launcher_run(launcher_run_id).info.experiment_id
    experiment = tracking.experiment_id(spec.experiment)
    return tracking.create_run(experiment, f"main-{naming.parent_run_name(spec.name)}"), experiment


def _features_step(images: str, weights: str, source, features: str | None, features_path: Path,
                   experiment: str, main_run: str, progress: bool | None) -> tuple[str, Path, bool]:
    """The main job's features: the file the user gave (``features``; no extract run), a
    FINISHED extraction of the same images and settings in the experiment (its file restored
    to ``features_path``), or a new extraction nested under ``main_run``. Returns the extract
    run's id ("" for a given file), the features' path and whether an extraction was reused."""
    from pipeline.extract import run_extract

    if features is not None:
        path = resolve_features(features)
        print(f"extract: skipped, using {path}", file=sys.stderr)
        return "", path, False
    params = {"images": images, "weights": weights, "input_size": "auto", "batch_size": 32}
    previous = find_extraction(experiment, params, source.fingerprint())
    if previous is not None:
        _restore_features(previous, features_path)
        print(f"extract: reusing FINISHED run {previous.info.run_id} ({features_path})", file=sys.stderr)
        return previous.info.run_id, features_path, True
    extract_run, _ = run_extract(images, weights, "auto", 32, str(features_path), experiment_id=experiment,
                                 parent_run_id=main_run, progress=progress)
    return extract_run, features_path, False


def _restore_features(run, path: Path) -> None:
    """Make ``path`` hold the features file of extract ``run`` (checked by sha256)."""
    from pipeline.extract import features_uri

    want = run.data.tags.get(naming.FEATURES_SHA)
    if path.is_file() and sha256_file(path) == want:
        return
    local = resolve_features(features_uri(run.info.run_id, run.data.params["output"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.copyfile(local, tmp)
    tmp.replace(path)
