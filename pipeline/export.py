"""The export stage: a sweep's MLflow runs -> tidy CSV, paper tables and figures.

Reads the trial runs nested under a sweep's parent run (:mod:`pipeline.runs`, and metric
histories), writes ``trials.csv`` (one row per trial, params typed), ``summary.md`` /
``summary.tex`` (grouped by config, mean ± std over seeds), ``epochs.csv`` (per-epoch metrics),
the PNG figures (``loss_curves``, ``loss_gaps``, ``accuracy``) and Optuna's HTML figures of the
study (``optimization_history``, ``param_importances``, ``parallel_coordinate``; the study is
found from the parent run's ``optuna.storage`` tag), and logs the same files as artifacts of
the parent run under ``export/``.
File names are fixed here; nothing from run names or params reaches a path.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd

from pipeline import findings, naming, paths, studies, study_figures, tables, tracking
from pipeline.errors import UserError
from pipeline.progress import progress_bar
from pipeline.runs import has_trial_runs, outcomes, resolve_run_ids, sweep_run, trial_records

FORMATS = ("csv", "md", "tex", "png", "pdf", "svg", "html")
DEFAULT_FORMATS = "csv,md,tex"
FIGURE_FORMATS = {"png", "pdf", "svg", "md"}  # formats that bring the figures
FIGURE_KINDS = {"heads"}  # the kinds of sweep with figures: a parity trial has none of their metrics
FILES = ("trials.csv", "summary.csv", "epochs.csv", "summary.md", "summary.tex", "findings.md",
         "findings.tex",
         *(f"{figure}.{suffix}" for figure in ("loss_curves", "loss_gaps", "accuracy")
           for suffix in ("png", "pdf", "svg")),
         *(f"{page}.html" for page in study_figures.OPTUNA_FIGURES))  # every name export writes
CURVE_METRICS = ("loss", "val_loss", "accuracy", "val_accuracy", "prob_loss", "val_prob_loss")


@dataclass(frozen=True)
class ExportResult:
    """The sweeps exported (``run_id`` is the first) and the files written."""

    run_id: str
    run_ids: tuple[str, ...]
    files: tuple[Path, ...]


def epoch_records(trials: pd.DataFrame, metrics=CURVE_METRICS) -> pd.DataFrame:
    """Per-epoch metric histories of the completed trials (:func:`tables.completed`): run_id,
    role, seed, epoch, metrics; rows in the trials' order, then by epoch."""
    done = tables.completed(trials)
    if done.empty:
        return pd.DataFrame()
    about = {row.run_id: {"run_id": row.run_id, "role": row.role, "seed": row.seed,
                          "learning_rate": row.learning_rate}
             for row in done[["run_id", "role", "seed", "learning_rate"]].itertuples(index=False)}
    rows: dict[tuple, dict] = {}
    for metric in metrics:
        for run_id, point in metric_histories(list(about), metric):
            key = (run_id, point.step)
            rows.setdefault(key, {**about[run_id], "epoch": point.step})[metric] = point.value
    order = {run_id: i for i, run_id in enumerate(about)}
    return pd.DataFrame([rows[key] for key in sorted(rows, key=lambda k: (order[k[0]], k[1]))])


HISTORY_RUNS_PER_QUERY = 500  # run ids in one SQL ``IN (...)``: well below SQLite's limit


def metric_histories(run_ids: list[str], metric: str):
    """Yield ``(run_id, point)`` for every logged point of ``metric`` in the runs ``run_ids``.

    A SQL store (SQLite, PostgreSQL) answers one query per :data:`HISTORY_RUNS_PER_QUERY`
    runs (its ``get_metric_history_bulk``, which MLflow's own server serves the UI's charts
    with); any other store (a tracking server) one request per run.
    """
    client = tracking.client()
    store = client._tracking_client.store
    if not hasattr(store, "get_metric_history_bulk"):
        for run_id in run_ids:
            for point in client.get_metric_history(run_id, metric):
                yield run_id, point
        return
    for i in range(0, len(run_ids), HISTORY_RUNS_PER_QUERY):
        for found in store.get_metric_history_bulk(run_ids[i:i + HISTORY_RUNS_PER_QUERY], metric,
                                                   max_results=2**31 - 1):
            yield found.run_id, found


def comparison_trials(trials: pd.DataFrame, ratio: float = 2.0) -> pd.DataFrame:
    """The completed trials of the seed's comparison: the 2-unit softmax at a learning rate lr
    and both sigmoids at ``ratio`` x lr.

    Chooses the smallest softmax learning rate for which a transferred sigmoid at ``ratio``
    times it exists; empty when the sweep holds no such pair.
    """
    done = tables.completed(trials)
    if done.empty or "role" not in done:
        return done.iloc[0:0]
    soft = sorted(done.loc[done["role"] == "softmax", "learning_rate"].unique())
    sig = done.loc[done["role"] == "sigmoid_transfer", "learning_rate"].unique()
    for lr in soft:
        match = [s for s in sig if abs(s - ratio * lr) <= 1e-9 * max(1.0, s)]
        if match:
            keep = ((done["role"] == "softmax") & (done["learning_rate"] == lr)) | (
                done["role"].isin(["sigmoid_transfer", "sigmoid_random"])
                & (done["learning_rate"] == match[0]))
            return done[keep]
    return done.iloc[0:0]


def export(run_id: str | None = None, output: str = "exports", formats: str = DEFAULT_FORMATS,
           log_to_run: bool = True) -> ExportResult:
    """Write sweeps' tables and figures into ``output`` and log them on their parent runs.

    ``run_id`` is a comma list of sweep parent run ids, study names or sweep names (the one of
    each run last), main run ids (their sweeps), or empty for the sweep run last
    (:func:`pipeline.runs.resolve_run_ids`). One sweep's files go into ``output`` itself, several
    sweeps' into ``output/<sweep name>/``. Sweeps whose file sets ``report`` (collapse, parity,
    breakers, parity_deep, atlas) also make ``findings.md`` / ``findings.tex`` in ``output``, one table each.
    ``formats`` is a comma list of csv, md, tex, png, pdf, svg, html. PNG figures (loss curves
    and gaps when the sweep holds the seed's softmax/sigmoid comparison; accuracy against the
    positive fraction for sweeps of heads) come with png, pdf, svg or md, the same figures as
    vector PDF or SVG (fonts embedded) with pdf or svg, Optuna's HTML figures with html or md,
    since the Markdown report shows or links them.
    """
    wanted = {f.strip() for f in formats.split(",") if f.strip()}
    unknown = wanted - set(FORMATS)
    if unknown or not wanted:
        raise UserError(f"formats '{formats}': allowed: {', '.join(FORMATS)}")
    run_ids = list(dict.fromkeys(resolve_run_ids(run_id)))  # each sweep once
    sweeps = [(rid, sweep_run(rid)) for rid in run_ids]
    _check_sweeps(sweeps, wanted, formats)
    out = paths.writable_dir(output, "output", make=False)  # made when the first sweep writes
    folders = _folders(out, sweeps)
    _check_places([out, *folders])
    per_sweep: dict[str, list[Path]] = {}
    sections: list[findings.Section] = []
    for (rid, parent), folder in zip(sweeps, folders, strict=True):
        name = parent.data.tags.get(naming.SWEEP_NAME, "sweep")
        per_sweep[rid], trials, context = _export_sweep(parent, name, _kind(parent), folder, wanted)
        report = parent.data.tags.get(naming.REPORT, "summary")
        if report in findings.TITLES:
            sections.append(findings.Section(report, trials, _regenerate(parent, output), context))
    report: list[Path] = []
    if sections and "md" in wanted:
        report.append(_write(out / "findings.md", findings.markdown(sections)))
    if sections and "tex" in wanted:
        report.append(_write(out / "findings.tex", findings.latex(sections)))
    if report:
        print(f"export: findings of {len(sections)} stud{'ies' if len(sections) > 1 else 'y'} -> {out} "
              f"({', '.join(p.name for p in report)})", file=sys.stderr)
    if log_to_run:
        client = tracking.client()
        for rid, files in per_sweep.items():
            for path in files + report:
                client.log_artifact(rid, str(path), "export")
    written = [p for files in per_sweep.values() for p in files] + report
    return ExportResult(run_id=run_ids[0], run_ids=tuple(run_ids), files=tuple(written))


def _kind(parent) -> str:
    """A sweep's kind of trial, from its parent run (tag ``pipeline.kind``; heads without it)."""
    return parent.data.tags.get(naming.KIND, "heads")


def _check_sweeps(sweeps: list, wanted: set[str], formats: str) -> None:
    """Raise :class:`UserError`, before the first file is written, if a sweep has no trial runs
    or the formats ``wanted`` are figures alone and no sweep has figures."""
    for rid, parent in sweeps:
        if not has_trial_runs(parent):
            raise UserError(f"run_id {rid}: the sweep has no trial runs")
    if wanted <= FIGURE_FORMATS - {"md"} and not {_kind(parent) for _, parent in sweeps} & FIGURE_KINDS:
        raise UserError(f"formats '{formats}': a parity study has no figures; ask for csv, md, tex "
                        "or html")


def _check_places(folders: list[Path]) -> None:
    """Raise :class:`UserError` if a folder an export writes into is not one, or something other
    than a file sits where it writes a file: checked before the first file is written."""
    for folder in folders:
        paths.writable_dir(folder, "output", make=False)
        for name in FILES:
            paths.refuse_other_than_file(folder / name, f"output {folder / name}")


def _folders(out: Path, sweeps: list) -> list[Path]:
    """Where each sweep's files go: ``out`` for one sweep; for several, ``out/<sweep name>``, and
    ``out/<sweep name>-<run id prefix>`` for a further study of the same sweep file."""
    if len(sweeps) == 1:
        return [out]
    folders: list[Path] = []
    for rid, parent in sweeps:
        name = parent.data.tags.get(naming.SWEEP_NAME, "sweep")
        folder = out / naming.safe_filename(name)
        folders.append(out / naming.safe_filename(f"{name}-{rid[:8]}") if folder in folders else folder)
    return folders


def _export_sweep(parent, sweep: str, kind: str, out: Path,
                  wanted: set[str]) -> tuple[list[Path], pd.DataFrame, str]:
    """One sweep's trials.csv, summary.{csv,md,tex}, epochs.csv and figures, in ``out``; returns
    the files, the trials and the sweep's context line (:func:`_context`).

    The runs are read once; metric histories only for the trials the loss curves show. A bar
    on a terminal counts the stages (:func:`_stages`): a 4,096-trial sweep takes a while."""
    run_id = parent.info.run_id
    with progress_bar("export", len(_stages(wanted)), "stage") as bar:
        _stage(bar, "reading the runs")
        attempts = trial_records(run_id, parent)
        trials = outcomes(attempts)
        out.mkdir(parents=True, exist_ok=True)
        kind_metrics = tables.SUMMARY_METRICS if kind == "heads" else tables.PARITY_SUMMARY_METRICS
        summary = tables.summarize(trials, kind_metrics)
        _stage(bar, "reading the loss curves")
        curves = epoch_records(comparison_trials(trials))
        pngs, pages = [], []
        if FIGURE_FORMATS & wanted:
            _stage(bar, "drawing the figures")
            pngs = _pngs(trials, curves, sweep, out, wanted)
        if {"html", "md"} & wanted:
            pages = _optuna_pages(parent, out, lambda name: _stage(bar, f"Optuna: {name}"))
        _stage(bar, "writing the tables")
        how_far = _how_far(parent, trials, len(attempts) - len(trials))
        context = _context(parent, how_far)
        written = _tables(trials, summary, curves, kind_metrics, wanted, sweep, run_id, out, pngs,
                          pages, context)
        bar.update(bar.total - bar.n)  # stages skipped (a figure Optuna cannot draw) count as done
    files = ", ".join(p.name for p in written) or "no files: no figure applies to its trials"
    print(f"export: study '{parent.data.tags.get(naming.STUDY)}' (run {run_id}): {how_far} -> {out} "
          f"({files})", file=sys.stderr)
    return written, trials, context


def _how_far(parent, trials: pd.DataFrame, rerun: int) -> str:
    """How far a sweep got, as its tables should be read: ``2 of 12 trials complete (1 failed;
    1 KILLED; 1 attempt run again left out); the sweep is KILLED, not finished: rerun it to
    resume``.

    ``trials`` are the outcomes (:func:`pipeline.runs.outcomes`): KILLED ones were interrupted
    or lost and not run again (yet); ``rerun`` counts the attempts that were run again. The
    budget is the study's (the parent run's trial counts, logged whenever a command on the
    study starts or ends)."""
    done = len(tables.completed(trials))
    budget = _budget(parent)
    pruned = int(trials["pruned"].sum())
    failed, killed = (int((trials["status"] == status).sum()) for status in ("FAILED", "KILLED"))
    notes = ([f"{pruned} pruned, left out of the tables"] if pruned else []) + (
        [f"{failed} failed"] if failed else []) + ([f"{killed} KILLED"] if killed else []) + (
        [f"{rerun} attempt{'s' if rerun > 1 else ''} run again left out"] if rerun else [])
    text = (f"{done} of {max(budget, done)} trials complete" if budget
            else f"{done} trial{'' if done == 1 else 's'} complete")  # a parent run without counts
    text += f" ({'; '.join(notes)})" if notes else ""
    if parent.info.status in ("RUNNING", "SCHEDULED"):
        text += f"; the sweep is {parent.info.status}: these are its trials so far"
    elif parent.info.status != "FINISHED":
        text += f"; the sweep is {parent.info.status}, not finished: rerun it to resume"
    return text


def _stages(wanted: set[str]) -> list[str]:
    """What one sweep's export does, in order, as its progress bar counts it."""
    stages = ["runs", "loss curves"]
    if FIGURE_FORMATS & wanted:
        stages.append("figures")
    if {"html", "md"} & wanted:
        stages += list(study_figures.OPTUNA_FIGURES)
    return stages + ["tables"]


def _stage(bar, name: str) -> None:
    """Count the stage under way done (if one is) and show ``name`` as the one under way."""
    if getattr(bar, "stage", None):
        bar.update()
    bar.stage = name
    bar.set_postfix_str(name)


def _pngs(trials: pd.DataFrame, curves: pd.DataFrame, sweep: str, out: Path,
          wanted: set[str]) -> list[Path]:
    """The PNG figures (and their copies in the ``wanted`` vector formats, listed after them):
    loss curves and gaps when the sweep holds the seed's comparison, accuracy against the
    positive fraction for sweeps of heads. Matplotlib comes with :mod:`pipeline.figures`, here:
    an export that draws nothing does not import it."""
    from pipeline import figures

    vector = [f for f in figures.VECTOR_FORMATS if f in wanted]
    pngs = []
    if not curves.empty:
        pngs = [figures.loss_curves(curves, out / "loss_curves.png", f"{sweep}: loss per epoch", vector),
                figures.loss_gaps(curves, out / "loss_gaps.png", f"{sweep}: loss differences", vector)]
    if "final_val_accuracy" in trials and not tables.completed(trials).empty:
        pngs.append(figures.accuracy_vs_collapse(trials, out / "accuracy.png",
                                                 f"{sweep}: accuracy of collapsed and healthy heads", vector))
    return pngs + [p.with_suffix(f".{suffix}") for suffix in vector for p in pngs]


def _tables(trials: pd.DataFrame, summary: pd.DataFrame, curves: pd.DataFrame, kind_metrics,
            wanted: set[str], sweep: str, run_id: str, out: Path, pngs: list[Path],
            pages: list[Path], context: str) -> list[Path]:
    """The tables in the formats ``wanted``, then the figures: the files written into ``out``,
    in order. The Markdown and LaTeX tables start with the command that writes them there
    again and with ``context`` (:func:`_context`): which study, and how far it got."""
    written: list[Path] = []
    if "csv" in wanted:
        written.append(_write(out / "trials.csv", trials.to_csv(index=False)))
        written.append(_write(out / "summary.csv", summary.to_csv(index=False)))
        if not curves.empty:
            written.append(_write(out / "epochs.csv", curves.to_csv(index=False)))
    written += pngs + pages
    command = f"python -m pipeline export --run_id {run_id} --output {shlex.quote(str(out))}"
    asked = ",".join(f for f in FORMATS if f in wanted)
    command += f" --formats {asked}" if asked != DEFAULT_FORMATS else ""
    if "md" in wanted:
        images = "".join(f"\n![{p.stem}]({p.name})\n" for p in pngs if p.suffix == ".png")
        links = "".join(f"- [{p.stem.replace('_', ' ')}]({p.name}) (Optuna, interactive)\n" for p in pages)
        written.append(_write(out / "summary.md",
                              f"# Sweep `{sweep}`\n\n{context}\nRegenerate with:\n\n"
                              f"```\n{command}\n```\n\n{tables.to_markdown(summary, kind_metrics)}"
                              f"{images}" + (f"\n{links}" if links else "")))
    if "tex" in wanted:
        caption = f"Sweep {sweep}: final-epoch metrics, mean and standard deviation over seeds."
        written.append(_write(out / "summary.tex",
                              f"% Regenerate with: {command}\n% {' '.join(context.split())}\n"
                              + tables.to_latex(summary, kind_metrics, caption=caption,
                                                label=f"tab:{naming.safe_filename(sweep)}")))
    return written


def _budget(parent) -> int:
    """The study's budget, from the trial counts its parent run logs whenever a command on the
    study starts or ends (0 for a parent run without them)."""
    counts = {k.removeprefix(naming.TRIAL_COUNT): v for k, v in parent.data.metrics.items()
              if k.startswith(naming.TRIAL_COUNT)}
    return int(studies.budget(counts))


def _regenerate(parent, output: str) -> str:
    """The commands that rerun a sweep (resuming its study, at its budget: a sweep run with
    ``--n_trials`` stays that size) and export it again, quoted for a shell."""
    params = parent.data.params
    sweep = params.get("sweep_file", f"sweeps/{params.get('sweep', 'SWEEP')}.yaml")
    features = params.get("features", "FEATURES.h5")
    study = params.get("study")
    resume = f" --study {shlex.quote(study)}" if study else ""
    budget = _budget(parent)
    resume += f" --n_trials {budget}" if budget else ""
    return (f"python -m pipeline sweep --features {shlex.quote(features)} --sweep {shlex.quote(sweep)}"
            f"{resume}\n"
            f"python -m pipeline export --run_id {shlex.quote(study or parent.info.run_id)} "
            f"--output {shlex.quote(output)}")


def _context(parent, how_far: str) -> str:
    """The line that says which sweep a table is of and how far it got (:func:`_how_far`)."""
    tags = parent.data.tags
    return (f"Sweep `{tags.get(naming.SWEEP_NAME)}` (study `{tags.get(naming.STUDY)}`, parent run "
            f"`{parent.info.run_id}`): {how_far}; features sha256 "
            f"`{tags.get(naming.FEATURES_SHA, '?')[:12]}`.\n")


def _optuna_pages(parent, out: Path, on_figure=None) -> list[Path]:
    """Optuna's HTML figures of the study behind sweep run ``parent`` (tags ``optuna.*``);
    ``on_figure(name)`` is called as each figure starts.

    A study that cannot be opened (its storage moved, a redacted password) or a figure that
    cannot be drawn is reported on stderr and skipped: the tables and PNGs do not depend on it.
    """
    from pipeline import storages

    tags = parent.data.tags
    storage, _, name = tags.get(naming.STORAGE, "").rpartition("#study=")
    name = name or tags.get(naming.STUDY, "")
    storage = storage or tracking.default_study_storage()
    try:
        study = optuna.load_study(study_name=name, storage=storages.read_storage(storage))
    except Exception as exc:  # a missing file, a server down, an unknown study: all the same here
        print(f"export: Optuna figures skipped: study '{name}' in '{storage}' cannot be opened "
              f"({' '.join(str(exc).split())[:200]})", file=sys.stderr)
        return []
    written, skipped = study_figures.optuna_figures(study, out, on_figure)
    for figure, reason in skipped.items():
        print(f"export: {figure}.html skipped: {reason}", file=sys.stderr)
    return written


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
