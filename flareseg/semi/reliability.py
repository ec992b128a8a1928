"""Reliable unlabeled-image filtering (UIF, FLARE22 SemiSeg-CSSN): keep the unlabeled cases on which a model's
intermediate checkpoints already agree with its final one.

score(case) = mean over the intermediate checkpoints of the mean Dice (over labels) between that checkpoint's
prediction and the final checkpoint's prediction. Cases scoring above a threshold, whose final prediction holds
every expected label, are kept, most reliable first (top N).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from flareseg.atomic import atomic_write_text
from flareseg.config.schema import PredictConfig
from flareseg.data.cases import find_images
from flareseg.inference.predictor import Predictor
from flareseg.io import read_image


def label_dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    """Dice of one label between two label maps (both empty: 1)."""
    in_a, in_b = a == label, b == label
    total = int(in_a.sum()) + int(in_b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(in_a, in_b).sum()) / total


def reliability(intermediate: Sequence[np.ndarray], final: np.ndarray, labels: Sequence[int]) -> float:
    """Mean over the intermediate predictions of their mean Dice with the final prediction."""
    if not intermediate:
        raise ValueError("reliability needs at least one intermediate prediction")
    return float(np.mean([np.mean([label_dice(p, final, k) for k in labels]) for p in intermediate]))


@dataclass
class Selection:
    scores: dict[str, float] = field(default_factory=dict)  # every scored case
    missing_labels: dict[str, list[int]] = field(default_factory=dict)  # expected labels absent from the final
    selected: list[str] = field(default_factory=list)  # kept, most reliable first
    failed: list[tuple[str, str]] = field(default_factory=list)


def select(scores: dict[str, float], missing: dict[str, list[int]], threshold: float, top: int | None) -> list[str]:
    """Cases above `threshold` with no expected label missing, most reliable first, at most `top`."""
    kept = [case for case, score in scores.items() if score > threshold and not missing.get(case)]
    kept.sort(key=lambda case: (-scores[case], case))
    return kept[:top] if top is not None else kept


def select_unlabeled(
    images_dir: str | os.PathLike,
    settings: PredictConfig,
    intermediate: Sequence[str | os.PathLike],
    out_file: str | os.PathLike,
    threshold: float = 0.9,
    top: int | None = None,
    expected: Sequence[int] | None = None,
    progress: bool = True,
) -> Selection:
    """Score every unlabeled image with the final fine checkpoint (`settings.fine`) against `intermediate` fine
    checkpoints (the coarse stage is shared), select, and write `out_file` (JSON: selected list and all scores)."""
    if not intermediate:
        raise ValueError("select-unlabeled needs at least one intermediate checkpoint")
    if Path(out_file).is_dir():  # checked before the work, not when writing its result
        raise IsADirectoryError(f"{out_file}: is a folder; give a file name such as {Path(out_file) / 'selected.json'}")
    found = find_images(images_dir)
    final = Predictor(settings)
    others = [Predictor(replace(settings, fine=Path(path))) for path in intermediate]
    labels = list(range(1, len(final.labels) + 1))
    expected = list(expected) if expected is not None else labels
    result = Selection()
    for case_id, message in found.problems:  # two images for one case, a broken link: that case fails alone
        result.failed.append((case_id, message))
        print(f"failed: {message}", file=sys.stderr)
    for case_id, image_path in tqdm(found.paths.items(), desc="score", unit="case", disable=not progress):
        try:
            image, geometry = read_image(image_path)
            reference = final.predict_array(image, geometry)
            predictions = [predictor.predict_array(image, geometry) for predictor in others]
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:  # noqa: BLE001 - one bad case is reported, the others are scored
            message = str(error) if str(error).startswith(str(image_path)) else f"{image_path}: {error}"
            result.failed.append((case_id, message))
            print(f"failed: {message}", file=sys.stderr)
            continue
        result.scores[case_id] = round(reliability(predictions, reference, labels), 4)
        present = set(np.unique(reference).tolist())
        result.missing_labels[case_id] = [k for k in expected if k not in present]
    result.selected = select(result.scores, result.missing_labels, threshold, top)
    atomic_write_text(
        out_file,
        json.dumps(
            {
                "selected": result.selected,
                "threshold": threshold,
                "top": top,
                "scores": dict(sorted(result.scores.items(), key=lambda item: -item[1])),
                "missing_labels": {case: ids for case, ids in result.missing_labels.items() if ids},
                "failed": dict(result.failed),
            },
            indent=1,
        )
        + "\n",
    )
    return result
