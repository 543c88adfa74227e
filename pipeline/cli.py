"""Command line: ``python -m pipeline SUBCOMMAND``, one per MLproject entry point (extract, sweep,
parity, export, main, findings), flags named as its parameters.

Each subcommand is a thin wrapper over the stage's function. When ``mlflow run`` launched the
command (``MLFLOW_RUN_ID`` is set), the stage records into that run. Bad input ends with one
line ``error: ...`` on stderr and exit status 2; Ctrl-C with status 130, SIGTERM 143.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Literal, get_args, get_origin

from pydantic.fields import FieldInfo

from pipeline import __version__
from pipeline.config import ParityConfig, parse_config
from pipeline.errors import UserError, interrupt_status, one_line
from pipeline.quiet import quiet_tensorflow

# The findings report's studies, run in order on one features file and exported together.
FINDINGS_SWEEPS = ("sweeps/collapse.yaml,sweeps/parity.yaml,sweeps/breakers.yaml,"
                   "sweeps/parity_deep.yaml,sweeps/atlas.yaml")


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """A flag spelled as the MLproject parameter (``--n_trials``) and in dashes (``--n-trials``)."""
    spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*spellings, dest=name, **kwargs)


def _optional_int(text: str) -> int | None:
    """An int, or None for an empty string (MLproject passes unset optional params as '')."""
    if text in ("", "None", "none"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _optional_str(text: str) -> str | None:
    return text or None


def _field_help(name: str, field: FieldInfo) -> str:
    """A config field's help: what it is (its description, which every field has), the values
    it takes if they are few, its default (spelled as typed: ``true``, ``none``)."""
    if not field.description:
        raise TypeError(f"config field {name} has no description for its --help")
    choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else ()
    if field.annotation is bool:
        choices = ("true", "false")
    spelled = isinstance(field.default, bool) or field.default is None
    default = str(field.default).lower() if spelled else field.default
    listed = f"; {', '.join(map(str, choices))}" if choices else ""
    return f"{field.description}{listed} (default {default})"


def parity_config(values: dict[str, str | None]) -> ParityConfig:
    """A :class:`ParityConfig` from command-line strings (unset ones keep their defaults)."""
    return parse_config(ParityConfig, {k: v for k, v in values.items() if v is not None}, "parity")


class _Parser(argparse.ArgumentParser):
    """argparse's parser, refusing a malformed command line as every bad input is refused: one
    ``error:`` line naming the problem (and where ``--help`` is), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per MLproject entry point."""
    parser = _Parser(
        prog="python -m pipeline",
        description="Reproduce the 1-unit softmax collapse and the sigmoid/softmax parity on your own "
                    "data: one subcommand per MLproject entry point, flags named as its parameters.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_extract, _add_sweep, _add_parity, _add_export, _add_main, _add_findings):
        add(sub)
    return parser


def _add_extract(sub) -> None:
    p = sub.add_parser("extract", help="images -> Xception features (HDF5)",
                       description="Extract Keras Xception features of an image folder or "
                                   "builtin:digits into an HDF5 file, recorded as an MLflow run.")
    _flag(p, "images", required=True,
          help="a folder with one subfolder per class, or builtin:digits")
    _flag(p, "weights", default="auto",
          help="imagenet, random, auto (ImageNet if available, else random, with a warning) "
               "or a Keras weights file (default: auto)")
    _flag(p, "input_size", default="auto",
          help="square input side in pixels, >= 71 (default auto: 299 for folders, 71 for digits)")
    _flag(p, "batch_size", type=int, default=32, help="images per batch (default 32)")
    _flag(p, "output", default="features.h5", help="HDF5 file to write (default features.h5)")


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="Optuna sweep over classifier heads, every trial an MLflow run",
                       description="Run or resume the Optuna study a sweep file describes; every "
                                   "trial is an MLflow run nested under the sweep's parent run.")
    _flag(p, "features", required=True,
          help="features HDF5 (train, label) or a runs:/ URI of an extraction's artifact")
    _flag(p, "sweep", default="sweeps/default.yaml",
          help="sweep YAML file (see sweeps/; default %(default)s)")
    _flag(p, "n_trials", type=_optional_int, default=None,
          help="override the file's n_trials (caps a grid)")
    _flag(p, "storage", type=_optional_str, default=None,
          help="Optuna storage: sqlite:///f.db, postgresql://..., or a journal file path "
               "(default: optuna-journal.log beside the MLflow store)")
    _flag(p, "study", type=_optional_str, default=None,
          help="study name (default: the sweep's name and a digest of its search space and "
               "features, as in default-3f9a02c1); an existing study resumes")
    _flag(p, "workers", type=int, default=1,
          help="processes of this machine that run trials side by side (default 1); 0 sets the "
               "study and its parent run up for workers started elsewhere")
    _flag(p, "register_model", type=_optional_str, default=None,
          help="also register the best head (logged as the parent run's model best_head) in the "
               "Model Registry under this name (default: log it only)")


def _add_parity(sub) -> None:
    p = sub.add_parser("parity", help="the seed's parity experiment: softmax vs transferred sigmoid",
                       description="Train, under one parent run, the 2-unit softmax at "
                                   "learning_rate and the transferred and random 1-unit sigmoids "
                                   "at ratio x learning_rate, on one batch order and dropout "
                                   "masks, and record the loss gaps.")
    _flag(p, "features", required=True, help="features HDF5 or a runs:/ URI")
    _flag(p, "experiment", default=None, type=_optional_str,
          help="MLflow experiment for the run (default sigmoid-softmax-parity)")
    for name, field in ParityConfig.model_fields.items():
        _flag(p, name, default=None, type=_optional_str, help=_field_help(name, field))


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="tables and figures from a sweep's runs",
                       description="Export a sweep's trials as CSV, Markdown and LaTeX tables "
                                   "and PNG figures, and log them on its parent run.")
    _flag(p, "run_id", type=_optional_str, default=None,
          help="a sweep's parent run id, study name or sweep name (the one of that study or "
               "sweep run last), a main run's id (its sweeps), or a comma list of them (default: "
               "the sweep run last); studies with a "
               "report (collapse, parity, breakers, parity_deep, atlas) also give findings.md/.tex")
    _flag(p, "output", default="exports", help="folder to write (default exports)")
    _flag(p, "formats", default="csv,md,tex",
          help="comma list of csv, md, tex, png, pdf, svg, html (default csv,md,tex); md also "
               "writes the PNG figures and Optuna's HTML pages its report shows")


def _add_main(sub) -> None:
    p = sub.add_parser("main", help="extract, sweep and export under one parent run",
                       description="The whole pipeline: extract (reused when already done), "
                                   "sweep, export.")
    _whole_job_flags(p, output="outputs")
    _flag(p, "sweep", default="sweeps/default.yaml",
          help="sweep YAML file, or a comma list run in order and exported together "
               "(default %(default)s)")
    _flag(p, "storage", type=_optional_str, default=None, help="Optuna storage (see sweep)")


def _add_findings(sub) -> None:
    p = sub.add_parser("findings", help="the findings report's studies, exported together",
                       description="The studies of the findings report (collapse, parity, breakers, "
                                   "parity_deep, atlas) on one features file "
                                   "(extracted, or given), exported together: OUTPUT/export/findings.md "
                                   "and findings.tex.")
    _whole_job_flags(p, output="outputs/findings")
    p.set_defaults(sweep=FINDINGS_SWEEPS, storage=None)


def _whole_job_flags(p: argparse.ArgumentParser, output: str) -> None:
    """The flags ``main`` and ``findings`` share: what to extract, or the features to use
    instead, and the folder of the job's files."""
    _flag(p, "images", default="builtin:digits",
          help="image folder or builtin:digits (default %(default)s)")
    _flag(p, "weights", default="auto", help="imagenet, random, auto or a weights file (default %(default)s)")
    _flag(p, "features", type=_optional_str, default=None,
          help="use this features file (e.g. gap_Xception.h5, or a runs:/ URI) instead of "
               "extracting images")
    _flag(p, "output", default=output, help="folder for features.h5 and export/ (default %(default)s)")


def run(args: argparse.Namespace) -> None:
    """Check the store and dispatch parsed arguments to the stage functions; the store's
    connections are closed when the stage ends, however it ends (:func:`pipeline.sqlite_wal.close`)."""
    import mlflow

    from pipeline import paths, sqlite_wal
    from pipeline.tracking import check_reachable, default_study_storage, prepare_store, require_store

    check_reachable()
    if args.command == "export":
        require_store()
    prepare_store(write_ahead=args.command != "export")
    try:
        if args.command in ("sweep", "main", "findings"):
            paths.writable_storage(args.storage or default_study_storage(), mlflow.get_tracking_uri())
        _stage(args, os.environ.get("MLFLOW_RUN_ID") or None)
    finally:
        sqlite_wal.close()


def _stage(args: argparse.Namespace, launcher: str | None) -> None:
    """Run the stage of ``args.command``, under run ``launcher`` if given."""
    if args.command == "extract":
        from pipeline.extract import features_uri, run_extract

        run_id, _ = run_extract(args.images, args.weights, args.input_size, args.batch_size,
                                args.output, run_id=launcher)
        print(f"extract: run {run_id}; a sweep reads its features as "
              f"{features_uri(run_id, args.output)}", file=sys.stderr)
    elif args.command == "sweep":
        from pipeline.sweep import run_sweep

        outcome = run_sweep(args.features, args.sweep, args.n_trials, args.storage, args.study,
                            launcher_run_id=launcher, workers=args.workers,
                            register_model=args.register_model)
        print(outcome.line(), file=sys.stderr)
    elif args.command == "parity":
        from pipeline.parity import EXPERIMENT, run_parity

        config = parity_config({n: getattr(args, n) for n in ParityConfig.model_fields})
        run_parity(args.features, config, args.experiment or EXPERIMENT, launcher_run_id=launcher)
    elif args.command == "export":
        from pipeline.export import export

        export(args.run_id, args.output, args.formats)
    elif args.command in ("main", "findings"):
        from pipeline.main import run_main

        outcome = run_main(args.images, args.weights, args.sweep, args.output, launcher_run_id=launcher,
                           storage=args.storage, features=args.features)
        runs = ", ".join(outcome.sweep_run_ids)
        print(f"{args.command}: done; sweep run{'s' if len(outcome.sweep_run_ids) > 1 else ''} {runs} "
              f"(main run {outcome.main_run_id}); files in {args.output}", file=sys.stderr)


# What an interrupt leaves behind, per subcommand, and what a rerun does.
AFTER_INTERRUPT = {
    "sweep": "finished trials are kept; rerun the same command to resume",
    "main": "a finished extraction and finished trials are kept; rerun the same command to resume",
    "findings": "a finished extraction and finished trials are kept; rerun the same command to resume",
    "parity": "its run ends KILLED; rerun to start the experiment over",
    "export": "the export is incomplete; rerun to write it whole",
}


def _file_state(path: str) -> tuple[int, int, int] | None:
    """What identifies the file at ``path`` (inode, size, modification time), or None."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def interrupt_message(args: argparse.Namespace, reason: str, output_before) -> str:
    """The line for an interrupted command: why, what is left, and what a rerun does.

    An extraction writes its features file whole or not at all, so the file at ``--output`` is
    either as it was before the command (``output_before``) or complete and new (the interrupt
    came while the run was being finished); a rerun extracts again either way.
    """
    if args.command != "extract":
        return f"interrupted ({reason}): {AFTER_INTERRUPT[args.command]}"
    if _file_state(args.output) == output_before:
        what = f"nothing was written at {args.output}"
    else:
        what = f"{args.output} was written whole but its run did not finish"
    return f"interrupted ({reason}): {what}; rerun to start the extraction over"


def main(argv: list[str] | None = None) -> None:
    """Entry point: parse, run, and turn a :class:`UserError` into one line and exit 2, an
    interrupt (Ctrl-C, SIGTERM) into one line saying what is left and exit 130 or 143."""
    quiet_tensorflow()
    args = build_parser().parse_args(argv)
    output_before = _file_state(args.output) if args.command == "extract" else None
    try:
        run(args)
    except UserError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        print(interrupt_message(args, str(exc) or "Ctrl-C", output_before), file=sys.stderr)
        sys.exit(interrupt_status(exc))
