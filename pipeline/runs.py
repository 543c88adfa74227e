"""A sweep's runs read back from MLflow: its parent run (by id, study or sweep name), and one
row per trial run.

The export's tables and figures and the atlas's verdicts both start from these rows.
"""

from __future__ import annotations

import mlflow
import pandas as pd

from pipeline import naming, tracking
from pipeline.config import CONFIG_MODELS, PARITY_METRICS
from pipeline.errors import UserError
from pipeline.results import EPOCH_METRICS


def latest_sweep_run(name: str | None = None) -> str:
    """The id of the sweep parent run, in any experiment, that was run last (started, or ended
    after a resume, most recently): of the study or the sweep (its file's ``name``) called
    ``name`` if given. Whatever its status: an interrupted sweep's finished trials export too,
    and the export says how far it got."""
    if name and "'" in name:
        raise UserError(f"run_id {name!r}: not a run id, a study or a sweep name")
    found = [run for tag in ((naming.STUDY, naming.SWEEP_NAME) if name else (None,))
             for order in ("start_time", "end_time") for run in _newest_sweep_run(tag, name, order)]
    if not found:
        raise UserError(f"no runs of study or sweep '{name}' in the tracking store "
                        f"({mlflow.get_tracking_uri()}); give a sweep's parent run id, study or "
                        f"sweep name" if name else
                        f"no sweep runs in the tracking store ({mlflow.get_tracking_uri()}); "
                        f"run a sweep first or pass --run_id")
    return max(found, key=lambda run: max(run.info.start_time, run.info.end_time or 0)).info.run_id


def _newest_sweep_run(tag: str | None, value: str | None, order: str) -> list:
    """The sweep parent run whose tag ``tag`` is ``value`` (any, without a tag) with the newest
    ``order`` time (``start_time`` or ``end_time``), or none."""
    clauses = [f"tags.`{naming.STEP}` = 'sweep'"] + ([f"tags.`{tag}` = '{value}'"] if tag else [])
    return mlflow.search_runs(search_all_experiments=True, max_results=1,
                              filter_string=" and ".join(clauses),
                              order_by=[f"attributes.{order} DESC"], output_format="list")


def resolve_run_ids(run_ids: str | None) -> list[str]:
    """Sweep parent run ids from a comma list of run ids, study names or sweep names (the
    latest run of each named study or sweep); empty means the latest sweep of all. A main
    run's id stands for the sweeps it ran."""
    names = [part.strip() for part in (run_ids or "").split(",") if part.strip()]
    if not names:
        return [latest_sweep_run()]
    return [rid for name in names
            for rid in (_sweeps_of(name) if naming.is_run_id(name) else [latest_sweep_run(name)])]


def _sweeps_of(run_id: str) -> list[str]:
    """``[run_id]`` for a sweep's parent run (or a run :func:`sweep_run` refuses); for a main
    run, the sweeps it ran: those it lists (tag ``pipeline.sweep_run_id``, each added as its
    sweep starts) and those nested under it or naming it as their main run."""
    try:
        tags = tracking.client().get_run(run_id).data.tags
    except mlflow.exceptions.MlflowException:
        return [run_id]
    if tags.get(naming.STEP) != "main":
        return [run_id]
    found = [rid for rid in tags.get(naming.SWEEP_RUNS, "").split(",") if rid]
    for tag in (naming.PARENT, naming.MAIN_RUN):
        linked = f"tags.`{naming.STEP}` = 'sweep' and tags.`{tag}` = '{run_id}'"
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=linked, order_by=["attributes.start_time ASC"])
        found += [run.info.run_id for run in runs if run.info.run_id not in found]
    if not found:
        raise UserError(f"run_id {run_id}: a main run that ran no sweep")
    return found


def trial_records(parent_run_id: str, parent=None) -> pd.DataFrame:
    """One row per trial run under ``parent_run_id``, every attempt of a trial that was retried
    included (:func:`outcomes` leaves those out): ids, status, ``pruned``, typed params, final
    metrics.

    Params keep their names (``loss`` is the loss function); the last epoch's value of metric
    ``m`` is the column ``final_m`` (a pruned trial's last epoch is the one it stopped after).
    ``parent`` is the parent run if the caller has it already (:func:`sweep_run`). The runs
    come from one search, read page by page.
    """
    parent = parent or sweep_run(parent_run_id)
    kind = parent.data.tags.get(naming.KIND, "heads")
    model = CONFIG_MODELS[kind]
    finals = EPOCH_METRICS if kind == "heads" else PARITY_METRICS
    runs = _trial_runs(parent)
    rows = []
    for run in runs:
        params = {k: v for k, v in run.data.params.items() if k in model.model_fields}
        config = model(**params).params() if params else {}
        tags = run.data.tags
        rows.append({"run_id": run.info.run_id, "run_name": run.info.run_name,
                     "status": run.info.status,
                     "trial": int(tags.get(naming.TRIAL_NUMBER, -1)),
                     "role": tags.get(naming.ROLE, ""),
                     "collapsed": tags.get(naming.COLLAPSED) == "true",
                     "pruned": tags.get(naming.PRUNED) == "true",
                     **config,
                     **{f"final_{m}": run.data.metrics.get(m, float("nan")) for m in finals},
                     "positive_fraction": run.data.metrics.get("positive_fraction", float("nan")),
                     "error": tags.get(naming.ERROR, ""),
                     "retries": tags.get(naming.RETRIES, "")})
    frame = pd.DataFrame(rows)
    return frame.sort_values("trial").reset_index(drop=True) if not frame.empty else frame


def has_trial_runs(parent) -> bool:
    """Whether sweep parent run ``parent`` has a trial run under it (one run read)."""
    return bool(_trial_runs(parent, max_results=1))


def _trial_runs(parent, max_results: int | None = None) -> list:
    """The trial runs under sweep parent run ``parent`` (at most ``max_results``)."""
    more = {} if max_results is None else {"max_results": max_results}
    return mlflow.search_runs(experiment_ids=[parent.info.experiment_id], output_format="list",
                              filter_string=f"tags.`{naming.PARENT}` = '{parent.info.run_id}'", **more)


def outcomes(records: pd.DataFrame) -> pd.DataFrame:
    """The rows of :func:`trial_records` that are trials' outcomes: all but the attempts that
    were run again. An attempt that an interrupt or a lost worker ends (its run KILLED) is
    queued again, up to a limit, as a new trial whose run lists it (tag ``pipeline.retries``);
    a KILLED run that no later run lists (not run again yet, or past the limit) stays."""
    if records.empty:
        return records
    rerun = {int(n) for listed in records["retries"] for n in listed.split(",") if n}
    return records[~records["trial"].isin(rerun)].reset_index(drop=True)


def sweep_run(run_id: str):
    """The parent run ``run_id`` of a sweep, or :class:`UserError` saying why it is not one."""
    try:
        parent = tracking.client().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise UserError(f"run_id {run_id}: no such run in {mlflow.get_tracking_uri()}") from None
    if parent.data.tags.get(naming.STEP) != "sweep":
        raise UserError(f"run_id {run_id}: not a sweep's parent run "
                        f"(its {naming.STEP} tag is {parent.data.tags.get(naming.STEP)!r})")
    return parent
