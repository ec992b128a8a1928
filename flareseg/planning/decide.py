"""The decisions of `flareseg plan`: each config value of a coarse-to-fine pipeline, from a dataset's fingerprint.

Every decision carries the rule it followed and the fingerprint figure it came from, one line each; the config
writer puts that line above the key. The rules adapt nnU-Net's published planning to the coarse-to-fine design:

- HU window: the 0.5th and 99.5th percentiles of foreground HU over every labeled case (nnU-Net's CT clipping).
- Target spacing: the median spacing; an axis whose median is over 3x the finest one takes its 10th percentile.
- Coarse grid (whole volume): the spacing at which the smallest organ (5th-percentile volume) keeps
  MIN_ORGAN_VOXELS voxels, never finer than the data; the median field of view at that spacing, rounded up to what
  the network's depth divides, is the fixed size (one resize per volume, FLARE21's design). Where one size would
  make the voxels of the 95th-percentile field of view more than WHOLE_BODY_FACTOR coarser than that spacing
  (whole-body scans beside abdominal ones, or a field of view too large for the memory budget), the grid keeps the
  spacing instead and the network tiles it with sliding windows of the largest patch that fits.
- Margin: the coarse box is off by up to a coarse voxel or two on each side: 2 coarse voxels + 10 mm of context,
  rounded up to 5 mm.
- Fine grid (label box): the 95th-percentile box of all labels plus the margin on each side, at the target
  spacing; where that exceeds the memory budget, the finest axes are coarsened first (nnU-Net's order) until it
  fits; sizes rounded to what the network's depth divides.
- Components: per label, the most components that each hold >= 10 % of the label's volume in any case (two for
  merged kidneys); a label with more than MAX_KEPT_COMPONENTS (lesions) keeps all. Minimum volume per label: half of
  its smallest such component.
- Batch size: 2 (nnU-Net's minimum), more while the patch uses under half of the budget (at most MAX_BATCH).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from flareseg.planning.fingerprint import Fingerprint
from flareseg.planning.network_memory import NetworkMemory

MIN_ORGAN_VOXELS = 1000  # coarse grid: voxels the smallest organ keeps (its 5th-percentile volume)
ANISOTROPY = 3.0  # an axis whose median spacing is over this times the finest one takes its 10th percentile
SUBSTANTIAL = 0.10  # a component that holds this share of its label's volume counts (specks do not)
MAX_KEPT_COMPONENTS = 3  # a label with more substantial components than this keeps all (lesions, metastases)
MAX_BATCH = 8
WHOLE_BODY_FACTOR = 1.5  # coarser than the organ rule by more than this: tile at fixed spacing instead


@dataclass(frozen=True)
class Decision:
    """One config value and why: the rule and the fingerprint figure it came from."""

    key: str  # dotted config key, e.g. prepare.grids.coarse.size
    value: object
    why: str


@dataclass(frozen=True)
class StageNetwork:
    """The network a stage trains (fixed by the design) and its measured training memory."""

    overrides: dict  # model keys, e.g. {"name": "base_unet", "channels": [8, ...]}
    memory: NetworkMemory
    # the caller's cap on a grid's voxels (the demo's: CPU training time), or None; a capped coarse grid is always
    # one resize (tiling a larger grid would exceed the cap)
    max_voxels: int | None = None

    def cap(self, gpu_memory_gb: float) -> int:
        """The most voxels a grid (or patch) of this stage may have: what trains at batch 2 in the memory, and the
        caller's cap."""
        fits = self.memory.max_voxels(gpu_memory_gb, batch_size=2)
        return fits if self.max_voxels is None else min(fits, self.max_voxels)

    def budget(self, gpu_memory_gb: float) -> str:
        """The budget `cap` stands for, in words."""
        if self.max_voxels is not None and self.max_voxels < self.memory.max_voxels(gpu_memory_gb, batch_size=2):
            return f"the cap of {self.max_voxels:,} voxels"
        return f"{gpu_memory_gb:g} GB at batch 2"

    @property
    def divisor(self) -> int:
        """Grid sizes are multiples of this: the network halves each axis once per stage below the first."""
        return 2 ** (len(self.overrides["channels"]) - 1)


@dataclass
class Plan:
    """Every decision of a plan, in order; `value(key)` looks one up."""

    label_names: dict[int, str]
    decisions: list[Decision] = field(default_factory=list)

    def add(self, key: str, value: object, why: str) -> object:
        self.decisions.append(Decision(key, value, why))
        return value

    def value(self, key: str) -> object:
        for decision in self.decisions:
            if decision.key == key:
                return decision.value
        raise KeyError(key)


def make_plan(fingerprint: Fingerprint, coarse: StageNetwork, fine: StageNetwork, gpu_memory_gb: float) -> Plan:
    """Decide the grids, window, margin, component rules and batch sizes of a coarse + fine pipeline."""
    plan = Plan(dict(fingerprint.label_names))
    labeled = fingerprint.labeled
    spacings = np.array([case["spacing"] for case in fingerprint.cases])
    extents = np.array([case["extent_mm"] for case in fingerprint.cases])
    _window(plan, fingerprint)
    target = _target_spacing(plan, spacings)
    coarse_spacing = _coarse_grid(plan, labeled, extents, spacings, coarse, gpu_memory_gb)
    margin = _margin(plan, coarse_spacing)
    _fine_grid(plan, labeled, target, margin, fine, gpu_memory_gb)
    _components(plan, labeled)
    return plan


def _window(plan: Plan, fingerprint: Fingerprint) -> None:
    stats = fingerprint.intensity
    low, high = math.floor(stats["p00_5"] / 10) * 10, math.ceil(stats["p99_5"] / 10) * 10
    plan.add(
        "data.hu_window",
        [float(low), float(high)],
        f"foreground HU 0.5th / 99.5th percentiles {stats['p00_5']:g} / {stats['p99_5']:g} over "
        f"{stats['samples']} sampled voxels (nnU-Net's CT clipping), rounded to 10 HU; each volume is then z-scored "
        f"(foreground mean {stats['mean']:g}, std {stats['std']:g})",
    )


def _target_spacing(plan: Plan, spacings: np.ndarray) -> np.ndarray:
    """The median spacing, with nnU-Net's rule for a much coarser axis (recorded, not a config key)."""
    target = np.median(spacings, axis=0)
    for axis in range(3):
        if target[axis] > ANISOTROPY * target.min():
            target[axis] = np.percentile(spacings[:, axis], 10)
    plan.add(
        "plan.target_spacing",
        _mm(target),
        f"median spacing of {len(spacings)} cases {_mm(np.median(spacings, axis=0))} mm (an axis over "
        f"{ANISOTROPY:g}x the finest takes its 10th percentile)",
    )
    return target


def _coarse_grid(plan, labeled, extents, spacings, network: StageNetwork, gpu_memory_gb: float) -> np.ndarray:
    """The coarse grid: a fixed size (one resize per volume, FLARE21's design) where every case's voxels stay near
    the organ rule's spacing, else a fixed spacing tiled with sliding windows (whole-body or mixed fields of view).
    Returns the spacing of the median case on it (mm)."""
    name, volume_ml = _smallest_organ(plan, labeled)
    organ_spacing = (volume_ml * 1000.0 / MIN_ORGAN_VOXELS) ** (1 / 3)
    spacing = np.maximum(organ_spacing, np.median(spacings, axis=0))  # never finer than the data
    field_of_view, largest = np.median(extents, axis=0), np.percentile(extents, 95, axis=0)
    size = _round_up(field_of_view / spacing, network.divisor)
    cap = network.cap(gpu_memory_gb)
    rule = (
        f"the smallest organ ({name}, 5th-percentile volume {volume_ml:g} ml) keeps {MIN_ORGAN_VOXELS} voxels at "
        f"{organ_spacing:.2f} mm, never finer than the median spacing: {_mm(spacing)} mm"
    )
    squeeze = max(1.0, (math.prod(size) / cap) ** (1 / 3))  # how much coarser one resize must be to fit memory
    stretch = float(np.max(largest / np.array(size) / spacing)) * squeeze  # the 95th-percentile case's voxels
    if stretch <= WHOLE_BODY_FACTOR or network.max_voxels is not None:  # a cap on the grid itself: one resize
        size = _fit(size, cap, network.divisor)
        why = f"{rule}; the median field of view {_mm(field_of_view)} mm at that spacing, rounded up to multiples of "
        why += f"{network.divisor}" + (
            f", shrunk {squeeze:.2f}x to fit {network.budget(gpu_memory_gb)}" if squeeze > 1 else ""
        )
        plan.add("prepare.grids.coarse.size", size, why)
        _batch(plan, "coarse", size, network, gpu_memory_gb)
        return field_of_view / np.array(size)
    patch = [min(edge, whole) for edge, whole in zip(_cube(cap, network.divisor), _round_up(largest / spacing, 1))]
    patch = _round_up(patch, network.divisor)
    plan.add(
        "prepare.grids.coarse.spacing",
        _mm(spacing),
        f"{rule}. One resize of every volume to one size would make the 95th-percentile field of view "
        f"{_mm(largest)} mm (median {_mm(field_of_view)} mm) {stretch:.1f}x coarser than that (over "
        f"{WHOLE_BODY_FACTOR:g}x; budget {network.budget(gpu_memory_gb)}): the volume is resampled to this "
        "spacing and tiled with sliding windows instead",
    )
    plan.add("coarse.model.input_size", patch, f"the largest patch within {network.budget(gpu_memory_gb)}")
    _batch(plan, "coarse", patch, network, gpu_memory_gb)
    return spacing


def _cube(cap: int, divisor: int) -> list[int]:
    """The largest cube of edge a multiple of `divisor` with at most `cap` voxels (at least 2 x divisor)."""
    edge = max(2 * divisor, int(cap ** (1 / 3)) // divisor * divisor)
    return [edge] * 3


def _smallest_organ(plan: Plan, labeled: list[dict]) -> tuple[str, float]:
    """The label with the smallest 5th-percentile volume over the cases it is present in."""
    smallest = None
    for label_id, name in plan.label_names.items():
        volumes = [case["labels"][str(label_id)]["volume_ml"] for case in labeled if str(label_id) in case["labels"]]
        if volumes:
            volume = float(np.percentile(volumes, 5))
            if smallest is None or volume < smallest[1]:
                smallest = (name, round(volume, 3))
    if smallest is None:
        raise ValueError("no labeled case holds any label: nothing to plan a segmentation for")
    return smallest


def _margin(plan: Plan, coarse_spacing: np.ndarray) -> float:
    margin = float(math.ceil((2 * float(coarse_spacing.max()) + 10.0) / 5.0) * 5)
    why = (
        f"2 coarse voxels ({float(coarse_spacing.max()):.2f} mm at the median field of view) for the coarse box's "
        "error on each side + 10 mm of context, rounded up to 5 mm"
    )
    plan.add("prepare.grids.fine.margin_mm", margin, why)
    plan.add("predict.margin_mm", margin, "the margin the fine stage was prepared with (prepare.grids.fine.margin_mm)")
    return margin


def _fine_grid(plan, labeled, target: np.ndarray, margin: float, network: StageNetwork, gpu_memory_gb: float):
    boxes = np.array([case["labels_box_mm"] for case in labeled if "labels_box_mm" in case])
    box = np.percentile(boxes, 95, axis=0) + 2 * margin
    spacing = target.astype(float).copy()
    cap = network.cap(gpu_memory_gb)
    while math.prod(size := _round_up(box / spacing, network.divisor)) > cap and max(size) > 2 * network.divisor:
        finest = spacing <= spacing.min() * 1.01
        spacing[finest] *= 1.02  # coarsen the finest axes first, as nnU-Net does
    size = _round_up(box / spacing, network.divisor)
    coarsened = (
        "" if np.allclose(spacing, target) else f", the finest axes coarsened to fit {network.budget(gpu_memory_gb)}"
    )
    plan.add(
        "prepare.grids.fine.size",
        size,
        f"95th-percentile box of all labels {_mm(box - 2 * margin)} mm + {margin:g} mm on each side at "
        f"{_mm(spacing)} mm (the target spacing{coarsened}); rounded up to multiples of {network.divisor}",
    )
    _batch(plan, "fine", size, network, gpu_memory_gb)


def _batch(plan: Plan, stage: str, size, network: StageNetwork, gpu_memory_gb: float) -> None:
    voxels = math.prod(size)
    batch = 2
    while batch < MAX_BATCH and network.memory.gigabytes(voxels, batch + 1) <= gpu_memory_gb / 2:
        batch += 1
    plan.add(
        f"{stage}.train.batch_size",
        batch,
        f"{network.memory.gigabytes(voxels, batch):.1f} GB of {gpu_memory_gb:g} at {list(size)} (measured "
        f"{network.memory.bytes_per_voxel:.0f} saved bytes per voxel under AMP, {network.memory.parameters:,} "
        "parameters); 2, or more while under half the budget",
    )


def _components(plan: Plan, labeled: list[dict]) -> None:
    keep, minimum, whys = {}, {}, []
    for label_id, name in plan.label_names.items():
        counts, smallest = [], []
        for case in labeled:
            stats = case["labels"].get(str(label_id))
            if stats is None:
                continue
            substantial = [ml for ml in stats["component_ml"] if ml >= SUBSTANTIAL * stats["volume_ml"]]
            counts.append(len(substantial))
            smallest.append(min(substantial))
        if not counts:
            continue
        most = max(counts)
        count = 0 if most > MAX_KEPT_COMPONENTS else most
        if count != 1:
            keep[label_id] = count
            whys.append(f"{name} {count} ({'all: ' if count == 0 else ''}up to {most} per case)")
        minimum[label_id] = round(500.0 * min(smallest), 1)  # half the smallest, ml -> mm3
    plan.add(
        "predict.keep_components_per_label",
        keep or None,
        "components holding >= 10 % of a label's volume, most per case: "
        + ("; ".join(whys) if whys else "one for every label"),
    )
    plan.add(
        "predict.postprocess.fine.min_volume_mm3_per_label",
        minimum,
        "half of each label's smallest component that holds >= 10 % of its volume, over all cases",
    )
    plan.add(
        "predict.coarse_min_volume_mm3",
        min(minimum.values()),
        "the smallest of the per-label minimum volumes: the ROI stage keeps every organ-sized part",
    )


def _round_up(values, divisor: int) -> list[int]:
    return [int(max(2 * divisor, math.ceil(float(v) / divisor) * divisor)) for v in values]


def _fit(size: list[int], cap: int, divisor: int) -> list[int]:
    """Shrink the largest axes of `size` by `divisor` until its voxels fit `cap`."""
    size = list(size)
    while math.prod(size) > cap and max(size) > 2 * divisor:
        size[int(np.argmax(size))] -= divisor
    return size


def _mm(values) -> list[float]:
    return [round(float(v), 2) for v in values]
