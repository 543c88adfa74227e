"""Run names, descriptions and tags: the one place that decides how runs read in the MLflow UI.

Trial runs are named for their config (``softmax-1u-bce-lr1e-3-glorot-s0``) so the run list
reads as the study's design; parent runs are named for the sweep and the date and carry a
description (``mlflow.note.content``, Markdown on the run page) saying what the study asks and
how to read it. A study's experiment gets a description and saved views (the runs page's
*Views* menu) that pick the columns and charts a reader compares. Tag keys that several
modules write or read are defined here too.
"""

from __future__ import annotations

import json
import re
import unicodedata
from datetime import UTC, datetime

from pipeline.config import ParityConfig, TrialConfig
from pipeline.sweep_file import SweepSpec

LOSS_ABBREV = {"binary_crossentropy": "bce", "categorical_crossentropy": "cce",
               "sparse_categorical_crossentropy": "scce"}
INIT_ABBREV = {"glorot_uniform": "glorot", "glorot_centered": "centered", "zeros": "zeros", "he_normal": "he",
               "transfer": "transfer"}

# Tags
STEP = "pipeline.step"            # extract | sweep | trial | export | main
SWEEP_NAME = "pipeline.sweep"
KIND = "pipeline.kind"             # heads | parity: what one trial of a sweep is
REPORT = "pipeline.report"         # summary | collapse | parity | breakers | parity_deep | atlas
MAIN_RUN = "pipeline.main_run_id"
SWEEP_RUNS = "pipeline.sweep_run_id"  # on a main (launcher) run: its sweeps' parent runs, a comma list
EXTRACT_RUN = "pipeline.extract_run_id"  # on a main run: its extract run
RETRIES = "pipeline.retries"  # on a trial's run: the trial numbers of the attempts it runs again
TRIAL_COUNT = "trials."  # + complete, fail, pruned, running, waiting, retried: a sweep's counts
ROLE = "parity.role"
COLLAPSED = "collapsed"
STUDY = "optuna.study"
TRIAL_NUMBER = "optuna.trial_number"
STORAGE = "optuna.storage"
FEATURES_SHA = "features.sha256"
WEIGHTS = "backbone.weights"
ERROR = "error"
ENGINE = "engine"                 # the engine that trained the trial: fused | keras
PRUNED = "pruned"                 # "true" on a trial the pruner stopped
VERDICT = "atlas.verdict"         # an atlas trial's cell verdict (pipeline.atlas)
EFFECTIVE_MODEL = "atlas.model"   # what an atlas trial's head effectively is (pipeline.atlas)
PARENT = "mlflow.parentRunId"
NOTE = "mlflow.note.content"      # a run's or an experiment's description in the UI
EXPERIMENT_KIND = "mlflow.experimentKind"
SAVED_VIEW = "mlflow.sharedViewState."  # + view id: a saved view of the experiment's runs page

# What a reader compares, as the MLflow UI names columns (`params.x`, `metrics.x`, `tags.x`).
COMPARED_PARAMS = ("activation", "units", "loss", "learning_rate", "init", "optimizer", "seed")
COMPARED_METRICS = ("val_accuracy", "positive_fraction", "val_prob_loss", "val_loss")
COMPARED_TAGS = (COLLAPSED, ROLE)
# ... and in the atlas's view: the cell's settings, both accuracies, the verdict and why.
ATLAS_PARAMS = ("activation", "units", "loss", "from_logits", "labels", "seed")
ATLAS_METRICS = ("val_accuracy", "keras_val_accuracy", "positive_fraction", "val_prob_loss", "val_loss")
ATLAS_TAGS = (VERDICT, EFFECTIVE_MODEL, COLLAPSED, ENGINE, ERROR)


def is_run_id(text: str) -> bool:
    """Whether ``text`` reads as an MLflow run id (32 lowercase hex digits)."""
    return re.fullmatch(r"[0-9a-f]{32}", text) is not None


def _typeable(name: str) -> list[tuple[bool, str]]:
    """The checks every name a user gives back must pass: not blank, no spaces at its ends, no
    control character (a newline)."""
    return [(not name.strip(), "is empty"),
            (name != name.strip(), "starts or ends with a space"),
            (any(unicodedata.category(c).startswith("C") for c in name),
             "holds a control character (a newline, a tab)")]


def study_name_problem(name: str) -> str | None:
    """What keeps ``name`` from naming a study that ``export --run_id``, MLflow's search filters
    and a regenerate command in a shell can all give back, or None: blank, spaced or holding a
    control character (:func:`_typeable`), one of ``,`` (export's list separator), ``'`` (a
    filter's quote) or a backtick (Markdown's), a leading ``-`` (a flag), or the look of a run
    id."""
    checks = [*_typeable(name),
              (any(c in name for c in ",'`"), "holds a comma, a quote (') or a backtick"),
              (name.startswith("-"), "starts with -"),
              (is_run_id(name), "reads as a run id (32 hex digits)")]
    return next((why for bad, why in checks if bad), None)


def model_name_problem(name: str) -> str | None:
    """What keeps ``name`` from naming a registered model, or None: blank, spaced or holding a
    control character (:func:`_typeable`), or what MLflow's Model Registry refuses: ``/``,
    ``:`` or ``%`` in it (a file-store registry's folders), ``.`` or a start of ``..``."""
    checks = [*_typeable(name),
              (any(c in name for c in "/:%"), "holds /, : or %, which the Model Registry refuses"),
              (name == "." or name.startswith(".."), "is . or starts with .., which the Model Registry "
                                                     "refuses")]
    return next((why for bad, why in checks if bad), None)


def format_lr(value: float) -> str:
    """``0.001`` -> ``1e-3``, ``0.0025`` -> ``2.5e-3``: short, exact enough to tell runs apart."""
    mantissa, exponent = f"{value:.3e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def hidden_part(hidden_units: int, hidden_activation: str) -> str:
    """``h32relu`` for a hidden layer of 32 relu units (names leave out a head without one)."""
    return f"h{hidden_units}{hidden_activation}"


def trial_run_name(config: TrialConfig) -> str:
    """A trial's run name: activation, units, hidden layer if any, loss, learning rate (and the
    body's when it has its own), init, optimizer (unless sgd), ``logits`` when the loss takes
    ``from_logits``, the labels unless the expected ones (``y-column``, ``y-onehot``), seed."""
    parts = [config.activation, f"{config.units}u"]
    if config.hidden_units:
        parts.append(hidden_part(config.hidden_units, config.hidden_activation))
    parts += [LOSS_ABBREV[config.loss], f"lr{format_lr(config.learning_rate)}"]
    if config.two_rates:
        parts.append(f"body{format_lr(config.body_learning_rate)}")
    parts.append(INIT_ABBREV[config.init])
    if config.optimizer != "sgd":
        parts.append(config.optimizer)
    if config.from_logits:
        parts.append("logits")
    if config.labels != "expected":
        parts.append(f"y-{config.labels}")
    parts.append(f"s{config.seed}")
    return "-".join(parts)


def parity_head_run_name(role: str, config: TrialConfig) -> str:
    """A parity head's run name: its ``role`` in the parity experiment (``softmax``,
    ``sigmoid_transfer``, ``sigmoid_random``) in place of the activation the role begins with,
    then the rest of :func:`trial_run_name` (``sigmoid_random-1u-bce-lr2e-2-glorot-s0``)."""
    return f"{role}-{trial_run_name(config).removeprefix(f'{config.activation}-')}"


def parity_run_name(config: ParityConfig) -> str:
    """A parity experiment's run name: optimizer, softmax lr, ratio, what deviates, seed.

    ``parity-adamw-lr1e-3-x2-decay0.5-s0``: settings off their defaults (the parity breakers
    and their corrections) are spelled out, so each row of the breakers study reads apart; a
    hidden layer reads ``h32relu`` after the optimizer, and ``scope-all`` says the sigmoids'
    body trains at the ratio too.
    """
    parts = ["parity", config.optimizer]
    if config.hidden_units:
        parts.append(hidden_part(config.hidden_units, config.hidden_activation))
    parts += [f"lr{format_lr(config.learning_rate)}", f"x{config.ratio:g}"]
    defaults = ParityConfig()
    flags = {"weight_decay": f"wd{config.weight_decay:g}" if config.weight_decay is not None else "",
             "sigmoid_decay_scale": f"decay{config.sigmoid_decay_scale:g}",
             "l2": f"l2-{config.l2:g}", "sigmoid_l2_scale": f"l2scale{config.sigmoid_l2_scale:g}",
             "label_smoothing": f"smooth{config.label_smoothing:g}",
             "bias_init": f"bias-{config.bias_init}", "share_masks": "own-masks",
             "share_batch_order": "own-order", "transfer_bias": "no-bias-transfer",
             "center_softmax": "centered",
             "ratio_scope": f"scope-{config.ratio_scope}" if config.hidden_units else ""}
    parts += [text for name, text in flags.items()
              if getattr(config, name) != getattr(defaults, name) and text]
    parts.append(f"s{config.seed}")
    return "-".join(parts)


def parent_run_name(sweep_name: str, when: datetime | None = None) -> str:
    """A sweep's parent run name: the sweep and the UTC date and time it started."""
    when = when or datetime.now(UTC)
    return f"{sweep_name}-{when:%Y%m%d-%H%M}"


def role_of(config: TrialConfig) -> str | None:
    """The part a head plays in the seed's comparisons, or None for any other head.

    ``softmax`` (2-unit softmax), ``sigmoid_transfer`` (1-unit sigmoid from the softmax's
    initial weights), ``sigmoid_random`` (1-unit sigmoid, ordinary init), ``softmax_1unit``
    (the collapse, whatever the loss is told). The other roles are heads as the comparisons
    train them: a sigmoid or softmax, the loss not told ``from_logits``, the expected labels.
    """
    if (config.activation, config.units) == ("softmax", 1):
        return "softmax_1unit"
    if config.from_logits or config.labels != "expected":
        return None
    if config.activation == "softmax":
        return "softmax"
    if (config.activation, config.units, config.loss) == ("sigmoid", 1, "binary_crossentropy"):
        return "sigmoid_transfer" if config.init == "transfer" else "sigmoid_random"
    return None


ROLE_NOTES = {
    "softmax_1unit": "A softmax over one unit outputs 1.0 for every input, so this head predicts "
                     "class 1 whatever it learns: its `val_accuracy` is the `positive_fraction` "
                     "(`val_accuracy_minus_expected` measures it), and `val_prob_loss` is "
                     "(1 - positive fraction) x ln(1e7), while Keras's `val_loss`, computed from "
                     "the logits, falls like a healthy head's.",
    "softmax": "The 2-unit softmax of the parity question: compare it with the runs tagged "
               "`parity.role` = sigmoid_transfer and sigmoid_random of the same seed.",
    "sigmoid_transfer": "A sigmoid started from a 2-unit softmax's weights (beta = w1 - w0); at twice "
                        "that softmax's learning rate its losses equal the softmax's.",
    "sigmoid_random": "A sigmoid from its own random start: the control for sigmoid_transfer.",
}


def parity_description(config: ParityConfig, number: int, sweep_name: str) -> str:
    """A parity trial run's description (the UI's run page): what was trained and what to look at."""
    body = ""
    if config.hidden_units:
        layers = "output layer" if config.ratio_scope == "output" else "every layer"
        body = (f"; all three with a hidden layer of {config.hidden_units} "
                f"{config.hidden_activation} units, the sigmoids' {layers} at the ratio")
    return (f"Trial {number} of sweep `{sweep_name}`: one parity experiment (the softmax at "
            f"lr {format_lr(config.learning_rate)}, the transferred and the random sigmoid at "
            f"{config.ratio:g}x it{body}, nested under this run). `max_gap_softmax_transfer` is "
            f"the largest per-epoch loss gap.")


def head_description(config: TrialConfig, number: int, sweep_name: str) -> str:
    """A head trial run's description (the UI's run page): what was trained and what to look at."""
    units = "one unit" if config.units == 1 else f"{config.units} units"
    if config.hidden_units:
        units += f" on a hidden layer of {config.hidden_units} {config.hidden_activation} units"
        if config.two_rates:
            units += f" (at lr {format_lr(config.body_learning_rate)})"
    told = " (from_logits=True)" if config.from_logits else ""
    labels = "" if config.labels == "expected" else f" on {config.labels} labels"
    text = (f"Trial {number} of sweep `{sweep_name}`: a {config.activation} over {units} trained "
            f"with {config.loss}{told}{labels} ({config.optimizer}, lr {format_lr(config.learning_rate)}, "
            f"{config.init} init, seed {config.seed}, {config.epochs} epochs). Per-epoch metrics "
            f"here; once it has trained to the end, the loss of every step in the artifact "
            f"`step_loss.csv`.")
    role = role_of(config)
    return f"{text}\n\n{ROLE_NOTES[role]}" if role else text


def safe_filename(text: str) -> str:
    """``text`` reduced to a single safe path component (no separators, no NUL, no dots first)."""
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text).lstrip(".") or "_"


def parity_parent_description(spec: SweepSpec) -> str:
    """A parity sweep's parent run description: the study's question, then how to read its runs."""
    return (f"{spec.description.strip()}\n\n"
            f"**How to read it.** Each nested run is one trial: a parity experiment (the "
            f"softmax at lr, the transferred and the random sigmoid at ratio x lr, nested "
            f"under it, tagged `parity.role`). The study {spec.objective.direction}s "
            f"`{spec.objective_metric}`. Sort by `max_gap_softmax_transfer`; at ratio 2 "
            f"it is float32 rounding. Expand a trial, select its three runs, *Compare*, then "
            f"click `loss`: the softmax and the transferred sigmoid coincide.\n\n"
            f"- Tables and figures: artifacts `export/` of this run "
            f"(`python -m pipeline export`).").strip()


def heads_parent_description(spec: SweepSpec) -> str:
    """A heads sweep's parent run description: the study's question, then how to read its runs."""
    return (f"{spec.description.strip()}\n\n"
            f"**How to read it.** Each nested run is one trial: a head trained with the config "
            f"in its name and params (activation, units, loss, learning_rate, init, seed). "
            f"The study {spec.objective.direction}s `{spec.objective_metric}`.\n\n"
            f"- Collapse: compare `val_accuracy` with `positive_fraction`; filter "
            f"`tags.collapsed = 'true'` for heads whose prediction never varies, and compare "
            f"`val_prob_loss` (the loss of the actual probabilities) with `val_loss` (Keras's, "
            f"from logits).\n"
            f"- Parity: select the runs tagged `parity.role` = softmax, sigmoid_transfer and "
            f"sigmoid_random of one seed, *Compare*, then click `val_loss`: the first two "
            f"curves coincide.\n"
            f"- Tables and figures: artifacts `export/` of this run (`python -m pipeline export`).\n"
            f"- The experiment's *Views* menu holds the columns and filters above.").strip()


BASE_VIEWS = ("heads", "parity")  # the saved views every study's experiment gets


def views_for(report: str) -> tuple[str, ...]:
    """The saved views (:func:`experiment_tags`) of the experiment of a study whose sweep file
    has this ``report``: the atlas's only where atlas studies run."""
    return (*BASE_VIEWS, "atlas") if report == "atlas" else BASE_VIEWS


def experiment_tags(description: str, created_ms: int,
                    views: tuple[str, ...] = BASE_VIEWS) -> dict[str, str]:
    """Tags that set up a study's experiment in the MLflow UI.

    Its description, its kind (runs of trained models, not GenAI traces) and saved views of its
    runs page (the *Views* menu), those of ``views``: ``heads`` shows the compared params, final
    metrics and tags as columns; ``parity`` keeps the runs of the parity comparison and the
    loss charts; ``atlas`` shows the atlas's columns with the runs grouped by their tag
    ``atlas.verdict`` (the runs page's ``groupBy`` state: groups by a tag, metrics averaged over
    a group). A view is MLflow's saved-view envelope (name, times, the page state as JSON).
    """
    columns = ([f"params.`{p}`" for p in COMPARED_PARAMS] + [f"metrics.`{m}`" for m in COMPARED_METRICS]
               + [f"tags.`{t}`" for t in COMPARED_TAGS])
    roles = f"tags.`{ROLE}` != 'softmax_1unit'"  # MLflow's filters have no OR: the roles but one
    table = {"selectedColumns": columns}
    atlas = ([f"params.`{p}`" for p in ATLAS_PARAMS] + [f"metrics.`{m}`" for m in ATLAS_METRICS]
             + [f"tags.`{t}`" for t in ATLAS_TAGS])
    by_verdict = {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": VERDICT}]}
    states = {
        "heads": ("Heads: config and results", {**table, "searchFilter": ""}),
        "parity": ("Parity: loss curves", {**table, "searchFilter": roles, "chartsSearchFilter": "loss"}),
        "atlas": ("Atlas: heads by verdict", {"selectedColumns": atlas, "searchFilter": "",
                                               "groupBy": by_verdict}),
    }
    tags = {EXPERIMENT_KIND: "custom_model_development"}
    if description.strip():
        tags[NOTE] = description.strip()
    for key in views:
        name, state = states[key]
        tags[SAVED_VIEW + key] = json.dumps({"name": name, "createdAt": created_ms,
                                             "updatedAt": created_ms, "state": json.dumps(state)})
    return tags
