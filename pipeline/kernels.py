"""Every compiled function of the project, in one module: TensorFlow's Philox generator and the
arithmetic of a fused pass.

Numba compiles them on their first call and caches them beside this module; its cache notices
a change to the file a cached function is in, not to the files of the functions it calls, so
they all live here. Each runs without the GIL, so a pass trains while the sweep's MLflow writer
thread works.

- Philox-4x32-10 as TensorFlow's stateless random ops run it on CPU, and the dropout of
  ``tf.nn.experimental.stateless_dropout`` (:mod:`pipeline.stateless_random` is their
  interface).
- A pass: losses, logit gradients, predictions and optimizer steps of many heads side by side,
  in float32 as TensorFlow computes them for Keras. The heads sit side by side in the columns
  of one kernel: head ``h`` has loss kind ``kind[h]`` (:data:`LOSS_KINDS`) and its columns start at
  ``first[h]`` (one column for the 1-unit kinds, two for the others). The losses are the ones
  Keras computes from the cached pre-activation logits, whatever the activation (a 1-unit
  softmax trains as a sigmoid; the 1-unit categorical cross-entropy is 0 while its gradient,
  softmax - label = 1 - label, is not), and the gradients are what TensorFlow's autodiff of
  them gives, in closed form: output minus (smoothed) label, halved for a 2-unit binary
  cross-entropy (the mean of two), times 1 / rows.
"""

from __future__ import annotations

import numpy as np

# the BLAS of np.dot in the kernels, loaded now so that a pass can limit its threads
import scipy.linalg.cython_blas  # noqa: F401
from numba import njit, uint32, uint64

# The loss kinds of a pass's heads: (units, loss).
LOSS_KINDS = ((1, "binary_crossentropy"), (1, "categorical_crossentropy"),
         (2, "binary_crossentropy"), (2, "categorical_crossentropy"),
         (2, "sparse_categorical_crossentropy"))
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "rmsprop", "adagrad", "adadelta")  # adamw: adam

INT32_SEED_MOD = 2**31 - 2  # Keras's _cast_seed: seeds are taken floormod(seed, int32.max - 1)
_SEED_KEY = (0x3EC8F720, 0x02461E29)  # the key TensorFlow scrambles a seed pair with
_ZERO, _HALF, _ONE, _TWO = np.float32(0.0), np.float32(0.5), np.float32(1.0), np.float32(2.0)
_EPS = np.float32(1e-7)
_B1, _B2, _RHO_RMS, _RHO_DELTA = np.float32(0.9), np.float32(0.999), np.float32(0.9), np.float32(0.95)
# Keras writes these as ``1 - 0.9`` etc. in double precision; TensorFlow rounds them to float32
_1_B1, _1_B2 = np.float32(1 - 0.9), np.float32(1 - 0.999)
_1_RHO_RMS, _1_RHO_DELTA = np.float32(1 - 0.9), np.float32(1 - 0.95)


@njit(inline="always")
def _sigmoid(z):
    e = np.float32(np.exp(-abs(z)))  # <= 1: no overflow
    r = _ONE / (_ONE + e)
    return r if z >= _ZERO else e * r


@njit(inline="always")
def _sigmoid_xent(t, z):
    """``tf.nn.sigmoid_cross_entropy_with_logits``: max(z, 0) - z t + log1p(exp(-|z|))."""
    return max(z, _ZERO) - z * t + np.float32(np.log1p(np.float32(np.exp(-abs(z)))))


@njit(inline="always")
def _log_softmax2(z0, z1):
    top = max(z0, z1)
    s0, s1 = z0 - top, z1 - top
    lse = np.float32(np.log(np.float32(np.exp(s0)) + np.float32(np.exp(s1))))
    return s0 - lse, s1 - lse


@njit(inline="always")
def _softmax2(z0, z1):
    top = max(z0, z1)
    e0, e1 = np.float32(np.exp(z0 - top)), np.float32(np.exp(z1 - top))
    s = e0 + e1
    return e0 / s, e1 / s


# --- TensorFlow's Philox (pipeline.stateless_random) ---------------------------------------------

@njit(inline="always")
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10: the four words of counter (c0..c3, c0 lowest) under key (k0, k1)."""
    for _ in range(10):
        p0 = uint64(0xD2511F53) * uint64(c0)  # the Philox-4x32 multipliers
        p1 = uint64(0xCD9E8D57) * uint64(c2)
        c0, c1, c2, c3 = (uint32(uint32(p1 >> uint64(32)) ^ c1 ^ k0), uint32(p1),
                          uint32(uint32(p0 >> uint64(32)) ^ c3 ^ k1), uint32(p0))
        k0 = uint32(k0 + uint32(0x9E3779B9))  # and key increments
        k1 = uint32(k1 + uint32(0xBB67AE85))
    return c0, c1, c2, c3


@njit(inline="always")
def _seed_key(s0, s1):
    """TensorFlow's key (first two words) and the high words of its counter (last two) for an
    int32 seed pair (its ``GenerateKey``: the pair, widened as int64, through one Philox call
    under a fixed key); the low words of the counter count calls from 0."""
    u0, u1 = uint64(np.int64(s0)), uint64(np.int64(s1))
    return _philox(uint32(u0), uint32(u0 >> uint64(32)), uint32(u1), uint32(u1 >> uint64(32)),
                   uint32(_SEED_KEY[0]), uint32(_SEED_KEY[1]))


@njit(cache=True)
def fill_words(s0, s1, calls, out):
    """out[i] = the four words of Philox call ``calls[i]`` of the stream of int32 seed pair (s0, s1)."""
    k0, k1, h0, h1 = _seed_key(s0, s1)
    for i in range(calls.shape[0]):
        c = calls[i]
        out[i, 0], out[i, 1], out[i, 2], out[i, 3] = _philox(uint32(c), uint32(c >> uint64(32)), h0, h1,
                                                             k0, k1)


@njit(cache=True, nogil=True)
def dropped_rows_into(x, rows, s0, s1, threshold, scale, out):
    """out = the rows ``rows`` of ``x`` through TensorFlow's stateless dropout with int32 seed
    pair (s0, s1): entry i (row-major) is kept, times ``scale``, when uniform i >= rate,
    compared as mantissas (uniform i >= rate exactly when its 23 bits >= ``threshold``)."""
    k0, k1, h0, h1 = _seed_key(s0, s1)
    width = x.shape[1]
    m = uint32(0x7FFFFF)
    zero = np.float32(0.0)
    if width % 4:  # the words of a Philox call straddle rows
        total = rows.shape[0] * width
        for c in range((total + 3) // 4):
            words = _philox(uint32(c), uint32(uint64(c) >> uint64(32)), h0, h1, k0, k1)
            for j in range(min(4, total - 4 * c)):
                row, col = (4 * c + j) // width, (4 * c + j) % width
                out[row, col] = x[rows[row], col] * scale if (words[j] & m) >= threshold else zero
        return
    calls_per_row = width // 4  # each call's 4 words fall in one row
    for row in range(rows.shape[0]):
        dst = out[row]
        for q in range(calls_per_row):
            c = uint64(row * calls_per_row + q)
            r0, r1, r2, r3 = _philox(uint32(c), uint32(c >> uint64(32)), h0, h1, k0, k1)
            dst[4 * q] = scale if (r0 & m) >= threshold else zero
            dst[4 * q + 1] = scale if (r1 & m) >= threshold else zero
            dst[4 * q + 2] = scale if (r2 & m) >= threshold else zero
            dst[4 * q + 3] = scale if (r3 & m) >= threshold else zero
        src = x[rows[row]]
        for k in range(width):
            dst[k] = src[k] * dst[k]


# --- a pass ----------------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def train_epoch(x, y, order, batch_size, step0, mask_seed, threshold, scale, kernel, bias, slots, lr,
                decay, l2, col_head, optimizer, kind, first, keep, add, softmax, linear, losses, correct):
    """One epoch over the rows ``order`` of ``x`` (row indices in batch order, ``batch_size`` a
    batch) from optimizer step ``step0``, updating ``kernel`` (D x columns), ``bias`` (1 x
    columns) and ``slots`` (kernel slot 1, slot 2, bias slot 1, slot 2) in place: each step's
    loss per head into ``losses`` (steps x heads), each head's right Keras predictions added to
    ``correct`` (training mode, before each update).

    With ``scale`` > 0 each batch goes through the dropout of Keras's ``Dropout`` with seed
    ``mask_seed``: TensorFlow's stateless dropout with the seed pair its ``SeedGenerator``
    hands out at each step, ``[mask_seed, step]`` (taken mod 2**31 - 2 by Keras's
    ``_cast_seed``), keeping entries whose uniform's mantissa is >= ``threshold``.
    """
    n, width = order.shape[0], x.shape[1]
    columns = kernel.shape[1]
    has_l2 = np.any(l2 > _ZERO)
    xb_full = np.empty((min(batch_size, n), width), np.float32)
    for i in range(losses.shape[0]):
        step = step0 + i
        rows = order[i * batch_size:min((i + 1) * batch_size, n)]
        xb = xb_full[:rows.shape[0]]
        if scale > _ZERO:
            seed, counter = mask_seed % INT32_SEED_MOD, step % INT32_SEED_MOD
            dropped_rows_into(x, rows, seed, counter, threshold, scale, xb)
        else:
            for r in range(rows.shape[0]):
                xb[r] = x[rows[r]]
        z = np.dot(xb, kernel) + bias
        yb = y[rows]
        dz = np.empty_like(z)
        heads_step(z, yb, kind, first, keep, add, softmax, linear, losses[i], dz, correct)
        g = np.dot(xb.T, dz)  # heads share no weights: each column gets its own gradient
        if has_l2:  # the penalty, and its gradient 2 * l2 * kernel
            add_l2_penalty(kernel, l2, col_head, losses[i])
            for d in range(width):
                for j in range(columns):
                    g[d, j] += l2[col_head[j]] * (kernel[d, j] * _TWO)
        bias_grad = np.zeros((1, columns), np.float32)
        for r in range(dz.shape[0]):
            for j in range(columns):
                bias_grad[0, j] += dz[r, j]
        optimizer_step(kernel, g, slots[0], slots[1], lr, decay, optimizer, step)
        optimizer_step(bias, bias_grad, slots[2], slots[3], lr, decay, optimizer, step)


@njit(cache=True, nogil=True)
def add_l2_penalty(kernel, l2, col_head, loss):
    """Add to each head's ``loss[h]`` its L2 penalty: ``l2[h]`` times the sum of the squares of
    its kernel columns (``col_head``: each column's head)."""
    square = np.zeros(kernel.shape[1], np.float32)
    for d in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            square[j] += kernel[d, j] * kernel[d, j]
    penalty = np.zeros(loss.shape[0], np.float32)
    for j in range(kernel.shape[1]):
        penalty[col_head[j]] += square[j]
    for h in range(loss.shape[0]):
        loss[h] += l2[h] * penalty[h]


@njit(inline="always")
def _probability1(z, softmax):
    """P(label 1) of a 1-unit head: 1 for a softmax (over one unit), else the sigmoid."""
    return _ONE if softmax else _sigmoid(z)


@njit(inline="always")
def _probabilities2(z0, z1, softmax):
    """P(label 0) and P(label 1) of a 2-unit head: its softmax, or a sigmoid per unit."""
    return _softmax2(z0, z1) if softmax else (_sigmoid(z0), _sigmoid(z1))


@njit(inline="always")
def _one_unit_row(k, z, t, per_row, softmax, linear):
    """A 1-unit head on one row with (smoothed) label ``t``: its loss, its logit's gradient and
    whether Keras predicts label 1 (output > 0.5; a linear head's output is its logit)."""
    if k == 0:
        loss, grad = _sigmoid_xent(t, z), (_sigmoid(z) - t) * per_row
    else:  # a softmax over one unit is 1: the loss is 0, the gradient 1 - label
        loss, grad = _ZERO, (_ONE - t) * per_row
    return loss, grad, (z > _HALF if linear else _probability1(z, softmax) > _HALF)


@njit(inline="always")
def _two_unit_row(k, z0, z1, t0, t1, positive, per_row, softmax):
    """A 2-unit head on one row with (smoothed) labels ``t0``, ``t1``: its loss, its logits'
    gradients and whether Keras predicts label 1 (the argmax, ties to label 0)."""
    if k == 2:  # the mean of two sigmoid cross-entropies
        loss = (_sigmoid_xent(t0, z0) + _sigmoid_xent(t1, z1)) / _TWO
        g0, g1 = (_sigmoid(z0) - t0) * _HALF * per_row, (_sigmoid(z1) - t1) * _HALF * per_row
    else:
        l0, l1 = _log_softmax2(z0, z1)
        # sparse: minus the log-probability of the label; categorical: against both labels
        loss = (-l1 if positive else -l0) if k == 4 else -(t0 * l0 + t1 * l1)
        s0, s1 = _softmax2(z0, z1)
        g0, g1 = (s0 - t0) * per_row, (s1 - t1) * per_row
    p0, p1 = _probabilities2(z0, z1, softmax)
    return loss, g0, g1, p1 > p0


@njit(cache=True, nogil=True)
def heads_step(z, y, kind, first, keep, add, softmax, linear, loss, dz, correct):
    """Each head's loss on the rows of logits ``z`` (rows x columns) with labels ``y``: into
    ``loss[h]`` the sum over rows / rows (Keras's mean), into ``dz`` its logits' gradient, and
    into ``correct[h]`` (added) its count of right Keras predictions.

    Labels are smoothed as Keras smooths them, ``label * keep[h] + add[h]``; a sparse head's
    are not.
    """
    rows = z.shape[0]
    per_row = _ONE / np.float32(rows) if rows else _ZERO  # no rows: loss 0, as divide_no_nan
    for h in range(kind.shape[0]):
        k, c = kind[h], first[h]
        total = _ZERO
        right = 0
        for r in range(rows):
            positive = y[r] == 1
            label = _ONE if positive else _ZERO
            if k <= 1:
                row_loss, dz[r, c], said = _one_unit_row(k, z[r, c], label * keep[h] + add[h], per_row,
                                                         softmax[h], linear[h])
            else:
                if k == 4:
                    t0, t1 = (_ZERO, _ONE) if positive else (_ONE, _ZERO)
                else:
                    t0, t1 = (_ONE - label) * keep[h] + add[h], label * keep[h] + add[h]
                row_loss, dz[r, c], dz[r, c + 1], said = _two_unit_row(
                    k, z[r, c], z[r, c + 1], t0, t1, positive, per_row, softmax[h])
            total += row_loss
            if said == positive:
                right += 1
        loss[h] = total / np.float32(rows) if rows else _ZERO
        correct[h] += right


@njit(cache=True, nogil=True)
def positive_probability(z, kind, first, softmax, out):
    """P(label 1) of each head (``out``: rows x heads) from logits ``z``."""
    for r in range(z.shape[0]):
        for h in range(kind.shape[0]):
            c = first[h]
            if kind[h] <= 1:
                out[r, h] = _probability1(z[r, c], softmax[h])
            else:
                out[r, h] = _probabilities2(z[r, c], z[r, c + 1], softmax[h])[1]


@njit(cache=True, nogil=True)
def optimizer_step(var, grad, slot1, slot2, lr, decay, optimizer, step):
    """One Keras 3 optimizer step on ``var`` (rows x columns: a kernel, or a bias as one row),
    in place, with its slots; ``lr`` and ``decay`` per column, ``optimizer`` an index into
    :data:`OPTIMIZERS`, ``step`` the optimizer's iteration count before this step.

    Decoupled weight decay comes first (``var - var * decay * lr``); the update rules, their
    constants and epsilons are Keras's, in its order of operations. Rows are the outer loop:
    each row's columns are contiguous.
    """
    rows, columns = var.shape
    if np.any(decay != _ZERO):
        for i in range(rows):
            for j in range(columns):
                var[i, j] = var[i, j] - var[i, j] * decay[j] * lr[j]
    if optimizer == 0:
        for i in range(rows):
            for j in range(columns):
                var[i, j] = var[i, j] - grad[i, j] * lr[j]
    elif optimizer <= 2:
        for i in range(rows):
            for j in range(columns):
                g, rate = grad[i, j], lr[j]
                m = slot1[i, j] * _B1 - g * rate
                slot1[i, j] = m
                var[i, j] = var[i, j] + (m * _B1 - g * rate if optimizer == 2 else m)
    elif optimizer == 3:
        t = np.float32(step + 1)
        alpha = np.empty(columns, np.float32)
        for j in range(columns):
            alpha[j] = lr[j] * np.float32(np.sqrt(_ONE - _B2 ** t)) / (_ONE - _B1 ** t)
        for i in range(rows):
            for j in range(columns):
                g = grad[i, j]
                m = slot1[i, j] + (g - slot1[i, j]) * _1_B1
                v = slot2[i, j] + (g * g - slot2[i, j]) * _1_B2
                slot1[i, j], slot2[i, j] = m, v
                var[i, j] = var[i, j] - (m * alpha[j]) / (np.float32(np.sqrt(v)) + _EPS)
    elif optimizer == 4:
        for i in range(rows):
            for j in range(columns):
                g = grad[i, j]
                v = _RHO_RMS * slot1[i, j] + _1_RHO_RMS * (g * g)
                slot1[i, j] = v
                var[i, j] = var[i, j] - (lr[j] * g) / np.float32(np.sqrt(v + _EPS))
    elif optimizer == 5:
        for i in range(rows):
            for j in range(columns):
                g = grad[i, j]
                acc = slot1[i, j] + g * g
                slot1[i, j] = acc
                var[i, j] = var[i, j] - (lr[j] * g) / np.float32(np.sqrt(acc + _EPS))
    else:
        for i in range(rows):
            for j in range(columns):
                g = grad[i, j]
                g2 = _RHO_DELTA * slot1[i, j] + _1_RHO_DELTA * (g * g)
                delta = -((np.float32(np.sqrt(slot2[i, j] + _EPS)) * g) / np.float32(np.sqrt(g2 + _EPS)))
                slot1[i, j] = g2
                slot2[i, j] = _RHO_DELTA * slot2[i, j] + _1_RHO_DELTA * (delta * delta)
                var[i, j] = var[i, j] + lr[j] * delta
