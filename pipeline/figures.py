"""Figures of a sweep: the seed's loss curves and gaps, the collapse chart.

The figure functions take tidy data (per-epoch rows with ``role``, ``seed``, ``epoch`` and
metric columns, or one row per trial) and write one figure at paper size (6 inches wide, the
width of a two-column paper's text, 200 dpi; labels and legends readable when printed) as PNG,
and on request as PDF and SVG with their fonts embedded; the caller decides where.
Matplotlib runs headless (Agg). Optuna's interactive plots of a study are
:mod:`pipeline.study_figures`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from matplotlib.transforms import offset_copy  # noqa: E402

ROLE_STYLE = {
    "softmax": ("2-unit softmax (lr)", "tab:blue", "-"),
    "sigmoid_transfer": ("sigmoid, transferred init (2 x lr)", "tab:orange", "--"),
    "sigmoid_random": ("sigmoid, random init (2 x lr)", "tab:green", ":"),
}
PAPER_SIZE = (6.0, 3.6)  # inches: one column of a two-column paper, at 200 dpi
COLLAPSED_COLOR, HEALTHY_COLOR = "tab:red", "tab:blue"


VECTOR_FORMATS = ("pdf", "svg")
# Vector figures embed their fonts: TrueType in PDF (Type 3 bitmaps are refused by some
# publishers), glyph outlines in SVG, so they print as drawn without the fonts installed.
VECTOR_STYLE = {"pdf.fonttype": 42, "svg.fonttype": "path"}


def _finish(fig, path: Path, vector: Sequence[str] = ()) -> Path:
    """Save ``fig`` as ``path`` (PNG, 200 dpi) and beside it in each of the ``vector`` formats
    (``pdf``, ``svg``: same name, that suffix); return ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=200, bbox_inches="tight")  # keeps legends placed outside the axes
    with matplotlib.rc_context(VECTOR_STYLE):
        for suffix in vector:
            fig.savefig(path.with_suffix(f".{suffix}"), bbox_inches="tight")
    plt.close(fig)
    return path


def loss_curves(curves: pd.DataFrame, path: Path, title: str = "", vector: Sequence[str] = ()) -> Path:
    """Training (solid markers) and validation loss per epoch for each role, mean over seeds."""
    fig, axes = plt.subplots(1, 2, figsize=(PAPER_SIZE[0] * 1.6, PAPER_SIZE[1]), sharey=True)
    mean = curves.groupby(["role", "epoch"]).mean(numeric_only=True).reset_index()
    for ax, metric, name in ((axes[0], "loss", "training"), (axes[1], "val_loss", "validation")):
        for role, (label, color, style) in ROLE_STYLE.items():
            part = mean[mean["role"] == role]
            if not part.empty:
                ax.plot(part["epoch"] + 1, part[metric], style, color=color, marker="o",
                        markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{name} loss")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy, nats (Keras loss)")
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _finish(fig, path, vector)


def loss_gaps(curves: pd.DataFrame, path: Path, title: str = "", vector: Sequence[str] = ()) -> Path:
    """The seed's second figure: val-loss differences per epoch, |.| on a log scale.

    ``sigmoid_transfer - softmax`` (near 0: the parity) and ``sigmoid_transfer -
    sigmoid_random`` (the effect of the start), each averaged over the seeds they share.
    """
    wide = curves.pivot_table(index=["seed", "epoch"], columns="role", values="val_loss")
    fig, ax = plt.subplots(figsize=PAPER_SIZE)
    pairs = (("sigmoid_transfer", "softmax", "|sigmoid(transfer) - softmax|", "tab:blue"),
             ("sigmoid_transfer", "sigmoid_random", "|sigmoid(transfer) - sigmoid(random)|",
              "tab:orange"))
    for a, b, label, color in pairs:
        if a in wide and b in wide:
            gap = (wide[a] - wide[b]).abs().groupby("epoch").mean()
            ax.plot(gap.index + 1, gap.clip(lower=1e-12).values, marker="o", markersize=3,
                    color=color, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("|validation loss difference| (nats)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _finish(fig, path, vector)


def config_label(run_name: str) -> str:
    """A trial's run name without its seed: the label of its config (``softmax-2u-cce-...``)."""
    return re.sub(r"-s\d+$", "", run_name)


MAX_BARS = 64  # bars of the accuracy chart: a 64-head grid has one per config


def bar_labels(run_names: pd.Series) -> tuple[pd.Series, str]:
    """The accuracy chart's bar of each trial, and a note when bars pool several configs.

    A bar is a config (the run name without its seed); when that gives more than
    :data:`MAX_BARS` bars (a sampled, continuous learning rate makes every trial its own
    config), a bar is a head with its learning rates pooled (``-lr*``).
    """
    labels = run_names.map(config_label)
    if labels.nunique() <= MAX_BARS:
        return labels, ""
    return labels.str.replace(r"-lr[\d.]+e-?\d+", "-lr*", regex=True), "learning rates pooled"


def accuracy_vs_collapse(trials: pd.DataFrame, path: Path, title: str = "",
                         vector: Sequence[str] = ()) -> Path:
    """Final validation accuracy of every head config against the positive fraction.

    One horizontal bar per config (mean over seeds, each seed a dot), red when a seed of it
    collapsed (its prediction never varies), blue otherwise. The dashed line is the positive
    fraction of the validation split: the accuracy of always answering class 1, where a
    collapsed head sits. At most :data:`MAX_BARS` bars (:func:`bar_labels`; beyond that even
    with pooled learning rates, the first ones), so the figure's size stays bounded; the title
    says what was pooled or left out.
    """
    done = trials[trials["status"] == "FINISHED"].copy()
    done["config"], note = bar_labels(done["run_name"])
    grouped = done.groupby("config", sort=False)
    configs = list(grouped.groups)
    if len(configs) > MAX_BARS:
        note = f"{note}; the first {MAX_BARS} of {len(configs)} heads"
        configs = configs[:MAX_BARS]
    title = f"{title} ({note})" if note and title else title or note
    fig, ax = plt.subplots(figsize=(PAPER_SIZE[0], 1.6 + 0.45 * len(configs)))
    for y, config in enumerate(configs):
        part = grouped.get_group(config)
        collapsed = bool(part["collapsed"].any())
        color = COLLAPSED_COLOR if collapsed else HEALTHY_COLOR
        ax.barh(y, part["final_val_accuracy"].mean(), color=color, alpha=0.35, height=0.6)
        ax.plot(part["final_val_accuracy"], [y] * len(part), "o", color=color, markersize=4)
    fraction = done["positive_fraction"].mean()
    ax.axvline(fraction, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(configs)), configs, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("validation accuracy (fraction correct, last epoch)")
    ax.grid(alpha=0.3, axis="x")
    handles = [Patch(color=COLLAPSED_COLOR, alpha=0.5, label="collapsed (constant prediction)"),
               Patch(color=HEALTHY_COLOR, alpha=0.5, label="healthy"),
               Line2D([], [], color="black", linestyle="--",
                      label=f"positive fraction {fraction:.3f} (always class 1)"),
               Line2D([], [], color="gray", marker="o", linestyle="", markersize=4,
                      label="one seed; bar = mean")]
    below_label = offset_copy(ax.transAxes, fig, y=-0.55, units="inches")
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0),
              bbox_transform=below_label, ncol=2, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    return _finish(fig, path, vector)
