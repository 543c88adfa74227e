"""Feature extraction on images the tests make: folders, builtin digits, weights, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from PIL import Image

from pipeline import naming
from pipeline.cli import build_parser, interrupt_message
from pipeline.errors import UserError
from pipeline.extract import extract, load_backbone, run_extract
from pipeline.features import read_features, resolve_features, sha256_file
from pipeline.sources import digits_source

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root, counts=(4, 3), corrupt=1, size=80):
    """root/cats and root/dogs with small random PNGs, plus ``corrupt`` undecodable .jpg files
    and a text file in dogs."""
    rng = np.random.default_rng(0)
    for label, (name, n) in enumerate(zip(("cats", "dogs"), counts, strict=True)):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 255, size=(size, size + 10 * label, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    for i in range(corrupt):
        (root / "dogs" / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "dogs" / "notes.txt").write_text("not an image: skipped and listed")
    return root


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


def test_every_file_is_decoded_or_listed_as_skipped(tmp_path, tracking):
    """Whatever their extension: WebP and a PNG named .jpeg are decoded; TIFF, text, an empty
    file and a hidden one are counted and listed in ``skipped_images.txt``."""
    root = make_folder(tmp_path / "images", counts=(2, 2), corrupt=0)
    pixels = np.random.default_rng(1).integers(0, 255, size=(80, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "cats" / "photo.webp")
    Image.fromarray(pixels).save(root / "dogs" / "png-inside.jpeg", format="PNG")
    Image.fromarray(pixels).save(root / "dogs" / "scan.tiff")
    (root / "cats" / "empty.jpg").write_bytes(b"")
    (root / "cats" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    run_id, result = run_extract(str(root), "random", 71, 4, str(tmp_path / "f.h5"), progress=False)
    skipped = ["cats/.DS_Store", "cats/empty.jpg", "dogs/notes.txt", "dogs/scan.tiff"]
    assert [str(Path(p).relative_to(root)) for p in result.skipped] == skipped
    assert result.n_images == 6 and read_features(result.output).y.tolist() == [0, 0, 0, 1, 1, 1]
    client = mlflow.MlflowClient()
    assert client.get_run(run_id).data.metrics["n_skipped"] == 4
    listed = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="skipped_images.txt"))
    assert [str(Path(p).relative_to(root)) for p in listed.read_text().splitlines()] == skipped


def test_features_match_a_direct_forward_pass(tmp_path):
    """The tf.data pipeline feeds Xception exactly what a direct call on the same pixels sees."""
    import tensorflow as tf

    model, _ = load_backbone("random", 71)
    weights = tmp_path / "x.weights.h5"
    model.save_weights(weights)
    source = digits_source()
    result = extract("builtin:digits", str(weights), "auto", 64, str(tmp_path / "d.h5"),
                     progress=False)
    features = read_features(result.output)
    assert features.class_names == ["3", "8"] and 0.4 < features.y.mean() < 0.6
    np.testing.assert_array_equal(features.y, source.labels)
    pixels = tf.image.resize(source.pixels[:40], (71, 71))
    direct = model.predict(keras.applications.xception.preprocess_input(pixels), verbose=0)
    np.testing.assert_allclose(features.x[:40], direct, rtol=1e-4, atol=1e-7)


def test_weights_file_is_loaded_and_recorded(tmp_path):
    model, _ = load_backbone("random", 71)
    path = tmp_path / "xception.weights.h5"
    model.save_weights(path)
    loaded, used = load_backbone(str(path), 71)
    assert used.startswith("file:xception.weights.h5 sha256:")
    for a, b in zip(model.get_weights()[:3], loaded.get_weights()[:3], strict=True):
        np.testing.assert_array_equal(a, b)


def test_auto_falls_back_to_random_loudly(tmp_path, tracking, monkeypatch, capsys):
    import keras.src.applications.xception as xception_module

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: offline")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.setattr(xception_module.file_utils, "get_file", offline)
    run_id, result = run_extract(str(make_folder(tmp_path / "im", corrupt=0)), "auto", 71, 8,
                                 str(tmp_path / "f.h5"), progress=False)
    assert result.weights == "random"
    assert "RANDOM weights" in capsys.readouterr().err
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


def test_random_weights_repeat():
    """Random-weight features are seeded: two extractions (and every number after) agree."""
    first, _ = load_backbone("random", 71)
    keras.utils.set_random_seed(12345)  # whatever the global state, the backbone is the same
    second, used = load_backbone("random", 71)
    assert used == "random"
    for a, b in zip(first.get_weights(), second.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_ctrl_c_during_extraction_says_nothing_was_written(tmp_path):
    """Ctrl-C in the middle of ``python -m pipeline extract``: exit 130, one line saying that
    nothing was written and the rerun starts over, no file (not even a temporary one), and the
    run KILLED."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "extract", "--images", "builtin:digits",
                                "--weights", "random", "--batch_size", "1", "--output", "out.h5"],
                               cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:  # the stage's first line: the images are being extracted
        lines.append(line)
        if line.startswith("extract: 357 images to go"):
            break
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    lines += process.stderr.readlines()
    assert process.wait(timeout=120) == 130, lines
    assert lines[-1] == ("interrupted (Ctrl-C): nothing was written at out.h5; rerun to start the "
                         "extraction over\n"), lines
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "mlruns") == ["mlflow.db"]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
        assert run.info.status == "KILLED"
    finally:
        mlflow.set_tracking_uri(None)


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
