"""Keras Xception as a feature extractor: the backbone, the decoded image batches, the forward pass.

The extract stage (:mod:`pipeline.extract`) imports this module once its inputs are checked, so
that bad input is refused without the seconds that importing TensorFlow takes.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.features import sha256_file
from pipeline.progress import progress_bar
from pipeline.quiet import quiet_tensorflow
from pipeline.sources import ImageSource

quiet_tensorflow()
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

BACKBONE = "keras.applications.Xception"
RANDOM_WEIGHTS_SEED = 0


def load_backbone(weights: str, input_size: int) -> tuple[keras.Model, str]:
    """Xception without its top, global-average pooled, and a description of the weights used.

    ``imagenet`` uses Keras's download and cache; ``random`` is ``weights=None``, initialised
    with seed :data:`RANDOM_WEIGHTS_SEED` so that runs repeat; ``auto`` is ImageNet when it can
    be had, otherwise random with a warning; anything else is a path to a Keras weights file
    for this architecture (:func:`pipeline.extract.check_inputs` has checked that it exists).
    """
    shape = (input_size, input_size, 3)
    build = lambda w: keras.applications.Xception(  # noqa: E731
        include_top=False, weights=w, pooling="avg", input_shape=shape)

    def build_random():  # seeded, so random-weight features (and every number after) repeat
        keras.utils.set_random_seed(RANDOM_WEIGHTS_SEED)
        return build(None)

    if weights == "random":
        return build_random(), "random"
    if weights in ("imagenet", "auto"):
        try:
            with contextlib.redirect_stdout(sys.stderr):  # Keras's "Downloading data from ..."
                return build("imagenet"), "imagenet"
        except Exception as exc:
            reason = " ".join(str(exc).split())[:300]
            if weights == "imagenet":
                raise UserError(f"weights imagenet: cannot be loaded ({reason}); use weights "
                                f"random, auto or a weights file") from None
            print(f"warning: ImageNet weights unavailable ({reason}); extracting with RANDOM "
                  f"weights (tag backbone.weights=random)", file=sys.stderr)
            return build_random(), "random"
    path = Path(weights)
    try:
        return build(str(path)), f"file:{path.name} sha256:{sha256_file(path)[:16]}"
    except Exception as exc:
        raise UserError(f"weights file {path}: cannot be loaded into Xception "
                        f"({' '.join(str(exc).split())[:200]})") from None


def image_dataset(source: ImageSource, input_size: int, batch_size: int) -> tf.data.Dataset:
    """Batches of (row index, RGB image in 0..255 at ``input_size``).

    A file decodes by its content, whatever its name; one that does not (another format, a
    damaged image, an unreadable file) is left out, and its row index with it, so the caller
    lists it as skipped."""
    size = (input_size, input_size)
    if source.pixels is not None:
        ds = tf.data.Dataset.from_tensor_slices((np.arange(len(source)), source.pixels))
        ds = ds.map(lambda i, px: (i, tf.image.resize(px, size)), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        def load(i, path):
            image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
            return i, tf.image.resize(tf.cast(image, tf.float32), size)

        ds = tf.data.Dataset.from_tensor_slices((np.arange(len(source)), list(source.paths)))
        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.ignore_errors()
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def forward(model: keras.Model, source: ImageSource, input_size: int, batch_size: int,
            progress: bool | None) -> tuple[np.ndarray, np.ndarray]:
    """``model``'s features of every image of ``source`` that decodes: the row indices of those
    images in ``source`` and their features (rows x features, float32), with a progress bar."""
    # One graph for every batch size: a last, smaller batch would otherwise trace Xception again.
    call = tf.function(lambda x: model(keras.applications.xception.preprocess_input(x), training=False),
                       input_signature=[tf.TensorSpec([None, input_size, input_size, 3], tf.float32)])
    rows, chunks = [], []
    with progress_bar("extract", len(source), "file", enabled=progress) as bar:
        for idx, batch in image_dataset(source, input_size, batch_size):
            chunks.append(call(batch).numpy())
            rows.append(idx.numpy())
            bar.update(len(idx))
        bar.update(len(source) - bar.n)  # the files that could not be decoded are done too
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), np.float32)
    return np.concatenate(rows), np.concatenate(chunks).astype(np.float32)
