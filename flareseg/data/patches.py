"""Patches of a fixed size for fixed-spacing stages: training samples one, inference tiles the volume.

A stage whose prepared grid is a spacing (prepare.<stage>.spacing) keeps the physical voxel size, so its arrays vary
in size; the network sees model.input_size patches of them, as nnU-Net does. Training draws a patch centred near a
voxel of a random present class (with probability train.foreground_patch_p) or anywhere; inference covers the
volume with overlapping patches (`tile_starts`) and blends them with a Gaussian weight (`gaussian_weight`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def patch_box(
    shape: tuple[int, ...],
    size: tuple[int, ...],
    classes: torch.Tensor,
    foreground_p: float,
    generator: torch.Generator,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Start (may be negative: padding) and end of a `size` patch inside an array of `shape`.

    `classes` is the class map of the array (0 = background). With probability `foreground_p` and any foreground
    present, the patch centre is a random voxel of a random present class (class-balanced, so small lesions are
    found), shifted by up to a quarter patch; otherwise the patch lies anywhere it fits.
    """
    draw = torch.rand(1, generator=generator, dtype=torch.float64).item()
    centre = None
    if draw < foreground_p:
        present = [int(c) for c in torch.unique(classes) if c > 0]
        if present:
            chosen = present[int(torch.randint(len(present), (1,), generator=generator))]
            voxels = torch.nonzero(classes == chosen)
            centre = voxels[int(torch.randint(len(voxels), (1,), generator=generator))].tolist()
    lo = []
    for axis, (n, p) in enumerate(zip(shape, size)):
        if centre is None:
            start = int(torch.randint(max(n - p, 0) + 1, (1,), generator=generator)) if n >= p else -((p - n) // 2)
        else:
            shift = int(torch.randint(-(p // 4), p // 4 + 1, (1,), generator=generator))
            start = centre[axis] + shift - p // 2
            start = min(max(start, min(0, n - p)), max(n - p, 0)) if n >= p else -((p - n) // 2)
        lo.append(start)
    return tuple(lo), tuple(s + p for s, p in zip(lo, size))


def take_patch(volume: torch.Tensor, lo: tuple[int, ...], hi: tuple[int, ...], fill: float) -> torch.Tensor:
    """volume[lo:hi] of a [z, y, x] tensor, padded with `fill` where the box leaves the array."""
    inner = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(lo, hi, volume.shape))
    patch = volume[inner]
    pad = []
    for a, b, n in reversed(list(zip(lo, hi, volume.shape))):
        pad += [max(0, -a), max(0, b - n)]
    if any(pad):
        patch = F.pad(patch[None, None].float(), pad, value=fill)[0, 0].to(volume.dtype)
    return patch


def tile_starts(length: int, size: int, overlap: float) -> list[int]:
    """Starts of windows of `size` covering [0, length) with about `overlap` shared (length >= size)."""
    if length <= size:
        return [0]
    count = math.ceil((length - size) / (size * (1.0 - overlap))) + 1
    return sorted({round(k * (length - size) / (count - 1)) for k in range(count)})


def gaussian_weight(size: tuple[int, ...], device: torch.device, sigma_scale: float = 0.125) -> torch.Tensor:
    """nnU-Net's blending weight: a Gaussian of sigma = size / 8 per axis, peak 1, floored above 0."""
    axes = []
    for n in size:
        x = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2
        axes.append(torch.exp(-0.5 * (x / max(n * sigma_scale, 1e-6)) ** 2))
    weight = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return weight.clamp_min(1e-3)


@torch.no_grad()
def sliding_window(model, image: torch.Tensor, size: tuple[int, ...], overlap: float, fill: float) -> torch.Tensor:
    """Logits of `model` over a [1, 1, z, y, x] image in overlapping `size` tiles, Gaussian-blended.

    The image is padded with `fill` to at least `size`; returns float32 [1, C, z, y, x] at the image's shape.
    A volume that fits one tile is one forward pass.
    """
    shape = tuple(image.shape[2:])
    padded_shape = tuple(max(n, p) for n, p in zip(shape, size))
    if padded_shape != shape:
        pad = []
        for n, p in reversed(list(zip(shape, padded_shape))):
            pad += [(p - n) // 2, p - n - (p - n) // 2]
        image = F.pad(image, pad, value=fill)
    offsets = [(p - n) // 2 for n, p in zip(shape, padded_shape)]
    if padded_shape == tuple(size):
        logits = model(image).float()
    else:
        weight = gaussian_weight(size, image.device)
        logits, total = None, torch.zeros(padded_shape, device=image.device)
        for z in tile_starts(padded_shape[0], size[0], overlap):
            for y in tile_starts(padded_shape[1], size[1], overlap):
                for x in tile_starts(padded_shape[2], size[2], overlap):
                    tile = (slice(z, z + size[0]), slice(y, y + size[1]), slice(x, x + size[2]))
                    out = model(image[(..., *tile)].contiguous()).float()
                    if logits is None:
                        logits = torch.zeros((1, out.shape[1], *padded_shape), device=image.device)
                    logits[(..., *tile)] += out * weight
                    total[tile] += weight
        logits /= total
    return logits[(..., *(slice(o, o + n) for o, n in zip(offsets, shape)))]
