"""Resampling shared by training and inference, in torch so it runs on the CPU or the GPU.

All resampling is corner-aligned (align_corners=True): the first and last voxel centres of the input and of
the output coincide, so the output grid keeps the input's origin and direction and its spacing is
(n_in - 1) * spacing_in / (n_out - 1). Images are interpolated linearly; label maps without mixing labels,
either label by label (each label's mask interpolated linearly and kept above 0.5, later labels overwrite
earlier ones, as the FLARE21 reference does) or by nearest neighbour.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from scipy import ndimage

from flareseg.io.geometry import Geometry

LabelMode = Literal["per_label", "nearest"]
# per-label resampling of a map whose label boxes together cover more than this many times its volume (random
# network outputs: every label everywhere) runs for all labels at once, in slabs of this many output slices
DENSE_LABELS_COVERAGE = 3.0
DENSE_SLAB = 4


def size_for_spacing(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> tuple[int, ...]:
    """Output size whose corner-aligned spacing is closest to `target` spacing (all in [z, y, x])."""
    if min(target) <= 0:
        raise ValueError(f"target spacing must be positive, got {target}")
    return tuple(max(2, round((n - 1) * s / t) + 1) if n > 1 else 1 for n, s, t in zip(shape, spacing, target))


def resampled_geometry(geometry: Geometry, size: tuple[int, int, int]) -> Geometry:
    """Geometry of a corner-aligned resampling of `geometry` to `size`."""
    spacing = tuple(s * (n - 1) / (m - 1) if m > 1 else s for s, n, m in zip(geometry.spacing, geometry.shape, size))
    return Geometry(spacing, geometry.origin, geometry.direction, size)


def resize_image(volume: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear, corner-aligned resize of a [z, y, x] volume (any dtype in; float32 or its float dtype out)."""
    _check_3d(volume, size)
    if tuple(volume.shape) == tuple(size):
        return volume if volume.is_floating_point() else volume.float()
    x = volume if volume.is_floating_point() else volume.float()
    return F.interpolate(x[None, None], size=tuple(size), mode="trilinear", align_corners=True)[0, 0]


def resize_label(label: torch.Tensor, size: tuple[int, int, int], mode: LabelMode = "per_label") -> torch.Tensor:
    """Resize a [z, y, x] integer label map to `size` without mixing labels (see module docstring)."""
    _check_3d(label, size)
    if label.is_floating_point():
        raise TypeError(f"label maps must be integer tensors, got {label.dtype}")
    if tuple(label.shape) == tuple(size):
        return label.clone()
    if mode == "nearest":
        out = label
        for axis, (n, m) in enumerate(zip(label.shape, size)):
            index = torch.floor(_corner_aligned_coords(n, m, label.device) + 0.5).long()  # halves round up
            out = out.index_select(axis, index)
        return out
    if mode != "per_label":
        raise ValueError(f"unknown label resampling mode {mode!r}; use 'per_label' or 'nearest'")
    boxes = _label_boxes(label)
    covered = sum(math.prod(b.stop - b.start for b in box) for box in boxes.values())
    if covered > DENSE_LABELS_COVERAGE * label.numel():  # labels spread everywhere (noise): one pass for all
        return _resize_labels_dense(label, tuple(size), sorted(boxes))
    out = torch.zeros(tuple(size), dtype=label.dtype, device=label.device)
    for value, box in boxes.items():
        _paint_label(out, label, value, box)
    return out


def _resize_labels_dense(label: torch.Tensor, size: tuple[int, int, int], values: list[int]) -> torch.Tensor:
    """The per-label result, computed for all labels at once: cost independent of how the labels are spread.

    Every label's mask is interpolated along z and y (in slabs of output slices); along x a voxel can only exceed
    0.5 for a label that exceeds 0.5 at one of its two x neighbours, i.e. for the label with the largest weight at
    one of them, so only those two candidates are interpolated to the output. Same float operations as
    `_paint_label`, so the same voxels.
    """
    out = torch.zeros(size, dtype=label.dtype, device=label.device)
    if not values:
        return out
    ids = torch.tensor(values, dtype=label.dtype, device=label.device)
    z_at, y_at, x_at = (_corner_aligned_coords(n, m, label.device) for n, m in zip(label.shape, size))
    n_x = label.shape[2]
    i0 = torch.floor(x_at).long().clamp(0, n_x - 1)
    i1 = (i0 + 1).clamp(max=n_x - 1)
    w = (x_at - i0).float().clamp(0, 1)
    following = (torch.arange(n_x, device=label.device) + 1).clamp(max=n_x - 1)
    for start in range(0, size[0], DENSE_SLAB):
        z = z_at[start : start + DENSE_SLAB]
        lo = int(torch.floor(z[0]).clamp(0, label.shape[0] - 1))
        hi = min(int(torch.floor(z[-1]).clamp(0, label.shape[0] - 1)) + 2, label.shape[0])
        masks = (label[lo:hi][None] == ids[:, None, None, None]).float()  # [labels, z, y, x]
        masks = _linear_along(_linear_along(masks, 1, z - lo), 2, y_at)  # [labels, z', y', x]
        weight, best = masks.max(dim=0)  # the only label that may exceed 0.5 at each x column, and its weight
        # at column j: this column's best label's weight in the next column, and the next column's best label's here
        own_next = masks.index_select(3, following).gather(0, best[None]).squeeze(0)
        next_here = masks.gather(0, best.index_select(2, following)[None]).squeeze(0)
        left = weight.index_select(2, i0) * (1 - w) + own_next.index_select(2, i0) * w
        right = next_here.index_select(2, i0) * (1 - w) + weight.index_select(2, i1) * w
        chosen = torch.where(right > 0.5, ids[best.index_select(2, i1)], 0)
        chosen = torch.where(left > 0.5, torch.maximum(ids[best.index_select(2, i0)], chosen), chosen)
        out[start : start + len(z)] = chosen
    return out


def _label_boxes(label: torch.Tensor) -> dict[int, tuple[slice, slice, slice]]:
    """Bounding slices of every non-zero label, in one pass over the volume."""
    if label.device.type == "cpu" and label.min() >= 0:
        objects = ndimage.find_objects(label.numpy())
        return {value: box for value, box in enumerate(objects, start=1) if box is not None}
    boxes = {}
    for value in torch.unique(label).tolist():
        if value != 0:
            mask = label == value
            spans = [
                torch.nonzero(mask.any(dim=tuple(a for a in range(3) if a != axis))).flatten() for axis in range(3)
            ]
            boxes[value] = tuple(slice(int(span[0]), int(span[-1]) + 1) for span in spans)
    return boxes


def _paint_label(out: torch.Tensor, label: torch.Tensor, value: int, box: tuple[slice, slice, slice]) -> None:
    """Interpolate the mask of one label inside its own bounding box only, and paint it where > 0.5."""
    out_slices, in_slices, coords = [], [], []
    for axis, (n, m) in enumerate(zip(label.shape, out.shape)):
        lo, hi = box[axis].start, box[axis].stop - 1
        x = _corner_aligned_coords(n, m, label.device)
        touched = torch.nonzero((x > lo - 1) & (x < hi + 1)).flatten()
        if touched.numel() == 0:
            return
        o_lo, o_hi = int(touched[0]), int(touched[-1]) + 1
        x = x[o_lo:o_hi]
        i_lo = int(torch.floor(x[0]).clamp(0, n - 1))
        i_hi = int(torch.floor(x[-1]).clamp(0, n - 1)) + 2
        out_slices.append(slice(o_lo, o_hi))
        in_slices.append(slice(i_lo, min(i_hi, n)))
        coords.append(x - i_lo)
    values = (label[tuple(in_slices)] == value).float()
    for axis, x in enumerate(coords):
        values = _linear_along(values, axis, x)
    region = out[tuple(out_slices)]
    region[values > 0.5] = value


def _linear_along(values: torch.Tensor, axis: int, x: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of `values` along `axis` at fractional positions `x` (0 .. n-1)."""
    n = values.shape[axis]
    i0 = torch.floor(x).long().clamp(0, n - 1)
    i1 = (i0 + 1).clamp(max=n - 1)
    shape = [1] * values.dim()
    shape[axis] = -1
    w = (x - i0).float().clamp(0, 1).reshape(shape)
    return values.index_select(axis, i0) * (1 - w) + values.index_select(axis, i1) * w


def _corner_aligned_coords(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """Input positions sampled by each output index in a corner-aligned resampling.

    float32, computed as F.interpolate does, so that per-label results agree with it voxel for voxel except
    where a mask value lands on 0.5 to within float rounding.
    """
    if n_out == 1:
        return torch.zeros(1, dtype=torch.float32, device=device)
    scale = torch.tensor((n_in - 1) / (n_out - 1), dtype=torch.float32)
    return torch.arange(n_out, dtype=torch.float32, device=device) * scale.to(device)


def _check_3d(volume: torch.Tensor, size: tuple[int, ...]) -> None:
    if volume.dim() != 3 or len(size) != 3 or min(size) < 1:
        raise ValueError(
            f"expected a [z, y, x] volume and a 3-value positive size, got {tuple(volume.shape)} -> {size}"
        )
