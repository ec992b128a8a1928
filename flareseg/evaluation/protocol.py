"""The FLARE evaluation protocols: which structures, which NSD tolerances, the slice rule, rounding and the summary.

Besides the FLARE metrics (DSC, NSD) the Hausdorff distances HD95 and HD can be asked for; their rules for empty
masks are in metrics.structure_metrics (both empty: 0 mm; one empty: NaN, left out of the summary's means and
counted).

Label maps are [z, y, x] arrays (as flareseg.io.read_image gives them), so axis 0 is the axial slice axis; the
official scripts index the NIfTI's last axis, which is the same axis.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from flareseg.evaluation.metrics import BOTH_EMPTY, HD_PERCENTS, METRICS, structure_metrics

DECIMALS = 4  # per-case values are rounded like the official scripts do
DEFAULT_METRICS = ("dsc", "nsd")


@dataclass(frozen=True)
class Target:
    """One evaluated structure.

    label: the id reported in the results. sources: the ids in the label maps that together form the structure.
    gt_slices_only: compare only the axial slices z in [min z, max z) of the ground truth (the official rule for
    the aorta, the IVC and the esophagus, whose annotated length varies between cases; a ground truth on a single
    slice leaves both masks empty, which scores 1 where the official script gives NaN). lesion: reported apart from
    the organs.
    """

    label: int
    name: str
    sources: tuple[int, ...]
    tolerance_mm: float
    gt_slices_only: bool = False
    lesion: bool = False


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    targets: tuple[Target, ...]

    @property
    def organs(self) -> tuple[Target, ...]:
        return tuple(t for t in self.targets if not t.lesion)

    @property
    def lesions(self) -> tuple[Target, ...]:
        return tuple(t for t in self.targets if t.lesion)


@dataclass(frozen=True)
class Score:
    """The metrics of one structure in one case, rounded to 4 decimals; None for a metric that was not asked.

    hd95 and hd are in mm and NaN when exactly one of the two masks is empty (undefined; see
    metrics.structure_metrics). NaN is not equal to itself: compare such scores field by field.
    """

    case: str
    label: int
    organ: str
    dsc: float | None
    nsd: float | None
    hd95: float | None = None
    hd: float | None = None

    def value(self, metric: str) -> float | None:
        """The value of one metric by name (dsc, nsd, hd95, hd)."""
        if metric not in METRICS:
            raise ValueError(f"unknown metric '{metric}' (choose from {', '.join(METRICS)})")
        return getattr(self, metric)


FLARE22_ORGANS = (
    "liver",
    "right kidney",
    "spleen",
    "pancreas",
    "aorta",
    "inferior vena cava",
    "right adrenal gland",
    "left adrenal gland",
    "gallbladder",
    "esophagus",
    "stomach",
    "duodenum",
    "left kidney",
)
FLARE22_TOLERANCES_MM = (5, 3, 3, 5, 2, 2, 2, 2, 2, 3, 5, 7, 3)
GT_SLICES_ONLY = frozenset({5, 6, 10})  # aorta, inferior vena cava, esophagus
LESION = Target(14, "lesion", (14,), 2.0, lesion=True)

_FLARE22_TARGETS = tuple(
    Target(label, name, (label,), float(tolerance), gt_slices_only=label in GT_SLICES_ONLY)
    for label, (name, tolerance) in enumerate(zip(FLARE22_ORGANS, FLARE22_TOLERANCES_MM), start=1)
)

PRESETS = {
    "flare22": Preset("flare22", "FLARE22: 13 organs (labels 1-13)", _FLARE22_TARGETS),
    "flare23": Preset("flare23", "FLARE23: 13 organs, and the lesions (label 14) apart", (*_FLARE22_TARGETS, LESION)),
    "lesion": Preset("lesion", "FLARE23 lesions only (label 14)", (LESION,)),
    # FLARE21 label maps use 1 liver, 2 kidney, 3 spleen, 4 pancreas. FLARE22-numbered maps work too: their right
    # kidney is 2 and their left kidney 13, which joins it; 5-12 are then ignored. NSD at 1 mm for all.
    "flare21": Preset(
        "flare21",
        "FLARE21: liver, kidneys (2, and 13 if present), spleen, pancreas at 1 mm",
        (
            Target(1, "liver", (1,), 1.0),
            Target(2, "kidney", (2, 13), 1.0),
            Target(3, "spleen", (3,), 1.0),
            Target(4, "pancreas", (4,), 1.0),
        ),
    ),
}


def get_preset(name: str | Preset) -> Preset:
    """A preset by name (flare22, flare23, flare21, lesion); a Preset is returned as it is."""
    if isinstance(name, Preset):
        return name
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), PRESETS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown evaluation preset '{name}' (choose from {', '.join(PRESETS)}){hint}")
    return PRESETS[name]


def check_metrics(metrics: str | Iterable[str]) -> tuple[str, ...]:
    """The asked metrics in the order of METRICS (dsc, nsd, hd95, hd), without repeats; an unknown name is an error."""
    asked = [metrics] if isinstance(metrics, str) else list(metrics)
    if not asked:
        raise ValueError(f"no metric asked (choose from {', '.join(METRICS)})")
    for name in asked:
        if name not in METRICS:
            close = difflib.get_close_matches(str(name), METRICS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown metric '{name}' (choose from {', '.join(METRICS)}){hint}")
    return tuple(name for name in METRICS if name in asked)


def score_case(
    gt: np.ndarray,
    pred: np.ndarray,
    spacing: Sequence[float],
    preset: str | Preset = "flare22",
    case: str = "",
    metrics: Iterable[str] = DEFAULT_METRICS,
) -> list[Score]:
    """The `metrics` (default Dice and NSD) of every structure of the preset for one pair of [z, y, x] label maps.

    spacing: voxel size in mm along (z, y, x), that of the ground truth. Values are rounded to 4 decimals. HD95 and
    HD follow the same crops as DSC and NSD (the slice rule included); the surfaces are computed once for all three.
    """
    preset = get_preset(preset)
    metrics = check_metrics(metrics)
    gt, pred = _as_labels(gt, "ground truth"), _as_labels(pred, "prediction")
    if gt.shape != pred.shape or gt.ndim != 3:
        raise ValueError(f"label maps must be 3D and of one shape, got {gt.shape} and {pred.shape}")
    # Bounding boxes of every label in one pass each, so that each structure is compared inside a small crop.
    max_label = max(source for target in preset.targets for source in target.sources)
    gt_boxes = ndimage.find_objects(gt, max_label=max_label)
    pred_boxes = ndimage.find_objects(pred, max_label=max_label)

    scores = []
    for target in preset.targets:
        gt_box = _union(gt_boxes[source - 1] for source in target.sources)
        pred_box = _union(pred_boxes[source - 1] for source in target.sources)
        box = _union([gt_box, pred_box])
        if box is not None and target.gt_slices_only and gt_box is not None:
            # The official upper bound is exclusive: the ground truth's last slice itself is not compared.
            first = max(box[0].start, gt_box[0].start)
            stop = min(box[0].stop, gt_box[0].stop - 1)
            box = (slice(first, max(first, stop)), *box[1:])
        if box is None:
            values = {name: BOTH_EMPTY[name] for name in metrics}
        else:
            values = structure_metrics(
                _mask(gt[box], target.sources), _mask(pred[box], target.sources), spacing, target.tolerance_mm, metrics
            )
        rounded = {name: _round(values[name]) if name in values else None for name in METRICS}
        scores.append(Score(case, target.label, target.name, **rounded))
    return scores


def summarize(scores: Iterable[Score], preset: str | Preset = "flare22", metrics: Iterable[str] | None = None) -> dict:
    """Per-structure mean and standard deviation over cases of every metric, the organ means' mean, lesions apart.

    metrics: those to summarize; by default the ones the scores hold. Per structure: "<metric>" (the mean over
    cases), "<metric>_std" (the sample standard deviation, ddof=1; None under two values) and, for hd95 and hd,
    "<metric>_undefined" (the cases where exactly one mask was empty: NaN, left out of the mean and std). "mean":
    the mean of the organ means and "<metric>_std", the sample standard deviation over cases of each case's mean over
    the organs (undefined HDs left out).
    """
    preset = get_preset(preset)
    scores = list(scores)
    if metrics is None:
        metrics = [name for name in METRICS if any(score.value(name) is not None for score in scores)]
        metrics = metrics or DEFAULT_METRICS
    metrics = check_metrics(metrics)
    by_label: dict[int, list[Score]] = {}
    for score in scores:
        by_label.setdefault(score.label, []).append(score)

    def entry(target: Target) -> dict:
        rows = by_label.get(target.label, [])
        result: dict = {"label": target.label}
        for name in metrics:
            values = [score.value(name) for score in rows]
            defined = [value for value in values if value is not None and not math.isnan(value)]
            result[name], result[f"{name}_std"] = _mean(defined), _std(defined)
            if name in HD_PERCENTS:
                result[f"{name}_undefined"] = sum(value is not None and math.isnan(value) for value in values)
        result["cases"] = len(rows)
        return result

    organs = {target.name: entry(target) for target in preset.organs}
    lesions = {target.name: entry(target) for target in preset.lesions}
    organ_labels = {target.label for target in preset.organs}
    mean: dict = {}
    for name in metrics:
        mean[name] = _mean(value for value in (organs[o][name] for o in organs) if value is not None)
        by_case: dict[str, list[float]] = {}
        for score in scores:
            value = score.value(name)
            if score.label in organ_labels and value is not None and not math.isnan(value):
                by_case.setdefault(score.case, []).append(value)
        mean[f"{name}_std"] = _std(float(np.mean(values)) for values in by_case.values())
    return {
        "preset": preset.name,
        "metrics": list(metrics),
        "cases": len({s.case for s in scores}),
        "organs": organs,
        "mean": mean,
        "lesion": lesions.get(LESION.name),
    }


def _as_labels(array: np.ndarray, what: str) -> np.ndarray:
    """An integer label map; float maps are accepted when they hold whole numbers."""
    array = np.asarray(array)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise ValueError(f"the {what} label map holds non-integer values")
        array = rounded.astype(np.int32)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"the {what} label map must hold integers, got {array.dtype}")
    if array.size and np.issubdtype(array.dtype, np.signedinteger) and array.min() < 0:
        raise ValueError(f"the {what} label map holds negative labels")
    return array


def _union(boxes: Iterable[tuple[slice, ...] | None]) -> tuple[slice, ...] | None:
    present = [box for box in boxes if box is not None]
    if not present:
        return None
    return tuple(
        slice(min(box[axis].start for box in present), max(box[axis].stop for box in present))
        for axis in range(len(present[0]))
    )


def _mask(labels: np.ndarray, sources: tuple[int, ...]) -> np.ndarray:
    return labels == sources[0] if len(sources) == 1 else np.isin(labels, sources)


def _round(value: float) -> float:
    # np.round, as the official scripts round numpy floats
    return float(np.round(value, DECIMALS))


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def _std(values: Iterable[float]) -> float | None:
    """Sample standard deviation (ddof=1, as pandas and most papers report it); None under two values."""
    values = list(values)
    return float(np.std(values, ddof=1)) if len(values) >= 2 else None
