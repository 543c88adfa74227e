"""TensorFlow's stateless random numbers on CPU, without TensorFlow.

Keras 3 on TensorFlow draws its seeded initializers and ``Dropout`` masks with TensorFlow's
stateless ops (``tf.random.stateless_uniform``, ``stateless_normal``,
``stateless_truncated_normal``, ``tf.nn.experimental.stateless_dropout``), which on CPU run
Philox-4x32-10 from a key and counter derived from the seed pair. This module computes the same
numbers, so that the fused engine starts from the start weights and applies the dropout masks
of the Keras reference while a sweep imports no TensorFlow:

- the uniforms and the dropout masks are TensorFlow's bit for bit;
- the normals go through the same Box-Muller transform in float32, whose ``log``, ``sin`` and
  ``cos`` may round differently from TensorFlow's in the last bit. A truncated-normal draw
  that close to the cut at 2 standard deviations may be kept by one and not the other, which
  changes its group of four: rare (the start weights of the tests' seeds and shapes agree).

tests/test_stateless_random.py holds each against TensorFlow. Philox runs compiled (Numba,
cached beside this module after its first compilation): the masks of a pass are hundreds of
millions of draws.
"""

from __future__ import annotations

import numpy as np

from pipeline.kernels import INT32_SEED_MOD, dropped_rows_into, fill_words

_MANTISSA = 0x7FFFFF
_RESERVED_PER_GROUP = 256  # Philox calls a truncated-normal output group of 4 may use (TensorFlow's)


def keras_seed(seed: int, counter: int = 0) -> tuple[int, int]:
    """The int32 seed pair Keras passes TensorFlow for integer seed ``seed`` (``counter`` is a
    ``SeedGenerator``'s count of draws: a ``Dropout``'s step)."""
    return seed % INT32_SEED_MOD, counter % INT32_SEED_MOD


def _words(seed: tuple[int, int], calls: np.ndarray) -> np.ndarray:
    """The four 32-bit words of each Philox call number in ``calls`` (calls x 4, uint32) of the
    stream of int32 seed pair ``seed``."""
    calls = np.asarray(calls, np.uint64)
    out = np.empty((*calls.shape, 4), np.uint32)
    fill_words(seed[0], seed[1], calls.reshape(-1), out.reshape(-1, 4))
    return out


def _to_float(words: np.ndarray) -> np.ndarray:
    """TensorFlow's uniform float32 in [0, 1) from 32-bit words: 23 bits of mantissa."""
    return (words & np.uint32(_MANTISSA)).astype(np.float32) * np.float32(2.0**-23)


def _box_muller(x0: np.ndarray, x1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two standard normals per pair of words, as TensorFlow's ``BoxMullerFloat``."""
    u1 = np.maximum(_to_float(x0), np.float32(1e-7))
    v1 = (2.0 * np.pi * _to_float(x1).astype(np.float64)).astype(np.float32)
    u2 = np.sqrt(np.float32(-2.0) * np.log(u1))
    return np.sin(v1) * u2, np.cos(v1) * u2


def uniform(shape: tuple[int, ...], seed: tuple[int, int], minval: float = 0.0,
            maxval: float = 1.0) -> np.ndarray:
    """``tf.random.stateless_uniform(shape, seed, minval, maxval)`` in float32."""
    n = int(np.prod(shape))
    u = _to_float(_words(seed, np.arange((n + 3) // 4)).reshape(-1)[:n])
    lo, hi = np.float32(minval), np.float32(maxval)
    return (u * (hi - lo) + lo).reshape(shape)


def normal(shape: tuple[int, ...], seed: tuple[int, int], mean: float = 0.0,
           stddev: float = 1.0) -> np.ndarray:
    """``tf.random.stateless_normal(shape, seed, mean, stddev)`` in float32."""
    n = int(np.prod(shape))
    words = _words(seed, np.arange((n + 3) // 4))
    f0, f1 = _box_muller(words[:, 0::2], words[:, 1::2])
    z = np.stack([f0, f1], axis=-1).reshape(-1)[:n]  # each call gives pairs (0, 1) and (2, 3)
    return (z * np.float32(stddev) + np.float32(mean)).reshape(shape)


def truncated_normal(shape: tuple[int, ...], seed: tuple[int, int], mean: float = 0.0,
                     stddev: float = 1.0) -> np.ndarray:
    """``tf.random.stateless_truncated_normal(shape, seed, mean, stddev)`` in float32.

    TensorFlow fills each group of 4 outputs from its own stretch of the Philox stream (group g
    starts at call 256 g), keeping the Box-Muller normals under 2 in absolute value in the order
    drawn. Four calls (16 normals) per group leave a group short with probability ~1e-13; a
    short group reads further calls.
    """
    n = int(np.prod(shape))
    groups = (n + 3) // 4
    out = np.empty((groups, 4), np.float32)
    calls = 4
    start = np.arange(groups)[:, None] * _RESERVED_PER_GROUP
    todo = np.arange(groups)
    while len(todo):
        words = _words(seed, start[todo] + np.arange(calls)).reshape(len(todo), -1)
        f0, f1 = _box_muller(words[:, 0::2], words[:, 1::2])
        z = np.stack([f0, f1], axis=-1).reshape(len(todo), -1)
        kept = np.abs(z) < np.float32(2.0)
        full = kept.sum(axis=1) >= 4
        for row in np.flatnonzero(full):
            out[todo[row]] = z[row][kept[row]][:4]
        todo, calls = todo[~full], calls * 2
    return (out.reshape(-1)[:n] * np.float32(stddev) + np.float32(mean)).reshape(shape)


def dropout_constants(rate: float) -> tuple[np.uint32, np.float32]:
    """What the dropout kernel needs for a Python float ``rate``: the 23-bit mantissa at and
    above which a uniform is >= ``rate`` in float32, as TensorFlow compares it (u = m / 2**23 >=
    rate exactly when m >= ceil(rate * 2**23)), and the scale of kept entries, float32(1 / (1 -
    rate)) (0 for rate 0: no dropout)."""
    threshold = np.uint32(np.ceil(np.float64(np.float32(rate)) * 2.0**23))
    return threshold, np.float32(1 / (1 - rate) if rate > 0 else 0.0)


def dropout_rows(x: np.ndarray, rows: np.ndarray, rate: float, seed: tuple[int, int]) -> np.ndarray:
    """``tf.nn.experimental.stateless_dropout(x[rows], rate, seed)`` for float32 ``x`` and a
    Python float ``rate``, bit for bit: ``x * float32(1 / (1 - rate))`` where
    ``stateless_uniform(shape, seed) >= float32(rate)``, 0 elsewhere."""
    out = np.empty((len(rows), x.shape[1]), np.float32)
    dropped_rows_into(np.ascontiguousarray(x, np.float32), np.asarray(rows, np.int64), seed[0], seed[1],
                      *dropout_constants(rate), out)
    return out


def dropout(x: np.ndarray, rate: float, seed: tuple[int, int]) -> np.ndarray:
    """``tf.nn.experimental.stateless_dropout(x, rate, seed)`` for float32 ``x`` of any shape."""
    flat = np.reshape(x, (1, -1))
    return dropout_rows(flat, np.zeros(1, np.int64), rate, seed).reshape(np.shape(x))
