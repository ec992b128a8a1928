"""Reliable unlabeled-image filtering (UIF): scores, ranking, selection, and the select-unlabeled command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from flareseg.cli import main
from flareseg.data.phantom import make_phantom, write_phantom_dataset
from flareseg.io import write_image
from flareseg.semi.reliability import label_dice, reliability, select
from tests.tiny import LABELS, LIVER_KIDNEY_SPLEEN, prepare_tiny, train_tiny


def test_a_corrupted_prediction_set_is_less_reliable():
    final = make_phantom(0, shape=(32, 48, 48), orientation="identity").label
    final = np.where(np.isin(final, [1, 3]), final, 0).astype(np.uint8)  # liver and spleen
    close = [np.roll(final, 1, axis=2), final.copy()]
    eroded = np.where(ndimage.binary_erosion(final > 0, iterations=2), final, 0).astype(np.uint8)
    swapped = np.where(final == 1, 3, np.where(final == 3, 1, 0)).astype(np.uint8)
    corrupted = [eroded, swapped]
    good, bad = reliability(close, final, [1, 3]), reliability(corrupted, final, [1, 3])
    assert 0.8 < good <= 1.0 and bad < 0.5 and good > bad
    assert reliability([final], final, [1, 3]) == 1.0 and label_dice(final, final * 0, 1) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        reliability([], final, [1])


def test_selection_threshold_order_top_and_expected_labels():
    scores = {"a": 0.95, "b": 0.99, "c": 0.5, "d": 0.97}
    missing = {"d": [2]}
    assert select(scores, missing, threshold=0.9, top=None) == ["b", "a"]
    assert select(scores, {}, threshold=0.9, top=2) == ["b", "d"]
    assert select(scores, {}, threshold=0.0, top=None) == ["b", "d", "a", "c"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uif")
    write_phantom_dataset(root / "raw", 3, seed=4, shape=(32, 48, 48), unlabeled=2)
    data = prepare_tiny(root / "raw", root / "data", *LIVER_KIDNEY_SPLEEN, "prepare.folds=1")
    train_tiny(data, root / "coarse", "coarse", LABELS)
    train_tiny(data, root / "fine", "fine", LABELS, "train.epochs=3", "train.keep_every=1")
    return root


def test_training_keeps_intermediate_checkpoints(run):
    kept = sorted(p.name for p in (run / "fine").glob("checkpoint_epoch_*.pt"))
    assert kept == ["checkpoint_epoch_0001.pt", "checkpoint_epoch_0002.pt", "checkpoint_epoch_0003.pt"]


def test_select_unlabeled_command(run, tmp_path):
    images = run / "raw" / "unlabeled"
    broken = tmp_path / "images"
    broken.mkdir()
    for path in images.iterdir():
        (broken / path.name).symlink_to(path)
    (broken / "bad_0000.nii.gz").write_bytes(b"\x1f\x8b" + b"x" * 40)
    out = tmp_path / "selected.json"
    args = [
        "select-unlabeled",
        "-i",
        str(broken),
        "-o",
        str(out),
        "-q",
        "--coarse",
        str(run / "coarse" / "checkpoint_latest.pt"),
        "--fine",
        str(run / "fine" / "checkpoint_epoch_0003.pt"),
        "--intermediate",
        str(run / "fine" / "checkpoint_epoch_0001.pt"),
        str(run / "fine" / "checkpoint_epoch_0002.pt"),
        "--threshold",
        "0.0",
        "--expected",
        "1",
        # four checkpoints: PyTorch spares four OpenVINO exports (~20 s); the default backend is tested elsewhere
        "--set",
        "predict.backend=torch",
    ]
    assert main(args) == 1  # the broken image is reported
    result = json.loads(out.read_text())
    assert sorted(result["scores"]) == ["phantom_003", "phantom_004"] and "bad" in result["failed"]
    assert all(0.0 <= score <= 1.0 for score in result["scores"].values())
    scores = list(result["scores"].values())
    assert scores == sorted(scores, reverse=True)
    expected_selection = [c for c in result["scores"] if c not in result["missing_labels"]]
    assert result["selected"] == expected_selection
    # The final checkpoint compared with itself is perfectly reliable.
    same = [*args[:11], str(run / "fine" / "checkpoint_epoch_0003.pt"), "--threshold", "0.99", *args[-2:]]
    write_image(tmp_path / "one" / "case_0000.nii.gz", *_image(images))
    same[2] = str(tmp_path / "one")
    assert main(same) == 0
    assert json.loads(out.read_text())["scores"] == {"case": 1.0}


def _image(folder: Path):
    from flareseg.io import read_image

    return read_image(sorted(folder.iterdir())[0])
