"""The one config schema: every key, its type, its default and what it means.

A YAML file may give any subset of the keys; the rest keep the defaults below. Stages read their own
sections (`prepare` for data preparation); `data` is shared by all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from flareseg.config.loader import ConfigError

FLARE_ORGANS = (
    "liver",
    "right_kidney",
    "spleen",
    "pancreas",
    "aorta",
    "inferior_vena_cava",
    "right_adrenal_gland",
    "left_adrenal_gland",
    "gallbladder",
    "esophagus",
    "stomach",
    "duodenum",
    "left_kidney",
)


@dataclass
class DataConfig:
    """What the label ids mean and how CT intensities are normalised, shared by every stage."""

    labels: list[str] = field(default_factory=lambda: list(FLARE_ORGANS))  # label id = position + 1; 0 = background
    hu_window: tuple[float, float] = (-325.0, 325.0)  # clip to this HU range, then z-score per volume

    def validate(self, prefix: str = "data.") -> None:
        if not self.labels:
            raise ConfigError(f"'{prefix}labels' must name at least one label")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"'{prefix}labels' has duplicate names: {self.labels}")
        if len(self.labels) > 254:
            raise ConfigError(f"'{prefix}labels' has {len(self.labels)} names; at most 254 fit a uint8 label map")
        if not self.hu_window[0] < self.hu_window[1]:
            raise ConfigError(f"'{prefix}hu_window' must be [low, high] with low < high, got {list(self.hu_window)}")


@dataclass
class GridConfig:
    """The grid a stage's arrays are resampled to: a fixed size or a fixed spacing (set exactly one)."""

    size: tuple[int, int, int] | None = (160, 160, 160)  # voxels [z, y, x]
    spacing: tuple[float, float, float] | None = None  # mm [z, y, x]; set size to null to use it

    def validate(self, prefix: str) -> None:
        if (self.size is None) == (self.spacing is None):
            raise ConfigError(
                f"set exactly one of '{prefix}size' and '{prefix}spacing' (the other to null); "
                f"got size={self.size}, spacing={self.spacing}"
            )
        if self.size is not None and min(self.size) < 2:
            raise ConfigError(f"'{prefix}size' must be at least 2 voxels per axis, got {list(self.size)}")
        if self.spacing is not None and min(self.spacing) <= 0:
            raise ConfigError(f"'{prefix}spacing' must be positive millimetres, got {list(self.spacing)}")


@dataclass
class CoarseArraysConfig(GridConfig):
    """Coarse arrays: the whole volume on one grid."""


@dataclass
class FineArraysConfig(GridConfig):
    """Fine arrays: the ground-truth box of all labels plus a margin (the whole image if unlabeled)."""

    size: tuple[int, int, int] | None = (192, 192, 192)  # voxels [z, y, x]
    margin_mm: float = 20.0  # grown on every side of the label box, clipped to the image

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.margin_mm < 0:
            raise ConfigError(f"'{prefix}margin_mm' must be >= 0, got {self.margin_mm}")


@dataclass
class PrepareConfig:
    """Data preparation: raw images and labels -> resampled arrays + one LMDB index."""

    images: Path | None = None  # folder of <case>_0000.nii.gz images (or .nii/.nrrd/.mha, or DICOM sub-folders)
    labels: Path | None = None  # folder of <case>.nii.gz label maps for the images
    unlabeled: Path | None = None  # folder of unlabeled <case>_0000 images (semi-supervised training)
    out: Path | None = None  # output folder: arrays/, index.lmdb, config.yaml, failures.csv
    workers: int = 2  # parallel processes, one case each at a time
    coarse: CoarseArraysConfig = field(default_factory=CoarseArraysConfig)
    fine: FineArraysConfig = field(default_factory=FineArraysConfig)
    label_resampling: Literal["per_label", "nearest"] = "per_label"  # how label maps are resampled
    annotation: Literal["full", "present"] = "full"  # which labels a case annotates: all configured, or those present
    annotated_file: Path | None = None  # JSON {case: [label ids]} overriding `annotation` per case
    folds: int = 5  # k of the k-fold split of labeled cases stored in the index (1 = all cases train)
    split_seed: int = 0  # seed of the case shuffle before the k-fold split
    foreground_samples: int = 100  # voxel locations stored per label, in fine-array coordinates
    overwrite: bool = False  # redo every case even if the index already holds it

    def validate(self, prefix: str = "prepare.") -> None:
        self.coarse.validate(f"{prefix}coarse.")
        self.fine.validate(f"{prefix}fine.")
        if self.workers < 1:
            raise ConfigError(f"'{prefix}workers' must be >= 1, got {self.workers}")
        if self.folds < 1:
            raise ConfigError(f"'{prefix}folds' must be >= 1, got {self.folds}")
        if self.foreground_samples < 0:
            raise ConfigError(f"'{prefix}foreground_samples' must be >= 0, got {self.foreground_samples}")
        if self.labels is not None and self.images is None:
            raise ConfigError(f"'{prefix}labels' is set but '{prefix}images' is not")


@dataclass
class ModelConfig:
    """The network, chosen by name, with its widths and layer types (see flareseg.models)."""

    name: str = "efficient_segnet"  # base_unet (coarse) | efficient_segnet (fine) | small_unet (FLARE24)
    in_channels: int = 1  # image channels (CT: 1)
    num_classes: int | None = None  # outputs, one sigmoid per label, no background; null = number of data.labels
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])  # width of each stage
    blocks_per_stage: int = 2  # residual blocks (conv units for small_unet) per encoder stage
    context_channels: int = 64  # width inside the EfficientSegNet context block
    input_size: tuple[int, int, int] = (192, 192, 192)  # network input [z, y, x]: summary, export, training crops
    norm: Literal["instance", "batch", "group"] = "instance"
    norm_affine: bool = False  # learnable scale and shift in the norm layers
    dropout: float = 0.2  # Dropout3d after each norm (0 = none)
    activation: Literal["relu", "leaky_relu", "gelu", "silu"] = "relu"
    channels_last: bool = False  # channels_last_3d memory format (faster for wide shallow layers on CPU)

    def validate(self, prefix: str = "model.") -> None:
        if not self.channels or min(self.channels) < 1:
            raise ConfigError(f"'{prefix}channels' must list positive widths, got {self.channels}")
        if len(self.channels) < 2:
            raise ConfigError(f"'{prefix}channels' needs at least 2 stages, got {self.channels}")
        for key in ("in_channels", "blocks_per_stage", "context_channels"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'{prefix}{key}' must be >= 1, got {getattr(self, key)}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"'{prefix}num_classes' must be >= 1 (or null), got {self.num_classes}")
        if min(self.input_size) < 1:
            raise ConfigError(f"'{prefix}input_size' must be positive, got {list(self.input_size)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"'{prefix}dropout' must be in [0, 1), got {self.dropout}")


@dataclass
class Config:
    """The whole flareseg configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    def validate(self) -> Config:
        self.data.validate()
        self.prepare.validate()
        self.model.validate()
        return self

    @property
    def num_classes(self) -> int:
        """Network outputs: model.num_classes, or one per data label."""
        return self.model.num_classes if self.model.num_classes is not None else len(self.data.labels)
