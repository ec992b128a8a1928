"""flareseg prepare: arrays + LMDB index from phantoms and real CT, resume, crashes, bad cases, DataLoader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from flareseg.cli import main
from flareseg.config import ConfigError, load_config
from flareseg.data.crop import Box, bounding_box
from flareseg.data.index import META_SPLITS, CaseIndex
from flareseg.data.phantom import write_phantom_dataset
from flareseg.data.prepare import prepare_dataset
from flareseg.data.prepared import PreparedArrays, PreparedData
from flareseg.engine.loaders import data_loader
from flareseg.io import Geometry, read_image, to_canonical, write_image

REPO = Path(__file__).resolve().parents[1]
SMALL = ["prepare.grids.coarse.size=[24, 32, 32]", "prepare.grids.fine.size=[28, 36, 36]", "prepare.folds=2"]


def _config(raw: Path, out: Path, *extra: str, unlabeled: bool = True, workers: int = 2):
    overrides = [
        f"prepare.images={raw / 'imagesTr'}",
        f"prepare.labels={raw / 'labelsTr'}",
        f"prepare.out={out}",
        f"prepare.workers={workers}",
        *SMALL,
        *extra,
    ]
    if unlabeled:
        overrides.append(f"prepare.unlabeled={raw / 'unlabeled'}")
    return load_config(None, overrides)


@pytest.fixture(scope="module")
def raw_phantoms(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("raw")
    write_phantom_dataset(raw, 4, seed=3, shape=(30, 56, 60), unlabeled=2)
    return raw


@pytest.fixture(scope="module")
def prepared(raw_phantoms, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    summary = prepare_dataset(_config(raw_phantoms, out), progress=False)
    return out, summary


def test_prepare_writes_arrays_and_records(raw_phantoms, prepared):
    out, summary = prepared
    assert summary.ok and sorted(summary.prepared) == [f"phantom_{i:03d}" for i in range(6)]
    index = CaseIndex(out / "index.lmdb")
    assert index.case_ids() == sorted(summary.prepared)
    for case_id in index.case_ids():
        record = index.get(case_id)
        labeled = record["labeled"]
        image_file = Path(record["image_file"])
        image, geometry = read_image(image_file)
        assert Geometry.from_dict(record["geometry"]) == geometry and record["original_shape"] == list(image.shape)
        coarse = np.load(index.array_path(record, "coarse_image"))
        fine = np.load(index.array_path(record, "fine_image"))
        assert coarse.shape == (24, 32, 32) and coarse.dtype == np.int16
        assert fine.shape == (28, 36, 36) and fine.dtype == np.int16
        assert (
            record["intensity"]["image"]["min"] <= coarse.min() and coarse.max() <= record["intensity"]["image"]["max"]
        )
        if not labeled:
            assert record["grids"]["fine"]["box"] == Box.full(record["canonical_geometry"]["shape"]).to_list()
            assert record["annotated"] == [] and "coarse_label" not in record["arrays"]
            continue
        label, _ = read_image(record["label_file"])
        canonical_label = to_canonical(label, geometry)[0]
        present = sorted(int(v) for v in np.unique(label) if v)
        assert record["labels_present"] == present and record["annotated"] == list(range(1, 14))
        # The fine crop holds the whole label box plus the 20 mm margin (or the image border).
        box, crop = bounding_box(canonical_label > 0), Box.from_list(record["grids"]["fine"]["box"])
        spacing = record["canonical_geometry"]["spacing"]
        for axis in range(3):
            margin = int(np.ceil(20 / spacing[axis] - 1e-9))
            assert crop.lo[axis] == max(0, box.lo[axis] - margin)
            assert crop.hi[axis] == min(canonical_label.shape[axis], box.hi[axis] + margin)
        coarse_label = np.load(index.array_path(record, "coarse_label"))
        fine_label = np.load(index.array_path(record, "fine_label"))
        assert coarse_label.dtype == np.uint8 and set(np.unique(fine_label)) - {0} <= set(present)
        assert {1, 3, 11} <= set(np.unique(coarse_label).tolist())  # liver, spleen and stomach survive 32^3
        # Foreground samples are voxels of their label in the fine array.
        for value, points in record["grids"]["fine"]["foreground_locations"].items():
            assert 0 < len(points) <= 100
            assert all(fine_label[tuple(p)] == int(value) for p in points)


def test_record_geometry_places_the_arrays_in_physical_space(prepared):
    out, _ = prepared
    index = CaseIndex(out / "index.lmdb")
    record = index.get("phantom_000")
    label, geometry = read_image(record["label_file"])
    for grid in ("coarse", "fine"):
        name = f"{grid}_label"
        array = np.load(index.array_path(record, name))
        array_geometry = Geometry.from_dict(record["grids"][grid]["geometry"])
        for organ in (1, 3):  # liver and spleen centroids in mm, from the source and from the prepared array
            source = geometry.index_to_physical(np.argwhere(label == organ).mean(0))
            prepared_centroid = array_geometry.index_to_physical(np.argwhere(array == organ).mean(0))
            assert np.linalg.norm(source - prepared_centroid) < 2 * max(array_geometry.spacing), (name, organ)


def test_splits_cover_labeled_cases_only(prepared):
    out, _ = prepared
    splits = CaseIndex(out / "index.lmdb").meta(META_SPLITS)
    labeled = {f"phantom_{i:03d}" for i in range(4)}
    assert splits["folds"] == 2 and len(splits["splits"]) == 2
    vals = [set(split["val"]) for split in splits["splits"]]
    assert vals[0].isdisjoint(vals[1]) and vals[0] | vals[1] == labeled
    assert all(set(split["train"]) == labeled - set(split["val"]) for split in splits["splits"])


def test_config_is_saved_in_the_output(prepared):
    out, _ = prepared
    saved = load_config(out / "config.yaml")
    assert saved.prepare.out == out and saved.prepare.grids["coarse"].size == (24, 32, 32)


def test_rerun_skips_finished_cases_and_redoes_changed_inputs(raw_phantoms, tmp_path):
    out = tmp_path / "out"
    first = prepare_dataset(_config(raw_phantoms, out, unlabeled=False), progress=False)
    records = {c: CaseIndex(out / "index.lmdb").get(c) for c in first.prepared}
    again = prepare_dataset(_config(raw_phantoms, out, unlabeled=False), progress=False)
    assert again.prepared == [] and sorted(again.skipped) == sorted(first.prepared)
    assert {c: CaseIndex(out / "index.lmdb").get(c) for c in first.prepared} == records
    changed = raw_phantoms.parent / "changed"
    os.system(f"cp -r {raw_phantoms} {changed}")
    label_file = changed / "labelsTr" / "phantom_001.nii.gz"
    label, geometry = read_image(label_file)
    write_image(label_file, np.where(label == 3, 0, label).astype(np.uint8), geometry)  # spleen removed
    config = load_config(
        None,
        [
            f"prepare.images={changed / 'imagesTr'}",
            f"prepare.labels={changed / 'labelsTr'}",
            f"prepare.out={tmp_path / 'out2'}",
            *SMALL,
        ],
    )
    prepare_dataset(config, progress=False)
    write_image(label_file, label, geometry)  # restored: a new modification time
    rerun = prepare_dataset(config, progress=False)
    assert rerun.prepared == ["phantom_001"] and len(rerun.skipped) == 3


def test_other_settings_need_a_new_folder_or_overwrite(raw_phantoms, tmp_path):
    out = tmp_path / "out"
    prepare_dataset(_config(raw_phantoms, out, unlabeled=False, workers=1), progress=False)
    with pytest.raises(ConfigError, match="prepare.grids differ"):
        prepare_dataset(
            _config(raw_phantoms, out, "prepare.grids.coarse.size=[16, 16, 16]", unlabeled=False), progress=False
        )
    redone = prepare_dataset(
        _config(raw_phantoms, out, "prepare.grids.coarse.size=[16, 16, 16]", "prepare.overwrite=true", unlabeled=False),
        progress=False,
    )
    assert len(redone.prepared) == 4
    record = CaseIndex(out / "index.lmdb").get("phantom_000")
    assert np.load(out / record["arrays"]["coarse_image"]).shape == (16, 16, 16)


CRASH_SCRIPT = """
import os, sys
import flareseg.data.prepare_case as prepare_case
from flareseg.cli import main
saved = []
original = prepare_case._save_array
def save_then_die(out_dir, case_id, name, array):
    saved.append(case_id)
    if len(set(saved)) == 3 and name == "fine_image":  # the third case dies half-way through its arrays
        os._exit(137)
    return original(out_dir, case_id, name, array)
prepare_case._save_array = save_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_killed_run_resumes_without_half_written_records(raw_phantoms, tmp_path):
    out = tmp_path / "out"
    args = [
        "prepare",
        "-i",
        str(raw_phantoms / "imagesTr"),
        "-l",
        str(raw_phantoms / "labelsTr"),
        "-o",
        str(out),
        "-w",
        "1",
        "-q",
        *[a for s in SMALL for a in ("--set", s)],
    ]
    crashed = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, *args], capture_output=True, text=True)
    assert crashed.returncode == 137
    index = CaseIndex(out / "index.lmdb")
    assert index.case_ids() == ["phantom_000", "phantom_001"]  # the dying third case left no record
    assert (out / "arrays" / "phantom_002_coarse_image.npy").exists()  # ...though some of its arrays exist
    assert not list((out / "arrays").glob(".*tmp*"))
    index.close()
    assert main(args) == 0
    index = CaseIndex(out / "index.lmdb")
    assert index.case_ids() == [f"phantom_{i:03d}" for i in range(4)]
    record = index.get("phantom_002")
    assert all((out / path).is_file() for path in record["arrays"].values())


def test_bad_cases_are_reported_and_skipped(raw_phantoms, tmp_path, capsys):
    raw = tmp_path / "raw"
    os.system(f"cp -r {raw_phantoms} {raw}")
    images, labels = raw / "imagesTr", raw / "labelsTr"
    good_image, geometry = read_image(images / "phantom_000_0000.nii.gz")
    (images / "unreadable_0000.nii.gz").write_bytes(b"\x1f\x8bgarbage" * 50)
    write_image(labels / "unreadable.nii.gz", np.zeros(good_image.shape, np.uint8), geometry)
    write_image(images / "mismatch_0000.nii.gz", good_image, geometry)
    write_image(
        labels / "mismatch.nii.gz",
        np.zeros(good_image.shape[:2] + (good_image.shape[2] - 1,), np.uint8),
        geometry.with_shape(good_image.shape[:2] + (good_image.shape[2] - 1,)),
    )
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((30, 30), np.int16)), str(images / "flat_0000.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((30, 30), np.uint8)), str(labels / "flat.nii.gz"))
    nan_image = good_image.astype(np.float32)
    nan_image[3, 4, 5] = np.nan
    write_image(images / "nan_0000.mha", nan_image, geometry)
    write_image(labels / "nan.mha", np.zeros(good_image.shape, np.uint8), geometry)
    write_image(images / "badids_0000.nii.gz", good_image, geometry)
    write_image(labels / "badids.nii.gz", np.full(good_image.shape, 20, np.uint8), geometry)
    write_image(images / "nolabel_0000.nii.gz", good_image, geometry)
    out = tmp_path / "out"
    code = main(
        [
            "prepare",
            "-i",
            str(images),
            "-l",
            str(labels),
            "-o",
            str(out),
            "-q",
            *[a for s in SMALL for a in ("--set", s)],
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    expected = {
        "unreadable": "cannot be read",
        "mismatch": "label grid does not match",
        "flat": "expected a 3D volume",
        "nan": "NaN",
        "badids": "label ids 20 are outside the configured labels 0..13",
        "nolabel": "no label map",
    }
    for case_id, reason in expected.items():
        lines = [line for line in err.splitlines() if case_id in line and reason in line]
        assert len(lines) == 1, (case_id, err)
    failures = (out / "failures.csv").read_text().splitlines()
    assert len(failures) == 1 + len(expected)
    assert CaseIndex(out / "index.lmdb").case_ids() == [f"phantom_{i:03d}" for i in range(4)]


def test_partial_labels_record_what_each_case_annotates(tmp_path):
    raw = tmp_path / "raw"
    write_phantom_dataset(raw, 2, seed=5, shape=(24, 40, 40), partial=True, orientation="identity")
    listed = json.loads((raw / "labelsTr" / "annotated.json").read_text())
    summary = prepare_dataset(_config(raw, tmp_path / "a", unlabeled=False, workers=1), progress=False)
    assert summary.ok
    index = CaseIndex(tmp_path / "a" / "index.lmdb")
    for case_id, ids in listed.items():
        assert index.get(case_id)["annotated"] == sorted(ids) and len(ids) < 13
    # Editing the annotated list re-prepares exactly the cases whose list changed.
    listed["phantom_001"] = sorted(listed["phantom_001"])[:-1]
    (raw / "labelsTr" / "annotated.json").write_text(json.dumps(listed))
    rerun = prepare_dataset(_config(raw, tmp_path / "a", unlabeled=False, workers=1), progress=False)
    assert rerun.prepared == ["phantom_001"] and rerun.skipped == ["phantom_000"]
    assert index.get("phantom_001")["annotated"] == listed["phantom_001"]
    (raw / "labelsTr" / "annotated.json").unlink()
    prepare_dataset(
        _config(raw, tmp_path / "b", "prepare.annotation=present", unlabeled=False, workers=1), progress=False
    )
    index = CaseIndex(tmp_path / "b" / "index.lmdb")
    for case_id in listed:
        record = index.get(case_id)
        assert record["annotated"] == record["labels_present"]


def test_dataloader_with_two_workers_reads_the_index(prepared):
    out, _ = prepared
    labeled = [f"phantom_{i:03d}" for i in range(4)]
    dataset = PreparedArrays(PreparedData(out), "fine", labeled)
    seen = {}
    for batch in data_loader(dataset, batch_size=2, workers=2):  # workers never forked from this process
        assert batch["image"].shape == (2, 1, 28, 36, 36) and batch["label"].shape == (2, 28, 36, 36)
        assert batch["annotated"].shape == (2, 13) and batch["annotated"].all()
        for i, case_id in enumerate(batch["case_id"]):
            seen[case_id] = batch["image"][i, 0]
    assert sorted(seen) == labeled
    for case_id, image in seen.items():
        expected = np.load(out / "arrays" / f"{case_id}_fine_image.npy")
        assert torch.equal(image, torch.from_numpy(expected))
    with pytest.raises(KeyError, match="not in the index"):
        PreparedArrays(PreparedData(out), "fine", ["nope"])


def test_prepare_real_ct_nifti_and_dicom(shared_data, tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    # Links, not copies: the shared data stays where it is.
    (images / "abdomen_0000.nii.gz").symlink_to(shared_data / "ct_abdomen_30sl" / "case_0000.nii.gz")
    (labels / "abdomen.nii.gz").symlink_to(shared_data / "ct_abdomen_30sl" / "case_label.nii.gz")
    (images / "dicom").symlink_to(shared_data / "ct_dicom_20sl" / "dicom")
    (labels / "dicom.nii.gz").symlink_to(shared_data / "ct_dicom_20sl" / "label.nii.gz")
    out = tmp_path / "out"
    code = subprocess.run(
        [
            "sh",
            str(REPO / "data_prepare" / "run.sh"),
            "-i",
            str(images),
            "-l",
            str(labels),
            "-o",
            str(out),
            "-q",
            "--set",
            "prepare.folds=2",
        ],
        capture_output=True,
        text=True,
    )
    assert code.returncode == 0, code.stderr
    index = CaseIndex(out / "index.lmdb")
    assert index.case_ids() == ["abdomen", "dicom"]
    dicom = index.get("dicom")
    assert dicom["labels_present"] == [1, 3, 4, 5, 6, 7, 11]
    assert dicom["original_shape"] == [20, 512, 512]
    abdomen = index.get("abdomen")
    assert abdomen["reorientation"] == {"axes": [0, 1, 2], "flips": [False, True, True]}
    assert abdomen["labels_present"] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13]
    assert np.load(out / abdomen["arrays"]["coarse_image"]).shape == (160, 160, 160)
    fine_label = np.load(out / abdomen["arrays"]["fine_label"])
    assert fine_label.shape == (192, 192, 192) and {1, 2, 3, 13} <= set(np.unique(fine_label).tolist())


DYING_WORKER_SCRIPT = """
import os, sys
import flareseg.data.prepare as prepare
original = prepare._prepare_one
def die_on_second_case(case, config, out_dir, annotated):
    if case.case_id == "phantom_001":
        os._exit(9)  # as if the kernel killed the worker (out of memory)
    return original(case, config, out_dir, annotated)
prepare._prepare_one = die_on_second_case
import flareseg.workers
flareseg.workers.START_METHOD = "fork"  # the workers inherit the patched function
from flareseg.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_dying_worker_loses_only_its_own_case(raw_phantoms, tmp_path):
    # In a fresh interpreter: forking this test process, whose earlier tests started OpenVINO and torch thread
    # pools, is not safe.
    out = tmp_path / "out"
    args = ["prepare", "-i", str(raw_phantoms / "imagesTr"), "-l", str(raw_phantoms / "labelsTr"), "-o", str(out)]
    args += ["-w", "2", "-q", *[a for s in SMALL for a in ("--set", s)]]
    run = subprocess.run([sys.executable, "-c", DYING_WORKER_SCRIPT, *args], capture_output=True, text=True)
    assert run.returncode == 1, run.stderr
    failures = (out / "failures.csv").read_text()
    assert "phantom_001" in failures and "worker process died" in failures
    # The cases that were in flight beside it when the pool broke were retried and prepared.
    prepared = ["phantom_000", "phantom_002", "phantom_003"]
    assert CaseIndex(out / "index.lmdb").case_ids() == prepared


def test_label_map_merges_and_drops_labels(raw_phantoms, tmp_path):
    # FLARE21: liver, kidney (right and left merged), spleen, pancreas; every other organ becomes background.
    config = _config(
        raw_phantoms,
        tmp_path / "out",
        "data.labels=[liver, kidney, spleen, pancreas]",
        "prepare.label_map={1: 1, 2: 2, 13: 2, 3: 3, 4: 4}",
        unlabeled=False,
        workers=1,
    )
    assert prepare_dataset(config, progress=False).ok
    index = CaseIndex(tmp_path / "out" / "index.lmdb")
    record = index.get("phantom_000")
    source, _ = read_image(record["label_file"])
    assert record["labels_present"] == [1, 2, 3, 4] and record["annotated"] == [1, 2, 3, 4]
    fine = np.load(index.array_path(record, "fine_label"))
    assert set(np.unique(fine).tolist()) == {0, 1, 2, 3, 4}
    # Both kidneys are label 2 now: its voxel count is about the sum of the two source kidneys (resampled).
    source_kidneys = np.isin(source, [2, 13]).sum() * np.prod(Geometry.from_dict(record["geometry"]).spacing)
    fine_kidneys = (fine == 2).sum() * np.prod(Geometry.from_dict(record["grids"]["fine"]["geometry"]).spacing)
    assert abs(fine_kidneys / source_kidneys - 1) < 0.1
    summary = prepare_dataset(config, progress=False)  # a rerun with the same map resumes: nothing to redo
    assert summary.ok and summary.prepared == [] and len(summary.skipped) == len(index.case_ids())


def test_fine_source_has_room_for_margin_jitter(prepared):
    out, _ = prepared
    index = CaseIndex(out / "index.lmdb")
    record = index.get("phantom_000")
    source, fine = record["grids"]["fine"]["source"], Box.from_list(record["grids"]["fine"]["box"])
    outer = Box.from_list(source["box"])
    assert all(o_lo <= f_lo and f_hi <= o_hi for o_lo, f_lo, f_hi, o_hi in zip(outer.lo, fine.lo, fine.hi, outer.hi))
    source_geometry = Geometry.from_dict(source["geometry"])
    assert np.allclose(
        source_geometry.spacing, Geometry.from_dict(record["grids"]["fine"]["geometry"]).spacing, rtol=0.1
    )
    label = np.load(index.array_path(record, "fine_source_label"))
    assert bounding_box(label > 0) == Box.from_list(source["foreground_box"])
    assert index.get("phantom_004")["grids"]["fine"]["source"] is None  # unlabeled
