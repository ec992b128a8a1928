"""The predictor: one CT in, its label map out, with the input's exact geometry.

    read -> reorient -> coarse model on the whole volume (resize, window, z-score on the device) -> components
    -> box of all organs + margin (mm) -> fine model on that crop of the original-resolution image
    -> label map back to crop size -> components -> paste -> undo the reorientation -> write

Full-resolution multi-channel float maps are never built: labels are decided at the model's resolution and only
the uint8 label map is resampled back.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flareseg.config.schema import PredictConfig
from flareseg.data.crop import expand_box_mm
from flareseg.data.resample import resampled_geometry, resize_label
from flareseg.inference.postprocess import box_to_source, foreground_box, keep_components
from flareseg.inference.stage_model import StageModel
from flareseg.io import Geometry, from_canonical, read_image, to_canonical, write_image
from flareseg.models.runtime import resolve_device


@dataclass
class CaseTimings:
    """Seconds per step of one case."""

    steps: dict[str, float] = field(default_factory=dict)
    _last: float = field(default_factory=time.perf_counter)

    def lap(self, step: str, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        self.steps[step] = now - self._last
        self._last = now


def _case_stem(path: str | os.PathLike) -> str:
    from flareseg.io import strip_image_suffix

    return strip_image_suffix(path)


class Predictor:
    """Coarse + fine checkpoints on one device; `predict_file` runs one case end to end."""

    def __init__(self, settings: PredictConfig):
        if settings.coarse is None or settings.fine is None:
            raise FileNotFoundError("predict.coarse and predict.fine must name checkpoints (--coarse, --fine)")
        self.settings = settings
        self.device = resolve_device(settings.device)
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        precision = settings.precision
        if precision == "auto":
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        self.coarse = StageModel(settings.coarse, self.device, precision)
        self.fine = StageModel(settings.fine, self.device, precision)
        if self.coarse.labels != self.fine.labels:
            raise ValueError(
                f"the coarse and fine checkpoints segment different labels: {self.coarse.labels} vs {self.fine.labels}"
            )
        self.labels = self.fine.labels

    def predict_file(self, image_path: str | os.PathLike, out_path: str | os.PathLike) -> CaseTimings:
        """Segment one image file or DICOM folder and write the label map (uint8) atomically to `out_path`."""
        timings = CaseTimings()
        image, geometry = read_image(image_path)
        timings.lap("read", self.device)
        label = self.predict_array(image, geometry, timings)
        write_image(out_path, label, geometry)
        if self.settings.png:
            from flareseg.visualize import overlay_png

            overlay_png(
                image, geometry, label, Path(out_path).with_name(_case_stem(out_path) + ".png"), names=self.labels
            )
        timings.lap("write", self.device)
        return timings

    def predict_array(self, image: np.ndarray, geometry: Geometry, timings: CaseTimings | None = None) -> np.ndarray:
        """The uint8 label map of a [z, y, x] image, on the same voxel grid."""
        timings = timings or CaseTimings()
        image_c, canonical, plan = to_canonical(image, geometry)
        volume = torch.from_numpy(np.ascontiguousarray(image_c)).to(self.device)

        coarse = self.coarse.label_map(volume).cpu().numpy()
        coarse_spacing = resampled_geometry(canonical, coarse.shape).spacing
        keep_components(
            coarse,
            coarse_spacing,
            self.settings.coarse_min_volume_mm3,
            self.settings.keep_components,
            self.settings.keep_components_per_label,
        )
        timings.lap("coarse", self.device)

        labels_c = np.zeros(canonical.shape, dtype=np.uint8)
        organs = foreground_box(coarse)
        if organs is not None:
            box = box_to_source(organs, coarse.shape, canonical.shape)
            box = expand_box_mm(box, self.settings.margin_mm, canonical.spacing, canonical.shape)
            timings.lap("box", self.device)
            fine = self.fine.label_map(volume[box.slices])
            fine = resize_label(fine, box.shape, "per_label").cpu().numpy()
            timings.lap("fine", self.device)
            keep_components(
                fine,
                canonical.spacing,
                self.settings.fine_min_volume_mm3,
                self.settings.keep_components,
                self.settings.keep_components_per_label,
            )
            labels_c[box.slices] = fine
        else:
            timings.lap("box", self.device)
            timings.lap("fine", self.device)
        label, _ = from_canonical(labels_c, plan)
        timings.lap("postprocess", self.device)
        return np.ascontiguousarray(label)
