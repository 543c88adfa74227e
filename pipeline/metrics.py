"""What a head actually predicts, measured the same way for every head.

Keras reports a loss computed from cached pre-activation logits, which hides the collapse of a
1-unit softmax (its outputs are all 1.0 while its loss falls). These functions look only at the
predicted probability of the positive class, so a sigmoid, a 2-unit softmax and a collapsed
1-unit softmax are compared on equal terms.
"""

from __future__ import annotations

import numpy as np

EPSILON = 1e-7  # Keras's backend epsilon: the clip behind the seed's 7.6 = 0.47 x ln(1e7)
CLIPPED_LOSS = -float(np.log(EPSILON))  # 16.1181: -ln(1e-7), a confident wrong answer's clipped loss


def sigmoid(z: np.ndarray) -> np.ndarray:
    """The logistic function, in its tanh form: no overflow for large negative ``z``."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def positive_probability(outputs: np.ndarray, activation: str = "sigmoid") -> np.ndarray:
    """P(label 1) from a head's outputs: the only column of a 1-unit head, column 1 of two.

    A sigmoid or softmax head's outputs are probabilities (a 2-unit sigmoid's column 1 is its
    own logistic regression's P(label 1), not normalised against column 0). A ``linear``
    head's outputs are logits: P(label 1) is sigmoid(z) of one unit, softmax(z)[1] of two.
    """
    outputs = np.asarray(outputs, dtype=np.float64)
    if activation == "linear":  # sigmoid(z1 - z0) is softmax(z)[1]
        z = outputs[:, -1] - outputs[:, 0] if outputs.ndim == 2 and outputs.shape[1] == 2 else outputs
        return positive_probability(sigmoid(z))
    return outputs[:, -1] if outputs.ndim == 2 else outputs


def prob_loss(p_positive: np.ndarray, y: np.ndarray) -> float:
    """Binary cross-entropy of the predicted probabilities, clipped to [1e-7, 1 - 1e-7]."""
    return float(prob_losses(np.reshape(p_positive, (1, -1)), y)[0])


def prob_losses(p_heads: np.ndarray, y: np.ndarray) -> np.ndarray:
    """:func:`prob_loss` of each row of ``p_heads`` (heads x examples) on labels ``y``: each row
    summed as a head's probabilities alone are, so a head scores the same in any company."""
    p = np.clip(np.ascontiguousarray(p_heads, dtype=np.float64), EPSILON, 1 - EPSILON)
    y = np.asarray(y, dtype=np.float64)
    return -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p), axis=-1)


def accuracy(p_positive: np.ndarray, y: np.ndarray) -> float:
    """Fraction right when the prediction is label 1 iff P(label 1) >= 0.5."""
    return float(accuracies(np.reshape(p_positive, (1, -1)), y)[0])


def accuracies(p_heads: np.ndarray, y: np.ndarray) -> np.ndarray:
    """:func:`accuracy` of each row of ``p_heads`` (heads x examples) on labels ``y``."""
    return np.mean((np.asarray(p_heads) >= 0.5) == np.asarray(y, dtype=bool), axis=-1)


def is_collapsed(p_positive: np.ndarray) -> bool:
    """True when the predicted probability is the same for every example, to float32 rounding.

    The same value may come out of a float32 kernel rounded one step apart: TensorFlow's
    vectorised softmax gives the 1.0 of a softmax over one unit as 1 - 2**-24 at some rows and
    1.0 at others (which, depends on the number of rows), so exact equality would call a
    collapsed head healthy. Values within one float32 step of the largest count as the same.
    """
    p = np.asarray(p_positive, dtype=np.float32)
    return bool(p.size == 0 or p.max() - p.min() <= np.spacing(p.max()))


def collapse_expectation(y: np.ndarray) -> dict[str, float]:
    """What a head that always says P(label 1) = 1 must score on labels ``y``.

    Its accuracy is the positive fraction and its clipped cross-entropy is the negative
    fraction times -ln(1e-7) = 16.1181 (the seed's 7.6 at 47% negatives).
    """
    positive = float(np.mean(y))
    return {"accuracy": positive, "prob_loss": (1 - positive) * CLIPPED_LOSS}
