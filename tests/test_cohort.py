"""Clinical outputs and cohort prediction: per-label statistics against a direct numpy computation, label subsets,
resumable and sharded folder prediction with reading and writing overlapped, and `flareseg.segment`."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

import flareseg
from flareseg.cli import main
from flareseg.config import load_config
from flareseg.data.phantom import make_phantom
from flareseg.inference.statistics import label_statistics
from flareseg.io import Geometry, read_image, write_image
from tests.conftest import oblique_direction


# ---------------------------------------------------------------- statistics
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_statistics_match_a_direct_numpy_computation(dtype):
    rng = np.random.default_rng(3)
    image = rng.integers(-1000, 1500, size=(17, 23, 29)).astype(dtype)
    if dtype == np.float32:
        image += rng.random(image.shape, dtype=np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[2:9, 3:15, 4:20] = 1
    label[10:16, 1:5, 20:28] = 3
    label[5, 20, 1] = 7  # one voxel
    geometry = Geometry((2.5, 0.7, 0.9), (-10.0, 20.0, 5.5), tuple(oblique_direction().ravel()), image.shape)
    names = ["liver", "kidney", "spleen"]
    figures = label_statistics(label, image, geometry, names)
    assert list(figures) == ["liver", "spleen", "label_7"]
    for name, value in (("liver", 1), ("spleen", 3), ("label_7", 7)):
        mask = label == value
        hu = image[mask].astype(np.float64)
        stats = figures[name]
        assert stats["label"] == value and stats["voxels"] == mask.sum()
        assert stats["volume_ml"] == pytest.approx(mask.sum() * 2.5 * 0.7 * 0.9 / 1000)
        assert stats["hu_mean"] == pytest.approx(hu.mean()) and stats["hu_std"] == pytest.approx(hu.std(), abs=1e-6)
        for key, q in (("hu_p5", 5), ("hu_median", 50), ("hu_p95", 95)):
            assert stats[key] == pytest.approx(np.percentile(hu, q), abs=1e-4), key
        where = np.argwhere(mask)
        assert stats["bbox_index_lo"] == where.min(0).tolist() and stats["bbox_index_hi"] == where.max(0).tolist()
        physical = geometry.index_to_physical(where)  # every voxel centre, mm
        assert np.allclose(stats["centroid_mm"], physical.mean(0))
        assert np.allclose(stats["bbox_mm_lo"], physical.min(0)) and np.allclose(stats["bbox_mm_hi"], physical.max(0))
    assert label_statistics(np.zeros_like(label), image, geometry, names) == {}


# ---------------------------------------------------------------- folder prediction at cohort scale
@pytest.fixture
def cohort(tmp_path) -> Path:
    images = tmp_path / "images"
    for k in range(3):
        phantom = make_phantom(k, shape=(24, 40, 40), orientation="identity")
        write_image(images / f"case{k}_0000.nii.gz", phantom.image, phantom.geometry)
    return images


def _run(checkpoints, images: Path, out: Path, *extra: str) -> int:
    coarse, fine = checkpoints
    args = ["predict", "-i", str(images), "-o", str(out), "--coarse", str(coarse), "--fine", str(fine), "-q"]
    common = ["--set", "predict.backend=torch", "--set", "predict.keep_components_per_label={2: 2}"]
    return main([*args, *common, "--set", "predict.coarse_min_volume_mm3=0", *extra])


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_rerun_resumes_keeps_every_runs_rows_and_refuses_other_settings(checkpoints, cohort, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(checkpoints, cohort, out) == 0
    first = {path.name: path.stat().st_mtime_ns for path in out.glob("case*.nii.gz")}
    assert len(first) == 3
    (out / "case2.nii.gz").unlink()  # a case that was not finished
    capsys.readouterr()
    assert _run(checkpoints, cohort, out) == 0
    assert "predicted 1, already done 2, failed 0" in capsys.readouterr().out
    assert {name: (out / name).stat().st_mtime_ns for name in first if name != "case2.nii.gz"} == {
        name: time for name, time in first.items() if name != "case2.nii.gz"
    }  # the finished cases were not written again
    rows = _rows(out / "timing.csv")
    assert [row["case"] for row in rows] == ["case0", "case1", "case2", "case2"]
    later = (out / "case0.nii.gz").stat().st_mtime_ns + 10**9
    os.utime(cohort / "case0_0000.nii.gz", ns=(later, later))  # an input replaced after its prediction: redone
    assert _run(checkpoints, cohort, out) == 0
    assert "predicted 1, already done 2, failed 0" in capsys.readouterr().out
    assert (out / "case0.nii.gz").stat().st_mtime_ns > first["case0.nii.gz"]
    rows = _rows(out / "timing.csv")[:4]
    assert len({row["run"] for row in rows}) <= 2 and all(row["status"] == "ok" for row in rows)
    # other settings would mix two models' outputs in one folder: refused, until --overwrite
    assert _run(checkpoints, cohort, out, "--set", "predict.margin_mm=5") == 2
    assert "holds predictions made with other settings (predict.margin_mm differ" in capsys.readouterr().err
    assert _run(checkpoints, cohort, out, "--set", "predict.margin_mm=5", "--overwrite") == 0
    assert "predicted 3, failed 0" in capsys.readouterr().out


def test_shards_split_the_cohort_and_overlap_changes_nothing(checkpoints, cohort, tmp_path):
    one = tmp_path / "one"
    assert _run(checkpoints, cohort, one, "--set", "predict.read_ahead=false") == 0
    shards = tmp_path / "shards"
    for part in (0, 1):
        assert _run(checkpoints, cohort, shards, "--part", str(part), "--parts", "2") == 0
    parts = [{row["case"] for row in _rows(shards / f"timing_part{k}of2.csv")} for k in (0, 1)]
    assert parts == [{"case0", "case2"}, {"case1"}]  # disjoint, deterministic, together all cases
    for k in range(3):  # the overlapped pipeline writes what one-at-a-time does
        a, geometry_a = read_image(one / f"case{k}.nii.gz")
        b, geometry_b = read_image(shards / f"case{k}.nii.gz")
        assert np.array_equal(a, b) and geometry_a == geometry_b
    assert main(["predict", "-i", str(cohort), "-o", str(tmp_path / "x"), "--part", "2", "--parts", "2"]) == 2


def test_statistics_subsets_and_failures_in_the_pipeline(checkpoints, cohort, tmp_path, capsys):
    (cohort / "broken_0000.nii.gz").write_bytes(b"not an image")  # read ahead in the reader thread: fails alone
    out = tmp_path / "out"
    assert _run(checkpoints, cohort, out, "--statistics", "--labels", "liver,3") == 1
    err = capsys.readouterr().err
    assert err.count("failed: ") == 1 and "broken_0000.nii.gz" in err
    for k in range(3):
        label, _ = read_image(out / f"case{k}.nii.gz")
        assert set(np.unique(label).tolist()) <= {0, 1, 3}  # kidney (2) is not written
        figures = json.loads((out / f"case{k}_statistics.json").read_text())
        assert set(figures) <= {"liver", "spleen"}
        for name, stats in figures.items():
            assert stats["voxels"] == int((label == stats["label"]).sum()), name
    table = _rows(out / "statistics.csv")
    assert {row["case"] for row in table} <= {f"case{k}" for k in range(3)} and table
    (out / "case1.nii.gz").unlink()  # a rerun predicts case1 alone: the folder's table keeps every case's rows
    assert _run(checkpoints, cohort, out, "--statistics", "--labels", "liver,3") == 1
    assert _rows(out / "statistics.csv") == table
    assert _run(checkpoints, cohort, tmp_path / "bad", "--labels", "heart") == 2
    assert "predict.labels names 'heart'" in capsys.readouterr().err
    # DICOM outputs need a DICOM series: every image file fails alone, with the reason
    assert _run(checkpoints, cohort, tmp_path / "dcm", "--output-format", "dicom-seg") == 1
    assert "dicom-seg output needs a DICOM series as input" in capsys.readouterr().err


def test_segment_in_one_call(checkpoints, tmp_path):
    coarse, fine = checkpoints
    phantom = make_phantom(1, shape=(24, 40, 40), orientation="ras")
    path = write_image(tmp_path / "ct.nii.gz", phantom.image, phantom.geometry)
    common = {"coarse": coarse, "fine": fine, "device": "cpu", "config": load_config(None, ["predict.backend=torch"])}
    result = flareseg.segment(path, tmp_path / "labels.nii.gz", statistics=True, **common)
    written, geometry = read_image(tmp_path / "labels.nii.gz")
    assert np.array_equal(written, result.label) and result.geometry == geometry == read_image(path)[1]
    assert result.label_names == ["liver", "kidney", "spleen"]
    assert set(result.statistics) == {result.label_names[v - 1] for v in np.unique(result.label) if v}
    same = flareseg.segment((phantom.image, phantom.geometry), labels=["liver"], **common)
    assert set(np.unique(same.label).tolist()) <= {0, 1} and same.statistics is None
    assert np.array_equal(same.label == 1, result.label == 1)
    assert common["config"].predict.labels is None and common["config"].predict.coarse is None  # not the caller's
