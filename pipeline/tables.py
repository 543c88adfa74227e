"""Paper tables from trial records: grouped by config, mean ± std over seeds, Markdown and LaTeX.

Pure functions on pandas DataFrames, so tests and other stages can build tables without MLflow.
"""

from __future__ import annotations

import math

import pandas as pd

from pipeline.config import CONFIG_MODELS

PARITY_SUMMARY_METRICS = ("final_max_gap_softmax_transfer", "final_beta_distance", "final_max_prob_gap")
SUMMARY_METRICS = ("final_val_accuracy", "positive_fraction", "final_val_prob_loss", "final_val_loss")
HEADERS = {"final_max_gap_softmax_transfer": "max loss gap", "final_beta_distance": "beta distance",
           "final_max_prob_gap": "max P gap", "final_val_accuracy": "val_accuracy",
           "final_val_prob_loss": "val_prob_loss",
           "final_val_loss": "val_loss (Keras)", "final_loss": "loss (Keras)",
           "final_accuracy": "accuracy", "final_prob_loss": "prob_loss"}
# Every setting of either trial kind but the seed (a config's seeds are its replicates), the
# head's shape first: the columns a summary groups by, when they vary.
_LEADING = ("activation", "units", "hidden_units", "hidden_activation", "loss", "from_logits", "labels")
CONFIG_COLUMNS = tuple(name for name in dict.fromkeys(
    [*_LEADING, *(field for model in CONFIG_MODELS.values() for field in model.model_fields)])
    if name != "seed")


def completed(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials that trained to the end: FINISHED runs that were not pruned (a pruned run is
    FINISHED too, with the epochs it trained, so its last values are an earlier epoch's)."""
    keep = trials["status"] == "FINISHED"
    if "pruned" in trials:
        keep &= ~trials["pruned"].astype(bool)
    return trials[keep]


def summarize(trials: pd.DataFrame, metrics=SUMMARY_METRICS) -> pd.DataFrame:
    """One row per config (every param but the seed) over the completed trials.

    Columns: the config columns that vary, ``n`` (seeds), ``collapsed`` (how many of them),
    and ``<metric>_mean``/``<metric>_std`` for each metric.
    """
    done = completed(trials)
    keys = [c for c in CONFIG_COLUMNS if c in done and done[c].nunique(dropna=False) > 1]
    keys = keys or [c for c in ("activation", "units", "loss", "optimizer", "ratio") if c in done]
    if done.empty:
        return pd.DataFrame(columns=[*keys, "n"])
    grouped = done.groupby(keys, sort=False, dropna=False)
    out = grouped.size().rename("n").to_frame()
    out["collapsed"] = grouped["collapsed"].sum().astype(int)
    for metric in metrics:
        if metric in done:
            out[f"{metric}_mean"] = grouped[metric].mean()
            out[f"{metric}_std"] = grouped[metric].std(ddof=1)
    return out.reset_index()


def plus_minus(mean: float, std: float, digits: int, tex: bool) -> str:
    """``mean ± std`` (``$\\pm$`` in LaTeX); a mean below 10^-digits in scientific notation."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    style = f".{digits}f" if mean == 0 or abs(mean) >= 10 ** -digits else ".1e"  # gaps are ~1e-8
    text = f"{mean:{style}}"
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += (r" $\pm$ " if tex else " ± ") + f"{std:{style}}"
    return text


def _cells(summary: pd.DataFrame, metrics, digits: int, tex: bool) -> tuple[list[str], list[list[str]]]:
    keys = [c for c in summary.columns if c in CONFIG_COLUMNS]
    header = [*keys, "n", "collapsed",
              *[HEADERS.get(m, m) for m in metrics if f"{m}_mean" in summary]]
    rows = []
    for _, row in summary.iterrows():
        cells = [_fmt(row[k]) for k in keys] + [str(int(row["n"])), str(int(row["collapsed"]))]
        cells += [plus_minus(row[f"{m}_mean"], row[f"{m}_std"], digits, tex)
                  for m in metrics if f"{m}_mean" in summary]
        rows.append(cells)
    return header, rows


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def latex_table(header: list[str], rows: list[list[str]], caption: str = "", label: str = "") -> str:
    """A booktabs ``table`` of already formatted cells (needs ``\\usepackage{booktabs}``).

    Cells are escaped, except those holding math (``$...$``), which are taken as LaTeX.
    """
    lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{" + "l" * len(header) + "}",
             r"\toprule", " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(c if "$" in c else latex_escape(c) for c in cells) + r" \\"
              for cells in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines.append(r"\caption{" + latex_escape(caption) + "}")
    if label:
        lines.append(r"\label{" + label + "}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def to_markdown(summary: pd.DataFrame, metrics=SUMMARY_METRICS, digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table of :func:`summarize`'s output."""
    return markdown_table(*_cells(summary, metrics, digits, tex=False))


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped, and the ASCII characters that its
    default (OT1) font encoding typesets as other glyphs (``|`` as an em dash, ``<`` and ``>``
    as inverted marks) written as text commands."""
    special = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
               "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
               "^": r"\textasciicircum{}", "|": r"\textbar{}", "<": r"\textless{}",
               ">": r"\textgreater{}"}
    return "".join(special.get(ch, ch) for ch in text)


def to_latex(summary: pd.DataFrame, metrics=SUMMARY_METRICS, digits: int = 4,
             caption: str = "", label: str = "") -> str:
    """A booktabs ``table`` of :func:`summarize`'s output (needs ``\\usepackage{booktabs}``)."""
    return latex_table(*_cells(summary, metrics, digits, tex=True), caption=caption, label=label)
