"""Where images come from: a folder with one subfolder per class, or ``builtin:digits``.

``builtin:digits`` is scikit-learn's bundled 8x8 handwritten digits (no download), reduced to
the two-class task 3 vs 8: the pair whose 8x8 shapes differ least (an 8 is a 3 with its left
side closed), so the task is not trivial, and it is nearly balanced (183 vs 174 images, 49%
positive, like the seed's cats vs dogs). It is upscaled to Xception's minimum input, 71x71.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

BUILTIN_DIGITS = "builtin:digits"
DIGITS_CLASSES = (3, 8)
# The formats TensorFlow's decode_image reads, told by their first bytes as it tells them.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WebP")
MIN_INPUT_SIZE = 71  # Xception's smallest input
MAX_INPUT_SIZE = 1024  # past this, a batch of Xception's activations outgrows most machines' memory
FOLDER_INPUT_SIZE = 299  # Xception's ImageNet input


@dataclass(frozen=True)
class ImageSource:
    """Either ``paths`` (image files) or ``pixels`` (N x H x W x C, 0..255), with labels."""

    labels: np.ndarray
    class_names: tuple[str, ...]
    description: str
    default_input_size: int
    paths: tuple[str, ...] = ()
    pixels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> str:
        """sha256 of the content (file names, bytes and labels): equal input, equal fingerprint."""
        digest = hashlib.sha256(self.description.encode())
        if self.pixels is not None:
            digest.update(np.ascontiguousarray(self.pixels).tobytes())
        for path in self.paths:
            digest.update(path.encode())
            try:
                digest.update(Path(path).read_bytes())
            except OSError:  # an unreadable file is skipped by extraction; its name still counts
                digest.update(b"\0unreadable")
        digest.update(self.labels.tobytes())
        return digest.hexdigest()


def open_source(images: str) -> ImageSource:
    """The :class:`ImageSource` for ``images``: ``builtin:digits`` or a class-per-subfolder path."""
    if images == BUILTIN_DIGITS:
        return digits_source()
    if images.startswith("builtin:"):
        raise UserError(f"images '{images}': unknown builtin (available: {BUILTIN_DIGITS})")
    return folder_source(Path(images))


def digits_source() -> ImageSource:
    """scikit-learn's digits, 3 (label 0) vs 8 (label 1), as 8x8x3 pixels in 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.isin(digits.target, DIGITS_CLASSES)
    gray = digits.images[keep] * (255.0 / 16.0)
    labels = (digits.target[keep] == DIGITS_CLASSES[1]).astype(np.int64)
    pixels = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
    return ImageSource(labels=labels, class_names=tuple(map(str, DIGITS_CLASSES)),
                       description=f"{BUILTIN_DIGITS} (scikit-learn digits, 3 vs 8)",
                       default_input_size=MIN_INPUT_SIZE, pixels=pixels)


def folder_source(root: Path) -> ImageSource:
    """Every file under ``root/<class>/``, classes in sorted order; exactly two classes.

    Files are taken whatever their name or extension: what decodes is extracted and the rest is
    skipped, counted and listed by the extract stage, so no file is left out unseen.
    """
    if not root.is_dir():
        raise UserError(f"images folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) != 2:
        found = ", ".join(classes) if classes else "none"
        raise UserError(f"images folder {root}: needs exactly 2 class subfolders, found "
                        f"{len(classes)} ({found})")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(str(p) for p in (root / name).rglob("*") if p.is_file())
        if not files:
            raise UserError(f"images folder {root}: class folder '{name}' is empty")
        if not any(image_format(f) for f in files):
            raise UserError(f"images folder {root}: class folder '{name}' holds no "
                            f"{', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]} image "
                            f"({len(files)} other files)")
        paths += files
        labels += [label] * len(files)
    return ImageSource(labels=np.asarray(labels, dtype=np.int64), class_names=tuple(classes),
                       description=str(root), default_input_size=FOLDER_INPUT_SIZE,
                       paths=tuple(paths))


def image_format(path: str | Path) -> str | None:
    """The format of the image file ``path`` by its first bytes (one of :data:`IMAGE_FORMATS`),
    or None for any other file. A file named for a format but holding another is judged by its
    bytes, as the decoder judges it; one that starts like an image may still fail to decode."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
    except OSError:  # unreadable: skipped like an undecodable file
        return None
    signatures = {"JPEG": head.startswith(b"\xff\xd8\xff"), "PNG": head.startswith(b"\x89PNG"),
                  "GIF": head.startswith(b"GIF8"), "BMP": head.startswith(b"BM"),
                  "WebP": head.startswith(b"RIFF") and head[8:12] == b"WEBP"}
    return next((name for name, match in signatures.items() if match), None)
