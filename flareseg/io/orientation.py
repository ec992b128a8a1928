"""Reorient a volume to one canonical axis order by permuting and flipping axes only, and back exactly.

Canonical: array axis 0 (z) runs towards superior, 1 (y) towards posterior, 2 (x) towards the patient's
left, i.e. the ITK direction is the identity (LPS). An oblique volume is brought to the closest canonical
orientation; the oblique residual stays in its direction matrix. No voxel is interpolated, so a round trip
returns the same voxels and the same header.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from flareseg.io.geometry import Geometry


@dataclass(frozen=True)
class Reorientation:
    """How a volume was brought to canonical order: enough to undo it exactly.

    axes: numpy transpose order; canonical array axis a is original array axis axes[a].
    flips: canonical array axes that were reversed after the transpose.
    source: the geometry of the original volume.
    """

    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    source: Geometry

    @property
    def is_identity(self) -> bool:
        return self.axes == (0, 1, 2) and not any(self.flips)

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Original [z, y, x] array -> canonical array (a view where possible, no copy)."""
        out = np.transpose(array, self.axes)
        return _flip(out, self.flips)

    def undo(self, array: np.ndarray) -> np.ndarray:
        """Canonical array -> array in the original voxel order."""
        return np.transpose(_flip(array, self.flips), np.argsort(self.axes))

    def canonical_geometry(self) -> Geometry:
        """The geometry of the canonical array."""
        src = self.source
        shape = tuple(src.shape[a] for a in self.axes)
        spacing = tuple(src.spacing[a] for a in self.axes)
        # Array axis a has its physical direction in ITK column 2 - a.
        columns = src.direction_matrix
        new_columns = np.empty((3, 3))
        corner = np.zeros(3)
        for a in range(3):
            old_axis = self.axes[a]
            sign = -1.0 if self.flips[a] else 1.0
            new_columns[:, 2 - a] = sign * columns[:, 2 - old_axis]
            corner[old_axis] = src.shape[old_axis] - 1 if self.flips[a] else 0
        origin = src.index_to_physical(corner)
        return Geometry(spacing, tuple(origin), tuple(new_columns.ravel() + 0.0), shape)  # + 0.0: no -0.0

    def to_dict(self) -> dict:
        return {"axes": list(self.axes), "flips": list(self.flips), "source": self.source.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> Reorientation:
        return cls(tuple(data["axes"]), tuple(bool(f) for f in data["flips"]), Geometry.from_dict(data["source"]))


def plan_reorientation(geometry: Geometry) -> Reorientation:
    """The axis permutation and flips that bring `geometry` closest to the canonical (identity) direction."""
    columns = geometry.direction_matrix
    # Physical axis p (x=0, y=1, z=2) is the target of canonical array axis 2 - p.
    best_score, best_axes = -1.0, (0, 1, 2)
    for axes in itertools.permutations(range(3)):
        # Canonical array axis a takes original array axis axes[a], whose direction is column 2 - axes[a].
        score = sum(abs(columns[2 - a, 2 - axes[a]]) for a in range(3))
        if score > best_score + 1e-9:
            best_score, best_axes = score, axes
    flips = tuple(bool(columns[2 - a, 2 - best_axes[a]] < 0) for a in range(3))
    return Reorientation(axes=tuple(best_axes), flips=flips, source=geometry)


def to_canonical(array: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, Geometry, Reorientation]:
    """Reorient `array` to canonical order; returns the array, its geometry and how to undo it."""
    if tuple(array.shape) != geometry.shape:
        raise ValueError(f"array shape {array.shape} does not match the geometry's shape {geometry.shape}")
    plan = plan_reorientation(geometry)
    return plan.apply(array), plan.canonical_geometry(), plan


def from_canonical(array: np.ndarray, plan: Reorientation) -> tuple[np.ndarray, Geometry]:
    """Undo `to_canonical`: the array in its original voxel order and the original geometry, exactly."""
    expected = plan.canonical_geometry().shape
    if tuple(array.shape) != expected:
        raise ValueError(f"canonical array has shape {array.shape}; expected {expected}")
    return plan.undo(array), plan.source


def _flip(array: np.ndarray, flips: tuple[bool, bool, bool]) -> np.ndarray:
    axes = tuple(a for a in range(3) if flips[a])
    return np.flip(array, axes) if axes else array
