"""Feature extraction on images the tests make: folders, builtin digits, weights, bad input."""

from __future__ import annotations

import keras
import mlflow
import numpy as np
import pytest

from pipeline import naming
from pipeline.backbone import load_backbone
from pipeline.cli import build_parser, interrupt_message
from pipeline.errors import UserError
from pipeline.extract import extract, run_extract
from pipeline.features import read_features, resolve_features, sha256_file
from pipeline.sources import digits_source
from tests.helpers import make_folder


def test_folder_extraction_skips_undecodable_files(tmp_path):
    images = make_folder(tmp_path / "images")
    result = extract(str(images), "random", 71, 4, str(tmp_path / "f.h5"), progress=False)
    assert result.n_images == 7
    assert [p.rsplit("/", 1)[-1] for p in result.skipped] == ["broken0.jpg", "notes.txt"]
    features = read_features(tmp_path / "f.h5")
    assert features.x.shape == (7, 2048) and features.x.dtype == np.float32
    assert features.y.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert features.class_names == ["cats", "dogs"]
    assert features.attrs["weights"] == "random" and features.attrs["input_size"] == 71
    assert features.attrs["backbone"] == "keras.applications.Xception"
    assert "version.keras" in features.attrs["versions"]


@pytest.fixture(scope="module")
def random_backbone(tmp_path_factory):
    """A random-weight Xception at 71 px and its weights saved as a Keras weights file, built
    once for the tests of this module that read them (building one takes seconds)."""
    model, _ = load_backbone("random", 71)
    weights = tmp_path_factory.mktemp("backbone") / "xception.weights.h5"
    model.save_weights(weights)
    return model, weights


@pytest.mark.slow
def test_features_match_a_direct_forward_pass(tmp_path, random_backbone):
    """The tf.data pipeline feeds Xception exactly what a direct call on the same pixels sees."""
    import tensorflow as tf

    model, weights = random_backbone
    source = digits_source()
    result = extract("builtin:digits", str(weights), "auto", 64, str(tmp_path / "d.h5"),
                     progress=False)
    features = read_features(result.output)
    assert features.class_names == ["3", "8"] and 0.4 < features.y.mean() < 0.6
    np.testing.assert_array_equal(features.y, source.labels)
    pixels = tf.image.resize(source.pixels[:40], (71, 71))
    direct = model.predict(keras.applications.xception.preprocess_input(pixels), verbose=0)
    np.testing.assert_allclose(features.x[:40], direct, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_weights_file_is_loaded_and_recorded(random_backbone):
    model, path = random_backbone
    loaded, used = load_backbone(str(path), 71)
    assert used.startswith("file:xception.weights.h5 sha256:")
    for a, b in zip(model.get_weights()[:3], loaded.get_weights()[:3], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_auto_falls_back_to_random_loudly(tmp_path, tracking, monkeypatch, capsys):
    import keras.src.applications.xception as xception_module

    def offline(fname, origin, *args, **kwargs):
        print(f"Downloading data from {origin}")  # as Keras's get_file says before it fetches
        raise Exception("URL fetch failure: offline")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.setattr(xception_module.file_utils, "get_file", offline)
    run_id, result = run_extract(str(make_folder(tmp_path / "im", corrupt=0)), "auto", 71, 8,
                                 str(tmp_path / "f.h5"), progress=False)
    assert result.weights == "random"
    out, err = capsys.readouterr()
    assert "RANDOM weights" in err and "Downloading data from" in err and out == ""  # notices: stderr
    run = mlflow.get_run(run_id)
    assert run.data.tags[naming.WEIGHTS] == "random"
    assert run.info.status == "FINISHED"
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "features")]
    assert artifacts == ["features/f.h5"]
    fetched = resolve_features(f"runs:/{run_id}/features/f.h5")
    assert sha256_file(fetched) == run.data.tags[naming.FEATURES_SHA] == sha256_file(result.output)
    with pytest.raises(UserError, match="weights imagenet: cannot be loaded"):
        load_backbone("imagenet", 71)


@pytest.mark.parametrize("setup, message", [
    (lambda root: None, "images folder not found"),
    (lambda root: root.mkdir(), "needs exactly 2 class subfolders, found 0"),
    (lambda root: (root / "a").mkdir(parents=True), "found 1"),
    (lambda root: [(root / c).mkdir(parents=True) for c in "abc"], "found 3"),
    (lambda root: [(root / c).mkdir(parents=True) for c in "ab"], "class folder 'a' is empty"),
    (lambda root: make_folder(root, counts=(2, 0), corrupt=0),
     r"class folder 'dogs' holds no JPEG, PNG, GIF, BMP or WebP image \(1 other files\)"),
])
def test_bad_image_folders(tmp_path, setup, message):
    root = tmp_path / "images"
    setup(root)
    with pytest.raises(UserError, match=message):
        extract(str(root), "random", 71, 4, str(tmp_path / "f.h5"), progress=False)
    assert not (tmp_path / "f.h5").exists()


def test_nothing_decodable_writes_nothing(tmp_path, tracking):
    root = tmp_path / "images"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        (root / name / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n then garbage")  # a PNG, cut short
    with pytest.raises(UserError, match="none of the 2 files could be decoded"):
        run_extract(str(root), "random", 71, 4, str(tmp_path / "f.h5"), progress=False)
    assert list(tmp_path.glob("*.h5")) == [] and list(tmp_path.glob(".*tmp")) == []
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED"


@pytest.mark.parametrize("size, message", [("70", "at least 71"), ("big", "must be 'auto'")])
def test_bad_input_size(tmp_path, size, message):
    with pytest.raises(UserError, match=message):
        extract("builtin:digits", "random", size, 4, str(tmp_path / "f.h5"), progress=False)


@pytest.mark.slow
def test_random_weights_repeat(random_backbone):
    """Random-weight features are seeded: two extractions (and every number after) agree."""
    first, _ = random_backbone  # built earlier, in another global random state
    keras.utils.set_random_seed(12345)  # whatever the global state, the backbone is the same
    second, used = load_backbone("random", 71)
    assert used == "random"
    for a, b in zip(first.get_weights(), second.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_interrupt_message_says_what_the_extraction_left(tmp_path):
    """The file at ``--output`` as it was: nothing written; replaced by a whole new one (the
    interrupt came while the run was being finished): said so. Either way the rerun starts over."""
    output = tmp_path / "out.h5"
    args = build_parser().parse_args(["extract", "--images", "builtin:digits", "--output", str(output)])
    assert interrupt_message(args, "Ctrl-C", None) == (
        f"interrupted (Ctrl-C): nothing was written at {output}; rerun to start the extraction over")
    output.write_bytes(b"new")
    assert interrupt_message(args, "terminated by signal 15", None) == (
        f"interrupted (terminated by signal 15): {output} was written whole but its run did not "
        f"finish; rerun to start the extraction over")
    sweep = build_parser().parse_args(["sweep", "--features", "f.h5", "--sweep", "s.yaml"])
    assert interrupt_message(sweep, "Ctrl-C", None) == (
        "interrupted (Ctrl-C): finished trials are kept; rerun the same command to resume")
