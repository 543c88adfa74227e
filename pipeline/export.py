"""The export stage: a sweep's MLflow runs -> tidy CSV, paper tables and figures.

Reads the trial runs nested under a sweep's parent run (``mlflow.search_runs`` and metric
histories), writes ``trials.csv`` (one row per trial, params typed), ``summary.md`` /
``summary.tex`` (grouped by config, mean ± std over seeds), ``epochs.csv`` (per-epoch metrics),
the PNG figures (``loss_curves``, ``loss_gaps``, ``accuracy``) and Optuna's HTML figures of the
study (``optimization_history``, ``param_importances``, ``parallel_coordinate``; the study is
found from the parent run's ``optuna.storage`` tag), and logs the same files as artifacts of
the parent run under ``export/``.
File names are fixed here; nothing from run names or params reaches a path.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import pandas as pd

from pipeline import figures, naming, tables
from pipeline.config import TRIAL_FIELDS, TrialConfig
from pipeline.errors import UserError

FORMATS = ("csv", "md", "tex", "png", "html")
CURVE_METRICS = ("loss", "val_loss", "accuracy", "val_accuracy", "prob_loss", "val_prob_loss")


@dataclass(frozen=True)
class ExportResult:
    """The sweep exported and the files written."""

    run_id: str
    files: tuple[Path, ...]


def latest_sweep_run() -> str:
    """The id of the most recently started sweep parent run, in any experiment."""
    runs = mlflow.search_runs(search_all_experiments=True, max_results=1,
                              filter_string=f"tags.`{naming.STEP}` = 'sweep'",
                              order_by=["attributes.start_time DESC"], output_format="list")
    if not runs:
        raise UserError("no sweep runs in the tracking store "
                        f"({mlflow.get_tracking_uri()}); run a sweep first or pass --run_id")
    return runs[0].info.run_id


def trial_records(parent_run_id: str) -> pd.DataFrame:
    """One row per trial run under ``parent_run_id``: ids, status, typed params, final metrics.

    Params keep their names (``loss`` is the loss function); the last epoch's value of metric
    ``m`` is the column ``final_m``.
    """
    client = mlflow.MlflowClient()
    try:
        parent = client.get_run(parent_run_id)
    except mlflow.exceptions.MlflowException:
        raise UserError(f"run_id {parent_run_id}: no such run in {mlflow.get_tracking_uri()}") from None
    if parent.data.tags.get(naming.STEP) != "sweep":
        raise UserError(f"run_id {parent_run_id}: not a sweep's parent run "
                        f"(its {naming.STEP} tag is {parent.data.tags.get(naming.STEP)!r})")
    runs = mlflow.search_runs(experiment_ids=[parent.info.experiment_id], output_format="list",
                              filter_string=f"tags.`{naming.PARENT}` = '{parent_run_id}'")
    rows = []
    for run in runs:
        params = {k: v for k, v in run.data.params.items() if k in TRIAL_FIELDS}
        config = TrialConfig(**params).params() if params else {}
        tags = run.data.tags
        rows.append({"run_id": run.info.run_id, "run_name": run.info.run_name,
                     "status": run.info.status,
                     "trial": int(tags.get(naming.TRIAL_NUMBER, -1)),
                     "role": tags.get(naming.ROLE, ""),
                     "collapsed": tags.get(naming.COLLAPSED) == "true",
                     **config,
                     **{f"final_{m}": run.data.metrics.get(m, float("nan")) for m in CURVE_METRICS},
                     "positive_fraction": run.data.metrics.get("positive_fraction", float("nan")),
                     "error": tags.get(naming.ERROR, "")})
    frame = pd.DataFrame(rows)
    return frame.sort_values("trial").reset_index(drop=True) if not frame.empty else frame


def epoch_records(trials: pd.DataFrame, metrics=CURVE_METRICS) -> pd.DataFrame:
    """Per-epoch metric histories of the finished trials: run_id, role, seed, epoch, metrics."""
    client = mlflow.MlflowClient()
    rows: dict[tuple, dict] = {}
    for _, trial in trials[trials["status"] == "FINISHED"].iterrows():
        for metric in metrics:
            for point in client.get_metric_history(trial["run_id"], metric):
                key = (trial["run_id"], point.step)
                rows.setdefault(key, {"run_id": trial["run_id"], "role": trial["role"],
                                      "seed": trial["seed"], "learning_rate": trial["learning_rate"],
                                      "epoch": point.step})[metric] = point.value
    return pd.DataFrame(list(rows.values()))


def parity_curves(trials: pd.DataFrame, epochs: pd.DataFrame, ratio: float = 2.0) -> pd.DataFrame:
    """The per-epoch rows of the seed's comparison: softmax at lr, both sigmoids at ratio x lr.

    Chooses the smallest softmax learning rate for which a transferred sigmoid at ``ratio``
    times it exists; empty when the sweep holds no such pair.
    """
    if epochs.empty:
        return epochs
    soft = sorted(trials.loc[trials["role"] == "softmax", "learning_rate"].unique())
    sig = trials.loc[trials["role"] == "sigmoid_transfer", "learning_rate"].unique()
    for lr in soft:
        match = [s for s in sig if abs(s - ratio * lr) <= 1e-9 * max(1.0, s)]
        if match:
            keep = ((epochs["role"] == "softmax") & (epochs["learning_rate"] == lr)) | (
                epochs["role"].isin(["sigmoid_transfer", "sigmoid_random"])
                & (epochs["learning_rate"] == match[0]))
            return epochs[keep]
    return epochs.iloc[0:0]


def export(run_id: str | None = None, output: str = "exports", formats: str = "csv,md,tex",
           log_to_run: bool = True) -> ExportResult:
    """Write a sweep's tables and figures into ``output`` and log them on its parent run.

    ``formats`` is a comma list of csv, md, tex, png, html. PNG figures (loss curves and gaps
    when the sweep holds the seed's softmax/sigmoid comparison; accuracy against the positive
    fraction always) come with png or md, Optuna's HTML figures with html or md, since the
    Markdown report shows or links them.
    """
    wanted = {f.strip() for f in formats.split(",") if f.strip()}
    unknown = wanted - set(FORMATS)
    if unknown or not wanted:
        raise UserError(f"formats '{formats}': allowed: {', '.join(FORMATS)}")
    run_id = run_id or latest_sweep_run()
    trials = trial_records(run_id)
    if trials.empty:
        raise UserError(f"run_id {run_id}: the sweep has no trial runs")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    summary = tables.summarize(trials)
    sweep = mlflow.MlflowClient().get_run(run_id).data.tags.get(naming.SWEEP_NAME, "sweep")
    written: list[Path] = []
    if "csv" in wanted:
        written.append(_write(out / "trials.csv", trials.to_csv(index=False)))
        written.append(_write(out / "summary.csv", summary.to_csv(index=False)))
    curves = parity_curves(trials, epoch_records(trials))
    if "csv" in wanted and not curves.empty:
        written.append(_write(out / "epochs.csv", curves.to_csv(index=False)))
    pngs, pages = [], []
    if {"png", "md"} & wanted:
        if not curves.empty:
            pngs = [figures.loss_curves(curves, out / "loss_curves.png", f"{sweep}: loss per epoch"),
                    figures.loss_gaps(curves, out / "loss_gaps.png", f"{sweep}: loss differences")]
        if (trials["status"] == "FINISHED").any():
            pngs.append(figures.accuracy_vs_collapse(trials, out / "accuracy.png",
                                                     f"{sweep}: accuracy of collapsed and healthy heads"))
        written += pngs
    if {"html", "md"} & wanted:
        pages = _optuna_pages(mlflow.MlflowClient().get_run(run_id), out)
        written += pages
    command = f"python -m pipeline export --run_id {run_id} --output {output}"
    if "md" in wanted:
        images = "".join(f"\n![{p.stem}]({p.name})\n" for p in pngs)
        links = "".join(f"- [{p.stem.replace('_', ' ')}]({p.name}) (Optuna, interactive)\n" for p in pages)
        written.append(_write(out / "summary.md",
                              f"# Sweep `{sweep}` (parent run `{run_id}`)\n\nRegenerate with:\n\n"
                              f"```\n{command}\n```\n\n{tables.to_markdown(summary)}{images}"
                              + (f"\n{links}" if links else "")))
    if "tex" in wanted:
        caption = f"Sweep {sweep}: final-epoch metrics, mean and standard deviation over seeds."
        written.append(_write(out / "summary.tex",
                              f"% Regenerate with: {command}\n"
                              + tables.to_latex(summary, caption=caption,
                                                label=f"tab:{naming.safe_filename(sweep)}")))
    if log_to_run:
        client = mlflow.MlflowClient()
        for path in written:
            client.log_artifact(run_id, str(path), "export")
    print(f"export: {len(trials)} trials of run {run_id} -> {out} "
          f"({', '.join(p.name for p in written)})", file=sys.stderr)
    return ExportResult(run_id=run_id, files=tuple(written))


def _optuna_pages(parent, out: Path) -> list[Path]:
    """Optuna's HTML figures of the study behind sweep run ``parent`` (tags ``optuna.*``).

    A study that cannot be opened (its storage moved, a redacted password) or a figure that
    cannot be drawn is reported on stderr and skipped: the tables and PNGs do not depend on it.
    """
    from pipeline import studies

    tags = parent.data.tags
    storage, _, name = tags.get(naming.STORAGE, "").rpartition("#study=")
    name = name or tags.get(naming.STUDY, "")
    try:
        study = optuna.load_study(study_name=name, storage=studies.make_storage(storage))
    except Exception as exc:  # a missing file, a server down, an unknown study: all the same here
        print(f"export: Optuna figures skipped: study '{name}' in '{storage}' cannot be opened "
              f"({' '.join(str(exc).split())[:200]})", file=sys.stderr)
        return []
    written, skipped = figures.optuna_figures(study, out)
    for figure, reason in skipped.items():
        print(f"export: {figure}.html skipped: {reason}", file=sys.stderr)
    return written


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
