"""The one config schema: `Config` and its sections, with every key, its type, its default and what it means.

`data` (here) is shared by every step; the other sections live beside it: `prepare` (prepare_section.py: the
named stage grids), `model`, `train`, `semi_supervised`, `distill` (train_section.py) and `predict`
(predict_section.py). A YAML file may give any subset of the keys; the rest keep the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flareseg.config.loader import ConfigError
from flareseg.config.predict_section import PostprocessConfig, PredictConfig
from flareseg.config.prepare_section import GridConfig, PrepareConfig, check_stage_name
from flareseg.config.train_section import (
    AugmentConfig,
    DistillConfig,
    LossConfig,
    ModelConfig,
    SemiSupervisedConfig,
    TrainConfig,
)

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
class Config:
    """The whole flareseg configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    semi_supervised: SemiSupervisedConfig = field(default_factory=SemiSupervisedConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)

    def validate(self) -> Config:
        self.data.validate()
        self.prepare.validate()
        self.model.validate()
        self.train.validate()
        self.semi_supervised.validate()
        self.distill.validate()
        if self.train.method == "distill" and self.distill.teacher is None:
            raise ConfigError("'train.method' is distill but 'distill.teacher' names no checkpoint")
        self.predict.validate()
        for source, target in (self.prepare.label_map or {}).items():
            if target > len(self.data.labels):
                raise ConfigError(
                    f"'prepare.label_map' maps {source} -> {target}, but data.labels has {len(self.data.labels)} names"
                )
        groups = self.train.label_groups
        if groups is not None:
            bad = [i for group in groups for i in group if not 1 <= i <= len(self.data.labels)]
            if bad:
                raise ConfigError(f"'train.label_groups' names label ids {bad} outside 1..{len(self.data.labels)}")
            if self.model.num_classes is not None and self.model.num_classes != len(groups):
                raise ConfigError(
                    f"'model.num_classes' is {self.model.num_classes} but 'train.label_groups' has {len(groups)} groups"
                )
        weights = self.train.loss.label_weights
        if weights is not None and len(weights) != self.num_classes:
            raise ConfigError(f"'train.loss.label_weights' needs {self.num_classes} values, got {len(weights)}")
        return self

    @property
    def num_classes(self) -> int:
        """Network outputs: model.num_classes, else one per train.label_groups group, else one per data label."""
        if self.model.num_classes is not None:
            return self.model.num_classes
        groups = self.train.label_groups
        return len(groups) if groups is not None else len(self.data.labels)

    def grid(self, stage: str) -> GridConfig:
        """The prepared grid of `stage` (a ConfigError listing the grids when there is none)."""
        if stage not in self.prepare.grids:
            raise ConfigError(f"no prepared grid is named {stage!r} (prepare.grids: {', '.join(self.prepare.grids)})")
        return self.prepare.grids[stage]

    def uses_patches(self, stage: str) -> bool:
        """Whether `stage` keeps a fixed spacing and runs on model.input_size patches (training samples one,
        inference tiles the volume) instead of resizing its arrays to model.input_size."""
        return self.grid(stage).fixed_spacing

    @property
    def class_label_groups(self) -> list[list[int]]:
        """The label ids each network class stands for: train.label_groups, or class k = label k + 1."""
        if self.train.label_groups is not None:
            return [list(group) for group in self.train.label_groups]
        return [[k + 1] for k in range(self.num_classes)]

    @property
    def class_names(self) -> list[str]:
        """A name per network class: the label's name, or the member names joined by '+' for a group."""
        names = []
        for group in self.class_label_groups:
            members = [self.data.labels[i - 1] if 1 <= i <= len(self.data.labels) else f"label_{i}" for i in group]
            names.append("+".join(members) if len(members) <= 3 else f"{members[0]}+{len(members) - 1}_more")
        return names


__all__ = [
    "FLARE_ORGANS",
    "AugmentConfig",
    "Config",
    "DataConfig",
    "DistillConfig",
    "GridConfig",
    "LossConfig",
    "ModelConfig",
    "PostprocessConfig",
    "PredictConfig",
    "PrepareConfig",
    "SemiSupervisedConfig",
    "TrainConfig",
    "check_stage_name",
]
