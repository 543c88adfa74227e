"""The head atlas: what each two-class head people write effectively is, and a verdict on it.

A *cell* of the atlas is a head as written (:data:`CELL`: activation, units, loss, the loss's
``from_logits`` flag, the labels it is given); its trials are its seeds.
:func:`effective_model` says what Keras 3 makes of a cell: its cross-entropies read the cached
pre-activation logits of a sigmoid or softmax output whatever ``from_logits`` says, and read a
``linear`` output as probabilities unless told ``from_logits``. :func:`cell_verdicts` judges
every cell of a study from its trials' final numbers, in this order:

- ``refused``: Keras raised for a seed (the error is the run's tag ``error``);
- ``degenerate``: a non-finite loss, or a trial failed because its objective was not finite;
- ``collapsed``: P(class 1) was the same for every validation example, for a seed;
- ``degenerate``: Keras's loss and val_loss are 0 for every seed (it reports nothing);
- ``trains but metric misleading``: Keras's ``val_accuracy`` (kept as ``keras_val_accuracy``)
  differs from the accuracy of P(class 1) >= 0.5 by more than :data:`METRIC_TOLERANCE` for a
  seed; both are measured on the same validation rows in inference mode, so an honest metric
  differs only by ties at 0.5;
- ``healthy``: the cell's mean validation accuracy gains over the majority class's accuracy at
  least :data:`HEALTHY_SHARE` of what the best cell's gains (its seeds' accuracies averaged);
- ``degenerate`` otherwise: it trains, to less than that.

P(class 1) is :func:`pipeline.metrics.positive_probability`: the output of a 1-unit head, unit 1
of a 2-unit one (a 2-unit sigmoid's own unit 1, not normalised against unit 0, whereas Keras's
accuracy on two units is their argmax), sigmoid(z) or softmax(z)[1] of a ``linear`` head.

The verdict of a cell needs the best cell of the study, so a sweep tags its trial runs
(:func:`tag_verdicts`: tags ``atlas.verdict`` and ``atlas.model``) once all have finished.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from pipeline import naming, runs, tables, tracking

CELL = ("activation", "units", "loss", "from_logits", "labels")
HEALTHY_SHARE = 0.9  # a healthy cell gains at least this share of the best cell's gain over chance
METRIC_TOLERANCE = 0.01  # largest |keras_val_accuracy - val_accuracy| of an honest Keras metric
VERDICTS = ("healthy", "trains but metric misleading", "collapsed", "degenerate", "refused")
DIVERGED = "FloatingPointError"  # how a trial whose objective is not finite fails (pipeline.trial)


def label_mismatch(units: int, loss: str, labels: str) -> str:
    """What is wrong with the labels a cell gives its loss, or "" when the loss can read them.

    A 0/1 column (N x 1) is what a 1-unit head needs and, squeezed, the class indices the sparse
    loss needs; a one-hot (N x 2) is what a 2-unit binary or categorical head needs.
    """
    sparse = loss == "sparse_categorical_crossentropy"
    if labels == "column" and units == 2 and not sparse:
        return "a 0/1 column (N x 1) against 2 outputs"
    if labels == "onehot" and sparse:
        return "one-hot labels (N x 2) where the sparse loss needs class indices"
    if labels == "onehot" and units == 1:
        return "one-hot labels (N x 2) against 1 output"
    return ""


LOGIT_MODELS = {  # (units, loss) -> the model a loss on the logits z trains
    (1, "binary_crossentropy"): "logistic regression on z",
    (1, "categorical_crossentropy"): "softmax over one logit: loss 0, yet its gradient 1 - y lowers z "
                                     "on label-0 rows",
    (1, "sparse_categorical_crossentropy"): "softmax over one logit: label 1 has no output",
    (2, "binary_crossentropy"): "two independent logistic regressions, one per unit",
    (2, "categorical_crossentropy"): "softmax regression (= logistic regression on z1 - z0)",
    (2, "sparse_categorical_crossentropy"): "softmax regression (= logistic regression on z1 - z0)",
}
RAW_MODELS = {  # (units, loss) -> what a loss not told from_logits makes of a linear output z
    (1, "binary_crossentropy"): "z clipped to [1e-7, 1 - 1e-7] read as P(class 1): no gradient where "
                                "z is outside (0, 1)",
    (1, "categorical_crossentropy"): "z / z = 1 read as the class distribution: loss and gradient 0",
    (1, "sparse_categorical_crossentropy"): "log(clip(z)) as one logit: label 1 has no output",
    (2, "binary_crossentropy"): "each z clipped to [1e-7, 1 - 1e-7] read as a probability",
    (2, "categorical_crossentropy"): "z / (z0 + z1), clipped, read as the class distribution "
                                     "(meaningless once a z is negative)",
    (2, "sparse_categorical_crossentropy"): "clip(z) normalised to sum 1 read as the class distribution",
}


def effective_model(activation: str, units: int, loss: str, from_logits: bool, labels: str) -> str:
    """What the head of a cell effectively is, in one sentence (see the module docstring)."""
    mismatch = label_mismatch(units, loss, labels)
    if mismatch:
        return f"labels do not fit: {mismatch}"
    if activation == "linear" and not from_logits:
        return f"outputs taken as probabilities: {RAW_MODELS[units, loss]}"
    text = LOGIT_MODELS[units, loss]
    if activation != "linear" and from_logits:
        text = f"from_logits ignored (Keras reads the cached logits z): {text}"
    if (activation, units) == ("softmax", 1):
        return f"{text}; outputs softmax(z) = 1.0, a constant prediction"
    if (activation, units) == ("sigmoid", 2):
        return f"{text}; P(class 1) read as unit 1's sigmoid"
    if (activation, units) == ("linear", 1):
        return f"{text}; Keras's accuracy thresholds z at 0.5, P(class 1) = sigmoid(z) at 0"
    return text


def _verdict(cell: pd.DataFrame, best: float) -> tuple[str, str]:
    """The verdict of one cell's trials and the note that backs it (the error, the gap), where
    ``best`` is the best cell's mean val_accuracy."""
    failed = cell[cell["status"] == "FAILED"]
    refused = failed[~failed["error"].str.startswith(DIVERGED)]
    if len(refused):
        return "refused", refused["error"].iloc[0]
    done = tables.completed(cell)
    if done.empty and failed.empty:
        return "degenerate", "no trial finished"
    losses = done[["final_loss", "final_val_loss"]].to_numpy(dtype=float)
    if len(failed) or not all(math.isfinite(v) for v in losses.ravel()):
        return "degenerate", failed["error"].iloc[0] if len(failed) else "a non-finite Keras loss"
    if done["collapsed"].any():
        return "collapsed", f"{int(done['collapsed'].sum())} of {len(done)} seeds predict a constant"
    if not losses.any():
        return "degenerate", "Keras's loss is 0"
    gap = (done["final_keras_val_accuracy"] - done["final_val_accuracy"]).abs().max()
    if gap > METRIC_TOLERANCE:
        return "trains but metric misleading", f"Keras's val_accuracy off by up to {gap:.4f}"
    chance = float(np.maximum(done["positive_fraction"], 1 - done["positive_fraction"]).mean())
    if not best > chance:  # also when no cell finished (best is NaN)
        return "degenerate", "no cell beats the majority class"
    share = (done["final_val_accuracy"].mean() - chance) / (best - chance)
    if share >= HEALTHY_SHARE:
        return "healthy", ""
    return "degenerate", f"{share:.0%} of the best cell's gain over the majority class"


def cell_verdicts(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per cell of a study's trials (:func:`pipeline.runs.trial_records`), in the
    trials' order: the cell, its verdict and note, its effective model, ``runs`` and
    ``finished``, ``collapsed`` seeds, mean ``val_accuracy`` and ``keras_val_accuracy``, the
    largest |difference| of the two over seeds (``metric_gap``), the best cell's mean
    val_accuracy (``best``) and the cell's ``run_ids``. Pruned trials are left out."""
    trials = trials[~trials["pruned"].astype(bool)]
    groups = trials.groupby(list(CELL), sort=False)
    done = tables.completed(trials)
    means = done.groupby(list(CELL), sort=False)["final_val_accuracy"].mean()
    best = float(means.max()) if len(means) else math.nan
    rows = []
    for key, cell in groups:
        finished = tables.completed(cell)
        verdict, note = _verdict(cell, best)
        rows.append({**dict(zip(CELL, key, strict=True)), "verdict": verdict, "note": note,
                     "model": effective_model(*key), "runs": len(cell), "finished": len(finished),
                     "collapsed": int(finished["collapsed"].sum()),
                     "val_accuracy": finished["final_val_accuracy"].mean(),
                     "keras_val_accuracy": finished["final_keras_val_accuracy"].mean(),
                     "metric_gap": (finished["final_keras_val_accuracy"]
                                    - finished["final_val_accuracy"]).abs().max(),
                     "best": best, "run_ids": list(cell["run_id"])})
    return pd.DataFrame(rows)


def tag_verdicts(parent_run_id: str) -> pd.DataFrame:
    """Tag every trial run of the finished sweep ``parent_run_id`` with its cell's verdict
    (``atlas.verdict``) and effective model (``atlas.model``); return :func:`cell_verdicts`."""
    parent = tracking.client().get_run(parent_run_id)
    cells = cell_verdicts(runs.outcomes(runs.trial_records(parent_run_id, parent)))
    for cell in cells.itertuples(index=False):
        for run_id in cell.run_ids:
            tracking.log_batch(run_id, tags={naming.VERDICT: cell.verdict,
                                             naming.EFFECTIVE_MODEL: cell.model})
    return cells
