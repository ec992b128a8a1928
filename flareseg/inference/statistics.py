"""Per-label statistics of a label map over its CT, as TotalSegmentator's `--statistics` gives them.

For each label present: voxel count, volume (ml), HU mean, std, median and 5th / 95th percentiles, the bounding box
(array indices [z, y, x] and, in patient coordinates, the box of the voxel centres in mm, x y z as ITK and DICOM
give them: LPS) and the centroid (mm, x y z).

Everything comes from one pass over the label map: the labelled voxels are gathered once and every figure is a
bincount over them by label (counts, HU sums and squares, coordinate sums, and for integer CT one HU histogram per
label); the boxes come from scipy's find_objects. No label loops over the whole volume. Percentiles interpolate
linearly between the two nearest ranks, as numpy.percentile does by default.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from flareseg.atomic import atomic_path
from flareseg.io import Geometry

PERCENTILES = (5.0, 50.0, 95.0)
COLUMNS = (
    "label",
    "name",
    "voxels",
    "volume_ml",
    "hu_mean",
    "hu_std",
    "hu_median",
    "hu_p5",
    "hu_p95",
    "bbox_index_lo",
    "bbox_index_hi",
    "bbox_mm_lo",
    "bbox_mm_hi",
    "centroid_mm",
)


def label_statistics(
    label: np.ndarray, image: np.ndarray, geometry: Geometry, names: list[str] | None = None
) -> dict[str, dict]:
    """{label name: its figures} for every label id present in `label` (uint8 [z, y, x] on `image`'s grid).

    `names[k]` names label id k + 1 (ids without a name are called label_<id>)."""
    if label.shape != image.shape:
        raise ValueError(f"the label map {label.shape} and the image {image.shape} differ in shape")
    where = np.flatnonzero(label)  # the one pass over the volume (boxes come from find_objects, a second)
    if where.size == 0:
        return {}
    ids = label.reshape(-1)[where].astype(np.intp)
    hu = image.reshape(-1)[where]
    counts = np.bincount(ids)
    present = np.flatnonzero(counts)
    sums = np.bincount(ids, weights=hu.astype(np.float64))
    squares = np.bincount(ids, weights=np.square(hu, dtype=np.float64))
    centre_sums = [np.bincount(ids, weights=axis.astype(np.float64)) for axis in np.unravel_index(where, label.shape)]
    boxes = ndimage.find_objects(label)
    percentiles = _percentiles(ids, hu, present)
    voxel_ml = math.prod(geometry.spacing) / 1000.0
    result = {}
    for value in present.tolist():
        count = int(counts[value])
        mean = sums[value] / count
        lo = np.array([axis.start for axis in boxes[value - 1]])
        hi = np.array([axis.stop - 1 for axis in boxes[value - 1]])
        corners_mm = _box_corners_mm(lo, hi, geometry)
        centre = np.array([axis_sums[value] / count for axis_sums in centre_sums])
        result[_name(value, names)] = {
            "label": value,
            "voxels": count,
            "volume_ml": float(count * voxel_ml),
            "hu_mean": float(mean),
            "hu_std": float(math.sqrt(max(squares[value] / count - mean * mean, 0.0))),
            **dict(zip(("hu_p5", "hu_median", "hu_p95"), percentiles[value])),
            "bbox_index_lo": lo.tolist(),
            "bbox_index_hi": hi.tolist(),  # inclusive
            "bbox_mm_lo": corners_mm.min(axis=0).tolist(),
            "bbox_mm_hi": corners_mm.max(axis=0).tolist(),
            "centroid_mm": geometry.index_to_physical(centre).tolist(),
        }
    return result


def _percentiles(ids: np.ndarray, hu: np.ndarray, present: np.ndarray) -> dict[int, list[float]]:
    """PERCENTILES of each label's HU values. Integer CT (int16 or narrower): one histogram per label from one
    bincount of (label, HU), each read at the ranks numpy.percentile interpolates between; float images: one sort
    by (label, HU)."""
    if np.issubdtype(hu.dtype, np.integer) and hu.dtype.itemsize <= 2:
        offset = 32768 if np.issubdtype(hu.dtype, np.signedinteger) else 0
        bins = 65536
        histogram = np.bincount(ids * bins + (hu.astype(np.intp) + offset), minlength=(int(ids.max()) + 1) * bins)
        result = {}
        for value in present.tolist():
            cumulative = np.cumsum(histogram[value * bins : (value + 1) * bins])
            result[value] = [_rank_percentile(cumulative, q, offset) for q in PERCENTILES]
        return result
    order = np.lexsort((hu, ids))
    sorted_ids, sorted_hu = ids[order], hu[order].astype(np.float64)
    starts = np.searchsorted(sorted_ids, present)
    ends = np.searchsorted(sorted_ids, present, side="right")
    return {
        value: [_sorted_percentile(sorted_hu[start:end], q) for q in PERCENTILES]
        for value, start, end in zip(present.tolist(), starts, ends)
    }


def _rank_percentile(cumulative: np.ndarray, q: float, offset: int) -> float:
    """numpy.percentile's linear interpolation, from a histogram's cumulative counts of integer values."""
    position = (int(cumulative[-1]) - 1) * q / 100.0
    lo = math.floor(position)
    at_lo = int(np.searchsorted(cumulative, lo, side="right")) - offset  # the value of rank lo (0-based)
    at_hi = int(np.searchsorted(cumulative, min(lo + 1, int(cumulative[-1]) - 1), side="right")) - offset
    return float(at_lo + (at_hi - at_lo) * (position - lo))


def write_statistics_csv(path: str | Path, per_case: dict[str, dict[str, dict]]) -> Path:
    """One CSV for a folder: a row per case and label (lists as space-separated numbers), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("case", *COLUMNS))
        for case, labels in sorted(per_case.items()):
            for name, figures in labels.items():
                row = {**figures, "name": name}
                writer.writerow((case, *(_cell(row[column]) for column in COLUMNS)))
    return Path(path)


def _sorted_percentile(run: np.ndarray, q: float) -> float:
    """numpy.percentile's linear interpolation on an already sorted run."""
    position = (run.size - 1) * q / 100.0
    lo = math.floor(position)
    hi = min(lo + 1, run.size - 1)
    return float(run[lo] + (run[hi] - run[lo]) * (position - lo))


def _box_corners_mm(lo: np.ndarray, hi: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The 8 corners of the index box [lo, hi] (voxel centres) in patient coordinates, (8, 3) x y z mm."""
    corners = np.array([[(lo, hi)[bit >> axis & 1][axis] for axis in range(3)] for bit in range(8)])
    return geometry.index_to_physical(corners)


def _name(value: int, names: list[str] | None) -> str:
    return names[value - 1] if names and 1 <= value <= len(names) else f"label_{value}"


def _cell(value) -> object:
    if isinstance(value, list):
        return " ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return value
