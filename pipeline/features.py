"""The features file: HDF5 in the layout of the seed's ``gap_Xception.h5``.

Datasets ``train`` (N x D float32) and ``label`` (N integers in {0, 1}); files this project
writes add attributes (backbone, weights, input size, class names in label order, source,
library versions). Other datasets in the file, such as the seed's ``test``, are ignored.

Reading validates everything a sweep relies on and raises :class:`UserError` with one line
naming the problem; writing is atomic, so a killed writer never leaves a half file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pipeline import paths
from pipeline.errors import UserError
from pipeline.labels import invalid_labels

FEATURES_DATASET = "train"
LABEL_DATASET = "label"
FEATURES_ALIGNMENT = 64  # bytes: a cache line, and the boundary TensorFlow needs to use an array in place
HASH_BLOCK = 16 << 20  # bytes hashed per call (see sha256_file); a multiple of the page size


@dataclass(frozen=True)
class FeatureSet:
    """Features ``x`` (N x D float32), labels ``y`` (N int64 in {0, 1}) and the file's attributes."""

    x: np.ndarray
    y: np.ndarray
    attrs: dict = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        """Class names in label order, or ``["0", "1"]`` for files that do not record them."""
        return list(self.attrs.get("class_names", ["0", "1"]))


def read_features(path: str | os.PathLike) -> FeatureSet:
    """Read and validate a features file.

    Raises :class:`UserError` when the file is missing, not HDF5 or truncated, lacks ``train``
    or ``label``, the two differ in length, the features are not 2-D real numbers with rows and
    columns or hold NaN/Inf, or the labels are not a mix of 0 and 1.
    """
    path = paths.existing_file(path, "features file")
    try:
        with h5py.File(path, "r") as h5:
            for name in (FEATURES_DATASET, LABEL_DATASET):
                if not isinstance(h5.get(name), h5py.Dataset):
                    raise UserError(
                        f"{path}: no dataset '{name}' (expected 'train' N x D features and "
                        f"'label' N labels, as in gap_Xception.h5)"
                    )
            train, labels = h5[FEATURES_DATASET], h5[LABEL_DATASET]
            if train.ndim == 2:  # a label per row, known from the shapes before either is read
                _check_label_shape(path, labels.shape, train.shape[0])
            x = _read_features_matrix(train)
            y_raw = np.asarray(labels[()])
            attrs = {key: _decode_attr(value) for key, value in h5.attrs.items()}
    except UserError:
        raise
    except MemoryError as exc:  # a dataset whose declared shape outgrows this machine
        raise UserError(f"{path}: too large to read into memory ({_first_line(exc)})") from None
    except (OSError, KeyError, ValueError) as exc:
        raise UserError(f"{path}: not a readable HDF5 file ({_first_line(exc)})") from None
    return FeatureSet(x=_check_features(path, x), y=_check_labels(path, y_raw, len(x)), attrs=attrs)


def _read_features_matrix(dataset: h5py.Dataset) -> np.ndarray:
    """A 2-D integer or float dataset as float32 in a buffer starting on a 64-byte boundary:
    mapped from the file when it can be (:func:`_mapped`), read into memory otherwise.

    The fused engine trains on such an array in place, so a sweep holds its features once.
    Anything else is read as it is, for :func:`_check_features` to judge.
    """
    kind = dataset.dtype.kind
    if dataset.ndim != 2 or kind not in "iuf" or dataset.size == 0:
        return np.asarray(dataset[()])
    mapped = _mapped(dataset)
    if mapped is not None:
        return mapped
    nbytes = dataset.size * 4
    buffer = np.empty(nbytes + FEATURES_ALIGNMENT, np.uint8)
    start = -buffer.ctypes.data % FEATURES_ALIGNMENT
    x = buffer[start:start + nbytes].view(np.float32).reshape(dataset.shape)
    dataset.read_direct(x)
    return x


def _mapped(dataset: h5py.Dataset) -> np.ndarray | None:
    """``dataset`` as an array mapped copy-on-write from its file, or None if it is not stored
    as one: contiguous, unfiltered, native float32, on a 64-byte boundary, wholly in the file.

    That is how h5py stores a dataset by default, and how :func:`write_features` stores
    features: a plain array at a fixed offset. Mapping it shares the operating system's cached
    pages of the file instead of copying them into new memory, which the system must first zero
    (and a virtual machine may first have to get from its host).

    The mapping is private: writing to the array changes this process's copy, never the file.
    A file replaced meanwhile (as :func:`write_features` replaces one) leaves the mapping with
    the content it had; one rewritten in place (h5py's ``r+``) may show through, as it would
    to a reader that had not yet read it.
    """
    offset = dataset.id.get_offset()
    if (offset is None or offset % FEATURES_ALIGNMENT or dataset.dtype != np.float32
            or dataset.chunks is not None or dataset.external or dataset.is_virtual):
        return None
    with open(dataset.file.filename, "rb") as fh:
        if os.fstat(fh.fileno()).st_size < offset + dataset.nbytes:
            return None  # cut short: reading it fails with HDF5's own message
        data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    return np.frombuffer(data, np.float32, dataset.size, offset).reshape(dataset.shape)


def _check_features(path: Path, x: np.ndarray) -> np.ndarray:
    if x.ndim != 2:
        raise UserError(f"{path}: 'train' must be 2-D (N x D), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise UserError(f"{path}: 'train' must be real numbers, got dtype {x.dtype}")
    if 0 in x.shape:
        raise UserError(f"{path}: 'train' is empty (shape {x.shape}): it needs rows and features")
    x = x.astype(np.float32, copy=False)
    if not (np.isfinite(x.min()) and np.isfinite(x.max())):  # NaN spreads to both, +-Inf to one
        rows = np.unique(np.nonzero(~np.isfinite(x))[0])
        raise UserError(f"{path}: 'train' holds NaN or Inf in {len(rows)} rows (first: row {rows[0]})")
    return x


def _check_label_shape(path: Path, shape: tuple[int, ...], n: int) -> None:
    """:class:`UserError` unless labels of ``shape`` (N, or N x 1 / 1 x N) give one per row of ``n``."""
    if len(shape) == 2 and 1 in shape:
        shape = (math.prod(shape),)
    if len(shape) != 1:
        raise UserError(f"{path}: 'label' must be 1-D, got shape {shape}")
    if shape[0] != n:
        raise UserError(f"{path}: 'train' has {n} rows but 'label' has {shape[0]}")


def _check_labels(path: Path, y: np.ndarray, n: int) -> np.ndarray:
    _check_label_shape(path, y.shape, n)
    y = y.reshape(-1)
    found = invalid_labels(y)
    if found:
        kind = "" if y.dtype.kind in "iuf" else f" (dtype {y.dtype})"
        raise UserError(f"{path}: labels must be 0 or 1, found {found}{kind}")
    counts = np.bincount(y.astype(np.int64), minlength=2)
    if counts.min() == 0:
        raise UserError(f"{path}: only one class present ({int(counts.max())} rows of label "
                        f"{int(counts.argmax())}); a binary classifier needs both")
    return y.astype(np.int64)


def write_features(path: str | os.PathLike, x: np.ndarray, y: np.ndarray, attrs: dict) -> Path:
    """Write ``x``, ``y`` and ``attrs`` to ``path`` atomically and return the path.

    The features are stored contiguously as float32 on a 64-byte boundary, so that reading
    maps them (:func:`_mapped`). The file is written to a temporary name in the same folder
    and renamed into place, so ``path`` is either the complete old file, the complete new one,
    or absent. Non-scalar attributes (lists, dicts) are stored as JSON strings.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a features file is for sharing
    try:
        # objects from 64 bytes on start on a 64-byte boundary, so the features can be mapped
        with h5py.File(tmp, "w", alignment_threshold=FEATURES_ALIGNMENT,
                       alignment_interval=FEATURES_ALIGNMENT) as h5:
            h5.create_dataset(FEATURES_DATASET, data=np.asarray(x, dtype=np.float32))
            h5.create_dataset(LABEL_DATASET, data=np.asarray(y, dtype=np.int64))
            for key, value in attrs.items():
                h5.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes.

    The file is mapped and hashed 16 MiB per call, each call letting other threads
    run: each call has to wait for Python's lock again when another thread holds it, so few
    large calls wait less than many small ones. Hashed pieces
    are let go of at once, so that the mapping does not add the file's size to the process's
    memory.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if not size:  # an empty file cannot be mapped
            return digest.hexdigest()
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data, memoryview(data) as view:
            for start in range(0, size, HASH_BLOCK):
                digest.update(view[start:start + HASH_BLOCK])
                if hasattr(data, "madvise"):
                    data.madvise(mmap.MADV_DONTNEED, start, min(HASH_BLOCK, size - start))
    return digest.hexdigest()


def _decode_attr(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        with contextlib.suppress(json.JSONDecodeError):
            return json.loads(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


ARTIFACT_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
_FETCHED: dict[str, Path] = {}  # artifact URI -> its copy in this process's folder


def resolve_features(features: str) -> Path:
    """A local path for ``features``: the path itself, or an MLflow artifact (``runs:/`` and the
    like) fetched once per process (with MLflow's progress bar on a terminal only) into a
    folder of the process's own, which is removed when the process exits."""
    if not features.startswith(ARTIFACT_SCHEMES):
        return Path(features)
    if features not in _FETCHED:
        _FETCHED[features] = _fetch(features)
    return _FETCHED[features]


def _fetch(uri: str) -> Path:
    import atexit
    import shutil

    import mlflow

    from pipeline.quiet import no_artifacts_progress

    folder = tempfile.mkdtemp(prefix="pipeline-features-")
    atexit.register(shutil.rmtree, folder, True)  # what an interrupted download left, too
    try:
        with no_artifacts_progress(not sys.stderr.isatty()):
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=folder))
    except Exception as exc:  # MLflow raises several types for a missing run or artifact
        shutil.rmtree(folder, ignore_errors=True)
        raise UserError(f"features '{uri}': cannot be fetched "
                        f"({' '.join(str(exc).split())[:200]})") from None
