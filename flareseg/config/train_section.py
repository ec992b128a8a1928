"""The model, train, semi_supervised and distill sections: one stage's network and how it is trained."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from flareseg.config.loader import ConfigError
from flareseg.config.prepare_section import check_stage_name


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
class AugmentConfig:
    """Training augmentations, applied to image and label together, each with its own seeded generator."""

    organ_hu_shift_p: float = 0.5  # probability, per organ, of an additive HU shift of that organ's voxels
    organ_hu_shift: float = 200.0  # the shift is uniform in [-this, +this] HU
    flip_p: float = 0.0  # probability, per axis in flip_axes, of mirroring
    flip_axes: list[int] = field(default_factory=lambda: [0, 1])  # array axes (z, y); x would swap left and right
    rotate_p: float = 0.0  # probability of a rotation about each axis
    rotate_degrees: float = 10.0  # rotation angle uniform in [-this, +this]
    elastic_p: float = 0.0  # probability of a smooth elastic deformation
    elastic_magnitude: float = 4.0  # voxels of maximum displacement
    elastic_grid: int = 4  # control points per axis of the random displacement field
    noise_p: float = 0.0  # probability of additive Gaussian noise
    noise_std: float = 20.0  # HU
    zoom_p: float = 0.0  # probability of an isotropic zoom about the centre
    zoom_range: tuple[float, float] = (0.9, 1.1)

    def validate(self, prefix: str = "train.augment.") -> None:
        for key in ("organ_hu_shift_p", "flip_p", "rotate_p", "elastic_p", "noise_p", "zoom_p"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"'{prefix}{key}' is a probability in [0, 1], got {getattr(self, key)}")
        if any(axis not in (0, 1, 2) for axis in self.flip_axes):
            raise ConfigError(f"'{prefix}flip_axes' lists array axes 0, 1, 2; got {self.flip_axes}")
        if not 0 < self.zoom_range[0] <= self.zoom_range[1]:
            raise ConfigError(f"'{prefix}zoom_range' must be [low, high] with 0 < low <= high, got {self.zoom_range}")
        if self.elastic_grid < 2:
            raise ConfigError(f"'{prefix}elastic_grid' must be >= 2, got {self.elastic_grid}")
        for key in ("organ_hu_shift", "rotate_degrees", "elastic_magnitude", "noise_std"):
            if getattr(self, key) < 0:
                raise ConfigError(f"'{prefix}{key}' must be >= 0, got {getattr(self, key)}")
        if len(set(self.flip_axes)) != len(self.flip_axes):
            raise ConfigError(f"'{prefix}flip_axes' lists an axis twice: {self.flip_axes}")


@dataclass
class LossConfig:
    """Segmentation loss on per-label sigmoids (no background channel)."""

    # soft Dice (squared denominator) + the term the loss registry names: dice (none), dice_focal, dice_bce,
    # dice_topk, or any loss added with flareseg.losses.register_loss (the registry decides which names are valid)
    name: str = "dice"
    smooth: float = 1e-5  # added to the Dice numerator and denominator
    focal_alpha: float = 0.5  # focal term: weight of positives (negatives get 1 - alpha)
    focal_gamma: float = 2.0
    topk_percent: float = 10.0  # TopK term: BCE averaged over the hardest k% voxels
    second_weight: float = 1.0  # weight of the term added to Dice
    label_weights: list[float] | None = None  # per-label weights (null = equal), e.g. a larger lesion weight
    dynamic_weights: bool = False  # also weight each label by its running (1 - soft Dice), mean 1 (hard labels gain)
    dynamic_momentum: float = 0.9  # smoothing of the running soft Dice per label (per training step)

    def validate(self, prefix: str = "train.loss.") -> None:
        if not 0.0 <= self.focal_alpha <= 1.0:
            raise ConfigError(f"'{prefix}focal_alpha' must be in [0, 1], got {self.focal_alpha}")
        if not 0.0 < self.topk_percent <= 100.0:
            raise ConfigError(f"'{prefix}topk_percent' must be in (0, 100], got {self.topk_percent}")
        if self.label_weights is not None and min(self.label_weights) < 0:
            raise ConfigError(f"'{prefix}label_weights' must be >= 0, got {self.label_weights}")
        if not 0.0 <= self.dynamic_momentum < 1.0:
            raise ConfigError(f"'{prefix}dynamic_momentum' must be in [0, 1), got {self.dynamic_momentum}")


@dataclass
class TrainConfig:
    """Training of one stage on prepared data."""

    MOVED_KEYS: ClassVar[dict[str, str]] = {"fine_margin_jitter_mm": "train.margin_jitter_mm"}

    stage: str = "fine"  # the stage: the name of the prepared grid it learns on (coarse, fine, roi, organs, ...)
    # how: supervised; cps (cross pseudo supervision, settings in semi_supervised); distill (from distill.teacher)
    method: Literal["supervised", "cps", "distill"] = "supervised"
    data: Path | None = None  # prepared folder (holding index.lmdb); null = prepare.out
    out: Path | None = None  # run folder: checkpoints, logs, curves, config.yaml
    fold: int = 0  # split of the index to train on; -1 = every labeled case, no validation
    epochs: int = 200
    iterations_per_epoch: int | None = None  # null = one pass over the training cases
    batch_size: int = 2  # per process
    workers: int = 2  # DataLoader worker processes per training process
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.99)  # Adam / AdamW
    momentum: float = 0.99  # SGD (Nesterov)
    schedule: Literal["step", "cosine", "poly", "constant"] = "step"
    step_milestones: list[float] = field(default_factory=lambda: [0.66, 0.86])  # fractions of the epochs
    step_factors: list[float] = field(default_factory=lambda: [0.1, 0.05])  # lr x factor from each milestone
    poly_power: float = 0.9
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda (one GPU per process) | cuda:N (one process)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    grad_clip: float | None = 12.0  # max gradient norm; null = no clipping
    seed: int = 0
    val_every: int = 1  # epochs between validations
    resume: bool = True  # continue from out/checkpoint_latest.pt when it exists
    keep_every: int | None = None  # also keep checkpoint_epoch_NNNN.pt every this many epochs (for UIF)
    pretrained: Path | None = None  # weights to start from (partial load with a shape check)
    lesion_label: int | None = None  # label id whose cases are oversampled (e.g. 14)
    lesion_oversample: int = 1  # each case with that label appears this many times per epoch
    margin_jitter_mm: float = 20.0  # labels-region stages: crops use the grid's margin_mm +- this, per side
    label_groups: list[list[int]] | None = None  # network class k = union of these label ids; null = one per label
    foreground_patch_p: float = 0.33  # fixed-spacing stages: share of patches centred on a foreground voxel
    time_budget_minutes: float | None = None  # stop after the epoch that reaches this much training time
    tensorboard: bool = False  # also write TensorBoard events (needs the tensorboard package)
    progress: bool = True  # progress bar on rank 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def validate(self, prefix: str = "train.") -> None:
        if self.keep_every is not None and self.keep_every < 1:
            raise ConfigError(f"'{prefix}keep_every' must be >= 1 (or null), got {self.keep_every}")
        for key in ("epochs", "batch_size", "val_every", "lesion_oversample"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'{prefix}{key}' must be >= 1, got {getattr(self, key)}")
        if self.workers < 0 or (self.iterations_per_epoch is not None and self.iterations_per_epoch < 1):
            raise ConfigError(f"'{prefix}workers' must be >= 0 and '{prefix}iterations_per_epoch' >= 1")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"'{prefix}lr' must be > 0 and '{prefix}weight_decay' >= 0")
        if len(self.step_milestones) != len(self.step_factors):
            raise ConfigError(f"'{prefix}step_milestones' and '{prefix}step_factors' must have the same length")
        check_stage_name(self.stage, f"{prefix}stage")
        if self.margin_jitter_mm < 0:
            raise ConfigError(f"'{prefix}margin_jitter_mm' must be >= 0, got {self.margin_jitter_mm}")
        if self.label_groups is not None and (not self.label_groups or not all(self.label_groups)):
            raise ConfigError(
                f"'{prefix}label_groups' must list non-empty groups of label ids, got {self.label_groups}"
            )
        if not 0.0 <= self.foreground_patch_p <= 1.0:
            raise ConfigError(f"'{prefix}foreground_patch_p' is a probability in [0, 1], got {self.foreground_patch_p}")
        self.augment.validate(f"{prefix}augment.")
        self.loss.validate(f"{prefix}loss.")


@dataclass
class SemiSupervisedConfig:
    """Cross pseudo supervision (FLARE22 SemiSeg-CSSN, train.method: cps): two networks teach each other on
    unlabeled cases."""

    MOVED_KEYS: ClassVar[dict[str, str]] = {"enabled": "train.method (cps)"}

    unlabeled_batch_size: int = 2  # unlabeled samples per step and process, beside train.batch_size labeled ones
    # lambda: weight of the pseudo-label loss, and the epochs over which it rises as exp(-5 (1 - t)^2); null: half of
    # train.epochs, 0: constant. The reference's lambda 1 from the first step made both networks collapse in
    # bench/compare_semi.py and bench/compare_cps.py (mean Dice 0.10 and 0.31); 0.3 over half the epochs held up
    # (a run that train.time_budget_minutes ends early may never reach half of its train.epochs cap: with a
    # budget, give rampup_epochs in epochs)
    weight: float = 0.3
    rampup_epochs: int | None = None
    unlabeled_cases: Path | None = None  # JSON list of unlabeled case ids to use (e.g. select-unlabeled's); null = all

    def rampup_length(self, epochs: int) -> float:
        """The epochs over which lambda rises, for a run of `epochs` epochs (0: lambda constant)."""
        return epochs / 2 if self.rampup_epochs is None else float(self.rampup_epochs)

    def validate(self, prefix: str = "semi_supervised.") -> None:
        if self.unlabeled_batch_size < 1 or self.weight < 0 or (self.rampup_epochs or 0) < 0:
            raise ConfigError(
                f"'{prefix}unlabeled_batch_size' must be >= 1, '{prefix}weight' and '{prefix}rampup_epochs' >= 0"
            )


@dataclass
class DistillConfig:
    """Knowledge distillation (train.method: distill): a trained teacher's soft outputs train this (usually
    smaller) student."""

    MOVED_KEYS: ClassVar[dict[str, str]] = {"enabled": "train.method (distill)"}

    teacher: Path | None = None  # teacher checkpoint (same labels; any architecture)
    weight: float = 0.5  # alpha: loss = (1 - alpha) SegLoss(labels) + alpha T^2 BCE(student / T, sigmoid(teacher / T))
    temperature: float = 2.0  # T: softens both sigmoids

    def validate(self, prefix: str = "distill.") -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ConfigError(f"'{prefix}weight' must be in [0, 1], got {self.weight}")
        if self.temperature <= 0:
            raise ConfigError(f"'{prefix}temperature' must be > 0, got {self.temperature}")
