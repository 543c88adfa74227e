"""Figures at paper size: the seed's loss curves and loss gaps, and the collapse chart.

Each function takes tidy per-epoch data (a DataFrame with ``role``, ``seed``, ``epoch`` and
metric columns) and writes one PNG; the caller decides where. Matplotlib runs headless (Agg).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

ROLE_STYLE = {
    "softmax": ("2-unit softmax (lr)", "tab:blue", "-"),
    "sigmoid_transfer": ("sigmoid, transferred init (2 x lr)", "tab:orange", "--"),
    "sigmoid_random": ("sigmoid, random init (2 x lr)", "tab:green", ":"),
}
PAPER_SIZE = (6.0, 3.6)  # inches: one column of a two-column paper, at 200 dpi


def _finish(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=200)
    plt.close(fig)
    return path


def loss_curves(curves: pd.DataFrame, path: Path, title: str = "") -> Path:
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
    axes[0].set_ylabel("cross-entropy (Keras loss)")
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _finish(fig, path)


def loss_gaps(curves: pd.DataFrame, path: Path, title: str = "") -> Path:
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
    ax.set_ylabel("|validation loss difference|")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _finish(fig, path)
