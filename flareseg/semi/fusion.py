"""Fusion of a partial label map with a teacher's pseudo-labels (FLARE23 partial-label training).

A partially labelled case annotates only some organs: where it says "organ k" or "background" for an annotated
organ k, it is trusted; for the organs it does not annotate it says nothing. The teacher fills those organs only:

    voxel labelled with an annotated id in `partial`       -> that id (annotated voxels always win)
    otherwise, `pseudo` gives an id the case does NOT annotate -> the pseudo id
    otherwise                                              -> 0

Pseudo-labels of annotated organs are ignored everywhere, also where the partial map says background (the case
says that organ is not there). Ids in `partial` that are not listed as annotated are treated as unannotated:
dropped, then possibly refilled from `pseudo`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAX_LABEL = 255  # label maps are uint8


def fuse_labels(partial: np.ndarray, annotated: Sequence[int], pseudo: np.ndarray) -> np.ndarray:
    """The fused uint8 label map (same shape as the inputs); see the module docstring for the rules.

    partial: the case's own (partial) label map; annotated: the label ids it annotates (0 is ignored);
    pseudo: the teacher's label map on the same voxel grid. Raises ValueError for mismatched shapes, ids outside
    0..255 or non-integer label values.
    """
    partial = as_label_ids(partial, "partial")
    pseudo = as_label_ids(pseudo, "pseudo")
    if partial.shape != pseudo.shape:
        raise ValueError(
            f"the partial label map and the pseudo-label map must have the same shape, got {partial.shape} "
            f"and {pseudo.shape}"
        )
    is_annotated = np.zeros(MAX_LABEL + 1, dtype=bool)
    for value in annotated:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= MAX_LABEL:
            raise ValueError(f"annotated label ids must be integers in 0..{MAX_LABEL}, got {value!r}")
        is_annotated[int(value)] = True
    is_annotated[0] = False
    fillable = ~is_annotated
    fillable[0] = False

    keep = is_annotated[partial]  # voxels the case labels with one of its annotated organs
    fused = np.where(keep, partial, 0).astype(np.uint8, copy=False)
    fill = fillable[pseudo]  # the teacher says "an organ the case does not annotate"
    fill &= ~keep
    fused[fill] = pseudo[fill]
    return fused


def as_label_ids(array: np.ndarray, name: str) -> np.ndarray:
    """`array` as uint8 label ids, or ValueError naming `name`."""
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"the {name} label map must hold integer label ids, got dtype {array.dtype}")
    if array.size:
        low, high = array.min(), array.max()
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > MAX_LABEL:
            raise ValueError(f"the {name} label map holds values outside 0..{MAX_LABEL} (min {low}, max {high})")
        if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
            raise ValueError(f"the {name} label map holds non-integer values; expected label ids")
    return array.astype(np.uint8)
