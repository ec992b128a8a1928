"""`flareseg.segment`: one call from a CT to its label map (and statistics), as TotalSegmentator's users expect.

    import flareseg
    result = flareseg.segment("ct.nii.gz", "ct_labels.nii.gz", coarse="coarse.pt", fine="fine.pt", statistics=True)
    result.label, result.geometry, result.statistics["liver"]["volume_ml"]

Each call loads the networks; to segment many cases, use `flareseg predict` (or Predictor) once for all of them.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flareseg.config import Config, load_config
from flareseg.io import Geometry, read_image, write_image


@dataclass
class Segmentation:
    """A label map on its input's grid, the names of its ids (id k + 1 is label_names[k]), and its statistics."""

    label: np.ndarray  # uint8 [z, y, x]
    geometry: Geometry  # exactly the input's spacing, origin and direction
    label_names: list[str]
    statistics: dict | None  # {label name: figures} (flareseg.inference.statistics), when asked


def segment(
    image: str | os.PathLike | tuple[np.ndarray, Geometry],
    output: str | os.PathLike | None = None,
    config: Config | str | os.PathLike | None = None,
    *,
    coarse: str | os.PathLike | None = None,
    fine: str | os.PathLike | None = None,
    stages: list[str | os.PathLike] | None = None,
    device: str | None = None,
    labels: list[str | int] | None = None,
    statistics: bool = False,
) -> Segmentation:
    """Segment one CT: an image file, a DICOM series folder, or an (array [z, y, x], Geometry) pair.

    `config`: a Config or a predict YAML file (default: the built-in defaults); `coarse`/`fine` or `stages` name the
    checkpoints and `device`/`labels` override the config's, as the command line does. `output`: where to write the
    label map (its format from the suffix, e.g. .nii.gz, .mha), or None to write nothing.
    """
    from flareseg.config import set_value
    from flareseg.inference.predictor import Predictor

    config = copy.deepcopy(config) if isinstance(config, Config) else load_config(config)  # the caller's stays
    overrides = {"coarse": coarse, "fine": fine, "stages": stages, "device": device, "labels": labels}
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("coarse", "fine"):
            value = _paths(value)
        elif key == "stages":
            value = [_paths(entry) for entry in value]
        set_value(config, f"predict.{key}", value, Path.cwd())
    config.validate()
    array, geometry = image if isinstance(image, tuple) else read_image(image)
    predictor = Predictor(config.predict)
    label = predictor.predict_array(np.asarray(array), geometry)
    if output is not None:
        write_image(output, label, geometry)
    figures = None
    if statistics:
        from flareseg.inference.statistics import label_statistics

        figures = label_statistics(label, np.asarray(array), geometry, predictor.labels)
    return Segmentation(label, geometry, list(predictor.labels), figures)


def _paths(value: str | os.PathLike | list) -> str | list[str]:
    """A checkpoint as a string, or a fold ensemble's list of them."""
    return str(value) if isinstance(value, (str, os.PathLike)) else [str(path) for path in value]
