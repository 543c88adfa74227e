"""The parity experiment: the seed's three heads on one batch order, and how far apart they end.

A 2-unit softmax trained with categorical cross-entropy at learning rate ``lr`` and a 1-unit
sigmoid started from beta = w1 - w0, b = b1 - b0 at ``ratio`` x ``lr`` are the same model when
``ratio`` is 2 (docs/parity.md derives why, for every optimizer here); a sigmoid with its own
random start shows how much the start matters. With a hidden layer all three start from the
same body, and the parity asks the ratio of the sigmoid's output layer only (``ratio_scope:
output``), not of its body too (``all``). :func:`train_parity` trains the three
(:meth:`ParityConfig.heads`) and :class:`ParityResult` measures the gaps; :func:`log_parity`
records them as a run with one nested run per head; :func:`run_parity` is the ``parity`` entry
point.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import lineage, naming, records, tracking
from pipeline.config import ParityConfig
from pipeline.metrics import sigmoid
from pipeline.results import TrialResult
from pipeline.split import Split, make_split

ROLES = ("softmax", "sigmoid_transfer", "sigmoid_random")
PARITY_QUESTION = ("Does a 1-unit sigmoid started from a 2-unit softmax head's weights (beta = w1 - w0, "
                   "b = b1 - b0) at twice the learning rate follow the softmax's trajectory? One run "
                   "per parity experiment, its three heads nested under it (tag parity.role).")
EXPERIMENT = "sigmoid-softmax-parity"
PAIRS = {"softmax_transfer": ("softmax", "sigmoid_transfer"),
         "transfer_random": ("sigmoid_transfer", "sigmoid_random")}


@dataclass
class ParityResult:
    """The three trained heads of one :class:`ParityConfig`, and the gaps between them."""

    config: ParityConfig
    results: dict[str, TrialResult]
    x_val: np.ndarray

    def gaps(self) -> dict[str, list[float]]:
        """Per-epoch |difference| of the training ``loss`` and ``val_loss`` for both pairs.

        Keys ``gap_softmax_transfer``, ``gap_transfer_random`` (training loss, the mean over
        the epoch's batches as Keras reports it) and ``val_gap_...`` (validation loss).
        """
        out = {}
        for pair, (a, b) in PAIRS.items():
            for metric, prefix in (("loss", "gap"), ("val_loss", "val_gap")):
                ha = np.asarray(self.results[a].history[metric], dtype=np.float64)
                hb = np.asarray(self.results[b].history[metric], dtype=np.float64)
                out[f"{prefix}_{pair}"] = list(np.abs(ha - hb))
        return out

    def summary(self) -> dict[str, float]:
        """The numbers the parity is judged by.

        ``max_gap_*``/``max_val_gap_*``: the largest per-epoch gaps; ``max_step_gap_softmax_transfer``:
        the largest per-step training-loss gap; ``beta_distance``/``bias_distance``: max |sigmoid's
        final beta - softmax's final (w1 - w0)| and |b - (b1 - b0)| (of the output layers);
        ``max_prob_gap``: max over the validation set of |P_softmax(1) - Psigmoid(1)| at the
        end, each through its own body when the heads have one.
        """
        out = {f"max_{name}": float(max(values)) for name, values in self.gaps().items()}
        soft, sig = self.results["softmax"], self.results["sigmoid_transfer"]
        steps = np.abs(np.asarray(soft.step_loss) - np.asarray(sig.step_loss))
        out["max_step_gap_softmax_transfer"] = float(steps.max())
        diff_kernel = soft.kernel[:, 1] - soft.kernel[:, 0]
        diff_bias = soft.bias[1] - soft.bias[0]
        out["beta_distance"] = float(np.abs(sig.kernel[:, 0] - diff_kernel).max())
        out["bias_distance"] = float(abs(sig.bias[0] - diff_bias))
        hidden = self.config.hidden_activation
        p_soft = sigmoid(soft.output_inputs(self.x_val, hidden) @ diff_kernel.astype(np.float64)
                          + diff_bias)
        p_sig = sigmoid(sig.output_inputs(self.x_val, hidden) @ sig.kernel[:, 0].astype(np.float64)
                         + sig.bias[0])
        out["max_prob_gap"] = float(np.abs(p_soft - p_sig).max())
        return out

    def curves(self) -> pd.DataFrame:
        """Tidy per-epoch rows (role, seed, epoch, metrics) for :mod:`pipeline.figures`."""
        rows = []
        for role, result in self.results.items():
            for epoch in range(len(result.history["loss"])):
                rows.append({"role": role, "seed": self.config.seed, "epoch": epoch,
                             **{m: v[epoch] for m, v in result.history.items()}})
        return pd.DataFrame(rows)


def train_parity(config: ParityConfig, split: Split, engine=None) -> ParityResult:
    """Train the three heads of ``config`` on ``split`` (with ``engine``, Keras by default)."""
    if engine is None:
        from pipeline.engine_keras import KerasEngine  # TensorFlow only once a head trains

        engine = KerasEngine()
    heads = config.heads()
    results = {role: engine.train(heads[role], split) for role in ROLES}
    return ParityResult(config=config, results=results, x_val=split.x_val)


def log_parity(run_id: str, experiment: str, result: ParityResult, split: Split,
               tags: dict[str, str] | None = None) -> dict[str, float]:
    """Record ``result`` on run ``run_id``: a nested run per head, gaps and figures on ``run_id``.

    Each head's run is tagged ``parity.role`` and ``engine`` (the engine that trained it) and
    holds its per-epoch metrics and per-step losses, as the series ``step_loss`` and in
    ``step_loss.csv`` (:func:`pipeline.records.log_head`); ``run_id`` gets the per-epoch
    gaps, their maxima (:meth:`ParityResult.summary`) and the loss-curve and loss-gap
    figures. ``tags`` go on every head's run. Returns the summary.
    """
    heads = result.config.heads()
    for role in ROLES:
        head_tags = {**(tags or {}), **records.head_tags(heads[role]), naming.ROLE: role,
                     naming.STEP: "parity-head", naming.ENGINE: result.results[role].engine}
        child = tracking.create_run(experiment, naming.parity_head_run_name(role, heads[role]),
                                    run_id, head_tags)
        with tracking.terminal_run(child):
            tracking.log_batch(child, params=heads[role].params())
            records.log_head(child, result.results[role], split.y_val, heads[role], step_series=True)
    summary = result.summary()
    points = [m for name, values in result.gaps().items() for m in tracking.series(name, values)]
    tracking.log_batch(run_id, metrics=points + tracking.scalars(summary))
    _log_figures(run_id, result)
    return summary


def _log_figures(run_id: str, result: ParityResult) -> None:
    """Chart the heads' losses and gaps on ``run_id``. Matplotlib is imported here, when a
    parity result is drawn, not by every sweep that imports this module."""
    from pipeline import figures

    curves = result.curves()
    title = naming.parity_run_name(result.config)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [figures.loss_curves(curves, Path(tmp, "loss_curves.png"), f"{title}: loss per epoch"),
                 figures.loss_gaps(curves, Path(tmp, "loss_gaps.png"), f"{title}: loss differences")]
        client = tracking.client()
        for path in paths:
            client.log_artifact(run_id, str(path), "figures")


def run_parity(features: str, config: ParityConfig, experiment: str = EXPERIMENT,
               launcher_run_id: str | None = None) -> tuple[str, dict[str, float]]:
    """The ``parity`` entry point: train and record one parity experiment on a features file.

    Validates the features before creating any run. The parent run is ``launcher_run_id``
    (the run ``mlflow run`` opened) when given, else a new run in ``experiment``. Returns the
    parent run id and the summary.
    """
    from pipeline.features import read_features, resolve_features, sha256_file

    path = resolve_features(features)
    data = read_features(path)
    sha = sha256_file(path)
    split = make_split(data.x, data.y, config.validation_fraction, config.seed, config.standardize)
    tracking.install_sigterm_handler()
    tags = {naming.STEP: "parity", naming.FEATURES_SHA: sha,
            naming.WEIGHTS: str(data.attrs.get("weights", "unknown")),
            naming.NOTE: _description(config), **tracking.versions()}
    if launcher_run_id:
        run_id = launcher_run_id
        experiment = tracking.launcher_run(run_id).info.experiment_id
        tracking.log_batch(run_id, tags=tags)
        tracking.log_new_params(run_id, config.params() | {"features": features})
    else:
        experiment = tracking.experiment_id(experiment)
        tracking.describe_experiment(experiment, PARITY_QUESTION)
        run_id = tracking.create_run(experiment, naming.parity_run_name(config), None, tags)
        tracking.log_batch(run_id, params=config.params() | {"features": features})
    tracking.log_features(run_id, lineage.features_dataset(features, sha, data.x.shape, data.class_names,
                                                           float(data.y.mean())))
    with tracking.terminal_run(run_id):
        summary = log_parity(run_id, experiment, train_parity(config, split), split,
                             {naming.FEATURES_SHA: sha})
    print(f"parity: run {run_id}: max |softmax - sigmoid_transfer| loss gap "
          f"{summary['max_gap_softmax_transfer']:.2e}, beta distance {summary['beta_distance']:.2e}, "
          f"max |sigmoid_transfer - sigmoid_random| {summary['max_gap_transfer_random']:.2e}",
          file=sys.stderr)
    return run_id, summary


def _description(config: ParityConfig) -> str:
    body = ""
    if config.hidden_units:
        layers = "output layer" if config.ratio_scope == "output" else "every layer"
        body = (f" (each with a hidden layer of {config.hidden_units} {config.hidden_activation} "
                f"units, from the same start; the sigmoids' {layers} at the ratio)")
    return (f"The seed's parity experiment with {config.optimizer}: a 2-unit softmax at lr "
            f"{config.learning_rate:g}, and 1-unit sigmoids at {config.ratio:g} x lr{body}, one "
            f"started from the softmax's weights (beta = w1 - w0, b = b1 - b0), one from a random "
            f"init. "
            f"Select the three nested runs and compare `loss`: at ratio 2 the softmax and the "
            f"transferred sigmoid coincide (`max_gap_softmax_transfer`, `beta_distance` on this "
            f"run; see docs/parity.md).")
