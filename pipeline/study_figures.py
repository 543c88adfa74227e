"""Optuna's interactive plots of a study, as self-contained HTML pages for a sweep's export.

Kept apart from :mod:`pipeline.figures` because Optuna's plotting and importance modules
import plotly and scikit-learn: only ``export`` needs them, never a sweep, and ``export``
imports them only when it draws these pages (formats ``html`` and ``md``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState

OPTUNA_FIGURES = ("optimization_history", "param_importances", "parallel_coordinate")
# Parameter importances by PED-ANOVA: how much each param's distribution among the best trials
# differs from its distribution among all of them. It is linear in the trials, where fANOVA's
# random forest runs for minutes on a thousand; the title of the page names the method.
IMPORTANCE_QUANTILE = 0.1
IMPORTANCE_METHOD = f"PED-ANOVA, best {IMPORTANCE_QUANTILE:.0%} of trials against all"


def optuna_figures(study: optuna.Study, folder: Path,
                   on_figure: Callable[[str], None] | None = None) -> tuple[list[Path], dict[str, str]]:
    """Optuna's optimization history, parameter importances and parallel coordinates as HTML.

    Each file embeds plotly.js, so it opens offline and from MLflow's artifact view; the
    importances are PED-ANOVA's (:data:`IMPORTANCE_METHOD`, named in the page's title). Returns
    the files written and, for each figure that cannot be drawn (no completed trial; fewer than
    two params that vary, for importances), the reason. ``on_figure(name)`` is called as each
    figure that can be drawn starts (for a progress bar).
    """
    import optuna.visualization as vis
    from optuna.importance import PedAnovaImportanceEvaluator

    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        return [], {name: "no completed trial" for name in OPTUNA_FIGURES}
    target = study.user_attrs.get("objective", "objective value")
    study = _ReadOnlyStudy(study)
    varying = sorted(name for name in {p for t in completed for p in t.params}
                     if len({repr(t.params.get(name)) for t in completed}) > 1)
    plots = {
        "optimization_history": lambda: vis.plot_optimization_history(study, target_name=target),
        "param_importances": lambda: vis.plot_param_importances(
            study, evaluator=PedAnovaImportanceEvaluator(target_quantile=IMPORTANCE_QUANTILE),
            params=varying, target_name=target),
        "parallel_coordinate": lambda: vis.plot_parallel_coordinate(study, params=varying,
                                                                     target_name=target),
    }
    written, skipped = [], {}
    if len(varying) < 2:
        skipped["param_importances"] = f"needs two or more params that vary, has {varying or 'none'}"
    if not varying:
        skipped["parallel_coordinate"] = "no param varies"
    for name, plot in plots.items():
        if name in skipped:
            continue
        if on_figure is not None:
            on_figure(name)
        try:
            fig = plot()
        except (ValueError, RuntimeError) as exc:  # Optuna's way of saying it cannot draw this
            skipped[name] = " ".join(str(exc).split())
            continue
        fig.update_layout(title=_title(study.study_name, name, fig.layout.title.text, len(completed)),
                          font={"size": 14})
        path = folder / f"{name}.html"
        fig.write_html(path, include_plotlyjs=True, full_html=True)
        written.append(path)
    return written, skipped


class _ReadOnlyStudy(optuna.Study):
    """A study as Optuna's plots read it: the same study, its ``trials`` not copied.

    ``Study.trials`` deep-copies every trial on each read, and the importances plot reads it
    once per parameter (to name the parameter's distribution): at 4,096 trials, more time than
    the importances themselves. The plots only read the trials, so the storage's own serve.
    """

    def __init__(self, study: optuna.Study):  # the same study: its storage, id and sampler
        self.__dict__.update(study.__dict__)

    @property
    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return self.get_trials(deepcopy=False)


def _title(study: str, figure: str, optuna_title: str | None, trials: int) -> str:
    """A page's title: the study, Optuna's title and, for importances, the method and sample."""
    title = f"{study}: {optuna_title or figure}"
    if figure == "param_importances":
        title += f" ({IMPORTANCE_METHOD}, {trials} completed trials)"
    return title
