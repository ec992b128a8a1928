"""The source DICOM series of a label map: its headers, which file each array slice comes from, and valid UIDs.

The label map is on the grid `flareseg.io.read_image(series_folder)` returns: ITK's slice order, which need not be
the order of the files (nor of InstanceNumber). Each array slice is matched to its source file by position: the
physical point of its first voxel against ImagePositionPatient, along the slice normal (the cross product of the
ImageOrientationPatient cosines) and sideways, so that every frame and contour references the SOP instance it was
computed on.

A series whose Study, Series or SOP Instance UIDs (or Frame of Reference UID) are empty or missing cannot be
referenced: such UIDs are generated in memory, deterministically (from the folder, the file names and sizes), so that
reruns and the two outputs agree. pydicom is imported when a function needs it.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flareseg.atomic import atomic_path
from flareseg.io.geometry import Geometry

EXTRA_HINT = 'pip install "flareseg[dicom]"'
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # lenient: real series carry UIDs with leading zeros, still referencable
_SERIES_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")  # one value for the whole series
_RT_UTILS_NEEDS = ("StudyDate", "StudyTime", "StudyID")  # rt-utils reads these without a default
_SLICE_TOLERANCE = 0.5  # of the voxel size: a slice farther from every file is not on the series' grid
_COSINE_TOLERANCE = 1e-3


class DicomExtraMissing(ImportError, ValueError):
    """The `dicom` extra (highdicom, rt-utils) is not installed. A ValueError too, so the CLI prints its one line."""


@dataclass
class SourceSeries:
    folder: Path
    files: list[Path]
    datasets: list  # pydicom headers (no pixel data), UIDs repaired in memory
    generated: list[str]  # which UIDs were generated
    changed: list[bool]  # files whose header was repaired
    file_of_slice: np.ndarray | None = None  # array slice k comes from files[file_of_slice[k]]
    ids: tuple[int, ...] = ()  # label ids present


def read_series(series_folder: str | os.PathLike) -> SourceSeries:
    """The headers of the series read_image reads from the folder, their missing UIDs generated in memory."""
    import pydicom

    folder = Path(series_folder)
    files = _series_files(folder)
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    generated, changed = _repair_uids(folder, files, datasets)
    return SourceSeries(folder, files, datasets, generated, changed)


def load_series(
    label: np.ndarray, series_folder: str | os.PathLike, label_names: Sequence[str], geometry: Geometry | None
) -> SourceSeries:
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
    series = read_series(folder)
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
    series = read_series(series_folder)
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    return [_write_repaired(series, j, out / f.name) for j, f in enumerate(series.files)]


def series_for_rt_utils(series: SourceSeries, folder: Path) -> None:
    """The series as rt-utils reads it: a file per slice, the repaired ones rewritten, the others linked."""
    for j, (source, header) in enumerate(zip(series.files, series.datasets)):
        target = folder / f"{j:05d}.dcm"
        if series.changed[j] or any(k not in header for k in _RT_UTILS_NEEDS):
            _write_repaired(series, j, target)
        else:
            os.symlink(source.resolve(), target)


def _write_repaired(series: SourceSeries, j: int, target: Path) -> Path:
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
