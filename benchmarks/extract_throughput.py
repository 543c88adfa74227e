"""Extraction throughput: ``extract`` (decode, resize, Xception, HDF5 write) against bare predict.

Usage (from the repository root)::

    python benchmarks/extract_throughput.py [--images 300] [--batch-size 32] [--repeats 2]

It writes ``--images`` JPEGs (400 x 300, two classes) to a temporary folder, builds Xception
with random weights once (outside the clock, for both), and then, alternating ``--repeats``
times, measures images per second of

- ``extract``: :func:`pipeline.extract.extract` on the folder at input size 299, from the
  files to the written HDF5 file;
- ``predict``: ``model.predict`` on the same images already decoded, resized and
  preprocessed in memory, at the same batch size.

Each figure includes its own function tracing, as a single run of either would. It prints the
best of the repeats for each and their ratio (goal: extract >= 0.85 x predict), by the clock
and by CPU time (the steadier measure on a machine shared with other work).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.quiet import quiet_tensorflow  # noqa: E402

quiet_tensorflow()
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from pipeline import backbone  # noqa: E402
from pipeline import extract as extract_stage  # noqa: E402
from pipeline.sources import open_source  # noqa: E402

SIZE = 299


def write_images(folder: Path, n: int) -> None:
    """``n`` JPEGs of smooth random colour fields, half in each of two class folders."""
    rng = np.random.default_rng(0)
    for i in range(n):
        coarse = rng.integers(0, 256, (30, 40, 3)).astype(np.float32)
        image = tf.image.resize(coarse[None], (300, 400), method="bicubic")[0]
        image += rng.normal(0, 8, image.shape)
        pixels = tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8)
        target = folder / ("cats" if i % 2 else "dogs") / f"{i:05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(tf.io.encode_jpeg(pixels, quality=90).numpy())


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(work) -> tuple[float, float]:
    """Wall and CPU seconds of ``work()``."""
    cpu, start = cpu_seconds(), time.perf_counter()
    work()
    return time.perf_counter() - start, cpu_seconds() - cpu


def time_extract(model: keras.Model, images: Path, output: Path, batch_size: int) -> tuple[float, float]:
    """Wall and CPU seconds of ``extract`` on ``images``, the backbone handed in already built."""
    original = backbone.load_backbone
    backbone.load_backbone = lambda weights, size: (model, "random")
    try:
        return timed(lambda: extract_stage.extract(str(images), "random", SIZE, batch_size, str(output),
                                                   progress=False))
    finally:
        backbone.load_backbone = original
        output.unlink(missing_ok=True)


def time_predict(model: keras.Model, inputs: np.ndarray, batch_size: int) -> tuple[float, float]:
    return timed(lambda: model.predict(inputs, batch_size=batch_size, verbose=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="extract-bench-") as tmp:
        images = Path(tmp) / "images"
        write_images(images, args.images)
        model = keras.applications.Xception(include_top=False, weights=None, pooling="avg",
                                            input_shape=(SIZE, SIZE, 3))
        decoded = np.concatenate([batch.numpy() for _, batch in backbone.image_dataset(
            open_source(str(images)), SIZE, args.batch_size)])
        inputs = keras.applications.xception.preprocess_input(decoded)
        model(inputs[:1])  # start TensorFlow's runtime up for both
        load = [os.getloadavg()[0]]
        timings = {"extract": [], "predict": []}
        for _ in range(args.repeats):
            timings["predict"].append(time_predict(model, inputs, args.batch_size))
            timings["extract"].append(time_extract(model, images, Path(tmp) / "f.h5", args.batch_size))
            load.append(os.getloadavg()[0])
    rate = {name: args.images / min(wall for wall, _ in runs) for name, runs in timings.items()}
    per_cpu = {name: args.images / min(cpu for _, cpu in runs) for name, runs in timings.items()}
    print(f"{args.images} JPEGs 400x300 -> Xception (random weights) at {SIZE}, batch {args.batch_size}; "
          f"highest 1-min load average seen: {max(load):.1f} on {os.cpu_count()} CPUs")
    for name, runs in timings.items():
        print(f"{name:>8}: {rate[name]:6.2f} images/s, {per_cpu[name]:6.2f} images per CPU second "
              f"(best of {', '.join(f'{wall:.1f} s / {cpu:.1f} CPU s' for wall, cpu in runs)})")
    print(f"extract / predict: {rate['extract'] / rate['predict']:.3f}x by the clock, "
          f"{per_cpu['extract'] / per_cpu['predict']:.3f}x by CPU time (goal >= 0.85x)")


if __name__ == "__main__":
    main()
