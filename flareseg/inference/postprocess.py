"""Post-processing of label maps: connected components per label, label boxes."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from flareseg.data.crop import Box

EVERY_COMPONENT = 0  # a count that leaves a label untouched: every component, any size (lesions)
EVERY_LARGE_COMPONENT = None  # a count without limit: every component of at least the minimum volume


def keep_components(
    label_map: np.ndarray,
    spacing,
    min_volume_mm3: float,
    keep: int = 1,
    keep_per_label: dict[int, int | None] | None = None,
    min_volume_per_label: dict[int, float] | None = None,
) -> np.ndarray:
    """Per label, keep the `keep` (or `keep_per_label[label]`) largest connected components (26-connectivity) of at
    least `min_volume_mm3` (or `min_volume_per_label[label]`); the largest component of each label is always kept,
    so a small organ is never erased.
    A count of EVERY_COMPONENT (0) leaves that label untouched; EVERY_LARGE_COMPONENT (None) sets no limit on the
    count but still drops components under the minimum volume. In place; returns it."""
    voxel_mm3 = math.prod(spacing)
    structure = np.ones((3, 3, 3), dtype=bool)
    for value, box in enumerate(ndimage.find_objects(label_map), start=1):
        if box is None:
            continue
        region = label_map[box]
        mask = region == value
        components, count = ndimage.label(mask, structure=structure)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())[1:]
        order = np.argsort(sizes)[::-1]
        count_kept = (keep_per_label or {}).get(value, keep)
        if count_kept == EVERY_COMPONENT:
            continue
        minimum = (min_volume_per_label or {}).get(value, min_volume_mm3)
        kept = [order[0]] + [i for i in order[1:count_kept] if sizes[i] * voxel_mm3 >= minimum]
        survivors = np.zeros(count + 1, dtype=bool)
        survivors[np.asarray(kept) + 1] = True
        region[mask & ~survivors[components]] = 0
    return label_map


def foreground_box(label_map: np.ndarray) -> Box | None:
    """The box around every labelled voxel, or None when the map is empty."""
    boxes = [box for box in ndimage.find_objects(label_map) if box is not None]
    if not boxes:
        return None
    lo = tuple(min(box[a].start for box in boxes) for a in range(3))
    hi = tuple(max(box[a].stop for box in boxes) for a in range(3))
    return Box(lo, hi)


def box_to_source(box: Box, size: tuple[int, ...], shape: tuple[int, ...]) -> Box:
    """A box on a corner-aligned resampling of size `size` mapped back onto the source grid of `shape`."""
    lo, hi = [], []
    for a in range(3):
        scale = (shape[a] - 1) / (size[a] - 1) if size[a] > 1 else 0.0
        lo.append(max(0, math.floor(box.lo[a] * scale)))
        hi.append(min(shape[a], math.ceil((box.hi[a] - 1) * scale) + 1))
    return Box(tuple(lo), tuple(hi))
