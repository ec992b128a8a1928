"""Boxes in array index space: the bounding box of a mask, grown by a margin in millimetres, and crops."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Box:
    """A half-open box [lo, hi) in [z, y, x] array indices."""

    lo: tuple[int, int, int]
    hi: tuple[int, int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "lo", tuple(int(v) for v in self.lo))
        object.__setattr__(self, "hi", tuple(int(v) for v in self.hi))
        if len(self.lo) != 3 or len(self.hi) != 3 or any(h <= lo for lo, h in zip(self.lo, self.hi)):
            raise ValueError(f"a box needs 3 axes with lo < hi, got lo={self.lo} hi={self.hi}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(h - lo for lo, h in zip(self.lo, self.hi))

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(lo, h) for lo, h in zip(self.lo, self.hi))

    @classmethod
    def full(cls, shape: tuple[int, ...]) -> Box:
        return cls((0, 0, 0), tuple(shape))

    def to_list(self) -> list[list[int]]:
        return [list(self.lo), list(self.hi)]

    @classmethod
    def from_list(cls, data: list[list[int]]) -> Box:
        return cls(tuple(data[0]), tuple(data[1]))


def bounding_box(mask: np.ndarray) -> Box | None:
    """The tight box around the non-zero voxels of a [z, y, x] mask, or None when it is empty."""
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=other))
        if hits.size == 0:
            return None
        lo.append(hits[0])
        hi.append(hits[-1] + 1)
    return Box(tuple(lo), tuple(hi))


def expand_box_mm(box: Box, margin_mm: float, spacing: tuple[float, float, float], shape: tuple[int, int, int]) -> Box:
    """Grow `box` by `margin_mm` on every side (rounded up to whole voxels), clipped to the image."""
    if margin_mm < 0:
        raise ValueError(f"margin must be >= 0 mm, got {margin_mm}")
    pad = [math.ceil(margin_mm / s - 1e-9) for s in spacing]
    lo = tuple(max(0, lo - p) for lo, p in zip(box.lo, pad))
    hi = tuple(min(n, h + p) for h, p, n in zip(box.hi, pad, shape))
    return Box(lo, hi)


def crop(array: np.ndarray, box: Box) -> np.ndarray:
    """The part of a [z, y, x] array inside `box` (a view, no copy)."""
    if any(h > n for h, n in zip(box.hi, array.shape)):
        raise ValueError(f"box {box.to_list()} exceeds the array shape {array.shape}")
    return array[box.slices]
