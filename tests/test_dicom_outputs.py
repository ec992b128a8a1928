"""DICOM-SEG and RTSTRUCT outputs: written, read back with highdicom and rt-utils, compared voxel for voxel in the
order of the source files; a series stored in reverse slice order; a series without UIDs; the missing extra."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from flareseg.config.schema import FLARE_ORGANS
from flareseg.io import Geometry, read_image
from flareseg.io.dicom_outputs import (
    GENERATED_UIDS_MESSAGE,
    SNOMED_CODES,
    DicomExtraMissing,
    write_dicom_seg,
    write_rtstruct,
    write_series_with_uids,
)

REPO = Path(__file__).resolve().parents[1]
REAL_CASE = REPO.parent / "shared" / "data" / "ct_dicom_20sl"
SYNTHETIC_NAMES = ["liver", "left_kidney", "mystery_organ"]


@pytest.fixture
def dicom_extra() -> None:
    """Skip where the dicom extra is not installed (the missing-extra test runs everywhere)."""
    for module in ("pydicom", "highdicom", "rt_utils"):
        pytest.importorskip(module)


def write_ct_series(folder: Path, n: int = 8, size: int = 32, spacing=(0.75, 0.75), step: float = 2.5) -> Path:
    """A CT Image Storage series stored in reverse slice order: file slice_000 (InstanceNumber 1) is the highest
    slice, ImagePositionPatient z decreasing with the file name."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(f"slice_{i:03d}.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Reverse^Synthetic", "REV1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.Modality, ds.Manufacturer = "", "CT", "flareseg-test"
        ds.SeriesNumber, ds.InstanceNumber = 3, i + 1
        ds.ImagePositionPatient = [-12.0, -10.0, 100.0 - i * step]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = list(spacing), step
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = rng.integers(0, 2000, (size, size)).astype(np.int16).tobytes()
        ds.save_as(folder / f"slice_{i:03d}.dcm", enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def reversed_series(tmp_path_factory) -> Path:
    pytest.importorskip("pydicom")
    return write_ct_series(tmp_path_factory.mktemp("dicom") / "reversed")


def synthetic_label(shape: tuple[int, int, int]) -> np.ndarray:
    """Blobs that move from slice to slice (a slice mix-up changes them), a ring with a hole, single pixels and a
    one-pixel line, and an empty last slice."""
    label = np.zeros(shape, np.uint8)
    for k in range(shape[0] - 1):
        label[k, 2 + k : 6 + 2 * k // 3, 3 + 2 * k : 8 + 2 * k] = 1  # grows and moves with k
        label[k, 20:30, 2:12] = 2  # a ring with a hole that moves with k
        label[k, 23 : 25 + k // 3, 5 : 7 + k // 2] = 0
        label[k, 2 * k, 28] = 3  # a single pixel on another row in every slice
    label[2, 30, 14:24] = 3  # a one-pixel line
    return label


def source_files_and_slices(folder: Path, geometry) -> list:
    """The series' files in file-name order (pydicom headers) with the array slice each lies on (by its position,
    independently of the module under test)."""
    import pydicom

    corners = geometry.index_to_physical(np.array([[k, 0, 0] for k in range(geometry.shape[0])], float))
    result = []
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        distance = np.linalg.norm(corners - np.asarray(ds.ImagePositionPatient, float), axis=1)
        assert distance.min() < 1e-3, f"{path.name} lies on no slice of the grid"
        result.append((ds, int(distance.argmin())))
    return result


def assert_seg_matches(seg_path: Path, sources, label: np.ndarray, names: list[str]) -> None:
    """The DICOM-SEG, decoded per source instance in the order of the source files, is the label map exactly."""
    import highdicom
    import pydicom

    seg = highdicom.seg.segread(seg_path)
    assert seg.segmentation_type.value == "BINARY"
    label_of_segment = {n: names.index(seg.get_segment_description(n).segment_label) + 1 for n in seg.segment_numbers}
    assert sorted(label_of_segment.values()) == sorted(set(np.unique(label).tolist()) - {0})
    uids = [ds.SOPInstanceUID for ds, _ in sources]
    pixels = seg.get_pixels_by_source_instance(uids, assert_missing_frames_are_empty=True)  # [file, y, x, segment]
    for f, (ds, k) in enumerate(sources):
        for segment, label_id in label_of_segment.items():
            decoded = pixels[f, :, :, segment - 1].astype(bool)
            assert np.array_equal(decoded, label[k] == label_id), f"{names[label_id - 1]} on {ds.InstanceNumber}"
    # each frame's plane position is that of the source instance it references (checked without highdicom)
    position = {ds.SOPInstanceUID: [float(v) for v in ds.ImagePositionPatient] for ds, _ in sources}
    raw = pydicom.dcmread(seg_path)
    for frame in raw.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        frame_position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(frame_position, position[uid], atol=1e-3)


def assert_rtstruct_matches(rt_path: Path, series_folder: Path, sources, label: np.ndarray, names: list[str]):
    """The RTSTRUCT, read back with rt-utils and taken in the order of the source files, is the label map exactly
    (measured: rt-utils' contours of border pixel centres, filled again, round-trip every voxel here, holes, single
    pixels and one-pixel lines included; the real case's 7 organs too)."""
    import rt_utils

    rt = rt_utils.RTStructBuilder.create_from(str(series_folder), str(rt_path))
    rt_slice = {ds.SOPInstanceUID: i for i, ds in enumerate(rt.series_data)}
    present = sorted(set(np.unique(label).tolist()) - {0})
    assert rt.get_roi_names() == [names[i - 1] for i in present]
    for label_id in present:
        mask = rt.get_roi_mask_by_name(names[label_id - 1])  # [rows, columns, rt-utils slices]
        for ds, k in sources:
            decoded = mask[:, :, rt_slice[ds.SOPInstanceUID]]
            expected = label[k] == label_id
            assert decoded.any() == expected.any(), f"{names[label_id - 1]}: wrong slices at {ds.InstanceNumber}"
            assert np.array_equal(decoded, expected), (
                f"{names[label_id - 1]} on {ds.InstanceNumber}: {int((decoded != expected).sum())} voxels differ"
            )


@pytest.fixture
def real_case() -> Path:
    if not (REAL_CASE / "dicom").is_dir() or not (REAL_CASE / "label.nii.gz").is_file():
        pytest.skip("../shared/data is not present (a fresh clone has no shared data)")
    return REAL_CASE


def test_series_without_uids_seg_and_rtstruct(dicom_extra, real_case, tmp_path):
    import highdicom

    folder = real_case / "dicom"
    image, geometry = read_image(folder)
    label, label_geometry = read_image(real_case / "label.nii.gz")
    assert label_geometry.same_grid(geometry)
    present = sorted(set(np.unique(label).tolist()) - {0})

    seg_report = write_dicom_seg(label, folder, tmp_path / "out" / "seg.dcm", FLARE_ORGANS)  # reads the grid itself
    rt_report = write_rtstruct(label, folder, tmp_path / "out" / "rt.dcm", FLARE_ORGANS, geometry=geometry)
    for report in (seg_report, rt_report):
        assert report.generated_uids
        assert GENERATED_UIDS_MESSAGE in report.message
        assert report.segments == tuple(FLARE_ORGANS[i - 1] for i in present)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["rt.dcm", "seg.dcm"]  # no temporaries left

    # the outputs reference the series with the generated UIDs; a copy with those UIDs (a third, separate run:
    # the UIDs are the same every time) is what rt-utils and a viewer need to show them
    copy = tmp_path / "series"
    write_series_with_uids(folder, copy)
    sources = source_files_and_slices(copy, geometry)
    assert [k for _, k in sources] != list(range(len(sources)))  # file order is not ITK's slice order here
    assert all(ds.SOPInstanceUID and ds.SeriesInstanceUID for ds, _ in sources)
    assert_seg_matches(tmp_path / "out" / "seg.dcm", sources, label, list(FLARE_ORGANS))
    assert_rtstruct_matches(tmp_path / "out" / "rt.dcm", copy, sources, label, list(FLARE_ORGANS))

    seg = highdicom.seg.segread(tmp_path / "out" / "seg.dcm")
    adrenal = seg.get_segment_description(present.index(7) + 1)  # label 7: right adrenal gland
    assert adrenal.segment_label == "right_adrenal_gland"
    assert adrenal.segmented_property_type.value == "23451007"
    modifier = adrenal.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
    assert (modifier.CodeValue, modifier.CodeMeaning) == ("24028007", "Right")
    assert seg.get_segment_description(1).segmented_property_category.value == "123037004"


def test_reversed_series_with_uids(dicom_extra, reversed_series, tmp_path, caplog):
    import highdicom
    import pydicom

    image, geometry = read_image(reversed_series)
    sources = source_files_and_slices(reversed_series, geometry)
    assert [k for _, k in sources] == list(range(len(sources)))[::-1]  # ITK stacks the files the other way round
    label = synthetic_label(geometry.shape)

    with caplog.at_level(logging.WARNING, logger="flareseg.io.dicom_outputs"):
        seg_report = write_dicom_seg(label, reversed_series, tmp_path / "seg.dcm", SYNTHETIC_NAMES)
    rt_report = write_rtstruct(label, reversed_series, tmp_path / "rt.dcm", SYNTHETIC_NAMES, geometry=geometry)
    assert "mystery_organ" in caplog.text and "85756007" in caplog.text
    for report in (seg_report, rt_report):
        assert not report.generated_uids
        assert GENERATED_UIDS_MESSAGE not in report.message
        assert report.segments == tuple(SYNTHETIC_NAMES)

    assert_seg_matches(tmp_path / "seg.dcm", sources, label, SYNTHETIC_NAMES)
    assert_rtstruct_matches(tmp_path / "rt.dcm", reversed_series, sources, label, SYNTHETIC_NAMES)

    seg = highdicom.seg.segread(tmp_path / "seg.dcm")
    assert seg.StudyInstanceUID == sources[0][0].StudyInstanceUID  # the original UIDs are referenced
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0][0].SeriesInstanceUID
    assert seg.get_segment_description(2).segmented_property_type.value == SNOMED_CODES["left_kidney"].code
    assert seg.get_segment_description(3).segmented_property_type.value == "85756007"  # generic Tissue

    # each contour lies on the slice it references, and its vertices on border pixels of that slice's region
    rt = pydicom.dcmread(tmp_path / "rt.dcm")
    by_uid = {ds.SOPInstanceUID: (ds, k) for ds, k in sources}
    for roi in rt.ROIContourSequence:
        label_id = int(roi.ReferencedROINumber)
        for contour in roi.ContourSequence:
            ds, k = by_uid[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            points = np.asarray(contour.ContourData, float).reshape(-1, 3)
            assert np.allclose(points[:, 2], float(ds.ImagePositionPatient[2]), atol=1e-3)
            columns = np.rint((points[:, 0] - float(ds.ImagePositionPatient[0])) / 0.75).astype(int)
            rows = np.rint((points[:, 1] - float(ds.ImagePositionPatient[1])) / 0.75).astype(int)
            assert (label[k, rows, columns] == label_id).all()


def test_non_square_pixels_refused_for_rtstruct(dicom_extra, tmp_path):
    folder = write_ct_series(tmp_path / "anisotropic", n=3, spacing=(0.75, 0.5))
    image, geometry = read_image(folder)
    label = np.zeros(geometry.shape, np.uint8)
    label[1, 4:8, 4:8] = 1
    with pytest.raises(ValueError, match=r"not square \(PixelSpacing 0.75\\0.5\)"):
        write_rtstruct(label, folder, tmp_path / "rt.dcm", ["liver"], geometry=geometry)
    assert not (tmp_path / "rt.dcm").exists()
    write_dicom_seg(label, folder, tmp_path / "seg.dcm", ["liver"], geometry=geometry)  # DICOM-SEG has no such limit
    sources = source_files_and_slices(folder, geometry)
    assert_seg_matches(tmp_path / "seg.dcm", sources, label, ["liver"])


def test_wrong_label_maps(dicom_extra, reversed_series, tmp_path):
    image, geometry = read_image(reversed_series)
    with pytest.raises(ValueError) as error:
        write_dicom_seg(np.zeros((8, 32, 31), np.uint8), reversed_series, tmp_path / "seg.dcm", ["liver"])
    message = str(error.value)
    assert str(reversed_series) in message and "(8, 32, 31)" in message and "(8, 32, 32)" in message
    assert "\n" not in message

    too_many = np.full(geometry.shape, 2, np.uint8)
    with pytest.raises(ValueError, match="label ids 2..2 but 1 label names"):
        write_rtstruct(too_many, reversed_series, tmp_path / "rt.dcm", ["liver"], geometry=geometry)

    label = synthetic_label(geometry.shape)
    shifted = Geometry(geometry.spacing, np.add(geometry.origin, (0, 0, 1.5)), geometry.direction, geometry.shape)
    with pytest.raises(ValueError, match="the grid is not the series' grid"):
        write_dicom_seg(label, reversed_series, tmp_path / "seg.dcm", SYNTHETIC_NAMES, geometry=shifted)
    flipped = Geometry(geometry.spacing, geometry.origin, np.diag([-1.0, 1.0, 1.0]).ravel(), geometry.shape)
    with pytest.raises(ValueError, match="was the label map reoriented"):
        write_rtstruct(label, reversed_series, tmp_path / "rt.dcm", SYNTHETIC_NAMES, geometry=flipped)

    empty = np.zeros(geometry.shape, np.uint8)
    report = write_dicom_seg(empty, reversed_series, tmp_path / "seg.dcm", ["liver"], geometry=geometry)
    assert report.path is None and report.segments == () and "no DICOM-SEG written" in report.message
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("module", "write", "what"),
    [("highdicom", write_dicom_seg, "DICOM-SEG"), ("rt_utils", write_rtstruct, "RTSTRUCT")],
)
def test_missing_extra_is_one_line(monkeypatch, tmp_path, module, write, what):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(DicomExtraMissing) as error:
        write(np.zeros((2, 2, 2), np.uint8), tmp_path / "no-series", tmp_path / "out.dcm", ["liver"])
    message = str(error.value)  # the hint, and the import's own reason (a missing module, a missing libGL ...)
    assert message.startswith(f'{what} output needs the dicom extra: pip install "flareseg[dicom]" (')
    assert module in message and "\n" not in message
    assert isinstance(error.value, ImportError) and isinstance(error.value, ValueError)  # the CLI's one line


def test_predict_writes_dicom_seg_and_rtstruct_beside_the_nifti(
    dicom_extra, checkpoints, reversed_series, tmp_path, monkeypatch
):
    """`flareseg predict --output-format nifti dicom-seg rtstruct` on a folder of DICOM series: the three outputs of
    a case hold the same label map (the networks' answer fixed to a known map, so that every label is present)."""
    from flareseg.cli import main
    from flareseg.inference.predictor import Predictor

    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "ct").symlink_to(reversed_series, target_is_directory=True)
    image, geometry = read_image(reversed_series)
    monkeypatch.setattr(
        Predictor, "predict_array", lambda self, image, geometry, timings=None: synthetic_label(image.shape)
    )
    coarse, fine = checkpoints
    out = tmp_path / "out"
    args = ["predict", "-i", str(inputs), "-o", str(out), "--coarse", str(coarse), "--fine", str(fine), "-q"]
    assert main([*args, "--output-format", "nifti", "dicom-seg", "rtstruct", "--set", "predict.backend=torch"]) == 0
    label, written = read_image(out / "ct.nii.gz")
    assert written == geometry and np.array_equal(label, synthetic_label(image.shape))
    names = ["liver", "kidney", "spleen"]
    sources = source_files_and_slices(reversed_series, geometry)
    assert_seg_matches(out / "ct_seg.dcm", sources, label, names)
    assert_rtstruct_matches(out / "ct_rtstruct.dcm", reversed_series, sources, label, names)
