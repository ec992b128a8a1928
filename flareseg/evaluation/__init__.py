"""FLARE evaluation: Dice and NSD (surface Dice at a tolerance), and on request HD95 and HD, per structure, per case
and per folder."""

from flareseg.evaluation.evaluate import evaluate_folder, format_summary
from flareseg.evaluation.metrics import METRICS, dice, dice_and_nsd, hausdorff, nsd, structure_metrics
from flareseg.evaluation.protocol import (
    PRESETS,
    Preset,
    Score,
    Target,
    check_metrics,
    get_preset,
    score_case,
    summarize,
)
from flareseg.evaluation.surface import (
    SurfaceDistances,
    compute_surface_distances,
    robust_hausdorff,
    surface_dice,
    surface_dice_at_tolerance,
    surfel_area_table,
)

__all__ = [
    "METRICS",
    "PRESETS",
    "Preset",
    "Score",
    "SurfaceDistances",
    "Target",
    "check_metrics",
    "compute_surface_distances",
    "dice",
    "dice_and_nsd",
    "evaluate_folder",
    "format_summary",
    "get_preset",
    "hausdorff",
    "nsd",
    "robust_hausdorff",
    "score_case",
    "structure_metrics",
    "summarize",
    "surface_dice",
    "surface_dice_at_tolerance",
    "surfel_area_table",
]
