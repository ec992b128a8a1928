"""The shapes organs are made of, in body-centred millimetres: smooth random fields, ellipsoids, cone segments.

Each shape gives its bounding box and `q2`, a squared normalised radius (< 1 inside) evaluated in float32 on
coordinate arrays that may be broadcastable rather than full 3D; a `Field` (a sum of separable low-frequency
cosine products) deforms the boundary, and also serves as the bowel texture of the background.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_CUT_SOFTNESS = 8.0  # mm: beyond an ellipsoid's cut plane, q2 grows by (distance / _CUT_SOFTNESS) ** 2


@dataclass(frozen=True)
class Field:
    """A smooth random field: sum of separable products of cosines of x, y and z (low frequencies)."""

    amplitude: np.ndarray  # (K,)
    frequency: np.ndarray  # (K, 3) radians per mm
    phase: np.ndarray  # (K, 3)

    @classmethod
    def sample(cls, rng: np.random.Generator, amplitude: float, wavelength: Sequence[float], terms: int = 3) -> Field:
        weights = rng.uniform(0.5, 1.0, terms) * rng.choice((-1.0, 1.0), terms)
        amp = amplitude * weights / np.abs(weights).sum()
        freq = 2 * np.pi / (np.asarray(wavelength, dtype=np.float64) * rng.uniform(0.7, 1.5, (terms, 3)))
        return cls(amp, freq, rng.uniform(0, 2 * np.pi, (terms, 3)))

    @property
    def bound(self) -> float:
        return float(np.abs(self.amplitude).sum())

    def __call__(self, x, y, z) -> np.ndarray:
        """The field (float32) at x, y, z."""
        return self.along_z(self.in_plane(x, y), z)

    def in_plane(self, x, y, weight=None) -> list[np.ndarray]:
        """The x and y factors of each term (times `weight`), to be reused for many z."""
        terms = []
        for a, f, p in zip(self.amplitude, self.frequency, self.phase, strict=True):
            term = np.float32(a) * np.cos(x * np.float32(f[0]) + np.float32(p[0]))
            term = term * np.cos(y * np.float32(f[1]) + np.float32(p[1]))
            terms.append(term if weight is None else term * weight)
        return terms

    def along_z(self, terms: list[np.ndarray], z) -> np.ndarray:
        total = None
        for term, f, p in zip(terms, self.frequency, self.phase, strict=True):
            term = term * np.cos(z * np.float32(f[2]) + np.float32(p[2]))
            total = term if total is None else total + term
        return total


@dataclass(frozen=True)
class Ellipsoid:
    centre: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray  # columns: the ellipsoid's axes in (x, y, z)
    cut: tuple[np.ndarray, float] | None = None  # (unit normal n, offset mm): a soft cut beyond n . (p - c) = offset

    def bbox(self, margin: float) -> tuple[np.ndarray, np.ndarray]:
        half = np.sqrt(((self.rotation * self.radii[None, :]) ** 2).sum(axis=1)) * margin
        return self.centre - half, self.centre + half

    def q2(self, x, y, z) -> np.ndarray:
        """Squared normalised radius: < 1 inside the undeformed ellipsoid."""
        d = (x - np.float32(self.centre[0]), y - np.float32(self.centre[1]), z - np.float32(self.centre[2]))
        weights = self.rotation / self.radii[None, :]  # u_i = sum_c weights[c, i] * d_c
        total = None
        for i in range(3):
            u = None
            for c in range(3):
                if abs(weights[c, i]) > 1e-12:
                    term = d[c] * np.float32(weights[c, i])
                    u = term if u is None else u + term
            total = u * u if total is None else total + u * u
        if self.cut is not None:
            normal, offset = self.cut
            side = None
            for c in range(3):
                if normal[c] != 0.0:
                    term = d[c] * np.float32(normal[c])
                    side = term if side is None else side + term
            beyond = np.maximum(side - np.float32(offset), np.float32(0)) * np.float32(1 / _CUT_SOFTNESS)
            total = total + beyond * beyond  # q2 rises over a few mm, so the deformation field makes it wavy
        return total


@dataclass(frozen=True)
class Segment:
    """A cone segment from a to b with radii ra, rb: one piece of a tube's centreline."""

    a: np.ndarray
    b: np.ndarray
    ra: float
    rb: float

    def bbox(self, margin: float) -> tuple[np.ndarray, np.ndarray]:
        r = max(self.ra, self.rb) * margin
        return np.minimum(self.a, self.b) - r, np.maximum(self.a, self.b) + r

    def q2(self, x, y, z) -> np.ndarray:
        axis = self.b - self.a
        inv_len2 = 1.0 / float(axis @ axis)
        d = (x - np.float32(self.a[0]), y - np.float32(self.a[1]), z - np.float32(self.a[2]))
        t = d[0] * np.float32(axis[0] * inv_len2) + d[1] * np.float32(axis[1] * inv_len2)
        t = t + d[2] * np.float32(axis[2] * inv_len2)
        np.clip(t, 0, 1, out=t)
        dist2 = None
        for c in range(3):
            e = d[c] - t * np.float32(axis[c])
            dist2 = e * e if dist2 is None else dist2 + e * e
        radius = t * np.float32(self.rb - self.ra) + np.float32(self.ra)
        return dist2 / (radius * radius)
