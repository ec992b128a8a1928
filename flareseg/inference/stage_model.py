"""A trained stage network loaded from its checkpoint, run on a volume that is already on the device."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from flareseg.data.intensity import window_and_zscore
from flareseg.data.patches import sliding_window
from flareseg.data.resample import resize_image, size_for_spacing
from flareseg.inference.backends import (
    OpenVinoRunner,
    choose_backend,
    choose_precision,
    classes_from_logits,
    torch_runner,
)
from flareseg.stage import TrainedStage


class StageModel:
    """One stage: its config (from the checkpoint), network, grid, HU window and output label ids.

    The grid is the stage's prepared one: a fixed size (the volume is resized to model.input_size and run in one
    pass) or a fixed spacing (the volume is resampled to that spacing and tiled with model.input_size patches).
    Network class k is written as label id `class_ids[k]`: its train.label_groups group's id (k + 1 without
    groups), so a lesion model trained on group [14] writes 14. A group that merges several labels is a region,
    not a label: a ROI stage finds its box with it (as the group's first id), a segmenting stage does not write it
    (a lesion model trained on [[14], [1, ..., 13]] learns the organs as context and writes only 14).
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        device: torch.device,
        precision: str,
        overlap: float = 0.25,
        backend: str = "torch",
        threads: int | None = None,
    ):
        path = Path(checkpoint)
        trained = TrainedStage.load(path)
        self.path, self.config = path, trained.config
        self.name = trained.name  # the stage it was trained as: its timing column and predict.postprocess key
        self.region = trained.grid.region  # volume (it learned whole volumes) or labels (label boxes)
        self.model = trained.network().to(device)
        self.device, self.overlap = device, overlap
        self.input_size = trained.input_size
        self.spacing = trained.grid.spacing  # None: a fixed size
        # a fixed-size stage runs its grid in one pass and needs only class indices; sliding windows blend logits
        output = "classes" if self.spacing is None else "logits"
        self.backend = choose_backend(backend, device, precision)
        self.precision = choose_precision(precision, device, self.backend)
        if self.backend == "openvino":
            self._forward = OpenVinoRunner(self.model, path, self.input_size, threads, self.precision, output)
        else:
            if trained.channels_last:
                self.model = self.model.to(memory_format=torch.channels_last_3d)
            self._forward = torch_runner(self.model, device, self.precision, trained.channels_last, output)
        self.window = trained.hu_window
        self.groups = trained.class_groups
        self.labels = trained.class_names  # one name per network class
        self.label_names = trained.label_names  # names of the output label ids 1..N
        self.region_ids = torch.tensor([0, *trained.region_ids], dtype=torch.uint8, device=device)
        self.class_ids = torch.tensor([0, *trained.written_ids], dtype=torch.uint8, device=device)

    def grid_size(self, shape: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[int, int, int]:
        """The voxel grid the network sees for a volume of `shape` voxels of `spacing` mm."""
        if self.spacing is None:
            return self.input_size
        return size_for_spacing(tuple(shape), tuple(spacing), tuple(self.spacing))

    @torch.inference_mode()
    def label_map(self, volume: torch.Tensor, spacing: tuple[float, ...], regions: bool = False) -> torch.Tensor:
        """Label ids (uint8, on `grid_size`) of a raw-HU [z, y, x] volume of `spacing` mm on the device.

        A voxel takes the class with the highest logit among those whose sigmoid exceeds 0.5 (logit > 0). With
        `regions`, merged groups count too (written as their first id): for finding the region of interest.
        """
        image = window_and_zscore(resize_image(volume, self.grid_size(volume.shape, spacing)), self.window)[None, None]
        if self.spacing is None:
            classes = self._forward(image)[0]
        else:
            logits = sliding_window(self._forward, image, self.input_size, self.overlap, float(image.min()))
            classes = classes_from_logits(logits)[0]
        return (self.region_ids if regions else self.class_ids)[classes.to(self.device).long()]
