"""A trained stage network loaded from its checkpoint, run on a volume that is already on the device.

A stage may be a fold ensemble (several checkpoints of the same stage, e.g. its k-fold models) and may use mirror
test-time augmentation (predict.tta: mirror: every combination of flips of the axes the stage's networks were
trained with flips of, as nnU-Net mirrors; 8 passes for all three axes). Then every (member, flip) pair
is one complete prediction of the stage's grid (one pass for a fixed size; every sliding window for a fixed
spacing, blended as for one model), flipped back, and its sigmoid probabilities are added to one running sum: the
memory is that of one prediction plus the sum, whatever the number of members and flips. The decision is the one
model's rule on the mean probabilities: the class with the highest mean probability among those above 0.5.

Mirror TTA only shows a network mirrored images it learned: the axes are those of train.augment.flip_axes common
to every member, when train.augment.flip_p > 0. Fed flips it never saw (all 8, to networks trained without flips,
flareseg's default), networks went from a mean DSC of 0.71 to 0.00 on the phantom bench
(bench/compare_accuracy_options.py); a stage whose members trained without flips is refused mirror TTA.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from flareseg.data.intensity import window_and_zscore
from flareseg.data.patches import sliding_window
from flareseg.data.resample import resize_image, size_for_spacing
from flareseg.inference.backends import (
    OpenVinoRunner,
    Runner,
    choose_backend,
    choose_precision,
    classes_from_logits,
    torch_runner,
)
from flareseg.stage import TrainedStage

log = logging.getLogger(__name__)
TTA_MODES = ("none", "mirror")


class StageModel:
    """One stage: its config (from the checkpoint), network(s), grid, HU window and output label ids.

    The grid is the stage's prepared one: a fixed size (the volume is resized to model.input_size and run in one
    pass) or a fixed spacing (the volume is resampled to that spacing and tiled with model.input_size patches).
    Network class k is written as label id `class_ids[k]`: its train.label_groups group's id (k + 1 without
    groups), so a lesion model trained on group [14] writes 14. A group that merges several labels is a region,
    not a label: a ROI stage finds its box with it (as the group's first id), a segmenting stage does not write it
    (a lesion model trained on [[14], [1, ..., 13]] learns the organs as context and writes only 14).

    `checkpoint` is one checkpoint or a list of them: a fold ensemble of one stage, whose members must agree on the
    stage name, grid, input size, classes and their label ids, label names and HU window (their architectures may
    differ). `tta`: "none" or "mirror". `passes` is the number of network passes of the last `label_map` call.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike | Sequence[str | os.PathLike],
        device: torch.device,
        precision: str,
        overlap: float = 0.25,
        backend: str = "torch",
        threads: int | None = None,
        tta: str = "none",
    ):
        if tta not in TTA_MODES:
            raise ValueError(f"predict.tta must be one of {TTA_MODES}, got {tta!r}")
        paths = [Path(checkpoint)] if isinstance(checkpoint, (str, os.PathLike)) else [Path(p) for p in checkpoint]
        if not paths:
            raise ValueError("a stage needs at least one checkpoint")
        members = [TrainedStage.load(path) for path in paths]
        check_members(members)
        trained = members[0]
        self.paths, self.path, self.config = paths, paths[0], trained.config
        self.name = trained.name  # the stage it was trained as: its timing column and predict.postprocess key
        self.region = trained.grid.region  # volume (it learned whole volumes) or labels (label boxes)
        self.device, self.overlap = device, overlap
        self.input_size = trained.input_size
        self.spacing = trained.grid.spacing  # None: a fixed size
        self.flips = mirror_flips(members) if tta == "mirror" else ((),)
        self.passes_per_window = len(members) * len(self.flips)  # network passes per input (window or grid)
        # one network without TTA on a fixed size runs its grid in one pass and needs only class indices (the
        # decision inside the compiled graph); sliding windows, ensembles and TTA average, so they need logits
        self.fast = self.spacing is None and self.passes_per_window == 1
        output = "classes" if self.fast else "logits"
        self.backend = choose_backend(backend, device, precision)
        networks = [member.network().to(device) for member in members]
        int8_checked = False
        if precision == "auto" and self.backend == "openvino":
            from flareseg.inference.quantize import check_passed

            int8_checked = all(check_passed(net, path, self.input_size, output) for net, path in zip(networks, paths))
        self.precision = choose_precision(precision, device, self.backend, int8_checked)
        self.models, self._forwards = [], []
        for path, member, model in zip(paths, members, networks):
            if self.backend == "openvino":
                forward = OpenVinoRunner(model, path, self.input_size, threads, self.precision, output)
            else:
                if member.channels_last:
                    model = model.to(memory_format=torch.channels_last_3d)
                forward = torch_runner(model, device, self.precision, member.channels_last, output)
            self.models.append(model)
            self._forwards.append(forward)
        self.model, self._forward = self.models[0], self._forwards[0]
        self.passes = 0
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

        A voxel takes the class with the highest (mean) probability among those whose (mean) sigmoid exceeds 0.5;
        for one network without TTA, the highest logit among those > 0. With `regions`, merged groups count too
        (written as their first id): for finding the region of interest.
        """
        image = window_and_zscore(resize_image(volume, self.grid_size(volume.shape, spacing)), self.window)[None, None]
        self.passes = 0
        if self.fast:
            classes = self._counted(self._forward)(image)[0]
        elif self.passes_per_window == 1:
            classes = classes_from_logits(self._logits(self._forward, image))[0]
        else:
            classes = self._averaged_classes(image)[0]
        return (self.region_ids if regions else self.class_ids)[classes.to(self.device).long()]

    def _counted(self, forward: Runner) -> Runner:
        def run(image: torch.Tensor) -> torch.Tensor:
            self.passes += 1
            return forward(image)

        return run

    def _logits(self, forward: Runner, image: torch.Tensor) -> torch.Tensor:
        """float32 [1, C, z, y, x] logits of one network over the whole grid (one pass, or blended windows)."""
        if self.spacing is None:
            return self._counted(forward)(image).float()
        return sliding_window(self._counted(forward), image, self.input_size, self.overlap, float(image.min()))

    def _averaged_classes(self, image: torch.Tensor) -> torch.Tensor:
        """[1, z, y, x] classes from the probabilities averaged over members x flips, summed as they come.

        The sum is of 1 - sigmoid(logit) = sigmoid(-logit): the same decision (the highest mean probability
        above 0.5 is the lowest mean complement below 0.5), but float32 keeps confident probabilities apart
        (sigmoid(20) and sigmoid(25) both round to 1.0; sigmoid(-20) and sigmoid(-25) do not).
        """
        total = None
        for forward in self._forwards:
            for axes in self.flips:
                logits = self._logits(forward, image.flip(axes) if axes else image)
                if axes:
                    logits = logits.flip(axes)  # the unflipped map is freed here
                complement = logits.neg_().sigmoid_()  # in place: one map per pass, beside the sum
                del logits
                total = complement if total is None else total.add_(complement)
                del complement
        best, index = total.div_(self.passes_per_window).min(dim=1)
        return ((index + 1) * (best < 0.5)).to(torch.uint8)


def check_members(members: list[TrainedStage]) -> None:
    """The checkpoints of one stage's ensemble must describe the same stage: a ValueError naming the two files and
    what differs otherwise."""
    first = members[0]
    for other in members[1:]:
        for what, value in (
            ("stage name (train.stage)", lambda s: s.name),
            ("grid (prepare.grids)", _grid),
            ("input size (model.input_size)", lambda s: s.input_size),
            ("classes (train.label_groups)", lambda s: s.class_groups),
            ("label names (data.labels)", lambda s: s.label_names),
            ("HU window (data.hu_window)", lambda s: s.hu_window),
        ):
            if value(other) != value(first):
                raise ValueError(
                    f"{other.path} and {first.path} are listed as one stage's ensemble but differ in their {what}: "
                    f"{value(other)} vs {value(first)}; an ensemble's members must be models of the same stage"
                )


def mirror_flips(members: list[TrainedStage]) -> tuple[tuple[int, ...], ...]:
    """The tensor dims ([1, C, z, y, x]) flipped by each pass of mirror TTA: every combination of the array axes
    that all members were trained with flips of (nnU-Net mirrors its training's mirror axes); the first is none.
    ValueError when a member trained without flips: it would be shown anatomy it never learned."""
    axes = {0, 1, 2}
    for member in members:
        augment = member.config.train.augment
        if augment.flip_p == 0 or not augment.flip_axes:
            raise ValueError(
                f"predict.tta mirror: {member.path} was trained without flips (train.augment.flip_p "
                f"{augment.flip_p:g}): mirrored inputs show it anatomy it never learned (on phantoms, DSC 0.71 -> "
                "0.00); set predict.tta: none, or train with train.augment.flip_p > 0"
            )
        axes &= set(augment.flip_axes)
    dims = [axis + 2 for axis in sorted(axes)]
    return tuple(combo for count in range(len(dims) + 1) for combo in itertools.combinations(dims, count))


def _grid(stage: TrainedStage) -> str:
    """A stage's grid as the error names it: its region and its fixed spacing or size."""
    grid = stage.grid
    shape = f"spacing {list(grid.spacing)} mm" if grid.fixed_spacing else f"size {list(grid.size)}"
    return f"{grid.region}, {shape}"
