"""The geometry record: where a [z, y, x] voxel array sits in physical space."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """Placement of a [z, y, x] array in physical (LPS, millimetre) space, as SimpleITK defines it.

    spacing: voxel size in mm along the array axes (z, y, x).
    origin: physical point (x, y, z) in mm of the centre of voxel [0, 0, 0].
    direction: the 3x3 ITK direction matrix, row-major; its column c is the physical unit vector of ITK
        index axis c, i.e. of array axis 2 - c (ITK index order is x, y, z, the reverse of the array's).
    shape: array shape (z, y, x).
    """

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        object.__setattr__(self, "origin", tuple(float(v) for v in self.origin))
        object.__setattr__(self, "direction", tuple(float(v) for v in np.ravel(self.direction)))
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))
        if len(self.spacing) != 3 or len(self.origin) != 3 or len(self.shape) != 3 or len(self.direction) != 9:
            raise ValueError(f"a 3D geometry needs 3 spacings, 3 origin values, 9 direction values and 3 sizes: {self}")
        if not all(np.isfinite(self.spacing)) or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be positive and finite, got {self.spacing}")
        if not all(np.isfinite(self.origin)) or not all(np.isfinite(self.direction)):
            raise ValueError(f"origin and direction must be finite, got {self.origin}, {self.direction}")

    @property
    def direction_matrix(self) -> np.ndarray:
        """The ITK direction as a 3x3 array (columns = ITK index axes x, y, z)."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def spacing_xyz(self) -> tuple[float, float, float]:
        return self.spacing[::-1]

    def index_to_physical(self, index_zyx: np.ndarray) -> np.ndarray:
        """Physical (x, y, z) points of array indices given as (..., 3) in [z, y, x] order."""
        ijk = np.asarray(index_zyx, dtype=np.float64)[..., ::-1]
        return np.asarray(self.origin) + (ijk * np.asarray(self.spacing_xyz)) @ self.direction_matrix.T

    def with_shape(self, shape: tuple[int, int, int]) -> Geometry:
        return Geometry(self.spacing, self.origin, self.direction, shape)

    def to_dict(self) -> dict:
        """Plain types for JSON records and checkpoints (float repr is exact)."""
        return {
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
            "shape": list(self.shape),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Geometry:
        return cls(tuple(data["spacing"]), tuple(data["origin"]), tuple(data["direction"]), tuple(data["shape"]))

    def same_grid(self, other: Geometry, atol: float = 1e-4) -> bool:
        """True when both describe the same voxel grid (shape exact, the rest within atol)."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, rtol=0, atol=atol)
            and np.allclose(self.origin, other.origin, rtol=0, atol=atol * 10)
            and np.allclose(self.direction, other.direction, rtol=0, atol=atol)
        )
