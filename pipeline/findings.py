"""The findings report: the collapse, parity, deep-parity, breakers and atlas tables, from
their studies' trials.

Pure functions from :func:`pipeline.runs.trial_records` frames to table cells, and the
assembly of ``findings.md`` / ``findings.tex`` with each table under the command that
regenerates it. Which table a study makes is its sweep file's ``report`` (``collapse``,
``parity``, ``parity_deep``, ``breakers`` or ``atlas``). :data:`BREAKERS` is the one list of
breaker/correction pairs; ``sweeps/breakers.yaml`` holds a grid point for each (a test checks).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline import atlas, tables
from pipeline.config import OPTIMIZERS, ParityConfig
from pipeline.metrics import CLIPPED_LOSS
from pipeline.naming import LOSS_ABBREV

EXACT = 1e-5  # the parity bar: float32 rounding over 5 epochs stays far below it


@dataclass(frozen=True)
class Breaker:
    """One row of the breakers table: a setting that may break parity and its correction.

    ``broken`` and ``corrected`` are the ParityConfig settings (beyond ``optimizer``) of the
    two experiments compared; settings not named keep their defaults.
    """

    name: str
    optimizer: str
    correction: str
    broken: dict = field(default_factory=dict)
    corrected: dict = field(default_factory=dict)


BREAKERS = (
    Breaker("decoupled weight decay 0.004 on both (AdamW)", "adamw", "halve the sigmoid's decay",
            {"weight_decay": 0.004}, {"weight_decay": 0.004, "sigmoid_decay_scale": 0.5}),
    Breaker("L2 kernel penalty 0.01 on both", "sgd", "halve the sigmoid's L2",
            {"l2": 0.01}, {"l2": 0.01, "sigmoid_l2_scale": 0.5}),
    Breaker("L2 kernel penalty 0.01 on both", "momentum", "halve the sigmoid's L2",
            {"l2": 0.01}, {"l2": 0.01, "sigmoid_l2_scale": 0.5}),
    Breaker("L2 kernel penalty 0.01 on both", "adam", "halve the sigmoid's L2",
            {"l2": 0.01}, {"l2": 0.01, "sigmoid_l2_scale": 0.5}),
    Breaker("L2 kernel penalty 0.01 on both", "adam",
            "halve the sigmoid's L2 and start the softmax at w0 = -w1",
            {"l2": 0.01}, {"l2": 0.01, "sigmoid_l2_scale": 0.5, "center_softmax": True}),
    Breaker("label smoothing 0.1 on both", "sgd", "none needed (compared with no smoothing)",
            {"label_smoothing": 0.1}, {}),
    Breaker("label smoothing 0.1 on both", "adam", "none needed (compared with no smoothing)",
            {"label_smoothing": 0.1}, {}),
    Breaker("dropout masks not shared", "sgd", "share the masks", {"share_masks": False}, {}),
    Breaker("bias not transferred (random-normal bias init)", "sgd", "transfer b = b1 - b0",
            {"bias_init": "random_normal", "transfer_bias": False}, {"bias_init": "random_normal"}),
    Breaker("different batch order", "sgd", "share the order", {"share_batch_order": False}, {}),
)
KNOBS = ("weight_decay", "sigmoid_decay_scale", "l2", "sigmoid_l2_scale", "label_smoothing",
         "bias_init", "share_masks", "share_batch_order", "transfer_bias", "center_softmax")


def sci(value: float, tex: bool = False) -> str:
    """``1.7e-05`` (or ``$1.7\\times10^{-5}$``): two significant digits, what a gap needs."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"${mantissa}\\times10^{{{int(exponent)}}}$" if tex else f"{mantissa}e{int(exponent)}"


# --- the collapse -------------------------------------------------------------------------

def collapse_rows(trials: pd.DataFrame, tex: bool = False) -> tuple[list[str], list[list[str]]]:
    """One row per head (activation, units, loss, optimizer) over seeds.

    Columns: runs finished/failed, how many collapsed, val_accuracy against the positive
    fraction, val_prob_loss against (1 - positive fraction) x ln(1e7), the largest |measured -
    expected| over seeds (for collapsed heads), Keras's val_loss, and a failed run's error.
    """
    header = ["head", "loss", "optimizer", "runs", "collapsed", "val_accuracy", "positive fraction",
              "val_prob_loss", "(1-pos) x ln 1e7", "max |measured - expected|", "val_loss (Keras)",
              "note"]
    rows = []
    keys = ["activation", "units", "loss", "optimizer"]
    for key, group in trials.groupby(keys, sort=False):
        done = tables.completed(group)
        activation, units, loss, optimizer = key
        neg = 1 - done["positive_fraction"]
        expected_loss = neg * CLIPPED_LOSS
        collapsed = done["collapsed"]
        diffs = pd.concat([(done["final_val_accuracy"] - done["positive_fraction"])[collapsed],
                           (done["final_val_prob_loss"] - expected_loss)[collapsed]])
        failed = group[group["status"] != "FINISHED"]
        note = ""
        if not failed.empty:
            note = f"{len(failed)} failed: {essential_error(failed['error'].iloc[0])}"
        elif len(done) and max(done["final_loss"].abs().max(), done["final_val_loss"].abs().max()) == 0:
            note = "Keras loss 0"
        rows.append([f"{activation}, {units} unit{'s' if units > 1 else ''}", loss, optimizer,
                     f"{len(done)}/{len(group)}", f"{int(collapsed.sum())}/{len(done)}",
                     _mean_std(done["final_val_accuracy"], tex), _mean_std(done["positive_fraction"], tex),
                     _mean_std(done["final_val_prob_loss"], tex), _mean_std(expected_loss, tex),
                     sci(float(diffs.abs().max()), tex) if len(diffs) else "–",
                     _mean_std(done["final_val_loss"], tex), note])
    return header, rows


def essential_error(error: str) -> str:
    """The sentence of a recorded error that says what went wrong (TensorFlow's are long)."""
    found = (re.search(r"Received a label value of \d+ which is outside the valid range of [^.]*?\)", error)
             or re.search(r"(Arguments|Argument) `\w+`[^.]*\. Received: [^\n]*?\)(?=\W|$)", error))
    return found.group(0) if found else error[:160]


def _mean_std(values: pd.Series, tex: bool, digits: int = 4) -> str:
    values = values.dropna()
    if values.empty:
        return "–"
    std = values.std(ddof=1) if len(values) > 1 else float("nan")
    return tables.plus_minus(float(values.mean()), float(std), digits, tex)


# --- the parity ---------------------------------------------------------------------------

def parity_rows(trials: pd.DataFrame, metric: str = "final_max_gap_softmax_transfer",
                tex: bool = False) -> tuple[list[str], list[list[str]]]:
    """Optimizers as rows, ratios as columns; each cell ``metric`` averaged over seeds."""
    done = tables.completed(trials)
    ratios = sorted(done["ratio"].unique())
    header = ["optimizer", "softmax lr", *[f"ratio {r:g}" for r in ratios], "seeds"]
    order = [o for o in OPTIMIZERS
             if o in set(done["optimizer"])]
    rows = []
    for optimizer in order:
        part = done[done["optimizer"] == optimizer]
        cells = [sci(float(part.loc[part["ratio"] == r, metric].mean()), tex) for r in ratios]
        lrs = ", ".join(f"{lr:g}" for lr in sorted(part["learning_rate"].unique()))
        rows.append([optimizer, lrs, *cells, str(part["seed"].nunique())])
    return header, rows


def parity_deep_rows(trials: pd.DataFrame, tex: bool = False) -> tuple[list[str], list[list[str]]]:
    """Heads with a hidden layer: one row per optimizer and hidden layer, one column per ratio
    and ratio scope; each cell the largest per-epoch training-loss gap over the seeds."""
    done = tables.completed(trials)
    columns = sorted({(float(r), s) for r, s in zip(done["ratio"], done["ratio_scope"], strict=True)},
                     key=lambda c: (c[0], c[1] != "output"))
    header = ["optimizer", "softmax lr", "hidden layer",
              *[_ratio_heading(r, s) for r, s in columns],
              "seeds"]
    order = [o for o in OPTIMIZERS
             if o in set(done["optimizer"])]
    rows = []
    for optimizer in order:
        part = done[done["optimizer"] == optimizer]
        for (units, activation), body in part.groupby(["hidden_units", "hidden_activation"], sort=True):
            cells = [body.loc[np.isclose(body["ratio"], r) & (body["ratio_scope"] == s),
                              "final_max_gap_softmax_transfer"] for r, s in columns]
            lrs = ", ".join(f"{lr:g}" for lr in sorted(body["learning_rate"].unique()))
            rows.append([optimizer, lrs, f"{units} {activation}" if units else "none",
                         *[sci(float(c.max()), tex) if len(c) else "–" for c in cells],
                         str(body["seed"].nunique())])
    return header, rows


def _ratio_heading(ratio: float, scope: str) -> str:
    """A deep-parity column: the ratio, and at a ratio other than 1 the layers it applies to."""
    if ratio == 1:
        return "ratio 1"
    return f"ratio {ratio:g}, {'output layer' if scope == 'output' else 'all layers'}"


# --- the breakers -------------------------------------------------------------------------

def matching(trials: pd.DataFrame, optimizer: str, settings: dict) -> pd.DataFrame:
    """The finished ratio-2 experiments of ``optimizer`` whose breaker settings are ``settings``
    (every setting not named at its default)."""
    defaults = ParityConfig()
    done = tables.completed(trials)
    mask = (done["optimizer"] == optimizer) & np.isclose(done["ratio"], 2.0)
    for knob in KNOBS:
        want = settings.get(knob, getattr(defaults, knob))
        column = done[knob]
        mask &= column.isna() if want is None else (column == want)
    return done[mask]


def breaker_rows(trials: pd.DataFrame, tex: bool = False) -> tuple[list[str], list[list[str]]]:
    """One row per :data:`BREAKERS` entry found in ``trials``: gaps without and with the correction.

    Each side shows max |loss gap|, max |P gap| on the validation set and |beta - (w1 - w0)|,
    means over seeds; "restored" is yes when the corrected side's P gap and beta distance are
    both <= 1e-5 (the loss also carries an L2 penalty, which differs between the heads unless
    w0 = -w1, so the loss gap is not the judge there).
    """
    header = ["setting", "optimizer", "correction", "without: loss gap", "P gap", "beta dist.",
              "with: loss gap", "P gap", "beta dist.", "exact parity restored"]
    metrics = ("final_max_gap_softmax_transfer", "final_max_prob_gap", "final_beta_distance")
    rows = []
    for breaker in BREAKERS:
        broken = matching(trials, breaker.optimizer, breaker.broken)
        fixed = matching(trials, breaker.optimizer, breaker.corrected)
        if broken.empty or fixed.empty:
            continue
        before = [float(broken[m].mean()) for m in metrics]
        after = [float(fixed[m].mean()) for m in metrics]
        restored = max(float(fixed["final_max_prob_gap"].max()),
                       float(fixed["final_beta_distance"].max())) <= EXACT
        rows.append([breaker.name, breaker.optimizer, breaker.correction,
                     *[sci(v, tex) for v in before], *[sci(v, tex) for v in after],
                     "yes" if restored else "no"])
    return header, rows


# --- the atlas ----------------------------------------------------------------------------

def atlas_rows(trials: pd.DataFrame, tex: bool = False) -> tuple[list[str], list[list[str]]]:
    """One row per cell of the atlas (:func:`pipeline.atlas.cell_verdicts`): the head as written,
    the verdict, finished runs, collapsed seeds, mean val_accuracy (ours, from P(class 1)) and
    Keras's, their largest |difference| over seeds, how far below the best cell's mean it is,
    what the head effectively is, and the verdict's note (Keras's error for a refused cell)."""
    header = ["activation", "units", "loss", "from_logits", "labels", "verdict", "runs", "collapsed",
              "val_accuracy", "Keras val_accuracy", "largest gap, Keras vs ours", "best - val_accuracy",
              "effective model", "note"]
    rows = []
    for cell in atlas.cell_verdicts(trials).itertuples(index=False):
        trained = cell.finished > 0
        rows.append([cell.activation, str(cell.units), LOSS_ABBREV[cell.loss], str(cell.from_logits).lower(),
                     cell.labels, cell.verdict, f"{cell.finished}/{cell.runs}",
                     f"{cell.collapsed}/{cell.finished}" if trained else "–",
                     f"{cell.val_accuracy:.4f}" if trained else "–",
                     f"{cell.keras_val_accuracy:.4f}" if trained else "–",
                     f"{cell.metric_gap:.4f}" if trained else "–",
                     f"{cell.best - cell.val_accuracy:.4f}" if trained else "–",
                     cell.model, essential_error(cell.note) if cell.verdict == "refused" else cell.note])
    return header, rows


def atlas_notes(trials: pd.DataFrame) -> str:
    """How many cells got each verdict, and the thresholds behind the verdicts."""
    counts = atlas.cell_verdicts(trials)["verdict"].value_counts()
    tally = ", ".join(f"{counts[v]} {v}" for v in atlas.VERDICTS if v in counts)
    return (f"{tally} (of {int(counts.sum())} cells). Healthy: the mean val_accuracy gains over the "
            f"majority class at least {atlas.HEALTHY_SHARE:.0%} of the best cell's gain; metric "
            f"misleading: Keras's val_accuracy differs from the accuracy of P(class 1) >= 0.5 by more "
            f"than {atlas.METRIC_TOLERANCE} for a seed; degenerate: a non-finite or always-0 Keras "
            f"loss, or less than that share; the order of the checks and P(class 1) of each head are "
            f"in pipeline/atlas.py. "
            f"In the MLflow UI the view *Atlas: heads by verdict* groups the trial runs by their tag "
            f"`atlas.verdict`.\n")


# --- the report ---------------------------------------------------------------------------

BREAKERS_NOTE = (
    "Loss gap: max over epochs of |training loss(softmax) - loss(transferred sigmoid)|; P gap: max "
    "over the validation set of |P_softmax(1) - P_sigmoid(1)| at the end; beta dist.: max |beta - "
    "(w1 - w0)| at the end. Parity is judged on P gap and beta: Keras's loss includes the L2 "
    "penalties, which differ between the heads unless w0 = -w1. docs/parity.md derives each row.\n")

TITLES = {"collapse": "The 1-unit softmax collapse", "parity": "The sigmoid/softmax parity",
          "parity_deep": "The parity for heads with a hidden layer",
          "breakers": "What breaks the parity", "atlas": "The head atlas"}
CAPTIONS = {
    "collapse": "Final-epoch validation metrics per head, mean and standard deviation over seeds. "
                "A 1-unit softmax outputs 1.0 for every input.",
    "parity": "Largest per-epoch |training loss(softmax) - loss(transferred sigmoid)| over 5 epochs, "
              "mean over seeds, for the sigmoid at ratio x the softmax's learning rate.",
    "parity_deep": "Max per-epoch |training loss(softmax) - loss(transferred sigmoid)| over 5 "
                   "epochs, the largest over seeds, for heads with a hidden layer: the sigmoid's "
                   "output layer (or all its layers) at ratio x the softmax's learning rate, the "
                   "rest at 1x.",
    "breakers": "Parity at ratio 2 under settings that may break it, without and with a correction "
                "(means over seeds).",
    "atlas": "Every two-class head as written (activation, units, loss, from_logits, labels), its "
             "verdict and final-epoch validation accuracies (means over seeds): ours from P(class 1) "
             ">= 0.5, Keras's own.",
}


@dataclass(frozen=True)
class Section:
    """One study's part of the report: its kind of table, trials and regenerating command."""

    report: str
    trials: pd.DataFrame
    command: str
    context: str = ""


def rows_for(section: Section, tex: bool) -> tuple[list[str], list[list[str]]]:
    """The table cells of ``section``."""
    make = {"collapse": collapse_rows, "parity": parity_rows, "parity_deep": parity_deep_rows,
            "breakers": breaker_rows, "atlas": atlas_rows}[section.report]
    return make(section.trials, tex=tex)


def collapse_notes(trials: pd.DataFrame) -> str:
    """What the collapse table says, in sentences with the measured numbers."""
    done = tables.completed(trials)
    soft1 = done[(done["activation"] == "softmax") & (done["units"] == 1)]
    lines = []
    bce = soft1[soft1["loss"] == "binary_crossentropy"]
    if not bce.empty:
        lines.append(
            f"With binary_crossentropy the 1-unit softmax's predictions never move (all "
            f"{len(bce)} runs collapsed), yet Keras's val_loss is {bce['final_val_loss'].mean():.4f} "
            f"on average, like a healthy head's, while the cross-entropy of its actual "
            f"probabilities, val_prob_loss, is {bce['final_val_prob_loss'].mean():.4f} = (1 - "
            f"{bce['positive_fraction'].mean():.4f}) x ln(1e7). Keras 3's binary_crossentropy "
            f"reads the cached pre-activation logit of a sigmoid or softmax output and applies a "
            f"sigmoid to it, so the head *trains as a sigmoid* on its logit while the softmax it "
            f"outputs is 1.0; the seed's 7.6 is the clipped loss of those outputs at 47% negatives.")
        sigmoid = done[(done["activation"] == "sigmoid") & (done["loss"] == "binary_crossentropy")
                       & (done["init"] == "glorot_uniform")]
        same = bce.merge(sigmoid, on=["optimizer", "seed", "learning_rate"], suffixes=("", "_sigmoid"))
        if not same.empty:
            gap = (same["final_val_loss"] - same["final_val_loss_sigmoid"]).abs().max()
            equal = "exactly" if gap == 0 else f"to {sci(float(gap))}"
            lines.append(
                f"Its Keras val_loss equals that of the 1-unit sigmoid with the same seed and "
                f"optimizer {equal} ({len(same)} pairs): the same logit, the same updates.")
    cce = soft1[soft1["loss"] == "categorical_crossentropy"]
    if not cce.empty:
        top = max(cce["final_loss"].abs().max(), cce["final_val_loss"].abs().max())
        lines.append(
            f"With categorical_crossentropy one unit gives log-softmax = 0 for every example: "
            f"Keras's loss and val_loss are {top:g} in all {len(cce)} runs, so there is no gradient "
            f"either; the outputs are the same constant 1.0.")
    scce = trials[(trials["activation"] == "softmax") & (trials["units"] == 1)
                  & (trials["loss"] == "sparse_categorical_crossentropy")]
    if not scce.empty:
        failed = scce[scce["status"] != "FINISHED"]
        if len(failed):
            lines.append(f"With sparse_categorical_crossentropy {len(failed)} of {len(scce)} runs "
                         f"failed at the first batch: `{essential_error(failed['error'].iloc[0])}` "
                         f"(one unit means one class, 0; label 1 has no output).")
        else:
            lines.append(f"With sparse_categorical_crossentropy all {len(scce)} runs finished "
                         f"(see the table for what they learned).")
    return "\n\n".join(lines)


HEADER = ("Every study on one features file, exported together: "
          "`mlflow run . -e findings --env-manager local` (the embedded default; add "
          "`-P features=FILE` for your own). docs/parity.md derives the parity and its breakers.\n")


def markdown(sections: list[Section], header: str = HEADER) -> str:
    """``findings.md``: each section's title, command, table and notes."""
    parts = ["# Findings\n", header]
    for section in sections:
        cells = rows_for(section, tex=False)
        parts += [f"## {TITLES[section.report]}\n", section.context,
                  f"Regenerate with:\n\n```\n{section.command}\n```\n",
                  f"{CAPTIONS[section.report]}\n", tables.markdown_table(*cells)]
        if section.report == "collapse":
            parts.append(collapse_notes(section.trials) + "\n")
        if section.report == "breakers":
            parts.append(BREAKERS_NOTE)
        if section.report == "atlas":
            parts.append(atlas_notes(section.trials))
    return "\n".join(p for p in parts if p)


def latex(sections: list[Section]) -> str:
    """``findings.tex``: one booktabs table per section, each under its commands as comments."""
    parts = []
    for section in sections:
        cells = rows_for(section, tex=True)
        commands = "".join(f"\n% {line}" for line in section.command.splitlines())
        parts += [f"% {TITLES[section.report]}. Regenerate with:{commands}",
                  tables.latex_table(*cells, caption=CAPTIONS[section.report],
                                     label=f"tab:{section.report}")]
    return "\n".join(parts)
