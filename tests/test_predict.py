"""Inference: geometry round trips (phantoms with oblique directions, real NIfTI and DICOM), bad inputs, atomic
writes, empty results, the CSV, predict.sh, and post-processing."""

from __future__ import annotations

import csv
import gzip
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from flareseg.checkpoint import load_checkpoint, save_checkpoint
from flareseg.cli import main
from flareseg.data.crop import Box
from flareseg.data.phantom import make_phantom, write_phantom_dataset
from flareseg.inference.postprocess import (
    EVERY_COMPONENT,
    EVERY_LARGE_COMPONENT,
    box_to_source,
    foreground_box,
    keep_components,
)
from flareseg.io import read_image, write_image

REPO = Path(__file__).resolve().parents[1]


def _predict(checkpoints, input_dir: Path, output_dir: Path, *extra: str) -> int:
    coarse, fine = checkpoints
    return main(
        [
            "predict",
            "-i",
            str(input_dir),
            "-o",
            str(output_dir),
            "--coarse",
            str(coarse),
            "--fine",
            str(fine),
            "-q",
            "--set",
            "predict.coarse_min_volume_mm3=0",
            *extra,
        ]
    )


def _assert_same_header(output: Path, geometry, exact: bool) -> None:
    label, written = read_image(output)
    assert label.dtype == np.uint8 and written.shape == geometry.shape
    if exact:
        assert written == geometry
    else:  # NIfTI stores an oblique direction as a float32 quaternion: equal to float32 precision
        assert written.spacing == pytest.approx(geometry.spacing, abs=1e-6)
        assert written.origin == pytest.approx(geometry.origin, abs=1e-4)
        assert written.direction == pytest.approx(geometry.direction, abs=1e-6)


@pytest.mark.parametrize("orientation", ["identity", "ras", "random", "oblique"])
@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd"])
def test_output_keeps_the_input_geometry(checkpoints, tmp_path, orientation, suffix):
    phantom = make_phantom(5, shape=(28, 40, 44), orientation=orientation)
    write_image(tmp_path / "in" / f"case_0000{suffix}", phantom.image, phantom.geometry)
    assert _predict(checkpoints, tmp_path / "in", tmp_path / "out") == 0
    _, geometry = read_image(tmp_path / "in" / f"case_0000{suffix}")
    _assert_same_header(
        tmp_path / "out" / f"case{suffix}", geometry, exact=not (suffix == ".nii.gz" and orientation == "oblique")
    )


def test_real_nifti_and_dicom_series(checkpoints, tmp_path, shared_data):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "abdomen_0000.nii.gz").symlink_to(shared_data / "ct_abdomen_30sl" / "case_0000.nii.gz")
    (inputs / "series").symlink_to(shared_data / "ct_dicom_20sl" / "dicom")
    assert _predict(checkpoints, inputs, tmp_path / "out") == 0
    for source, output in (("abdomen_0000.nii.gz", "abdomen.nii.gz"), ("series", "series.nii.gz")):
        _, geometry = read_image(inputs / source)
        _assert_same_header(tmp_path / "out" / output, geometry, exact=True)


def test_bad_inputs_are_reported_and_the_others_predicted(checkpoints, tmp_path, capsys):
    inputs = tmp_path / "in"
    phantom = make_phantom(1, shape=(24, 32, 32), orientation="identity")
    good = write_image(inputs / "good_0000.nii.gz", phantom.image, phantom.geometry)
    (inputs / "corrupt_0000.nii.gz").write_bytes(b"\x1f\x8b" + b"junk" * 40)
    (inputs / "truncated_0000.nii.gz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (inputs / "text_0000.nii").write_text("not an image\n" * 40)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 20), np.int16)), str(inputs / "flat_0000.nii.gz"))
    sitk.WriteImage(
        sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16))] * 2), str(inputs / "fourd_0000.nii.gz")
    )
    nan = phantom.image.astype(np.float32)
    nan[2, 3, 4] = np.nan
    write_image(inputs / "nan_0000.mha", nan, phantom.geometry)
    zero = inputs / "zero_0000.nii.gz"
    write_image(zero, phantom.image, phantom.geometry)
    raw = bytearray(gzip.decompress(zero.read_bytes()))
    raw[80:84] = np.float32(0.0).tobytes()  # pixdim[1]: x spacing 0
    zero.write_bytes(gzip.compress(bytes(raw)))

    assert _predict(checkpoints, inputs, tmp_path / "out") == 1
    err = capsys.readouterr().err
    reasons = {
        "corrupt": "cannot be read",
        "truncated": "truncated",
        "text": "cannot be read",
        "flat": "expected a 3D volume",
        "fourd": "expected a 3D volume",
        "nan": "NaN",
        "zero": "zero or non-finite voxel spacing",
    }
    for case, reason in reasons.items():
        assert len([line for line in err.splitlines() if f"{case}_0000" in line and reason in line]) == 1, (case, err)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii*")) == ["good.nii.gz"]
    rows = {row["case"]: row for row in csv.DictReader(open(tmp_path / "out" / "timing.csv"))}
    assert rows["good"]["status"] == "ok" and float(rows["good"]["seconds"]) > 0
    assert float(rows["good"]["peak_rss_mb"]) > 50 and float(rows["good"]["coarse"]) > 0
    assert all(rows[case]["status"] == "failed" and rows[case]["message"] for case in reasons)


def test_a_crash_while_writing_leaves_no_output(checkpoints, tmp_path, monkeypatch):
    phantom = make_phantom(1, shape=(24, 32, 32))
    write_image(tmp_path / "in" / "case_0000.nii.gz", phantom.image, phantom.geometry)

    def crash(image, path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", crash)
    assert _predict(checkpoints, tmp_path / "in", tmp_path / "out") == 1
    assert [p.name for p in (tmp_path / "out").iterdir() if "case" in p.name] == []


def test_an_empty_coarse_result_gives_an_empty_valid_output(checkpoints, tmp_path):
    state = load_checkpoint(checkpoints[0])
    state["model"]["head.weight"].zero_()  # every logit 0: no voxel above sigmoid 0.5
    save_checkpoint(tmp_path / "silent.pt", state)
    phantom = make_phantom(3, shape=(24, 32, 32), orientation="random")
    write_image(tmp_path / "in" / "case_0000.nii.gz", phantom.image, phantom.geometry)
    assert (
        main(
            [
                "predict",
                "-i",
                str(tmp_path / "in"),
                "-o",
                str(tmp_path / "out"),
                "-q",
                "--coarse",
                str(tmp_path / "silent.pt"),
                "--fine",
                str(checkpoints[1]),
            ]
        )
        == 0
    )
    label, geometry = read_image(tmp_path / "out" / "case.nii.gz")
    assert geometry.shape == phantom.geometry.shape and not label.any()


def test_predict_sh(checkpoints, tmp_path):
    phantom = make_phantom(4, shape=(24, 32, 32))
    write_image(tmp_path / "in" / "case_0000.nii.gz", phantom.image, phantom.geometry)
    result = subprocess.run(
        [
            "sh",
            str(REPO / "predict.sh"),
            str(tmp_path / "in"),
            str(tmp_path / "out"),
            "--set",
            f"predict.coarse={checkpoints[0]}",
            "--set",
            f"predict.fine={checkpoints[1]}",
            "-q",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "case.nii.gz").is_file() and (tmp_path / "out" / "config.yaml").is_file()
    usage = subprocess.run(["sh", str(REPO / "predict.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_keep_components_keeps_the_largest_and_big_enough_others():
    label = np.zeros((20, 20, 20), np.uint8)
    label[1:6, 1:6, 1:6] = 1  # 125 voxels
    label[10:12, 10:12, 10:12] = 1  # 8 voxels
    label[15:19, 15:19, 15:19] = 1  # 64 voxels
    label[1:3, 15:17, 1:3] = 2  # a small organ: one component of 8 voxels
    one = keep_components(label.copy(), (1.0, 1.0, 1.0), min_volume_mm3=50, keep=1)
    assert (one == 1).sum() == 125 and (one == 2).sum() == 8  # the small organ's largest part survives
    two = keep_components(label.copy(), (1.0, 1.0, 1.0), min_volume_mm3=50, keep=3)
    assert (two == 1).sum() == 125 + 64  # the 8-voxel part is below 50 mm^3
    assert foreground_box(two) == Box((1, 1, 1), (19, 19, 19)) and foreground_box(np.zeros_like(label)) is None
    # Per-label overrides: two components of label 1 (e.g. merged kidneys) while others keep one.
    label[10:12, 1:3, 10:12] = 2  # a second, 8-voxel part of label 2
    per_label = keep_components(label.copy(), (1.0, 1.0, 1.0), min_volume_mm3=0, keep=1, keep_per_label={1: 2})
    assert (per_label == 1).sum() == 125 + 64 and (per_label == 2).sum() == 8
    # The two named counts without a limit: every component above the minimum volume, or every component.
    label[15:17, 1:3, 15:17] = 1  # a fourth part of label 1, 8 voxels
    large = keep_components(label.copy(), (1.0, 1.0, 1.0), 50, keep=1, keep_per_label={1: EVERY_LARGE_COMPONENT})
    assert (large == 1).sum() == 125 + 64
    every = keep_components(label.copy(), (1.0, 1.0, 1.0), 50, keep=1, keep_per_label={1: EVERY_COMPONENT})
    assert (every == 1).sum() == 125 + 8 + 64 + 8


def test_box_to_source_covers_the_resampled_box():
    box = box_to_source(Box((1, 2, 3), (5, 6, 7)), size=(10, 10, 10), shape=(19, 37, 10))
    assert box == Box((2, 8, 3), (9, 21, 7))


def test_png_overlays(checkpoints, tmp_path):
    phantom = make_phantom(6, shape=(24, 40, 40), orientation="random")
    write_image(tmp_path / "in" / "case_0000.nii.gz", phantom.image, phantom.geometry)
    assert _predict(checkpoints, tmp_path / "in", tmp_path / "out", "--png") == 0
    picture = tmp_path / "out" / "case.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_image(tmp_path / "gt.nii.gz", phantom.label, phantom.geometry)
    args = [
        "overlay",
        "--image",
        str(tmp_path / "in" / "case_0000.nii.gz"),
        "--label",
        str(tmp_path / "out" / "case.nii.gz"),
        "--gt",
        str(tmp_path / "gt.nii.gz"),
        "-o",
        str(tmp_path / "overlay.png"),
    ]
    assert main(args) == 0
    import matplotlib.image

    pixels = matplotlib.image.imread(tmp_path / "overlay.png")
    assert pixels.shape[0] > 200 and pixels.shape[1] > 400
    # Contours are drawn in colour on a grey image: some pixels are far from grey.
    rgb = pixels[..., :3]
    assert (rgb.max(-1) - rgb.min(-1) > 0.3).sum() > 50
    wrong = make_phantom(6, shape=(20, 40, 40))
    write_image(tmp_path / "other.nii.gz", wrong.label, wrong.geometry)
    assert main([*args[:3], "--label", str(tmp_path / "other.nii.gz"), "-o", str(tmp_path / "x.png")]) == 2


def test_end_to_end_predict_then_evaluate(checkpoints, tmp_path):
    cases = write_phantom_dataset(tmp_path / "raw", 2, seed=8, shape=(28, 44, 44))
    assert _predict(checkpoints, tmp_path / "raw" / "imagesTr", tmp_path / "pred") == 0
    out = tmp_path / "scores.csv"
    assert (
        main(
            [
                "evaluate",
                "--gt",
                str(tmp_path / "raw" / "labelsTr"),
                "--pred",
                str(tmp_path / "pred"),
                "--out",
                str(out),
                "--preset",
                "flare21",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(open(out)))
    assert sorted({row["case"] for row in rows}) == cases and len(rows) == 4 * len(cases)
    assert all(0.0 <= float(row["dsc"]) <= 1.0 and 0.0 <= float(row["nsd"]) <= 1.0 for row in rows)
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["cases"] == 2 and summary["failures"] == {} and 0.0 <= summary["mean"]["dsc"] <= 1.0
    assert set(summary["organs"]) == {"liver", "kidney", "spleen", "pancreas"}
