"""FLARE evaluation: Dice and NSD (surface Dice at a tolerance) per structure, per case and per folder."""

from flareseg.evaluation.evaluate import evaluate_folder, format_summary
from flareseg.evaluation.metrics import dice, dice_and_nsd, nsd
from flareseg.evaluation.protocol import PRESETS, Preset, Score, Target, get_preset, score_case, summarize
from flareseg.evaluation.surface import (
    SurfaceDistances,
    compute_surface_distances,
    surface_dice,
    surface_dice_at_tolerance,
    surfel_area_table,
)

__all__ = [
    "PRESETS",
    "Preset",
    "Score",
    "SurfaceDistances",
    "Target",
    "compute_surface_distances",
    "dice",
    "dice_and_nsd",
    "evaluate_folder",
    "format_summary",
    "get_preset",
    "nsd",
    "score_case",
    "summarize",
    "surface_dice",
    "surface_dice_at_tolerance",
    "surfel_area_table",
]
