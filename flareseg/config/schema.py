"""The one config schema: every key, its type, its default and what it means.

A YAML file may give any subset of the keys; the rest keep the defaults below. Stages read their own
sections (`prepare` for data preparation); `data` is shared by all of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

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


STAGE_NAME = re.compile(r"[a-z][a-z0-9_]*")  # a stage's name: file names, CSV columns and YAML keys carry it


@dataclass
class GridConfig:
    """One named stage grid of a prepared folder: which region of each case it holds, and the grid that region is
    resampled to (a fixed size or a fixed spacing: set exactly one)."""

    # volume: the whole image (a coarse or ROI stage); labels: the box of all labels plus margin_mm, the whole
    # image for an unlabeled case (a fine, organ or lesion stage, which inference runs inside the ROI's box)
    region: Literal["volume", "labels"] | None = None  # required
    size: tuple[int, int, int] | None = None  # voxels [z, y, x]
    spacing: tuple[float, float, float] | None = None  # mm [z, y, x]
    margin_mm: float = 20.0  # labels region: grown on every side of the label box, clipped to the image

    def validate(self, prefix: str) -> None:
        if self.region is None:
            raise ConfigError(f"'{prefix}region' must be set: volume (the whole image) or labels (the label box)")
        if (self.size is None) == (self.spacing is None):
            raise ConfigError(
                f"set exactly one of '{prefix}size' and '{prefix}spacing' (the other to null); "
                f"got size={self.size}, spacing={self.spacing}"
            )
        if self.size is not None and min(self.size) < 2:
            raise ConfigError(f"'{prefix}size' must be at least 2 voxels per axis, got {list(self.size)}")
        if self.spacing is not None and min(self.spacing) <= 0:
            raise ConfigError(f"'{prefix}spacing' must be positive millimetres, got {list(self.spacing)}")
        if self.margin_mm < 0:
            raise ConfigError(f"'{prefix}margin_mm' must be >= 0, got {self.margin_mm}")

    @property
    def fixed_spacing(self) -> bool:
        """Whether volumes are resampled to a spacing and tiled into model.input_size patches (else resized to
        `size` and run in one pass)."""
        return self.spacing is not None


def _default_grids() -> dict[str, GridConfig]:
    """The two stages of the FLARE21 design: coarse (whole volume) and fine (label box + margin)."""
    return {
        "coarse": GridConfig(region="volume", size=(160, 160, 160)),
        "fine": GridConfig(region="labels", size=(192, 192, 192), margin_mm=20.0),
    }


def check_stage_name(name: object, key: str) -> None:
    if not isinstance(name, str) or not STAGE_NAME.fullmatch(name):
        raise ConfigError(f"'{key}' names a stage {name!r}: use lower-case letters, digits and _ (e.g. organs)")


@dataclass
class PrepareConfig:
    """Data preparation: raw images and labels -> resampled arrays + one LMDB index."""

    MOVED_KEYS: ClassVar[dict[str, str]] = {  # keys of earlier versions, named in the unknown-key error
        "coarse": "prepare.grids.coarse (with region: volume)",
        "fine": "prepare.grids.fine (with region: labels)",
    }

    images: Path | None = None  # folder of <case>_0000.nii.gz images (or .nii/.nrrd/.mha, or DICOM sub-folders)
    labels: Path | None = None  # folder of <case>.nii.gz label maps for the images
    unlabeled: Path | None = None  # folder of unlabeled <case>_0000 images (semi-supervised training)
    out: Path | None = None  # output folder: arrays/, index.lmdb, config.yaml, failures.csv
    workers: int = 2  # parallel processes, one case each at a time
    # the stage grids, by stage name (a YAML mapping replaces the default coarse + fine; --set
    # prepare.grids.coarse.size=[...] changes one); train.stage names the grid a network learns on
    grids: dict[str, GridConfig] = field(default_factory=_default_grids)
    label_resampling: Literal["per_label", "nearest"] = "per_label"  # how label maps are resampled
    annotation: Literal["full", "present"] = "full"  # which labels a case annotates: all configured, or those present
    annotated_file: Path | None = None  # JSON {case: [label ids]} overriding `annotation` per case
    folds: int = 5  # k of the k-fold split of labeled cases stored in the index (1 = all cases train)
    split_seed: int = 0  # seed of the case shuffle before the k-fold split
    foreground_samples: int = 100  # voxel locations stored per label, in fine-array coordinates
    label_map: dict[int, int] | None = None  # source label id -> data.labels id (unlisted ids -> 0); null = as is
    source_margin_mm: float = 40.0  # labels grids: extra margin of the training source crop (room for jitter)
    overwrite: bool = False  # redo every case even if the index already holds it

    def validate(self, prefix: str = "prepare.") -> None:
        if not self.grids:
            raise ConfigError(f"'{prefix}grids' must name at least one stage grid")
        for name, grid in self.grids.items():
            check_stage_name(name, f"{prefix}grids.{name}")
            grid.validate(f"{prefix}grids.{name}.")
        if self.workers < 1:
            raise ConfigError(f"'{prefix}workers' must be >= 1, got {self.workers}")
        if self.folds < 1:
            raise ConfigError(f"'{prefix}folds' must be >= 1, got {self.folds}")
        if self.foreground_samples < 0:
            raise ConfigError(f"'{prefix}foreground_samples' must be >= 0, got {self.foreground_samples}")
        if self.labels is not None and self.images is None:
            raise ConfigError(f"'{prefix}labels' is set but '{prefix}images' is not")
        if self.source_margin_mm < 0:
            raise ConfigError(f"'{prefix}source_margin_mm' must be >= 0, got {self.source_margin_mm}")
        for source, target in (self.label_map or {}).items():
            if not 0 <= source <= 255 or target < 0:
                raise ConfigError(f"'{prefix}label_map' maps {source} -> {target}; ids must be 0..255 and >= 0")


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
    weight: float = 1.0  # lambda: weight of the pseudo-label loss (reference 1.0)
    rampup_epochs: int = 0  # lambda rises as exp(-5 (1 - t)^2) over these epochs (0 = constant, the reference)
    unlabeled_cases: Path | None = None  # JSON list of unlabeled case ids to use (e.g. select-unlabeled's); null = all

    def validate(self, prefix: str = "semi_supervised.") -> None:
        if self.unlabeled_batch_size < 1 or self.weight < 0 or self.rampup_epochs < 0:
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


@dataclass
class PostprocessConfig:
    """Component filtering of one stage's labels, at that stage's resolution; an unset key takes predict's
    shorthand (coarse_min_volume_mm3 for the ROI stage, fine_min_volume_mm3 for the others, keep_components...)."""

    min_volume_mm3: float | None = None  # components smaller than this are dropped (the largest of a label stays)
    keep_components: int | None = None  # connected components kept per label (largest first)
    keep_components_per_label: dict[int, int] | None = None  # by label id, over predict's; 0 = keep all (lesions)

    def validate(self, prefix: str) -> None:
        if self.min_volume_mm3 is not None and self.min_volume_mm3 < 0:
            raise ConfigError(f"'{prefix}min_volume_mm3' must be >= 0, got {self.min_volume_mm3}")
        if self.keep_components is not None and self.keep_components < 1:
            raise ConfigError(f"'{prefix}keep_components' must be >= 1, got {self.keep_components}")
        if any(k < 0 for k in (self.keep_components_per_label or {}).values()):
            raise ConfigError(f"'{prefix}keep_components_per_label' values must be >= 0 (0 = keep all)")


@dataclass
class PredictConfig:
    """Inference: coarse model -> organ box -> fine model -> post-processing, on the GPU or the CPU."""

    coarse: Path | None = None  # coarse checkpoint (its config comes from the checkpoint)
    fine: Path | None = None  # fine checkpoint
    stages: list[Path] | None = None  # any chain instead: first = ROI (whole volume), the rest segment inside it
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    # auto: fp16 on CUDA; on the CPU bf16 under OpenVINO where the CPU has native bf16, else fp32
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    threads: int | None = None  # CPU threads for torch and OpenVINO (null = all cores)
    backend: Literal["auto", "torch", "openvino"] = "auto"  # auto: openvino on the CPU when installed, else torch
    margin_mm: float = 20.0  # grown on every side of the coarse organ box before the fine model
    # component filtering, the shorthand for every stage: min_volume_mm3 is coarse_min_volume_mm3 for the ROI
    # stage (the first of a chain of several) and fine_min_volume_mm3 for the stages that segment
    coarse_min_volume_mm3: float = 1000.0  # ROI-stage components smaller than this are dropped (the largest stays)
    fine_min_volume_mm3: float = 2000.0  # segmenting-stage components smaller than this are dropped (largest stays)
    keep_components: int = 1  # connected components kept per label (largest first)
    keep_components_per_label: dict[int, int] | None = None  # by label id, e.g. {2: 2}; 0 = keep all (lesions)
    # per stage, by its name (its checkpoint's train.stage), e.g. {lesion: {min_volume_mm3: 0}}: overrides the above
    postprocess: dict[str, PostprocessConfig] = field(default_factory=dict)
    window_overlap: float = 0.25  # fixed-spacing stages: overlap of the sliding-window patches (fraction per axis)
    png: bool = False  # also write <case>.png: axial and coronal slices with the predicted contours

    def validate(self, prefix: str = "predict.") -> None:
        if self.keep_components < 1 or any(k < 0 for k in (self.keep_components_per_label or {}).values()):
            raise ConfigError(f"'{prefix}keep_components' must be >= 1 (per-label overrides >= 0, 0 = keep all)")
        if not 0.0 <= self.window_overlap < 1.0:
            raise ConfigError(f"'{prefix}window_overlap' must be in [0, 1), got {self.window_overlap}")
        if self.stages is not None and not self.stages:
            raise ConfigError(f"'{prefix}stages' must list at least one checkpoint (or be null)")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"'{prefix}threads' must be >= 1 (or null), got {self.threads}")
        for key in ("margin_mm", "coarse_min_volume_mm3", "fine_min_volume_mm3"):
            if getattr(self, key) < 0:
                raise ConfigError(f"'{prefix}{key}' must be >= 0, got {getattr(self, key)}")
        for name, rule in self.postprocess.items():
            check_stage_name(name, f"{prefix}postprocess.{name}")
            rule.validate(f"{prefix}postprocess.{name}.")

    def postprocess_for(self, stage: str, finds_region: bool) -> PostprocessConfig:
        """The component rule of `stage` with every key decided: its own settings over the shorthand.
        `finds_region`: the stage is the ROI stage of a chain (coarse_min_volume_mm3), not a segmenting one."""
        own = self.postprocess.get(stage, PostprocessConfig())
        shorthand = self.coarse_min_volume_mm3 if finds_region else self.fine_min_volume_mm3
        return PostprocessConfig(
            min_volume_mm3=shorthand if own.min_volume_mm3 is None else own.min_volume_mm3,
            keep_components=self.keep_components if own.keep_components is None else own.keep_components,
            keep_components_per_label={
                **(self.keep_components_per_label or {}),
                **(own.keep_components_per_label or {}),
            },
        )


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
