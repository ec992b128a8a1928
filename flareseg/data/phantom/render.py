"""Painting a phantom's volumes: background, organs, stomach gas, lesions, and the partial-label drop.

Each organ is evaluated only inside its own bounding box and written into the int16 image and uint8 label in
paint order (later organs overwrite earlier ones). `Regions` records the blocks where each label id was
painted, so that finding, restoring or erasing an id never needs a scan of the whole volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from flareseg.data.phantom.anatomy import LABEL_OF, LESION_LABEL, Anatomy, Organ
from flareseg.data.phantom.body import Body
from flareseg.data.phantom.grid import Grid, slab_size, threads
from flareseg.data.phantom.shapes import Field


def fill_background(grid: Grid, image: np.ndarray, body: Body) -> None:
    """Air, body wall, inner fat / bowel texture and spine, slab by slab.

    When array axis 0 runs along z only (every grid but an oblique one), the in-plane part is computed once.
    """
    slab, (depth, height, width) = slab_size(grid.shape), grid.shape
    axial = not np.any(grid.matrix[:2, 2]) and not np.any(grid.matrix[2, :2])
    shared = body.plane(*grid.coords((0, 0, 0), (1, height, width))[:2]) if axial else None

    def fill(z0: int) -> None:
        z1 = min(z0 + slab, depth)
        x, y, z = grid.coords((z0, 0, 0), (z1, 1, 1) if axial else (z1, height, width))
        hu = body.hu(shared if axial else body.plane(x, y), z)
        np.rint(np.broadcast_to(hu, (z1 - z0, height, width)), out=image[z0:z1], casting="unsafe")

    with ThreadPoolExecutor(threads()) as pool:
        list(pool.map(fill, range(0, grid.shape[0], slab)))


def paint(grid: Grid, image: np.ndarray, label: np.ndarray, organ: Organ, body: Body):
    """Paint one organ inside its bounding box; returns (the box as slices, its inside mask), or None."""
    box = grid.index_box(*organ.bbox())
    if box is None:
        return None
    lo, hi = box
    margin = 1.0 + organ.field.bound
    if len(organ.parts) == 1:
        q2 = organ.parts[0].q2(*grid.coords(lo, hi))
    else:
        q2 = np.full(tuple(hi - lo), np.inf, dtype=np.float32)
        for part in organ.parts:
            within = grid.index_box_within(*part.bbox(margin), lo, hi)
            if within is not None:
                plo, phi, sub = within
                np.minimum(q2[sub], part.q2(*grid.coords(plo, phi)), out=q2[sub])
    x, y, z = grid.coords(lo, hi)
    limit = organ.field(x, y, z) + np.float32(1.0)
    inside = q2 < limit * limit
    inside &= body.allowed(x, y)
    box_slices = tuple(slice(lo[a], hi[a]) for a in range(3))
    np.copyto(image[box_slices], np.int16(round(organ.hu)), where=inside)
    if organ.label:
        np.copyto(label[box_slices], np.uint8(organ.label), where=inside)
    return box_slices, inside


def add_stomach_air(grid: Grid, image: np.ndarray, painted, air_y: float) -> None:
    """Gas in the non-dependent (anterior) part of the stomach of a supine patient."""
    box, inside = painted
    lo = [s.start for s in box]
    hi = [s.stop for s in box]
    _, y, _ = grid.coords(lo, hi)
    np.copyto(image[box], np.int16(-900), where=inside & (y < np.float32(air_y)))


class Regions:
    """The blocks of the label volume where each label id was painted (an id never lies outside its blocks)."""

    def __init__(self, label: np.ndarray):
        self.label = label
        self.blocks: dict[int, list[tuple[slice, ...]]] = {}

    def add(self, value: int, block: tuple[slice, ...]) -> None:
        self.blocks.setdefault(value, []).append(block)

    def voxels(self, value: int) -> int:
        return sum(int(np.count_nonzero(self.label[block] == value)) for block in self.blocks.get(value, ()))

    def present(self) -> tuple[int, ...]:
        return tuple(v for v in sorted(self.blocks) if v and self.voxels(v))

    def erase(self, value: int) -> None:
        for block in self.blocks.pop(value, ()):
            view = self.label[block]
            view[view == value] = 0


def restore_missing_organs(grid: Grid, image, label, organs: Sequence[Organ], regions: Regions) -> None:
    """An organ that no voxel centre hit (very coarse grid) gets the voxel nearest its anchor, if in the grid."""
    for organ in organs:
        if regions.voxels(organ.label):
            continue
        index = grid.nearest_index(organ.anchor)
        if index is not None:
            label[index] = organ.label
            image[index] = round(organ.hu)
            regions.add(organ.label, tuple(slice(i, i + 1) for i in index))


def add_lesions(grid, image, label, anatomy: Anatomy, regions: Regions, rng: np.random.Generator) -> None:
    """1-3 roughly spherical lesions (label 14), 5-30 mm across, darker than their host organ, inside it."""
    hosts = (LABEL_OF["liver"], LABEL_OF["right_kidney"], LABEL_OF["left_kidney"], LABEL_OF["pancreas"])
    host_hu = {organ.label: organ.hu for organ in anatomy.organs}
    for _ in range(int(rng.integers(1, 4))):
        host = int(rng.choice(hosts, p=(0.55, 0.15, 0.15, 0.15)))
        diameter = rng.uniform(5.0, 30.0 if host == hosts[0] else 20.0)
        contrast = rng.uniform(30.0, 60.0)
        pick, field = rng.random(), Field.sample(rng, 0.1, (diameter * 2,) * 3)
        if host not in regions.blocks:
            continue
        box = regions.blocks[host][0]
        candidates = np.flatnonzero(label[box] == host)
        if candidates.size == 0:
            continue
        local = np.unravel_index(candidates[min(int(pick * candidates.size), candidates.size - 1)], label[box].shape)
        index = [s.start + i for s, i in zip(box, local, strict=True)]
        cx, cy, cz = (float(v.ravel()[0]) for v in grid.coords(index, [i + 1 for i in index]))
        radius = diameter / 2
        reach = radius * (1 + field.bound)
        lesion_box = grid.index_box(np.array([cx, cy, cz]) - reach, np.array([cx, cy, cz]) + reach)
        lo, hi = lesion_box
        x, y, z = grid.coords(lo, hi)
        dx, dy, dz = x - np.float32(cx), y - np.float32(cy), z - np.float32(cz)
        q2 = (dx * dx + dy * dy + dz * dz) * np.float32(1 / radius**2)
        limit = field(dx, dy, dz) + np.float32(1.0)
        sub = tuple(slice(lo[a], hi[a]) for a in range(3))
        inside = (q2 < limit * limit) & (label[sub] == host)
        np.copyto(label[sub], np.uint8(LESION_LABEL), where=inside)
        regions.add(LESION_LABEL, sub)
        np.copyto(image[sub], np.int16(round(host_hu[host] - contrast)), where=inside)


def drop_organs(regions: Regions, rng: np.random.Generator) -> tuple[int, ...]:
    """Keep a random non-empty proper subset of the present organs, erase the others from the label; returns the
    kept ids (the lesion label, when present, is always kept)."""
    present = regions.present()
    organs = [v for v in present if v != LESION_LABEL]
    if len(organs) < 2:
        return present
    keep = {int(v) for v in rng.choice(organs, size=int(rng.integers(1, len(organs))), replace=False)}
    for value in organs:
        if value not in keep:
            regions.erase(value)
    return tuple(v for v in present if v in keep or v == LESION_LABEL)
