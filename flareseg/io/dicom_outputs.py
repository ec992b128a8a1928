"""DICOM outputs for a predicted label map: DICOM-SEG (highdicom) and RTSTRUCT (rt-utils), as TotalSegmentator offers.

The label map is on the grid `flareseg.io.read_image(series_folder)` returns: ITK's slice order, which need not be
the order of the files (nor of InstanceNumber). Each array slice is matched to its source file by position: the
physical point of its first voxel against ImagePositionPatient, along the slice normal (the cross product of the
ImageOrientationPatient cosines) and sideways, so that every frame and contour references the SOP instance it was
computed on.

A series whose Study, Series or SOP Instance UIDs (or Frame of Reference UID) are empty or missing cannot be
referenced: such UIDs are generated in memory, deterministically (from the folder, the file names and sizes), so that
reruns and the two outputs agree, and the report says so. rt-utils reads the series from a folder itself, so it is
given a temporary copy of the series with those UIDs.

highdicom, pydicom and rt-utils (the `dicom` extra) are imported when a function needs them, so `import flareseg`
does not load them.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flareseg.atomic import atomic_path
from flareseg.io.geometry import Geometry

log = logging.getLogger(__name__)

EXTRA_HINT = 'pip install "flareseg[dicom]"'
GENERATED_UIDS_MESSAGE = "the source series had no valid UIDs: the output references generated ones (not the originals)"
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # lenient: real series carry UIDs with leading zeros, still referencable
_SERIES_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")  # one value for the whole series
_RT_UTILS_NEEDS = ("StudyDate", "StudyTime", "StudyID")  # rt-utils reads these without a default
_SLICE_TOLERANCE = 0.5  # of the voxel size: a slice farther from every file is not on the series' grid
_COSINE_TOLERANCE = 1e-3


class DicomExtraMissing(ImportError, ValueError):
    """The `dicom` extra (highdicom, rt-utils) is not installed. A ValueError too, so the CLI prints its one line."""


@dataclass(frozen=True)
class SnomedCode:
    """What a segment is, in SNOMED CT (coding scheme SCT): the segmented property type and its category, with the
    laterality as a type modifier (as TotalSegmentator and DCMQI code left and right organs)."""

    code: str
    meaning: str
    category_code: str
    category_meaning: str
    modifier_code: str | None = None
    modifier_meaning: str | None = None


_ANATOMY = ("123037004", "Anatomical Structure")  # SRT T-D000A
_ALTERED = ("49755003", "Morphologically Altered Structure")  # SRT M-01000
_LEFT = ("7771000", "Left")
_RIGHT = ("24028007", "Right")


def _organ(code: str, meaning: str, side: tuple[str, str] | None = None) -> SnomedCode:
    return SnomedCode(code, meaning, *_ANATOMY, *(side or (None, None)))


# TotalSegmentator's resources/totalsegmentator_snomed_mapping.csv for the organs (and its liver_tumor for "lesion":
# FLARE23's pan-cancer lesions, without an anatomic region); pydicom's codes.SCT agree on every value.
SNOMED_CODES: dict[str, SnomedCode] = {
    "liver": _organ("10200004", "Liver"),
    "right_kidney": _organ("64033007", "Kidney", _RIGHT),
    "spleen": _organ("78961009", "Spleen"),
    "pancreas": _organ("15776009", "Pancreas"),
    "aorta": _organ("15825003", "Aorta"),
    "inferior_vena_cava": _organ("64131007", "Inferior vena cava"),
    "right_adrenal_gland": _organ("23451007", "Adrenal gland", _RIGHT),
    "left_adrenal_gland": _organ("23451007", "Adrenal gland", _LEFT),
    "gallbladder": _organ("28231008", "Gallbladder"),
    "esophagus": _organ("32849002", "Esophagus"),
    "stomach": _organ("69695003", "Stomach"),
    "duodenum": _organ("38848004", "Duodenum"),
    "left_kidney": _organ("64033007", "Kidney", _LEFT),
    "kidney": _organ("64033007", "Kidney"),  # FLARE21: both kidneys in one label
    "lesion": SnomedCode("108369006", "Neoplasm", *_ALTERED),
}
GENERIC_CODE = SnomedCode("85756007", "Tissue", "85756007", "Tissue")  # DCMQI's generic type for an unknown name


@dataclass(frozen=True)
class DicomOutputReport:
    """What a DICOM output holds. `path` is None when the label map held no label (nothing is written)."""

    path: Path | None
    segments: tuple[str, ...]
    generated_uids: bool
    message: str


def snomed_code(name: str) -> SnomedCode:
    """The code of a label name; the generic "Tissue" code, with a warning, for a name without one."""
    code = SNOMED_CODES.get(name)
    if code is None:
        log.warning(
            "label %r has no SNOMED CT code in flareseg's table: coded as the generic 'Tissue' (85756007)", name
        )
        return GENERIC_CODE
    return code


def write_dicom_seg(
    label: np.ndarray,
    series_folder: str | os.PathLike,
    out_path: str | os.PathLike,
    label_names: Sequence[str],
    *,
    geometry: Geometry | None = None,
) -> DicomOutputReport:
    """Write `label` ([z, y, x], on the grid read_image(series_folder) returns) as a BINARY DICOM-SEG that
    references the series' images: one segment per label id present (id i is label_names[i - 1]).

    `geometry`: the Geometry read_image returned for the folder, if at hand (else the series is read again).
    """
    hd, codes = _import_highdicom()
    label = np.asarray(label)
    series = _load_series(label, series_folder, label_names, geometry)
    if not series.ids:
        return _nothing_written("DICOM-SEG", out_path, series)
    segment_of = np.zeros(max(series.ids) + 1, dtype=np.uint16 if len(series.ids) > 255 else np.uint8)
    segment_of[list(series.ids)] = np.arange(1, len(series.ids) + 1)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="flareseg", family=codes.DCM.ArtificialIntelligence, version=_version()
    )
    descriptions = [
        _segment_description(hd, number, label_names[i - 1], algorithm) for number, i in enumerate(series.ids, 1)
    ]
    with _quiet("highdicom", logging.WARNING):
        seg = hd.seg.Segmentation(
            source_images=[series.datasets[j] for j in series.file_of_slice],
            pixel_array=segment_of[label],
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=_output_series_number(series),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="flareseg",
            manufacturer_model_name="flareseg",
            software_versions=_version(),
            device_serial_number="none",
            series_description="flareseg segmentation",
            content_label="FLARESEG",
        )
        with atomic_path(out_path) as tmp:
            seg.save_as(tmp)
    return _report("DICOM-SEG", out_path, series, label_names)


def write_rtstruct(
    label: np.ndarray,
    series_folder: str | os.PathLike,
    out_path: str | os.PathLike,
    label_names: Sequence[str],
    *,
    geometry: Geometry | None = None,
) -> DicomOutputReport:
    """Write `label` ([z, y, x], on the grid read_image(series_folder) returns) as an RTSTRUCT of closed planar
    contours (rt-utils): one ROI per label id present, named label_names[id - 1].

    Contours are polygons through the centres of each region's border pixels; see tests/test_dicom_outputs.py
    for what survives the round trip. `geometry` as for write_dicom_seg.
    """
    builder = _import_rt_utils()
    label = np.asarray(label)
    series = _load_series(label, series_folder, label_names, geometry)
    spacing = [float(v) for v in series.datasets[0].PixelSpacing]
    if abs(spacing[0] - spacing[1]) > 1e-6 * max(spacing):
        # rt-utils scales column indices by PixelSpacing[0] (the row spacing): contours would be misplaced
        raise ValueError(
            f"{series.folder}: its pixels are not square (PixelSpacing {spacing[0]:g}\\{spacing[1]:g}); rt-utils "
            "would place RTSTRUCT contours wrongly: write a DICOM-SEG instead"
        )
    if not series.ids:
        return _nothing_written("RTSTRUCT", out_path, series)
    slice_of_file = np.argsort(series.file_of_slice)
    with tempfile.TemporaryDirectory(prefix="flareseg-rtstruct-") as tmp:
        _series_for_rt_utils(series, Path(tmp))
        with _quiet("pydicom", logging.ERROR):  # rt-utils sets FileDataset.is_little_endian, deprecated in pydicom 3
            rtstruct = builder.create_new(dicom_series_path=tmp)
        file_of_uid = {ds.SOPInstanceUID: j for j, ds in enumerate(series.datasets)}
        rt_files = [file_of_uid.get(ds.SOPInstanceUID) for ds in rtstruct.series_data]
        if len(rt_files) != len(series.files) or None in rt_files:
            raise ValueError(
                f"{series.folder}: rt-utils read {len(rt_files)} of the series' {len(series.files)} files (it skips "
                "files whose pixel data pydicom cannot decode, e.g. JPEG-LS without pylibjpeg)"
            )
        slices = slice_of_file[rt_files]  # rt-utils' slice i (ascending along the normal) is array slice slices[i]
        rtstruct.set_series_description("flareseg segmentation")
        for i in series.ids:
            mask = np.moveaxis(label[slices] == i, 0, -1)  # [rows, columns, slices] in rt-utils' order
            rtstruct.add_roi(mask=mask, name=label_names[i - 1], roi_generation_algorithm="AUTOMATIC")
        with atomic_path(out_path) as tmp_out, _quiet("pydicom", logging.ERROR):
            rtstruct.ds.save_as(tmp_out)
    return _report("RTSTRUCT", out_path, series, label_names)


@dataclass
class _Series:
    folder: Path
    files: list[Path]
    datasets: list  # pydicom headers (no pixel data), UIDs repaired in memory
    generated: list[str]  # which UIDs were generated
    changed: list[bool]  # files whose header was repaired
    file_of_slice: np.ndarray | None = None  # array slice k comes from files[file_of_slice[k]]
    ids: tuple[int, ...] = ()  # label ids present


def _read_series(series_folder: str | os.PathLike) -> _Series:
    """The headers of the series read_image reads from the folder, their missing UIDs generated in memory."""
    import pydicom

    folder = Path(series_folder)
    files = _series_files(folder)
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    generated, changed = _repair_uids(folder, files, datasets)
    return _Series(folder, files, datasets, generated, changed)


def _load_series(
    label: np.ndarray, series_folder: str | os.PathLike, label_names: Sequence[str], geometry: Geometry | None
) -> _Series:
    """Check the label map against the series' grid, read the series and match each array slice to its file."""
    folder = Path(series_folder)
    label = np.asarray(label)
    if label.ndim != 3 or not (np.issubdtype(label.dtype, np.integer) or label.dtype == bool):
        raise ValueError(f"the label map must be a 3D array of integer label ids, got {label.dtype} {label.shape}")
    if geometry is None:
        from flareseg.io import read_image

        geometry = read_image(folder)[1]
    if tuple(label.shape) != tuple(geometry.shape):
        raise ValueError(
            f"{folder}: the label map has shape {tuple(label.shape)} but the DICOM series reads as "
            f"{tuple(geometry.shape)} ([z, y, x]): a label map must be on the series' own grid"
        )
    ids = _label_ids(label, label_names)
    series = _read_series(folder)
    series.file_of_slice = _match_slices(folder, geometry, series.files, series.datasets)
    series.ids = ids
    return series


def _label_ids(label: np.ndarray, label_names: Sequence[str]) -> tuple[int, ...]:
    """The label ids present (0 excluded); ValueError for ids without a name or duplicated names."""
    if label.size == 0:
        return ()
    low, high = int(label.min()), int(label.max())
    if low < 0 or high > len(label_names):
        raise ValueError(
            f"the label map holds label ids {low}..{high} but {len(label_names)} label names were given "
            f"({', '.join(label_names)}): id i is named label_names[i - 1]"
        )
    duplicated = sorted(name for name, count in Counter(label_names).items() if count > 1)
    if duplicated:
        raise ValueError(f"label names must be unique: {', '.join(duplicated)} given more than once")
    counts = sum(np.bincount(plane.ravel(), minlength=len(label_names) + 1) for plane in label)  # slice by slice
    return tuple(int(i) for i in np.flatnonzero(counts[1:]) + 1)


def _series_files(folder: Path) -> list[Path]:
    """The files of the series read_image reads from `folder`: GDCM's series with the most files."""
    import SimpleITK as sitk

    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise ValueError(f"{folder}: is not a folder with a readable DICOM series")
    series = [sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series_ids]
    return [Path(f) for f in max(series, key=len)]


def _match_slices(folder: Path, geometry: Geometry, files: list[Path], datasets: list) -> np.ndarray:
    """For each array slice, the index of the file at its position (ValueError when the grids disagree)."""
    n, rows, columns = geometry.shape
    first = datasets[0]
    if len(files) != n or int(first.Rows) != rows or int(first.Columns) != columns:
        raise ValueError(
            f"{folder}: its DICOM series has {len(files)} files of {first.Rows}x{first.Columns} pixels but the "
            f"grid is {n}x{rows}x{columns} ([z, y, x]): not the grid read_image returns for this folder"
        )
    cosines = np.asarray([float(v) for v in first.ImageOrientationPatient])
    direction = geometry.direction_matrix  # columns: the physical directions of array axes x, y, z
    if not (
        np.allclose(direction[:, 0], cosines[:3], atol=_COSINE_TOLERANCE)
        and np.allclose(direction[:, 1], cosines[3:], atol=_COSINE_TOLERANCE)
    ):
        raise ValueError(
            f"{folder}: the grid's in-plane axes {np.round(direction[:, :2].T.ravel(), 4).tolist()} are not the "
            f"series' ImageOrientationPatient {cosines.tolist()}: was the label map reoriented? "
            "Give it on the grid read_image returns"
        )
    normal = np.cross(cosines[:3], cosines[3:])
    positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    corners = geometry.index_to_physical(np.stack([np.arange(n), np.zeros(n), np.zeros(n)], axis=1))
    along = np.abs((corners @ normal)[:, None] - (positions @ normal)[None, :])  # [slice, file], mm
    file_of_slice = along.argmin(axis=1)
    offsets = corners - positions[file_of_slice]
    along_off = np.abs(offsets @ normal)
    sideways = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    bad = np.flatnonzero(
        (along_off > _SLICE_TOLERANCE * geometry.spacing[0]) | (sideways > _SLICE_TOLERANCE * min(geometry.spacing[1:]))
    )
    if bad.size or len(set(file_of_slice.tolist())) != n:
        shared = np.bincount(file_of_slice, minlength=n)[file_of_slice] > 1
        k = int(bad[0]) if bad.size else int(np.flatnonzero(shared)[1])
        raise ValueError(
            f"{folder}: array slice {k} starts at {np.round(corners[k], 3).tolist()} mm; the nearest DICOM file, "
            f"{files[file_of_slice[k]].name}, at {np.round(positions[file_of_slice[k]], 3).tolist()} mm"
            f"{' (already matched to another slice)' if not bad.size else ''}: the grid is not the series' grid"
        )
    return file_of_slice


def _repair_uids(folder: Path, files: list[Path], datasets: list) -> tuple[list[str], list[bool]]:
    """Generate, in memory, the UIDs a reference needs that are empty, missing, malformed or (SOP instances)
    duplicated; take an empty SOPClassUID from the file meta. Returns what was generated and which files changed."""
    from pydicom.uid import generate_uid

    sizes = [f.stat().st_size for f in files]
    series_key = [str(folder.resolve()), *sorted(f"{f.name}:{size}" for f, size in zip(files, sizes))]
    generated: list[str] = []
    changed = [False] * len(files)
    for keyword in _SERIES_UIDS:
        values = {str(ds.get(keyword, "") or "") for ds in datasets}
        if len(values) == 1 and _valid_uid(next(iter(values))):
            continue
        uid = generate_uid(entropy_srcs=["flareseg", keyword, *series_key])
        for ds in datasets:
            setattr(ds, keyword, uid)
        generated.append(keyword)
        changed = [True] * len(files)
    sops = [str(ds.get("SOPInstanceUID", "") or "") for ds in datasets]
    count = Counter(sops)
    invalid = [j for j, uid in enumerate(sops) if not _valid_uid(uid) or count[uid] > 1]
    for j in invalid:
        uid = generate_uid(entropy_srcs=["flareseg", "SOPInstanceUID", str(files[j].resolve()), str(sizes[j])])
        datasets[j].SOPInstanceUID = uid
        datasets[j].file_meta.MediaStorageSOPInstanceUID = uid
        changed[j] = True
    if invalid:
        generated.append(f"SOPInstanceUID ({len(invalid)} of {len(files)} files)")
    for j, ds in enumerate(datasets):
        if not _valid_uid(str(ds.get("SOPClassUID", "") or "")):
            from_meta = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
            if not _valid_uid(from_meta):
                raise ValueError(f"{folder}: its DICOM file {files[j].name} has no SOPClassUID (nor in its file meta)")
            ds.SOPClassUID = from_meta
            changed[j] = True
    return generated, changed


def _valid_uid(uid: str) -> bool:
    return 0 < len(uid) <= 64 and _UID.fullmatch(uid) is not None


def write_series_with_uids(series_folder: str | os.PathLike, out_folder: str | os.PathLike) -> list[Path]:
    """Copy the series read_image reads from `series_folder` into `out_folder`, with the UIDs the DICOM outputs
    reference: a viewer that is to show a DICOM-SEG or RTSTRUCT of a series without valid UIDs needs this copy."""
    try:
        import pydicom  # noqa: F401
    except ImportError as error:
        raise DicomExtraMissing(f"copying a DICOM series needs the dicom extra: {EXTRA_HINT} ({error})") from error
    series = _read_series(series_folder)
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    return [_write_repaired(series, j, out / f.name) for j, f in enumerate(series.files)]


def _series_for_rt_utils(series: _Series, folder: Path) -> None:
    """The series as rt-utils reads it: a file per slice, the repaired ones rewritten, the others linked."""
    for j, (source, header) in enumerate(zip(series.files, series.datasets)):
        target = folder / f"{j:05d}.dcm"
        if series.changed[j] or any(k not in header for k in _RT_UTILS_NEEDS):
            _write_repaired(series, j, target)
        else:
            os.symlink(source.resolve(), target)


def _write_repaired(series: _Series, j: int, target: Path) -> Path:
    """File j of the series, pixels included, with its repaired UIDs (and empty study attributes rt-utils needs)."""
    import pydicom

    ds = pydicom.dcmread(series.files[j])
    header = series.datasets[j]
    for keyword in (*_SERIES_UIDS, "SOPInstanceUID", "SOPClassUID"):
        setattr(ds, keyword, getattr(header, keyword))
    for keyword in _RT_UTILS_NEEDS:
        if keyword not in ds:
            setattr(ds, keyword, "")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    with atomic_path(target) as tmp:
        ds.save_as(tmp)
    return target


@contextmanager
def _quiet(name: str, level: int) -> Iterator[None]:
    """Keep highdicom's INFO lines and pydicom's deprecation notes about rt-utils' code out of flareseg's output."""
    logger = logging.getLogger(name)
    saved = logger.level
    try:
        logger.setLevel(level)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(saved)


def _segment_description(hd, number: int, name: str, algorithm):
    """A highdicom SegmentDescription coded in SNOMED CT, laterality as a property type modifier."""
    code = snomed_code(name)
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=name,
        segmented_property_category=hd.sr.CodedConcept(code.category_code, "SCT", code.category_meaning),
        segmented_property_type=hd.sr.CodedConcept(code.code, "SCT", code.meaning),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    if code.modifier_code is not None:
        modifier = hd.sr.CodedConcept(code.modifier_code, "SCT", code.modifier_meaning)
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
    return description


def _output_series_number(series: _Series) -> int:
    number = series.datasets[0].get("SeriesNumber")
    return int(number) + 1000 if number not in (None, "") else 1000


def _report(kind: str, out_path: str | os.PathLike, series: _Series, label_names: Sequence[str]) -> DicomOutputReport:
    names = tuple(label_names[i - 1] for i in series.ids)
    message = f"{out_path}: {kind} with {len(names)} segment(s) of {series.folder}"
    if series.generated:
        message = f"{out_path}: {GENERATED_UIDS_MESSAGE}: {', '.join(series.generated)}"
        log.warning("%s", message)
    return DicomOutputReport(Path(out_path), names, bool(series.generated), message)


def _nothing_written(kind: str, out_path: str | os.PathLike, series: _Series) -> DicomOutputReport:
    message = f"{out_path}: the label map holds no label: no {kind} written"
    log.warning("%s", message)
    return DicomOutputReport(None, (), bool(series.generated), message)


def _version() -> str:
    from flareseg import __version__

    return __version__


def _import_highdicom():
    try:
        import highdicom
        import pydicom  # noqa: F401 - highdicom's own dependency, named for the message
        from pydicom.sr.codedict import codes
    except ImportError as error:
        raise DicomExtraMissing(f"DICOM-SEG output needs the dicom extra: {EXTRA_HINT} ({error})") from error
    return highdicom, codes


def _import_rt_utils():
    try:
        import pydicom  # noqa: F401
        from rt_utils import RTStructBuilder
    except ImportError as error:
        raise DicomExtraMissing(f"RTSTRUCT output needs the dicom extra: {EXTRA_HINT} ({error})") from error
    return RTStructBuilder
