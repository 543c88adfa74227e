"""The features file: round trip, the seed's layout, one-line errors, atomic writes."""

from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.features import read_features, write_features
from tests.helpers import fresh_python, make_features


def write_raw(path: Path, **datasets) -> Path:
    """An HDF5 file with exactly these datasets, written directly with h5py."""
    with h5py.File(path, "w") as h5:
        for name, data in datasets.items():
            h5.create_dataset(name, data=data)
    return path


def unreadable(path, *fragments: str) -> str:
    """Assert ``read_features(path)`` raises a one-line UserError containing every fragment."""
    with pytest.raises(UserError) as info:
        read_features(path)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


@pytest.fixture
def xy():
    return make_features(n=40, d=6, seed=3)


def folder_listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# --- round trip and seed layout ----------------------------------------------------------------

def test_round_trip(tmp_path, xy):
    x, y = xy
    attrs = {"backbone": "xception", "input_size": 299, "scale": 0.5,
             "class_names": ["cats", "dogs"], "versions": {"keras": "3.0"}}
    path = write_features(tmp_path / "sub" / "f.h5", x.astype(np.float64), y.astype(np.int32), attrs)
    assert path == tmp_path / "sub" / "f.h5"
    data = read_features(path)
    assert data.x.dtype == np.float32 and data.x.shape == x.shape
    np.testing.assert_array_equal(data.x, x)
    assert np.issubdtype(data.y.dtype, np.integer)
    np.testing.assert_array_equal(data.y, y)
    assert data.attrs == attrs
    assert data.class_names == ["cats", "dogs"]
    assert folder_listing(path.parent) == {"f.h5"}


def test_stored_dtypes(tmp_path, xy):
    x, y = xy
    path = write_features(tmp_path / "f.h5", x, y, {})
    with h5py.File(path, "r") as h5:
        assert h5["train"].dtype == np.float32
        assert np.issubdtype(h5["label"].dtype, np.integer)
        assert set(h5) == {"train", "label"}


def test_fixture_file_reads(features_file):
    data = read_features(features_file)
    assert data.x.shape == (240, 32)
    assert set(np.unique(data.y)) == {0, 1}
    assert data.class_names == ["0", "1"]


def test_seed_layout_with_extra_test_dataset(tmp_path, xy):
    x, y = xy
    path = write_raw(tmp_path / "gap_Xception.h5", train=x, label=y.astype(np.uint8), test=x[:7] * 2)
    data = read_features(path)
    np.testing.assert_array_equal(data.x, x)
    np.testing.assert_array_equal(data.y, y)
    assert data.attrs == {}
    assert data.class_names == ["0", "1"]


def test_float_labels_column_read_as_integers(tmp_path, xy):
    x, y = xy
    data = read_features(write_raw(tmp_path / "f.h5", train=x.astype(np.float64),
                                   label=y.astype(np.float32).reshape(-1, 1)))
    assert data.x.dtype == np.float32
    assert np.issubdtype(data.y.dtype, np.integer)
    np.testing.assert_array_equal(data.y, y)


# --- bad inputs --------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    unreadable(tmp_path / "absent.h5", "not found", "absent.h5")


def test_text_file_is_not_hdf5(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("this is not an HDF5 file\nsecond line\n")
    unreadable(path, str(path), "not a readable HDF5 file")


def test_truncated_file(tmp_path, xy):
    x, y = xy
    path = write_features(tmp_path / "f.h5", x, y, {"backbone": "xception"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    unreadable(path, str(path), "not a readable HDF5 file")


def test_train_missing(tmp_path, xy):
    _, y = xy
    unreadable(write_raw(tmp_path / "f.h5", label=y), "no dataset 'train'")


def test_label_missing(tmp_path, xy):
    x, _ = xy
    unreadable(write_raw(tmp_path / "f.h5", train=x), "no dataset 'label'")


def test_lengths_differ(tmp_path, xy):
    x, y = xy
    unreadable(write_raw(tmp_path / "f.h5", train=x, label=y[:-3]),
               f"'train' has {len(x)} rows but 'label' has {len(y) - 3}")


def test_three_dimensional_features(tmp_path, xy):
    x, y = xy
    unreadable(write_raw(tmp_path / "f.h5", train=x.reshape(len(x), 2, 3), label=y),
               "'train' must be 2-D", "(40, 2, 3)")


@pytest.mark.parametrize("bad", [2, -1])
def test_labels_outside_zero_one(tmp_path, xy, bad):
    x, y = xy
    y = y.copy()
    y[5] = bad
    unreadable(write_raw(tmp_path / "f.h5", train=x, label=y), "labels must be 0 or 1", str(bad))


def test_fractional_labels(tmp_path, xy):
    x, y = xy
    unreadable(write_raw(tmp_path / "f.h5", train=x, label=np.where(y == 1, 0.5, 0.0)),
               "labels must be 0 or 1", "0.5")


def test_only_one_class(tmp_path, xy):
    x, _ = xy
    unreadable(write_raw(tmp_path / "f.h5", train=x, label=np.ones(len(x), dtype=np.int64)),
               "only one class", "label 1")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features(tmp_path, xy, bad):
    x, y = xy
    x = x.copy()
    x[11, 2] = bad
    x[30, 0] = bad
    unreadable(write_raw(tmp_path / "f.h5", train=x, label=y), "NaN or Inf", "2 rows", "row 11")


def test_non_numeric_features(tmp_path, xy):
    _, y = xy
    unreadable(write_raw(tmp_path / "f.h5", train=np.full((len(y), 2), b"a"), label=y),
               "'train' must be real numbers")


def test_complex_features(tmp_path, xy):
    x, y = xy
    unreadable(write_raw(tmp_path / "f.h5", train=x.astype(np.complex64), label=y),
               "'train' must be real numbers", "complex64")


@pytest.mark.parametrize("shape", [(0, 6), (40, 0)], ids=["no rows", "no columns"])
def test_empty_features(tmp_path, xy, shape):
    _, y = xy
    unreadable(write_raw(tmp_path / "f.h5", train=np.zeros(shape, np.float32), label=y[:shape[0]]),
               "'train' is empty", str(shape))


def test_a_folder_is_not_a_features_file(tmp_path):
    with pytest.raises(UserError, match="is a folder, not a file"):
        read_features(tmp_path)


def test_train_is_a_group_not_a_dataset(tmp_path, xy):
    _, y = xy
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as h5:
        h5.create_group("train")
        h5.create_dataset("label", data=y)
    unreadable(path, "train")


# --- atomic write ------------------------------------------------------------------------------

def test_failure_midway_leaves_no_target_and_no_temp_file(tmp_path, xy, monkeypatch):
    x, y = xy
    calls = []
    original = h5py.Group.create_dataset

    def fail_on_second(self, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", fail_on_second)
    target = tmp_path / "f.h5"
    with pytest.raises(OSError, match="simulated"):
        write_features(target, x, y, {})
    assert calls == ["train", "label"]  # it failed after the first dataset was written
    assert not target.exists()
    assert folder_listing(tmp_path) == set()


def test_unserialisable_attribute_leaves_no_target_and_no_temp_file(tmp_path, xy):
    x, y = xy
    target = tmp_path / "f.h5"
    with pytest.raises(TypeError):
        write_features(target, x, y, {"ok": "yes", "bad": {"obj": object()}})
    assert not target.exists()
    assert folder_listing(tmp_path) == set()


def test_object_labels_rejected_and_existing_target_left_intact(tmp_path, xy):
    x, y = xy
    target = write_features(tmp_path / "f.h5", x, y, {"version": "old"})
    before = target.read_bytes()
    bad_labels = np.array([{"label": 1}] * len(y), dtype=object)
    with pytest.raises((TypeError, ValueError)):
        write_features(target, x * 2, bad_labels, {"version": "new"})
    assert target.read_bytes() == before
    assert read_features(target).attrs == {"version": "old"}
    assert folder_listing(tmp_path) == {"f.h5"}


def test_rewrite_replaces_target(tmp_path, xy):
    x, y = xy
    target = write_features(tmp_path / "f.h5", x, y, {"version": "old"})
    write_features(target, x * 2, y, {"version": "new"})
    data = read_features(target)
    np.testing.assert_array_equal(data.x, x * 2)
    assert data.attrs == {"version": "new"}
    assert folder_listing(tmp_path) == {"f.h5"}


def test_written_file_honours_umask(tmp_path, xy):
    x, y = xy
    old = os.umask(0o022)
    try:
        path = write_features(tmp_path / "f.h5", x, y, {})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# --- mapped, not copied ------------------------------------------------------------------------

def memory_owner(array: np.ndarray):
    """What finally holds ``array``'s memory: an mmap when mapped, None when numpy owns it."""
    while isinstance(array, (np.ndarray, memoryview)):
        array = array.base if isinstance(array, np.ndarray) else array.obj
    return array


def test_written_features_are_mapped_from_the_file(tmp_path, xy):
    x, y = xy
    path = write_features(tmp_path / "f.h5", x, y, {})
    data = read_features(path)
    assert isinstance(memory_owner(data.x), mmap.mmap)
    assert data.x.ctypes.data % 64 == 0 and data.x.flags.writeable
    np.testing.assert_array_equal(data.x, x)
    data.x[0, 0] = 99.0  # a private copy: the file keeps its values
    np.testing.assert_array_equal(read_features(path).x, x)
    write_features(path, x * 2, y, {})  # replaced: the mapping keeps what it read
    assert data.x[1, 1] == x[1, 1]
    np.testing.assert_array_equal(read_features(path).x, x * 2)


@pytest.mark.parametrize("layout", [{"chunks": (8, 6)}, {"compression": "gzip"}, {"dtype": ">f4"},
                                    {"dtype": "<f8"}], ids=["chunked", "gzip", "big-endian", "float64"])
def test_other_layouts_are_read_into_memory(tmp_path, xy, layout):
    x, y = xy
    with h5py.File(tmp_path / "f.h5", "w") as h5:
        h5.create_dataset("train", data=x, **layout)
        h5.create_dataset("label", data=y)
    data = read_features(tmp_path / "f.h5")
    assert memory_owner(data.x) is None
    assert data.x.dtype == np.float32 and data.x.ctypes.data % 64 == 0
    np.testing.assert_array_equal(data.x, x)


def test_a_runs_uri_is_downloaded_without_a_progress_bar_in_a_log(tracking, tmp_path, capsys):
    """A features file given as ``runs:/`` is fetched; with stderr not a terminal (a log, or
    here pytest's capture) MLflow's download bar stays off."""
    import mlflow

    from pipeline.features import resolve_features

    x, y = make_features(n=60, d=4)
    path = write_features(tmp_path / "f.h5", x, y, {})
    client = mlflow.MlflowClient()
    run = client.create_run("0").info.run_id
    client.log_artifact(run, str(path), "features")
    capsys.readouterr()
    local = resolve_features(f"runs:/{run}/features/f.h5")
    np.testing.assert_array_equal(read_features(local).x, x)
    assert "Downloading artifacts" not in capsys.readouterr().err


def test_a_runs_uri_is_fetched_once_per_process_and_its_copy_goes_with_it(tracking, tmp_path):
    """``main`` resolves its features twice (checked, then used); the second call is the first
    one's file, and the fetched copy does not outlive the command (a tracking server's features
    file is hundreds of MB)."""
    import mlflow

    x, y = make_features(n=60, d=4)
    path = write_features(tmp_path / "f.h5", x, y, {})
    client = mlflow.MlflowClient()
    run = client.create_run("0").info.run_id
    client.log_artifact(run, str(path), "features")
    out = fresh_python(
        "from pipeline.features import resolve_features\n"
        f"first, again = (resolve_features('runs:/{run}/features/f.h5') for _ in range(2))\n"
        "print(first, first is again, first.is_file(), sep='\\n')", tmp_path)
    fetched, same, existed = out.splitlines()[-3:]
    assert (same, existed) == ("True", "True")
    assert not Path(fetched).parent.exists()


def test_a_runs_uri_that_cannot_be_fetched_leaves_no_folder(tracking, tmp_path, monkeypatch):
    import tempfile

    from pipeline.features import resolve_features

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(UserError, match="cannot be fetched"):
        resolve_features("runs:/0123456789abcdef0123456789abcdef/features/f.h5")
    assert not list(scratch.iterdir())
