"""The predictor: one CT in, its label map out, with the input's exact geometry.

    read -> reorient -> ROI (coarse) model on the whole volume (resize, window, z-score on the device) -> components
    -> box of all organs + margin (mm) -> fine model(s) on that crop of the original-resolution image
    -> components (at the model's resolution) -> label map back to crop size -> paste -> undo the reorientation
    -> write

Full-resolution multi-channel float maps are never built: labels are decided at the model's resolution and only
the uint8 label map is resampled back.

A stage may be a fold ensemble (a list of checkpoints) and predict.tta: mirror flips every input 8 ways; both
average sigmoid probabilities inside the stage (StageModel), and `CaseTimings.passes` counts each stage's network
passes per case (members x flips x sliding windows), beside its seconds.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flareseg.config.schema import PredictConfig
from flareseg.data.crop import Box, expand_box_mm
from flareseg.data.resample import resampled_geometry, resize_label
from flareseg.inference.postprocess import EVERY_LARGE_COMPONENT, box_to_source, foreground_box, keep_components
from flareseg.inference.stage_model import StageModel
from flareseg.io import Geometry, from_canonical, read_image, to_canonical, write_image
from flareseg.models.runtime import resolve_device


@dataclass
class CaseTimings:
    """Seconds per step of one case, and the network passes of each stage (by its step name)."""

    steps: dict[str, float] = field(default_factory=dict)
    passes: dict[str, int] = field(default_factory=dict)
    _last: float = field(default_factory=time.perf_counter)

    def lap(self, step: str, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        self.steps[step] = self.steps.get(step, 0.0) + now - self._last  # a step lapped twice adds up
        self._last = now


class Predictor:
    """A chain of stage checkpoints on one device; `predict_file` runs one case end to end.

    predict.stages lists the chain (predict.coarse + predict.fine is the two-stage shorthand). With one stage it
    segments the whole volume. With more, the first finds the region of interest (its components are filtered, and
    the box of what remains plus predict.margin_mm is cut from the original-resolution image) and every later stage
    segments that crop; a later stage's labels overwrite earlier ones where it finds foreground (organs, then
    lesions). Each stage runs on its own grid (fixed size, or fixed spacing with sliding windows).

    A stage given as a list of checkpoints is a fold ensemble, and predict.tta: mirror adds the 8 flips; both
    average probabilities inside the stage. A stage's seconds include every pass; `predict_array` also records each
    stage's network passes of the case in `timings.passes` (by the stage's step name, `steps.stages`).
    """

    def __init__(self, settings: PredictConfig):
        chain = stage_checkpoints(settings)
        if any(entry is None for entry in chain):
            raise FileNotFoundError(
                "predict.coarse and predict.fine (or predict.stages) must name checkpoints (--coarse, --fine)"
            )
        self.settings = settings
        self.device = resolve_device(settings.device)
        if settings.threads is not None:  # torch's own pool (resampling, post-processing, the torch backend)
            torch.set_num_threads(settings.threads)
        stages = [
            StageModel(
                entry,
                self.device,
                settings.precision,
                settings.window_overlap,
                settings.backend,
                settings.threads,
                settings.tta,
            )
            for entry in chain
        ]
        self.roi, self.segmenters = (None, stages) if len(stages) == 1 else (stages[0], stages[1:])
        if self.roi is not None and self.roi.region != "volume":
            raise ValueError(
                f"{self.roi.path} learned the {self.roi.name!r} stage on label boxes (prepare.grids.{self.roi.name}"
                ".region: labels), but the first stage of a chain finds the region of interest in the whole volume: "
                "put a stage trained on a volume grid first"
            )
        self.steps = _step_names(stages, roi_first=self.roi is not None)  # a timing column per step and stage
        self.rules = {  # each stage's component rule, decided once
            stage: settings.postprocess_for(stage.name, finds_region=stage is self.roi) for stage in stages
        }
        unknown = sorted(set(settings.postprocess) - {stage.name for stage in stages})
        if unknown:
            raise ValueError(
                f"predict.postprocess names the stages {', '.join(unknown)}, but this chain's stages are "
                f"{', '.join(stage.name for stage in stages)} (each checkpoint's train.stage)"
            )
        for stage in self.segmenters[1:]:
            if stage.label_names != self.segmenters[0].label_names:
                raise ValueError(
                    f"{stage.path} numbers its labels {stage.label_names}, but {self.segmenters[0].path} numbers them "
                    f"{self.segmenters[0].label_names}: the segmenting stages must share data.labels"
                )
        self.labels = self.segmenters[0].label_names  # names of the output label ids 1..N
        self.written = _label_subset(settings.labels, self.labels)  # a 256-entry table of the ids to write, or None

    def predict_file(self, image_path: str | os.PathLike, out_path: str | os.PathLike) -> CaseTimings:
        """Segment one image file or DICOM folder and write the label map (uint8) atomically to `out_path`."""
        timings = CaseTimings()
        image, geometry = read_image(image_path)
        timings.lap("read", self.device)
        label = self.predict_array(image, geometry, timings)
        write_image(out_path, label, geometry)  # the label map only: a folder's other outputs are CaseOutputs'
        timings.lap("write", self.device)
        return timings

    def predict_array(self, image: np.ndarray, geometry: Geometry, timings: CaseTimings | None = None) -> np.ndarray:
        """The uint8 label map of a [z, y, x] image, on the same voxel grid."""
        timings = timings or CaseTimings()
        image_c, canonical, plan = to_canonical(image, geometry)
        volume = torch.from_numpy(np.ascontiguousarray(image_c)).to(self.device)
        labels_c = np.zeros(canonical.shape, dtype=np.uint8)
        region = self._region_of_interest(volume, canonical, timings)
        if region is not None:
            crop, target = volume[region.slices], labels_c[region.slices]
            for stage, step in zip(self.segmenters, self.steps.segmenters):
                # components are filtered at the model's resolution (a few million voxels, not tens of millions),
                # then only the uint8 label map is resampled back to the crop, label by label
                on_grid = stage.label_map(crop, canonical.spacing).cpu().numpy()
                grid_spacing = resampled_geometry(canonical.with_shape(region.shape), on_grid.shape).spacing
                self._filter(on_grid, grid_spacing, stage)
                labels = resize_label(torch.from_numpy(on_grid).to(self.device), region.shape, "per_label")
                labels = labels.cpu().numpy()
                np.copyto(target, labels, where=labels > 0)
                timings.lap(step, self.device)
                self._count_passes(stage, step, timings)
        if self.written is not None:  # predict.labels: the other labels are not written (the models ran as trained)
            labels_c = self.written[labels_c]
        label, _ = from_canonical(labels_c, plan)
        timings.lap("postprocess", self.device)
        return np.ascontiguousarray(label)

    def _region_of_interest(self, volume: torch.Tensor, canonical: Geometry, timings: CaseTimings) -> Box | None:
        """The box the segmenting stages work in: the whole volume, or the ROI stage's finding + margin (None if
        it finds nothing)."""
        if self.roi is None:
            return Box((0, 0, 0), tuple(canonical.shape))
        found = self.roi.label_map(volume, canonical.spacing, regions=True).cpu().numpy()
        # a region merged from several labels (the ROI of a cascade) has as many parts as it has: no count limit
        grouped = {group[0]: EVERY_LARGE_COMPONENT for group in self.roi.groups if len(group) > 1}
        self._filter(found, resampled_geometry(canonical, found.shape).spacing, self.roi, grouped)
        timings.lap(self.steps.roi, self.device)
        self._count_passes(self.roi, self.steps.roi, timings)
        box = foreground_box(found)
        if box is not None:
            box = box_to_source(box, found.shape, canonical.shape)
            box = expand_box_mm(box, self.settings.margin_mm, canonical.spacing, canonical.shape)
        timings.lap("box", self.device)
        return box

    @staticmethod
    def _count_passes(stage: StageModel, step: str, timings: CaseTimings) -> None:
        passes = getattr(stage, "passes", None)  # a stand-in stage (tests) may not count them
        if passes is not None:
            timings.passes[step] = passes

    def _filter(self, labels: np.ndarray, spacing, stage: StageModel, extra: dict | None = None) -> None:
        """Keep the components `stage`'s rule keeps (predict.postprocess.<name>, else the shorthand keys)."""
        rule = self.rules[stage]
        per_label = {**rule.keep_components_per_label, **(extra or {})}
        keep_components(
            labels, spacing, rule.min_volume_mm3, rule.keep_components, per_label, rule.min_volume_mm3_per_label
        )


def stage_checkpoints(settings: PredictConfig) -> list[Path | list[Path] | None]:
    """The chain's stages in order, each a checkpoint or a fold ensemble's list (a list of one is its checkpoint):
    predict.stages, else [predict.coarse, predict.fine] (None where one is unset)."""
    chain = settings.stages if settings.stages is not None else [settings.coarse, settings.fine]
    return [entry[0] if isinstance(entry, list) and len(entry) == 1 else entry for entry in chain]


def checkpoint_files(settings: PredictConfig) -> list[Path | None]:
    """Every checkpoint file the chain reads, the members of each ensemble in order (None for an unset coarse or
    fine): what a folder's prediction_settings.json fingerprints."""
    files: list[Path | None] = []
    for entry in stage_checkpoints(settings):
        files.extend(entry if isinstance(entry, list) else [entry])
    return files


def _label_subset(wanted: list[str | int] | None, names: list[str]) -> np.ndarray | None:
    """A lookup table keeping the label ids `wanted` names (by name or id) and zeroing the others."""
    if wanted is None:
        return None
    table = np.zeros(256, dtype=np.uint8)
    for item in wanted:
        label_id = names.index(item) + 1 if item in names else item
        if not isinstance(label_id, int) or not 1 <= label_id <= len(names):
            known = ", ".join(f"{k + 1} {name}" for k, name in enumerate(names))
            raise ValueError(f"predict.labels names {item!r}, which the stages do not write (their labels: {known})")
        table[label_id] = label_id
    return table


@dataclass(frozen=True)
class StepNames:
    """The timing steps of a chain, in order: read, the ROI stage, box, each segmenting stage, postprocess, write.
    A stage's step is its name (train.stage); a name that comes twice gets _2, _3..."""

    roi: str | None
    segmenters: tuple[str, ...]

    @property
    def all(self) -> tuple[str, ...]:
        middle = (self.roi, "box") if self.roi is not None else ()
        return ("read", *middle, *self.segmenters, "postprocess", "write")

    @property
    def stages(self) -> tuple[str, ...]:
        """The steps that run a network, in order: the keys of `CaseTimings.passes`."""
        return (self.roi, *self.segmenters) if self.roi is not None else self.segmenters


def _step_names(stages: list[StageModel], roi_first: bool) -> StepNames:
    names, seen = [], {"read", "box", "postprocess", "write"}
    for stage in stages:
        name, k = stage.name, 1
        while name in seen:
            k += 1
            name = f"{stage.name}_{k}"
        seen.add(name)
        names.append(name)
    return StepNames(names[0], tuple(names[1:])) if roi_first else StepNames(None, tuple(names))
