"""Dice and NSD of one structure with the FLARE rules for empty masks and poor overlap."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flareseg.evaluation.surface import surface_dice

# Below this Dice the surfaces are not compared and NSD is 0 (FLARE rule: it saves time on failed structures).
MIN_DICE_FOR_NSD = 0.2


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


def dice_and_nsd(
    gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float], tolerance_mm: float
) -> tuple[float, float]:
    """(Dice, NSD) of two bool masks with the FLARE rules, computing the Dice once."""
    gt, pred = _as_masks(gt, pred)
    has_gt, has_pred = bool(gt.any()), bool(pred.any())
    if not has_gt and not has_pred:
        return 1.0, 1.0
    if not has_gt or not has_pred:
        return 0.0, 0.0
    overlap = dice(gt, pred)
    if overlap < MIN_DICE_FOR_NSD:
        return overlap, 0.0
    return overlap, surface_dice(gt, pred, spacing, tolerance_mm)


def _as_masks(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.dtype != bool or pred.dtype != bool:
        raise TypeError(f"masks must be bool arrays, got {gt.dtype} and {pred.dtype}")
    if gt.shape != pred.shape:
        raise ValueError(f"masks must have one shape, got {gt.shape} and {pred.shape}")
    return gt, pred
