"""Surface distances and the surface Dice at a tolerance (normalized surface distance, NSD).

The algorithm is the one of DeepMind's `surface-distance` package (Nikolov et al. 2021), which the FLARE challenges
use for their NSD; this is an independent implementation of it that gives the same numbers:

1. The surface of a mask is made of surfels: for every 2x2x2 block of voxels (a cube whose corners are voxel
   centres), the marching-cubes surface inside that cube. Its area depends only on which of the 8 corners are inside
   (256 configurations) and on the spacing, so it comes from a 256-entry table.
2. A block is a border block when it holds both inside and outside voxels. The distance from each border block of
   one mask to the nearest border block of the other is an exact Euclidean distance transform in millimetres.
3. Surface Dice at tolerance t = (area of the GT surfels within t of the predicted surface + area of the predicted
   surfels within t of the GT surface) / (GT surface area + predicted surface area).
4. The robust Hausdorff distance at p % (HD95 at 95, the Hausdorff distance at 100) comes from the same distances:
   per direction, the smallest distance whose cumulative surfel area reaches p % of that surface, then the larger
   of the two directions.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

# Corner c of a 2x2x2 block sits at offset CORNERS[c] (axis 0, 1, 2) and is bit c of the block's configuration code.
CORNERS = np.array(list(itertools.product((0, 1), repeat=3)))
_EDGES = [(a, b) for a in range(8) for b in range(a + 1, 8) if np.abs(CORNERS[a] - CORNERS[b]).sum() == 1]
_FACES = [[c for c in range(8) if CORNERS[c][axis] == side] for axis in range(3) for side in (0, 1)]


@dataclass(frozen=True)
class SurfaceDistances:
    """Per-surfel distances (mm) to the other surface and surfel areas (mm^2), in no particular order."""

    distances_gt_to_pred: np.ndarray
    distances_pred_to_gt: np.ndarray
    areas_gt: np.ndarray
    areas_pred: np.ndarray


def surfel_area_table(spacing: Sequence[float]) -> np.ndarray:
    """Surface area (mm^2) inside a 2x2x2 block for each of the 256 configuration codes, at this voxel spacing."""
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(spacing > 0):
        raise ValueError(f"spacing must be 3 positive values (axis 0, 1, 2), got {spacing.tolist()}")
    # A triangle's area vector (half the cross product of two edges) scales by the product of the other two
    # spacings along each axis when the block is stretched to the voxel size.
    scale = np.array([spacing[1] * spacing[2], spacing[0] * spacing[2], spacing[0] * spacing[1]])
    return np.linalg.norm(_unit_area_vectors() * scale, axis=-1).sum(axis=-1)


@lru_cache(maxsize=1)
def _unit_area_vectors() -> np.ndarray:
    """(256, T, 3): the area vectors of the marching-cubes triangles of each configuration in a unit cube."""
    per_code = [_triangle_area_vectors(code) for code in range(256)]
    table = np.zeros((256, max(len(v) for v in per_code), 3))
    for code, vectors in enumerate(per_code):
        if vectors:
            table[code, : len(vectors)] = vectors
    table.setflags(write=False)
    return table


def _triangle_area_vectors(code: int) -> list[np.ndarray]:
    """Marching-cubes triangles of one configuration, as area vectors.

    The surface crosses each cube edge whose two corners differ, at its midpoint. On a face with two diagonal inside
    corners (an ambiguous face) the corners of the minority class are cut off separately; the surface of a
    configuration and of its complement are then the same. Each closed polygon is split into the triangles that give
    it the largest area (only non-planar pentagons and hexagons have a choice). These two rules reproduce the
    marching-cubes case table of the reference package; the tests check all 256 codes at random spacings.
    """
    inside = [(code >> corner) & 1 for corner in range(8)]
    if sum(inside) > 4:
        inside = [1 - value for value in inside]
    cut = [edge for edge in _EDGES if inside[edge[0]] != inside[edge[1]]]
    links: dict[tuple[int, int], list[tuple[int, int]]] = {edge: [] for edge in cut}
    for face in _FACES:
        crossing = [edge for edge in cut if edge[0] in face and edge[1] in face]
        if len(crossing) == 2:
            pairs = [crossing]
        elif len(crossing) == 4:  # an ambiguous face: join the two crossings around each (minority) inside corner
            pairs = [[edge for edge in crossing if corner in edge] for corner in face if inside[corner]]
        else:
            pairs = []
        for first, second in pairs:
            links[first].append(second)
            links[second].append(first)

    vectors: list[np.ndarray] = []
    unvisited = set(cut)
    while unvisited:
        polygon = [min(unvisited)]
        unvisited.discard(polygon[0])
        while True:
            step = [edge for edge in links[polygon[-1]] if edge in unvisited]
            if not step:
                break
            polygon.append(step[0])
            unvisited.discard(step[0])
        points = [(CORNERS[a] + CORNERS[b]) / 2.0 for a, b in polygon]
        vectors.extend(_largest_triangulation(points))
    return vectors


def _largest_triangulation(points: list[np.ndarray]) -> list[np.ndarray]:
    """Area vectors of the triangulation of a closed polygon (at most 6 vertices here) with the largest area."""
    best: list[np.ndarray] = []
    best_area = -1.0
    for triangles in _triangulations(0, len(points) - 1):
        vectors = [0.5 * np.cross(points[j] - points[i], points[k] - points[i]) for i, j, k in triangles]
        area = float(sum(np.linalg.norm(v) for v in vectors))
        if area > best_area + 1e-9:  # tied triangulations have equal areas at any spacing
            best, best_area = vectors, area
    return best


def _triangulations(first: int, last: int) -> list[list[tuple[int, int, int]]]:
    """All triangulations of the convex polygon first..last (vertex indices in order)."""
    if last - first < 2:
        return [[]]
    return [
        left + right + [(first, apex, last)]
        for apex in range(first + 1, last)
        for left in _triangulations(first, apex)
        for right in _triangulations(apex, last)
    ]


def _union_box(gt: np.ndarray, pred: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of gt | pred, or None when both are empty."""
    union = gt | pred
    box = []
    for axis in range(union.ndim):
        present = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        if present.size == 0:
            return None
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def _block_codes(mask: np.ndarray) -> np.ndarray:
    """Configuration code of every 2x2x2 block of a mask padded with one outside voxel on each side."""
    padded = np.pad(mask, 1).astype(np.uint8)
    size = tuple(n - 1 for n in padded.shape)
    codes = np.zeros(size, dtype=np.uint8)
    for bit, (a, b, c) in enumerate(CORNERS):
        codes |= padded[a : a + size[0], b : b + size[1], c : c + size[2]] << bit
    return codes


def compute_surface_distances(gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> SurfaceDistances:
    """Distances from every surfel of each mask to the other surface, with the surfel areas.

    gt, pred: 3D bool arrays of one shape; spacing: voxel size in mm along the array axes. When a mask is empty its
    arrays are empty and the other mask's distances are all infinite.
    """
    gt, pred = _check_masks(gt, pred)
    spacing = tuple(float(s) for s in spacing)
    box = _union_box(gt, pred)
    if box is None:
        empty = np.zeros(0)
        return SurfaceDistances(empty, empty, empty, empty)
    # Cropping to the union's bounding box (then padding one voxel) keeps every border block and changes no distance.
    codes_gt, codes_pred = _block_codes(gt[box]), _block_codes(pred[box])
    border_gt = (codes_gt != 0) & (codes_gt != 255)
    border_pred = (codes_pred != 0) & (codes_pred != 255)
    areas = surfel_area_table(spacing)
    return SurfaceDistances(
        distances_gt_to_pred=_distances_to(border_pred, border_gt, spacing),
        distances_pred_to_gt=_distances_to(border_gt, border_pred, spacing),
        areas_gt=areas[codes_gt[border_gt]],
        areas_pred=areas[codes_pred[border_pred]],
    )


def _distances_to(target: np.ndarray, at: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distance (mm) from each True voxel of `at` to the nearest True voxel of `target`."""
    if not target.any():
        return np.full(int(at.sum()), np.inf)
    return ndimage.distance_transform_edt(~target, sampling=spacing)[at]


def surface_dice_at_tolerance(distances: SurfaceDistances, tolerance_mm: float) -> float:
    """Share of the two surfaces' area within `tolerance_mm` of the other surface; NaN when both are empty."""
    total = distances.areas_gt.sum() + distances.areas_pred.sum()
    if total == 0:
        return float("nan")
    close_gt = distances.areas_gt[distances.distances_gt_to_pred <= tolerance_mm].sum()
    close_pred = distances.areas_pred[distances.distances_pred_to_gt <= tolerance_mm].sum()
    return float((close_gt + close_pred) / total)


def robust_hausdorff(distances: SurfaceDistances, percent: float) -> float:
    """The `percent` percentile Hausdorff distance (mm): 95 gives HD95, 100 the Hausdorff distance.

    As the reference package's compute_robust_hausdorff: for each direction, the distance below which `percent` %
    of that surface's area lies (surfels weighted by their area, not counted), then the larger of the two. Infinite
    when a mask is empty, both empty included (no FLARE-style rules here; see metrics.hausdorff for those).
    """
    if not 0 <= percent <= 100:
        raise ValueError(f"percent must be in [0, 100], got {percent}")
    return max(
        _percentile_distance(distances.distances_gt_to_pred, distances.areas_gt, percent),
        _percentile_distance(distances.distances_pred_to_gt, distances.areas_pred, percent),
    )


def _percentile_distance(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    if distances.size == 0:
        return float("inf")
    order = np.lexsort((areas, distances))  # the reference's order: by distance, then by area
    sorted_areas = areas[order]
    cumulative = np.cumsum(sorted_areas) / np.sum(sorted_areas)
    index = int(np.searchsorted(cumulative, percent / 100.0))
    return float(distances[order[min(index, distances.size - 1)]])


def surface_dice(gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> float:
    """Surface Dice of two 3D bool masks at `tolerance_mm` (no FLARE rules; see metrics.nsd for those)."""
    return surface_dice_at_tolerance(compute_surface_distances(gt, pred, spacing), tolerance_mm)


def _check_masks(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.dtype != bool or pred.dtype != bool:
        raise TypeError(f"masks must be bool arrays, got {gt.dtype} and {pred.dtype}")
    if gt.ndim != 3 or gt.shape != pred.shape:
        raise ValueError(f"masks must be 3D arrays of one shape, got {gt.shape} and {pred.shape}")
    return gt, pred
