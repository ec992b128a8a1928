"""Case discovery never stops at one bad entry: two files for one case, broken links, files that do not follow the
naming, and folders that hold no image at all (each reported on one line, the other cases kept)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from flareseg.cli import main
from flareseg.data.cases import InputFolderError, discover_cases, find_cases, find_images, find_labels
from flareseg.io import Geometry, write_image

GEOMETRY = Geometry(spacing=(2.0, 1.5, 1.5), origin=(0.0,) * 3, direction=tuple(np.eye(3).ravel()), shape=(5, 6, 7))


def _image(path):
    return write_image(path, np.zeros(GEOMETRY.shape, np.int16), GEOMETRY)


def _label(path, value: int = 1):
    label = np.zeros(GEOMETRY.shape, np.uint8)
    label[1:4, 2:5, 2:6] = value
    return write_image(path, label, GEOMETRY)


def test_two_images_for_one_case_skip_that_case_alone(tmp_path):
    _image(tmp_path / "a_0000.nii.gz")
    _image(tmp_path / "a_0000.mha")
    _image(tmp_path / "b_0000.nii.gz")
    found = find_images(tmp_path)
    assert list(found.paths) == ["b"]
    [(case, message)] = found.problems
    assert case == "a" and str(tmp_path / "a_0000.mha") in message and str(tmp_path / "a_0000.nii.gz") in message
    assert "\n" not in message


def test_two_label_maps_or_a_broken_link_skip_that_case_alone(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    for case in ("a", "b", "c", "d"):
        _image(images / f"{case}_0000.nii.gz")
    _label(labels / "a.nii.gz")
    _label(labels / "a.nrrd")
    _label(labels / "b.nii.gz")
    (labels / "c.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    (images / "e_0000.nii.gz").symlink_to(tmp_path / "gone_too.nii.gz")
    _label(labels / "e.nii.gz")
    cases, problems = find_cases(images, labels, None)
    assert [case.case_id for case in cases] == ["b"]
    reasons = dict(problems)
    assert sorted(reasons) == ["a", "c", "d", "e"]  # every case but b, each reported once
    assert str(labels / "a.nii.gz") in reasons["a"] and str(labels / "a.nrrd") in reasons["a"]
    assert reasons["c"] == f"{labels / 'c.nii.gz'}: broken symbolic link to {tmp_path / 'gone.nii.gz'}"
    assert reasons["e"] == f"{images / 'e_0000.nii.gz'}: broken symbolic link to {tmp_path / 'gone_too.nii.gz'}"
    assert "no label map" in reasons["d"]
    found = discover_cases(images, labels, None)  # bad inputs (failures) apart from unpaired cases (skipped)
    assert sorted(case for case, _ in found.invalid) == ["a", "c", "e"] and [c for c, _ in found.unpaired] == ["d"]
    assert list(find_labels(labels).paths) == ["b", "e"]


def test_images_must_carry_the_channel_suffix(tmp_path, caplog):
    _image(tmp_path / "a_0000.nii.gz")
    _image(tmp_path / "a_0001.nii.gz")  # another channel: ignored silently
    _image(tmp_path / "label.nii.gz")  # no channel suffix: ignored, with a warning
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty_folder").mkdir()  # no DICOM series: ignored, with a warning
    with caplog.at_level(logging.WARNING):
        found = find_images(tmp_path)
    assert found.paths == {"a": tmp_path / "a_0000.nii.gz"} and found.problems == []
    warnings = [record.getMessage() for record in caplog.records]
    assert warnings == [
        f"ignored {tmp_path / 'label.nii.gz'}: not named <case>_0000.<ext>",
        f"ignored {tmp_path / 'empty_folder'}: a folder without a readable DICOM series",
    ]


def test_a_folder_without_images_is_an_error_that_says_what_it_holds(tmp_path):
    with pytest.raises(InputFolderError, match="the folder is empty"):
        find_images(tmp_path)
    _label(tmp_path / "label.nii.gz")
    (tmp_path / "series").mkdir()
    with pytest.raises(InputFolderError) as error:
        find_images(tmp_path)
    message = str(error.value)
    assert "1 image file not named <case>_0000.<ext> (label.nii.gz)" in message
    assert "1 sub-folder without a readable DICOM series (series)" in message
    _image(tmp_path / "ct_0001.nii.gz")
    with pytest.raises(InputFolderError, match=r"1 image of another channel than _0000 \(ct_0001.nii.gz\)"):
        find_images(tmp_path)
    with pytest.raises(NotADirectoryError, match="pass the folder that holds it"):
        find_images(tmp_path / "label.nii.gz")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        find_images(tmp_path / "missing")


def test_a_dicom_series_folder_passed_itself_asks_for_its_parent(shared_data, tmp_path, caplog):
    with pytest.raises(InputFolderError, match="holds a DICOM series itself; pass its parent folder"):
        find_images(shared_data / "ct_dicom_20sl" / "dicom")
    # its parent: the series sub-folder is a case (no _0000 needed), label.nii.gz beside it is not segmented
    with caplog.at_level(logging.WARNING):
        found = find_images(shared_data / "ct_dicom_20sl")
    assert found.paths == {"dicom": shared_data / "ct_dicom_20sl" / "dicom"}
    assert any("label.nii.gz: not named <case>_0000" in record.getMessage() for record in caplog.records)


def test_prepare_with_no_image_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    _image(tmp_path / "images" / "a.nii.gz")  # not named a_0000
    argv = ["prepare", "-i", str(tmp_path / "images"), "-l", str(tmp_path / "labels"), "-o", str(tmp_path / "out")]
    assert main([*argv, "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no image found" in err[0] and "a.nii.gz" in err[0], err


def test_evaluate_fails_only_the_cases_with_two_files_or_a_broken_link(tmp_path, capsys):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for case in ("a", "b", "c"):
        _label(gt / f"{case}.nii.gz")
    _label(pred / "a.nii.gz")
    _label(pred / "b.nii.gz")
    _label(pred / "b.mha")  # which one is meant is unknown
    (pred / "c.nii.gz").symlink_to(tmp_path / "gone.nii.gz")  # once scored silently as an empty prediction
    out = tmp_path / "scores.csv"
    argv = ["evaluate", "--gt", str(gt), "--pred", str(pred), "--out", str(out), "--preset", "flare21"]
    assert main([*argv, "--workers", "1"]) == 1
    summary = json.loads(out.with_suffix(".json").read_text())
    assert sorted(summary["failures"]) == ["b", "c"] and summary["missing_predictions"] == []
    assert "broken symbolic link" in summary["failures"]["c"] and str(pred / "b.mha") in summary["failures"]["b"]
    assert summary["cases"] == 1  # case a was scored
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "failed: b" in line]) == 1
