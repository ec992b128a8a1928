"""Read one DICOM series from a folder, refusing the series that ITK would place wrongly.

ITK stacks the files of a series in GDCM's order and spaces them evenly by (last - first) / (n - 1); a missing or
duplicated slice only prints "Non uniform sampling" and shifts every slice after it. So the slice positions are
checked here: ImagePositionPatient projected on the slice normal (the cross product of the ImageOrientationPatient
row and column cosines) must step evenly in one direction, with no two slices at one position, every slice in one
orientation, and no sideways drift (gantry tilt, which ITK's grid cannot represent either).

Tolerances. DICOM writes positions as decimal strings (at most 16 characters) that scanners round to 1e-3 mm or
finer, and real series show steps that differ by a few 1e-3 mm. A step may therefore differ from the median step by
max(1 % of it, 0.01 mm): 0.02 mm on a 2 mm series, far below any resampling error, while a missing slice is off
by 100 % and a duplicate has a step of 0. Direction cosines may differ by 1e-4 (0.006 degrees, 0.05 mm across a
500 mm field of view).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from flareseg.io.errors import ImageReadError

log = logging.getLogger(__name__)

POSITION = "0020|0032"  # ImagePositionPatient
ORIENTATION = "0020|0037"  # ImageOrientationPatient
_DESCRIPTION = "0008|103e"  # SeriesDescription
RELATIVE_TOLERANCE = 0.01  # of the median slice step
ABSOLUTE_TOLERANCE_MM = 0.01
COSINE_TOLERANCE = 1e-4
_SHOWN = 3  # problems named in a message; the count says how many there are


def read_dicom_series(folder: Path) -> sitk.Image:
    """The series with the most files in `folder` (series whose UIDs are empty strings included), checked.

    Raises ImageReadError when there is no series, a single slice, or slices that are duplicated, missing,
    unevenly spaced, out of order, in mixed orientations, or without a position. RuntimeError comes from ITK.
    """
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise ImageReadError(folder, "is a folder without a readable DICOM series")
    series = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series_ids}
    chosen = max(series_ids, key=lambda uid: len(series[uid]))
    if len(series) > 1:
        _warn_several_series(folder, series, chosen)
    files = series[chosen]
    if len(files) < 2:
        raise ImageReadError(folder, f"its DICOM series has {len(files)} slice; expected a 3D volume")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # the tags of every file, read with the pixels at no extra I/O
    image = reader.Execute()
    names = [Path(f).name for f in files]
    positions = np.array([_numbers(folder, reader, i, POSITION, 3, names[i]) for i in range(len(files))])
    orientations = np.array([_numbers(folder, reader, i, ORIENTATION, 6, names[i]) for i in range(len(files))])
    check_slice_positions(folder, names, positions, orientations)
    return image


def check_slice_positions(folder: Path, names: list[str], positions: np.ndarray, orientations: np.ndarray) -> None:
    """Raise ImageReadError unless the slices (in reading order) lie evenly spaced along one slice normal.

    `positions` (n, 3): ImagePositionPatient in mm; `orientations` (n, 6): ImageOrientationPatient.
    """
    normal = _slice_normal(folder, names, orientations)
    along = positions @ normal  # mm along the slice normal
    order = np.argsort(along, kind="stable")
    sorted_steps = np.diff(along[order])
    spacing = float(np.median(sorted_steps))
    tolerance = max(RELATIVE_TOLERANCE * spacing, ABSOLUTE_TOLERANCE_MM)

    duplicates = np.flatnonzero(sorted_steps <= tolerance)
    if duplicates.size:
        pairs = [
            f"{names[order[k]]} and {names[order[k + 1]]} at {along[order[k]]:.3f} mm" for k in duplicates[:_SHOWN]
        ]
        raise ImageReadError(
            folder,
            f"its DICOM series has {duplicates.size} duplicated slice position(s) along the slice normal: "
            f"{'; '.join(pairs)}{_more(duplicates.size)}",
        )
    steps = np.diff(along)  # in reading order: ITK stacks the files so
    if not ((steps > 0).all() or (steps < 0).all()):
        k = int(np.flatnonzero(np.sign(steps) != np.sign(steps[0]))[0])
        raise ImageReadError(
            folder,
            f"its DICOM files are not in slice order: {names[k]} ({along[k]:.3f} mm) comes after "
            f"{names[k - 1]} ({along[k - 1]:.3f} mm) and before {names[k + 1]} ({along[k + 1]:.3f} mm)",
        )
    uneven = np.flatnonzero(np.abs(np.abs(steps) - spacing) > tolerance)
    if uneven.size:
        gaps = [
            f"{abs(steps[k]):.3f} mm between {names[k]} ({along[k]:.3f} mm) and {names[k + 1]} ({along[k + 1]:.3f} mm)"
            for k in uneven[:_SHOWN]
        ]
        raise ImageReadError(
            folder,
            f"its DICOM series is not evenly spaced (missing slices?): the median step is {spacing:.3f} mm but "
            f"{'; '.join(gaps)}{_more(uneven.size)}",
        )
    drift = positions - positions[0] - np.outer(along - along[0], normal)  # sideways from the first slice
    off = np.linalg.norm(drift, axis=1)
    if off.max() > tolerance:
        k = int(np.argmax(off))
        raise ImageReadError(
            folder,
            f"its DICOM slices shift sideways along the series (gantry tilt?): {names[k]} lies {off[k]:.3f} mm "
            f"off the slice normal through {names[0]}; ITK's grid cannot place such slices",
        )


def _slice_normal(folder: Path, names: list[str], orientations: np.ndarray) -> np.ndarray:
    """The unit normal shared by every slice's ImageOrientationPatient; ImageReadError when they differ or are
    not orthogonal unit vectors."""
    differs = np.abs(orientations - orientations[0]).max(axis=1) > COSINE_TOLERANCE
    if differs.any():
        others = np.flatnonzero(differs)
        raise ImageReadError(
            folder,
            f"its DICOM series mixes slice orientations: {_list(names, others)} "
            f"{'has' if others.size == 1 else 'have'} ImageOrientationPatient "
            f"{_cosines(orientations[others[0]])} where {names[0]} has {_cosines(orientations[0])}",
        )
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    if not 0.99 < np.linalg.norm(normal) < 1.01:  # row and column cosines must be orthogonal unit vectors
        raise ImageReadError(
            folder, f"its DICOM file {names[0]} has an invalid ImageOrientationPatient {_cosines(orientations[0])}"
        )
    return normal / np.linalg.norm(normal)


def _numbers(folder: Path, reader: sitk.ImageSeriesReader, index: int, tag: str, count: int, name: str) -> list:
    """A backslash-separated numeric tag of one file of the series."""
    text = reader.GetMetaData(index, tag) if reader.HasMetaDataKey(index, tag) else ""
    try:
        values = [float(v) for v in text.split("\\")]
    except ValueError:
        values = []
    if len(values) != count or not np.isfinite(values).all():
        what = "ImagePositionPatient" if tag == POSITION else "ImageOrientationPatient"
        raise ImageReadError(folder, f"its DICOM file {name} has no valid {what} ({tag}): {text.strip()!r}")
    return values


def _warn_several_series(folder: Path, series: dict[str, tuple[str, ...]], chosen: str) -> None:
    """Say which series is read, why, and which are not."""
    others = [uid for uid in series if uid != chosen]
    tie = any(len(series[uid]) == len(series[chosen]) for uid in others)
    why = "the first of the series with the most files" if tie else "the series with the most files"
    log.warning(
        "%s: holds %d DICOM series; reading %s, %s; not read: %s",
        folder,
        len(series),
        _describe(chosen, series[chosen]),
        why,
        "; ".join(_describe(uid, series[uid]) for uid in others),
    )


def _describe(uid: str, files: tuple[str, ...]) -> str:
    """Series UID, description and file count, for the several-series warning."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    description = ""
    try:
        reader.ReadImageInformation()
        if reader.HasMetaDataKey(_DESCRIPTION):
            description = f" {reader.GetMetaData(_DESCRIPTION).strip()!r}"
    except RuntimeError:
        pass  # the description is only a help to the reader of the warning
    return f"series {uid or '(empty UID)'}{description} ({len(files)} files)"


def _cosines(values: np.ndarray) -> str:
    return "\\".join(f"{v:g}" for v in values)


def _list(names: list[str], indices: np.ndarray) -> str:
    return ", ".join(names[i] for i in indices[:_SHOWN]) + _more(indices.size)


def _more(count: int) -> str:
    return f" (and {count - _SHOWN} more)" if count > _SHOWN else ""
