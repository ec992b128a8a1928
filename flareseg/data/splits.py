"""K-fold splits of case ids, reproducible from a seed."""

from __future__ import annotations

import random


def kfold_splits(case_ids: list[str], folds: int, seed: int) -> list[dict[str, list[str]]]:
    """`folds` train/val splits: the shuffled cases are dealt into folds; fold k validates on the k-th part.

    folds=1 gives one split with every case in train and none in val.
    """
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    ordered = sorted(case_ids)
    if folds == 1:
        return [{"train": ordered, "val": []}]
    if len(ordered) < folds:
        raise ValueError(f"{folds}-fold split needs at least {folds} labeled cases, got {len(ordered)}")
    shuffled = ordered[:]
    random.Random(seed).shuffle(shuffled)
    parts = [sorted(shuffled[k::folds]) for k in range(folds)]
    return [{"train": sorted(c for p in parts[:k] + parts[k + 1 :] for c in p), "val": parts[k]} for k in range(folds)]
