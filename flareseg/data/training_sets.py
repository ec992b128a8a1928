"""Training and validation samples over prepared arrays.

Every item is a dict: "image" float32 (1, D, H, W), HU-windowed and z-scored; "label" uint8 (D, H, W) network
class ids (label ids, or the train.label_groups they fall in; 0 = background);
"annotated" bool (C,) (partial labels: which labels this case annotates); "case_id".

Training items are random but reproducible: item k of epoch e draws all its randomness from a generator seeded
by (seed, e, k), so what a sample looks like does not depend on workers, processes or interruptions.
Arrays are memory-mapped from the prepared .npy files; raw images are never read again.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from flareseg.config import Config
from flareseg.data.augment import Augmenter
from flareseg.data.crop import Box
from flareseg.data.intensity import window_and_zscore
from flareseg.data.patches import patch_box, take_patch
from flareseg.data.prepared import PreparedData
from flareseg.data.resample import resize_image, resize_label

Stage = str  # the name of a prepared grid (train.stage)


class _PreparedSamples(Dataset):
    def __init__(self, data: PreparedData, case_ids: list[str], config: Config):
        self.data = data
        self.case_ids = list(case_ids)
        self.num_labels = config.num_classes
        self.window = config.data.hu_window
        self.size = tuple(config.model.input_size)
        self.label_mode = config.prepare.label_resampling
        self.groups = config.class_label_groups
        self.class_of_label = _class_lookup(self.groups)
        missing = data.missing(self.case_ids)
        if missing:
            raise KeyError(f"cases not in the index {data.index.path}: {', '.join(missing[:10])}")

    def _array(self, record: dict, name: str) -> np.ndarray:
        return self.data.load_array(record, name)

    def _item(self, record: dict, image: torch.Tensor, label: torch.Tensor, stats=None) -> dict:
        """The item dict; labels become network classes (train.label_groups), annotated per class.

        The image is windowed and z-scored with its own statistics, or with `stats` (mean, std of the windowed
        volume a patch came from, so that patches are normalised as inference normalises the whole volume)."""
        annotated_ids = set(record["annotated"])
        annotated = torch.tensor([all(i in annotated_ids for i in group) for group in self.groups], dtype=torch.bool)
        if stats is None:
            image = window_and_zscore(image, self.window)
        else:
            image = (image.clamp(*self.window) - stats[0]) / stats[1]
        return {
            "case_id": record["case_id"],
            "image": image[None],
            "label": self.class_of_label[label.long()],
            "annotated": annotated,
        }


class TrainingSamples(_PreparedSamples):
    """Random training samples of one stage, `length` per epoch (cases cycled, lesion cases repeated).

    A volume-region grid: its whole-volume arrays (resized to model.input_size if they differ), augmented.
    A labels-region grid: the label box plus a margin of the grid's margin_mm +- train.margin_jitter_mm (uniform
    and independent on each of the six faces, symmetric, never below 0), cut from the grid's training source,
    resized to model.input_size, augmented.
    Fixed-spacing grids (prepare.grids.<stage>.spacing) are not resized: a model.input_size patch is drawn from the
    volume or crop instead (see flareseg.data.patches), normalised with the statistics of the whole of it.
    """

    def __init__(
        self, data: PreparedData, case_ids: list[str], config: Config, stage: Stage, length: int | None = None
    ):
        super().__init__(data, case_ids, config)
        train = config.train
        self.stage = stage
        self.seed = train.seed
        self.epoch = 0
        grid = config.grid(stage)
        self.crops_labels = grid.region == "labels"
        self.margin_mm = grid.margin_mm
        self.jitter_mm = train.margin_jitter_mm
        self.augment = Augmenter(train.augment)
        self.patches = config.uses_patches(stage)
        self.foreground_p = train.foreground_patch_p
        plan = []
        for case_id in self.case_ids:
            record = self.data.record(case_id)
            repeats = train.lesion_oversample if train.lesion_label in record["labels_present"] else 1
            plan += [case_id] * repeats
        if not plan:
            raise ValueError("no labeled cases to train on")
        length = length or len(plan)
        self.plan = [plan[k % len(plan)] for k in range(length)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int) -> dict:
        generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch, k))
        record = self.data.record(self.plan[k])
        image, label, spacing = self._label_crop(record, generator) if self.crops_labels else self._volume(record)
        stats = None
        if self.patches:  # fixed spacing: normalise like the whole volume, then one input_size patch of it
            std, mean = torch.std_mean(image.clamp(*self.window), unbiased=False)
            stats = (float(mean), max(float(std), 1e-6))
            lo, hi = patch_box(
                tuple(image.shape), self.size, self.class_of_label[label.long()], self.foreground_p, generator
            )
            image, label = take_patch(image, lo, hi, self.window[0]), take_patch(label, lo, hi, 0)
        if self.augment.enabled:
            image, label = self.augment(image, label, generator, spacing=spacing)
        return self._item(record, image, label, stats)

    def _volume(self, record: dict) -> tuple[torch.Tensor, torch.Tensor, tuple[float, ...]]:
        image = torch.from_numpy(np.array(self._array(record, f"{self.stage}_image"), dtype=np.float32))
        label = torch.from_numpy(np.array(self._array(record, f"{self.stage}_label")))
        spacing = tuple(record["grids"][self.stage]["geometry"]["spacing"])
        if not self.patches and tuple(image.shape) != self.size:
            spacing = _spacing_after_resize(spacing, image.shape, self.size)
            image, label = resize_image(image, self.size), resize_label(label, self.size, self.label_mode)
        return image, label, spacing

    def _label_crop(self, record: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        source = record["grids"][self.stage]["source"]
        if source is None or source["foreground_box"] is None:
            raise ValueError(f"case {record['case_id']} has no {self.stage} training source (no labels?)")
        image = self._array(record, f"{self.stage}_source_image")
        label = self._array(record, f"{self.stage}_source_label")
        box = _jittered_box(
            Box.from_list(source["foreground_box"]),
            source["geometry"]["spacing"],
            image.shape,
            self.margin_mm,
            self.jitter_mm,
            generator,
        )
        crop_image = torch.from_numpy(np.array(image[box.slices], dtype=np.float32))
        crop_label = torch.from_numpy(np.array(label[box.slices]))
        if self.patches:
            return crop_image, crop_label, tuple(source["geometry"]["spacing"])
        spacing = _spacing_after_resize(source["geometry"]["spacing"], box.shape, self.size)
        return resize_image(crop_image, self.size), resize_label(crop_label, self.size, self.label_mode), spacing


class UnlabeledSamples(_PreparedSamples):
    """Random samples of unlabeled cases for semi-supervised training: the stored `stage` image (the whole volume;
    resized to model.input_size if it differs), augmented like the labeled ones (with an empty label map), `length`
    per epoch. Items carry an all-zero "label" and an all-False "annotated"."""

    def __init__(self, data: PreparedData, case_ids: list[str], config: Config, stage: Stage, length: int):
        super().__init__(data, case_ids, config)
        if not self.case_ids:
            raise ValueError("semi-supervised training needs unlabeled cases in the index (flareseg prepare -u DIR)")
        self.stage, self.seed, self.epoch = stage, config.train.seed, 0
        self.augment = Augmenter(config.train.augment)
        self.patches = config.uses_patches(stage)
        self.plan = [self.case_ids[k % len(self.case_ids)] for k in range(length)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int) -> dict:
        generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch, k, 1))
        record = self.data.record(self.plan[k])
        image = torch.from_numpy(np.array(self._array(record, f"{self.stage}_image"), dtype=np.float32))
        stats = None
        if self.patches:
            std, mean = torch.std_mean(image.clamp(*self.window), unbiased=False)
            stats = (float(mean), max(float(std), 1e-6))
            lo, hi = patch_box(tuple(image.shape), self.size, torch.zeros(1), 0.0, generator)
            image = take_patch(image, lo, hi, self.window[0])
        elif tuple(image.shape) != self.size:
            image = resize_image(image, self.size)
        label = torch.zeros(image.shape, dtype=torch.uint8)
        if self.augment.enabled:
            image, label = self.augment(image, label, generator)
        item = self._item(record, image, label, stats)
        item["annotated"][:] = False
        return item


class ValidationSamples(_PreparedSamples):
    """The fixed validation data of a stage: its stored arrays, not augmented, any shape."""

    def __init__(self, data: PreparedData, case_ids: list[str], config: Config, stage: Stage):
        super().__init__(data, case_ids, config)
        self.stage = stage

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, k: int) -> dict:
        record = self.data.record(self.case_ids[k])
        image = torch.from_numpy(np.array(self._array(record, f"{self.stage}_image"), dtype=np.float32))
        label = torch.from_numpy(np.array(self._array(record, f"{self.stage}_label")))
        return self._item(record, image, label)


def _jittered_box(foreground: Box, spacing, shape, margin_mm: float, jitter_mm: float, generator) -> Box:
    """The foreground box grown by margin +- jitter mm on each face (independent, uniform), inside the array."""
    offsets = (torch.rand(2, 3, generator=generator, dtype=torch.float64) * 2 - 1) * jitter_mm + margin_mm
    offsets = offsets.clamp_min(0.0)
    lo = [max(0, f - math.ceil(float(offsets[0, a]) / spacing[a])) for a, f in enumerate(foreground.lo)]
    hi = [
        min(n, f + math.ceil(float(offsets[1, a]) / spacing[a])) for a, (f, n) in enumerate(zip(foreground.hi, shape))
    ]
    return Box(tuple(lo), tuple(hi))


def _spacing_after_resize(spacing, shape, size) -> tuple[float, ...]:
    """Voxel size (mm) after a corner-aligned resize of `shape` voxels of `spacing` to `size` voxels."""
    return tuple(s * (n - 1) / (m - 1) if m > 1 else s for s, n, m in zip(spacing, shape, size))


def _class_lookup(groups: list[list[int]]) -> torch.Tensor:
    """A table label id (0..255) -> network class (1..C, 0 = background); a label in two groups keeps the first."""
    table = torch.zeros(256, dtype=torch.uint8)
    for k in reversed(range(len(groups))):
        table[groups[k]] = k + 1
    return table


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (SeedSequence mixing: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, dtype=np.uint64)[0]) & (2**63 - 1)
