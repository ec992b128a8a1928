"""Partial labels + pseudo-labels (FLARE23): the fusion rules, then `flareseg pseudo-label` end to end with a tiny
trained teacher and with a stand-in teacher that knows the full labels."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from flareseg.cli import main
from flareseg.config import ConfigError
from flareseg.config.schema import PredictConfig
from flareseg.data.phantom import make_phantom, phantom_case_seed, write_phantom_dataset
from flareseg.io import read_image, write_image
from flareseg.semi import fuse_labels, pseudo_label_folder, read_annotated_file
from flareseg.semi import pseudo_label as pseudo_label_module
from tests.tiny import prepare_tiny, train_tiny

SHAPE = (32, 48, 48)


# --- fusion rules ------------------------------------------------------------------------------------------------


def test_annotated_voxels_win_over_the_pseudo_labels():
    partial = np.array([[[1, 1, 2, 0]]], np.uint8)
    pseudo = np.array([[[3, 4, 3, 3]]], np.uint8)
    fused = fuse_labels(partial, [1, 2], pseudo)
    assert fused.dtype == np.uint8 and fused.shape == partial.shape
    assert fused.tolist() == [[[1, 1, 2, 3]]]


def test_pseudo_labels_fill_only_unannotated_organs():
    partial = np.zeros((1, 1, 5), np.uint8)
    pseudo = np.array([[[0, 1, 2, 3, 4]]], np.uint8)
    assert fuse_labels(partial, [2, 4], pseudo).tolist() == [[[0, 1, 0, 3, 0]]]


def test_pseudo_labels_of_annotated_organs_are_ignored_also_on_background():
    partial = np.array([[[0, 0, 1, 1]], [[0, 0, 0, 0]]], np.uint8)
    pseudo = np.array([[[1, 1, 1, 2]], [[1, 2, 0, 2]]], np.uint8)
    # organ 1 is annotated: where the case says background the teacher's organ 1 is not added
    fused = fuse_labels(partial, [1], pseudo)
    assert fused.tolist() == [[[0, 0, 1, 1]], [[0, 2, 0, 2]]]
    assert ((fused == 1) == (partial == 1)).all()


def test_labels_outside_the_annotated_list_are_dropped_or_refilled():
    partial = np.array([[[5, 5, 5, 1]]], np.uint8)  # 5 is present but not listed as annotated
    pseudo = np.array([[[0, 5, 3, 5]]], np.uint8)
    assert fuse_labels(partial, [1], pseudo).tolist() == [[[0, 5, 3, 1]]]
    # and an empty list: the teacher fills everything
    assert fuse_labels(partial, [], pseudo).tolist() == [[[0, 5, 3, 5]]]


def test_fusion_accepts_other_integer_dtypes_and_checks_its_inputs():
    partial = np.array([[[1, 0]]], np.int16)
    pseudo = np.array([[[2, 2]]], np.float32)
    assert fuse_labels(partial, [np.int64(1)], pseudo).tolist() == [[[1, 2]]]
    with pytest.raises(ValueError, match="same shape"):
        fuse_labels(np.zeros((2, 3, 4), np.uint8), [1], np.zeros((2, 3, 5), np.uint8))
    with pytest.raises(ValueError, match="outside 0..255"):
        fuse_labels(np.full((1, 1, 2), 300, np.int16), [1], np.zeros((1, 1, 2), np.uint8))
    with pytest.raises(ValueError, match="non-integer"):
        fuse_labels(np.zeros((1, 1, 2), np.uint8), [1], np.full((1, 1, 2), 0.5, np.float32))
    with pytest.raises(ValueError, match="annotated label ids"):
        fuse_labels(np.zeros((1, 1, 2), np.uint8), [256], np.zeros((1, 1, 2), np.uint8))


# --- end to end with a trained teacher ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> tuple[Path, Path]:
    """Coarse and fine checkpoints of the 13 FLARE organs, trained a few steps on partial labels."""
    root = tmp_path_factory.mktemp("teacher")
    write_phantom_dataset(root / "raw", 3, seed=2, shape=SHAPE, partial=True)
    data = prepare_tiny(
        root / "raw", root / "data", "prepare.annotation=present", "prepare.folds=1", "prepare.workers=1"
    )
    return train_tiny(data, root / "coarse", "coarse"), train_tiny(data, root / "fine", "fine")


def test_cli_fills_partial_labels_and_reports_a_bad_case(teacher, tmp_path, capsys):
    raw = tmp_path / "raw"
    cases = write_phantom_dataset(raw, 3, seed=11, shape=SHAPE, partial=True)
    original = json.loads((raw / "labelsTr" / "annotated.json").read_text())
    # a case whose label map is on another grid, and an image without a label map
    bad = make_phantom(3, shape=(24, 32, 32), partial=True)
    write_image(raw / "imagesTr" / "bad_0000.nii.gz", bad.image, bad.geometry)
    cropped = bad.label[:-2]
    write_image(raw / "labelsTr" / "bad.nii.gz", cropped, dataclasses.replace(bad.geometry, shape=cropped.shape))
    write_image(raw / "imagesTr" / "lonely_0000.nii.gz", bad.image, bad.geometry)
    (raw / "labelsTr" / "annotated.json").write_text(json.dumps({**original, "bad": list(bad.annotated)}))

    args = ["pseudo-label", "-i", str(raw / "imagesTr"), "-l", str(raw / "labelsTr"), "-o", str(tmp_path / "out")]
    coarse, fine = teacher
    args += ["--coarse", str(coarse), "--fine", str(fine), "--device", "cpu", "-q"]
    args += ["--set", "predict.coarse_min_volume_mm3=0", "--set", "predict.fine_min_volume_mm3=0"]
    # PyTorch spares two OpenVINO exports (~10 s); the default backend is tested in test_backends.py
    assert main([*args, "--set", "predict.backend=torch"]) == 1

    err = capsys.readouterr().err.splitlines()
    assert len([line for line in err if "bad.nii.gz" in line and "label grid does not match" in line]) == 1, err
    assert len([line for line in err if "lonely_0000" in line and "no label map" in line]) == 1, err
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{case}.nii.gz" for case in cases]
    written = json.loads((out / "annotated.json").read_text())
    assert sorted(written) == cases
    for case in cases:
        _, image_geometry = read_image(raw / "imagesTr" / f"{case}_0000.nii.gz")
        partial, _ = read_image(raw / "labelsTr" / f"{case}.nii.gz")
        fused, geometry = read_image(out / f"{case}.nii.gz")
        assert geometry == image_geometry and fused.dtype == np.uint8
        own = original[case]
        kept = np.isin(partial, own)
        assert (fused[kept] == partial[kept]).all()  # every annotated voxel unchanged
        for organ in own:  # the teacher added no voxel of an annotated organ
            assert ((fused == organ) == (partial == organ)).all(), (case, organ)
        assert set(written[case]) >= set(own)
        assert set(np.unique(fused)) - {0} <= set(written[case])
    rows = {row["case"]: row for row in csv.DictReader(open(out / "pseudo_label.csv"))}
    assert {case: row["status"] for case, row in rows.items()} == {
        **{case: "ok" for case in cases},
        "bad": "failed",
        "lonely": "skipped",
    }
    assert "label grid does not match" in rows["bad"]["message"]


# --- a stand-in teacher that knows the full labels ----------------------------------------------------------------


class _OracleTeacher:
    """Returns the full (not partial) label of each phantom, found by the image's bytes; can be told to fail."""

    full: dict[str, np.ndarray] = {}
    calls = 0

    def __init__(self, settings: PredictConfig):
        self.settings = settings

    def predict_array(self, image, geometry, timings=None):
        type(self).calls += 1
        key = hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()
        if key not in self.full:
            raise RuntimeError("the teacher ran out of memory")
        return self.full[key]


@pytest.fixture
def oracle(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    cases = write_phantom_dataset(raw, 3, seed=4, shape=(24, 40, 40), partial=True)
    full = {}
    for index, case in enumerate(cases):
        phantom = make_phantom(phantom_case_seed(4, index), shape=(24, 40, 40))
        full[case] = phantom.label
        _OracleTeacher.full[hashlib.sha256(phantom.image.tobytes()).hexdigest()] = phantom.label
    _OracleTeacher.calls = 0
    monkeypatch.setattr(pseudo_label_module, "Predictor", _OracleTeacher)
    return raw, cases, full


def test_a_perfect_teacher_restores_the_full_labels(oracle, tmp_path):
    raw, cases, full = oracle
    annotated = read_annotated_file(raw / "labelsTr" / "annotated.json")
    summary = pseudo_label_folder(raw / "imagesTr", raw / "labelsTr", tmp_path / "out", PredictConfig(), annotated)
    assert summary.ok and summary.exit_code == 0 and summary.written == cases
    written = json.loads((tmp_path / "out" / "annotated.json").read_text())
    for case in cases:
        fused, _ = read_image(tmp_path / "out" / f"{case}.nii.gz")
        assert np.array_equal(fused, full[case])
        present = sorted(int(v) for v in np.unique(full[case]) if v)
        assert summary.filled[case] == [v for v in present if v not in annotated[case]]
        assert summary.filled[case]  # partial phantoms lack at least one organ
        assert written[case] == sorted(set(annotated[case]) | set(present))


def test_unlisted_cases_are_copied_and_unlisted_ids_refilled(oracle, tmp_path):
    raw, cases, full = oracle
    annotated = read_annotated_file(raw / "labelsTr" / "annotated.json")
    partial, _ = read_image(raw / "labelsTr" / f"{cases[1]}.nii.gz")
    unlisted = annotated[cases[1]][:1]
    listed = {cases[1]: annotated[cases[1]][1:] or [], cases[2]: annotated[cases[2]]}  # cases[0] is not listed
    summary = pseudo_label_folder(raw / "imagesTr", raw / "labelsTr", tmp_path / "out", PredictConfig(), listed, False)
    assert summary.ok and _OracleTeacher.calls == 2  # no teacher for the unlisted case
    copied, _ = read_image(tmp_path / "out" / f"{cases[0]}.nii.gz")
    original, _ = read_image(raw / "labelsTr" / f"{cases[0]}.nii.gz")
    assert np.array_equal(copied, original)
    assert summary.annotated[cases[0]] == sorted(int(v) for v in np.unique(original) if v)
    assert summary.filled[cases[0]] == []
    # the id present in the map but not listed is taken from the teacher: the full label again
    refilled, _ = read_image(tmp_path / "out" / f"{cases[1]}.nii.gz")
    assert np.array_equal(refilled, full[cases[1]]) and set(unlisted) <= set(summary.filled[cases[1]])
    assert (partial == unlisted[0]).any()
    rows = {row["case"]: row for row in csv.DictReader(open(tmp_path / "out" / "pseudo_label.csv"))}
    assert "not listed" in rows[cases[0]]["message"] and "replaced by the teacher" in rows[cases[1]]["message"]


def test_a_teacher_failure_is_reported_and_removes_a_stale_output(oracle, tmp_path, capsys):
    raw, cases, _ = oracle
    annotated = read_annotated_file(raw / "labelsTr" / "annotated.json")
    other = make_phantom(9, shape=(20, 32, 32), partial=True)  # unknown to the teacher: it fails
    write_image(raw / "imagesTr" / "odd_0000.nii.gz", other.image, other.geometry)
    write_image(raw / "labelsTr" / "odd.nii.gz", other.label, other.geometry)
    out = tmp_path / "out"
    write_image(out / "odd.nii.gz", other.label, other.geometry)  # from an earlier run
    annotated["odd"] = list(other.annotated)
    summary = pseudo_label_folder(raw / "imagesTr", raw / "labelsTr", out, PredictConfig(), annotated, False)
    assert summary.exit_code == 1 and [case for case, _ in summary.failed] == ["odd"]
    assert "odd_0000.nii.gz: RuntimeError: the teacher ran out of memory" in capsys.readouterr().err
    assert not (out / "odd.nii.gz").exists() and "odd" not in json.loads((out / "annotated.json").read_text())
    assert summary.written == cases


def test_bad_arguments(oracle, tmp_path):
    raw, _, _ = oracle
    with pytest.raises(ConfigError, match="must differ"):
        pseudo_label_folder(raw / "imagesTr", raw / "labelsTr", raw / "labelsTr", PredictConfig(), None)
    (tmp_path / "bad.json").write_text(json.dumps({"case": [0, 1]}))
    with pytest.raises(ConfigError, match="between 1 and 255"):
        read_annotated_file(tmp_path / "bad.json")
    missing = ["pseudo-label", "-i", str(raw / "imagesTr"), "-l", str(raw / "labelsTr"), "-o", str(tmp_path / "o")]
    assert main([*missing, "--annotated", str(tmp_path / "nope.json"), "-q"]) == 2
