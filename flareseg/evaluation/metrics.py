"""Dice, NSD and the Hausdorff distances of one structure with the FLARE rules for empty masks and poor overlap."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from flareseg.evaluation.surface import compute_surface_distances, robust_hausdorff, surface_dice_at_tolerance

# Below this Dice the surfaces are not compared and NSD is 0 (FLARE rule: it saves time on failed structures).
MIN_DICE_FOR_NSD = 0.2

# The metrics `flareseg evaluate --metrics` can ask for, in the order of the CSV columns. dsc and nsd are the FLARE
# ones; hd95 and hd are the 95th percentile and the maximum of the surface distances in mm (not FLARE metrics).
METRICS = ("dsc", "nsd", "hd95", "hd")
HD_PERCENTS = {"hd95": 95.0, "hd": 100.0}

# Both masks empty: the structure is rightly absent, a perfect score for every metric.
BOTH_EMPTY = {"dsc": 1.0, "nsd": 1.0, "hd95": 0.0, "hd": 0.0}
# One mask empty: DSC and NSD are 0 (FLARE); a distance to an empty surface is undefined (NaN, not infinite).
ONE_EMPTY = {"dsc": 0.0, "nsd": 0.0, "hd95": math.nan, "hd": math.nan}


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """Dice similarity coefficient 2|G n P| / (|G| + |P|) of two bool masks; 1 when both are empty."""
    gt, pred = _as_masks(gt, pred)
    total = int(np.count_nonzero(gt)) + int(np.count_nonzero(pred))
    if total == 0:
        return 1.0
    return 2 * int(np.count_nonzero(gt & pred)) / total


def nsd(gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> float:
    """Normalized surface distance (surface Dice at `tolerance_mm`) with the FLARE rules.

    Both masks empty: 1. One empty: 0. Dice below 0.2: 0, without comparing the surfaces.
    """
    return dice_and_nsd(gt, pred, spacing, tolerance_mm)[1]


def hausdorff(gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float], percent: float = 100.0) -> float:
    """Hausdorff distance (mm) at `percent` (95: HD95, 100: HD) of two bool masks, with the empty-mask rules.

    Both masks empty: 0. One empty: NaN. Otherwise DeepMind surface-distance's
    compute_robust_hausdorff(compute_surface_distances(gt, pred, spacing), percent).
    """
    gt, pred = _as_masks(gt, pred)
    has_gt, has_pred = bool(gt.any()), bool(pred.any())
    if not has_gt and not has_pred:
        return 0.0
    if not has_gt or not has_pred:
        return math.nan
    return robust_hausdorff(compute_surface_distances(gt, pred, spacing), percent)


def dice_and_nsd(
    gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float], tolerance_mm: float
) -> tuple[float, float]:
    """(Dice, NSD) of two bool masks with the FLARE rules, computing the Dice once."""
    values = structure_metrics(gt, pred, spacing, tolerance_mm, ("dsc", "nsd"))
    return values["dsc"], values["nsd"]


def structure_metrics(
    gt: np.ndarray,
    pred: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float,
    metrics: Sequence[str] = ("dsc", "nsd"),
) -> dict[str, float]:
    """The asked `metrics` (names of METRICS) of two bool masks, with the rules for empty masks and poor overlap.

    Both masks empty: DSC 1, NSD 1, HD95 0, HD 0 (a rightly absent structure is a perfect answer).
    One empty (a missed or a false-positive structure): DSC 0, NSD 0, HD95 and HD NaN, because a distance to an
    empty surface is undefined; DeepMind's surface-distance gives infinity there (and for both empty), MONAI inf or
    NaN. The folder summary leaves NaN out of the means and counts it; the miss is already penalised by DSC = NSD = 0.
    Dice below 0.2: NSD 0 without comparing the surfaces (FLARE); HD95 and HD are still measured.
    The surfaces are computed once, for NSD and the Hausdorff distances together.
    """
    unknown = [name for name in metrics if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)} (choose from {', '.join(METRICS)})")
    gt, pred = _as_masks(gt, pred)
    has_gt, has_pred = bool(gt.any()), bool(pred.any())
    if not has_gt and not has_pred:
        return {name: BOTH_EMPTY[name] for name in metrics}
    if not has_gt or not has_pred:
        return {name: ONE_EMPTY[name] for name in metrics}
    values: dict[str, float] = {}
    overlap = dice(gt, pred) if "dsc" in metrics or "nsd" in metrics else math.nan
    if "dsc" in metrics:
        values["dsc"] = overlap
    wants_nsd_surfaces = "nsd" in metrics and overlap >= MIN_DICE_FOR_NSD
    distances = None
    if wants_nsd_surfaces or any(name in HD_PERCENTS for name in metrics):
        distances = compute_surface_distances(gt, pred, spacing)
    if "nsd" in metrics:
        values["nsd"] = surface_dice_at_tolerance(distances, tolerance_mm) if wants_nsd_surfaces else 0.0
    for name, percent in HD_PERCENTS.items():
        if name in metrics:
            values[name] = robust_hausdorff(distances, percent)
    return {name: values[name] for name in metrics}


def _as_masks(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.dtype != bool or pred.dtype != bool:
        raise TypeError(f"masks must be bool arrays, got {gt.dtype} and {pred.dtype}")
    if gt.shape != pred.shape:
        raise ValueError(f"masks must have one shape, got {gt.shape} and {pred.shape}")
    return gt, pred
