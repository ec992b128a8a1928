"""The voxel grid of a phantom: field of view, spacing, orientation plans and body-centred coordinates.

A phantom is drawn from independent random streams (so that e.g. the orientation never changes the anatomy).
`plan_grid` draws the field of view and spacing (from an `Acquisition`'s ranges: the reference generator's, or a
site's) and builds the base geometry (array axes along z, y, x, rotated for "oblique") plus the signed axis
permutation that gives the requested storage orientation; `apply_plan` and `permuted_geometry` apply it to the
volumes and to the geometry. `Grid` gives the body-centred millimetre
coordinates of any block of voxels, and `slab_size` / `threads` split the volume into slabs for threaded work.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flareseg.io.geometry import Geometry

ORIENTATIONS = ("identity", "ras", "random", "oblique")
_SLAB_VOXELS = 1 << 19  # voxels per slab for the background, the noise and the blur


@dataclass(frozen=True)
class Acquisition:
    """The ranges (mm) that `plan_grid` draws a field of view and a spacing from; the defaults are the reference
    generator's (no site)."""

    fov_xy: tuple[float, float] = (360.0, 420.0)  # in-plane field of view (reconstruction diameter)
    fov_z: tuple[float, float] = (240.0, 290.0)  # scan length
    in_plane: tuple[float, float] = (0.6, 1.0)  # pixel size
    slice_spacing: tuple[float, float] = (1.0, 5.0)
    centre_z: float = 30.0  # the middle of the scan, above the body centre (z = 0: about the renal hila)


REFERENCE_ACQUISITION = Acquisition()
# The streams of the reference generator come first: spawned children never depend on how many come after them,
# so the streams that only site phantoms use ("site", "metal", "truncation") leave the reference phantoms unchanged.
_STREAMS = ("grid", "anatomy", "orientation", "lesions", "noise", "partial", "site", "metal", "truncation")


def random_streams(seed: int) -> dict[str, np.random.SeedSequence]:
    """Independent random streams, so that e.g. the orientation never changes the anatomy."""
    return dict(zip(_STREAMS, np.random.SeedSequence(int(seed)).spawn(len(_STREAMS)), strict=True))


def plan_grid(streams, shape, spacing, orientation, acquisition: Acquisition = REFERENCE_ACQUISITION):
    """The base geometry (array axes along z, y, x, possibly rotated), the axis permutation and flips to apply to
    it, and the physical position of the body centre."""
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    rng = np.random.default_rng(streams["grid"])
    fov_xy, fov_z = rng.uniform(*acquisition.fov_xy), rng.uniform(*acquisition.fov_z)
    in_plane, slice_spacing = rng.uniform(*acquisition.in_plane), rng.uniform(*acquisition.slice_spacing)
    fov_shift = np.array([rng.uniform(-5, 5), rng.uniform(-5, 5), acquisition.centre_z + rng.uniform(-8, 8)])
    body_z = rng.uniform(-300.0, 0.0)
    fov = np.array([fov_z, fov_xy, fov_xy])
    if shape is not None:
        shape = tuple(int(n) for n in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be 3 positive sizes (z, y, x), got {shape}")
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"spacing must be 3 positive sizes in mm (z, y, x), got {spacing}")
    if spacing is None and shape is None:
        spacing = (slice_spacing, in_plane, in_plane)
    if spacing is None:
        spacing = tuple(float(f / n) for f, n in zip(fov, shape, strict=True))
    if shape is None:
        shape = tuple(max(2, math.ceil(f / s - 1e-6)) for f, s in zip(fov, spacing, strict=True))

    rng = np.random.default_rng(streams["orientation"])
    rotation = np.eye(3)
    axes, flips = (0, 1, 2), (False, False, False)
    if orientation == "ras":
        flips = (False, True, True)
    elif orientation in ("random", "oblique"):
        axes = tuple(int(a) for a in rng.permutation(3))
        flips = tuple(bool(f) for f in rng.integers(0, 2, size=3))
    if orientation == "oblique":
        axis = rng.normal(size=3)
        angle = math.radians(rng.uniform(5.0, 20.0)) * rng.choice((-1.0, 1.0))
        rotation = _rotation_about(axis / np.linalg.norm(axis), angle)

    body_centre = np.array([0.0, 0.0, body_z])
    centre = body_centre + fov_shift
    spacing_xyz = np.array(spacing[::-1])
    size_xyz = np.array(shape[::-1], dtype=np.float64)
    origin = centre - rotation @ (spacing_xyz * (size_xyz - 1) / 2)
    base = Geometry(spacing, tuple(origin), tuple(rotation.ravel()), shape)
    return base, (axes, flips), body_centre


def _rotation_about(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues: rotation by `angle` radians about the unit vector `axis`."""
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def permuted_geometry(geometry: Geometry, axes: Sequence[int], flips: Sequence[bool]) -> Geometry:
    """Geometry of flip(transpose(array, axes), flips): new array axis a is old axis axes[a], maybe reversed."""
    columns = geometry.direction_matrix
    new_columns = np.empty((3, 3))
    corner = np.zeros(3)
    for a in range(3):
        old = axes[a]
        new_columns[:, 2 - a] = (-1.0 if flips[a] else 1.0) * columns[:, 2 - old]
        corner[old] = geometry.shape[old] - 1 if flips[a] else 0
    origin = geometry.index_to_physical(corner)
    spacing = tuple(geometry.spacing[a] for a in axes)
    shape = tuple(geometry.shape[a] for a in axes)
    return Geometry(spacing, tuple(origin), tuple(new_columns.ravel() + 0.0), shape)


def apply_plan(image, label, base: Geometry, plan) -> tuple[np.ndarray, np.ndarray, Geometry]:
    axes, flips = plan
    if tuple(axes) == (0, 1, 2) and not any(flips):
        return image, label, base

    return _reorder(image, axes, flips), _reorder(label, axes, flips), permuted_geometry(base, axes, flips)


def _reorder(array: np.ndarray, axes: Sequence[int], flips: Sequence[bool], tile: int = 16) -> np.ndarray:
    """A contiguous copy of flip(transpose(array, axes), flips), copied in tiles so that it stays in the caches."""
    view = np.transpose(array, axes)
    flip_axes = tuple(a for a in range(3) if flips[a])
    view = np.flip(view, flip_axes) if flip_axes else view
    if view.size < (1 << 20):
        return np.ascontiguousarray(view)
    out = np.empty(view.shape, dtype=array.dtype)
    for i in range(0, view.shape[0], tile):
        for k in range(0, view.shape[2], tile):
            out[i : i + tile, :, k : k + tile] = view[i : i + tile, :, k : k + tile]
    return out


@dataclass(frozen=True)
class Grid:
    """Body-centred millimetre coordinates of the voxel centres of a geometry.

    offset: coordinates (x, y, z) of voxel [0, 0, 0]; matrix: column c = mm per step of ITK index axis c.
    """

    offset: np.ndarray
    matrix: np.ndarray
    shape: tuple[int, int, int]

    @classmethod
    def of(cls, geometry: Geometry, body_centre: np.ndarray) -> Grid:
        matrix = geometry.direction_matrix * np.asarray(geometry.spacing_xyz)[None, :]
        return cls(np.asarray(geometry.origin) - body_centre, matrix, geometry.shape)

    def coords(self, lo: Sequence[int], hi: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float32 x, y, z of the voxel block [lo, hi) (array order), broadcastable to its shape.

        An axis-aligned grid gives 1D-like arrays ((1, 1, n), (1, n, 1), (n, 1, 1)); a rotated one gives 3D.
        """
        out = []
        for c in range(3):
            terms = []
            for a in range(3):
                step = self.matrix[c, 2 - a]
                if step != 0.0:
                    view = [1, 1, 1]
                    view[a] = hi[a] - lo[a]
                    terms.append((np.arange(lo[a], hi[a]) * step).reshape(view))
            terms[0] = (terms[0] + self.offset[c]).astype(np.float32)
            total = terms[0]
            for term in terms[1:]:
                total = total + term.astype(np.float32)
            out.append(total)
        return out[0], out[1], out[2]

    def index_box(self, lo_mm: np.ndarray, hi_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The array-order index block [lo, hi) holding every voxel centre inside the mm box, or None."""
        corners = np.array([[(lo_mm, hi_mm)[(k >> c) & 1][c] for c in range(3)] for k in range(8)])
        ijk = np.linalg.solve(self.matrix, (corners - self.offset).T).T  # ITK order (x, y, z)
        lo = np.ceil(ijk.min(axis=0)[::-1] - 1e-6).astype(int)
        hi = np.floor(ijk.max(axis=0)[::-1] + 1e-6).astype(int) + 1
        lo, hi = np.maximum(lo, 0), np.minimum(hi, self.shape)
        return None if np.any(hi <= lo) else (lo, hi)

    def index_box_within(self, lo_mm: np.ndarray, hi_mm: np.ndarray, lo: np.ndarray, hi: np.ndarray):
        """The voxels of the mm box inside the index block [lo, hi): (its own block [plo, phi), and the slices of
        that block relative to lo), or None when they do not meet."""
        box = self.index_box(lo_mm, hi_mm)
        if box is None:
            return None
        plo, phi = np.maximum(box[0], lo), np.minimum(box[1], hi)
        if np.any(phi <= plo):
            return None
        return plo, phi, tuple(slice(plo[a] - lo[a], phi[a] - lo[a]) for a in range(3))

    def nearest_index(self, point: np.ndarray) -> tuple[int, int, int] | None:
        ijk = np.linalg.solve(self.matrix, np.asarray(point, dtype=np.float64) - self.offset)
        index = tuple(int(v) for v in np.rint(ijk[::-1]))
        inside = all(0 <= v < n for v, n in zip(index, self.shape, strict=True))
        return index if inside else None


def slab_size(shape: Sequence[int]) -> int:
    """Slices per slab: about half a million voxels, so that a slab's float32 arrays stay in the CPU caches."""
    return max(1, min(shape[0], _SLAB_VOXELS // (shape[1] * shape[2])))


def threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))
