"""The predict section: the chain of trained stages, its device and precision, and each stage's post-processing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from flareseg.config.loader import ConfigError
from flareseg.config.prepare_section import check_stage_name


@dataclass
class PostprocessConfig:
    """Component filtering of one stage's labels, at that stage's resolution; an unset key takes predict's
    shorthand (coarse_min_volume_mm3 for the ROI stage, fine_min_volume_mm3 for the others, keep_components...)."""

    min_volume_mm3: float | None = None  # components smaller than this are dropped (the largest of a label stays)
    min_volume_mm3_per_label: dict[int, float] | None = None  # by label id, over min_volume_mm3 (flareseg plan's)
    keep_components: int | None = None  # connected components kept per label (largest first)
    keep_components_per_label: dict[int, int] | None = None  # by label id, over predict's; 0 = keep all (lesions)

    def validate(self, prefix: str) -> None:
        if self.min_volume_mm3 is not None and self.min_volume_mm3 < 0:
            raise ConfigError(f"'{prefix}min_volume_mm3' must be >= 0, got {self.min_volume_mm3}")
        if any(v < 0 for v in (self.min_volume_mm3_per_label or {}).values()):
            raise ConfigError(f"'{prefix}min_volume_mm3_per_label' values must be >= 0 mm3")
        if self.keep_components is not None and self.keep_components < 1:
            raise ConfigError(f"'{prefix}keep_components' must be >= 1, got {self.keep_components}")
        if any(k < 0 for k in (self.keep_components_per_label or {}).values()):
            raise ConfigError(f"'{prefix}keep_components_per_label' values must be >= 0 (0 = keep all)")


@dataclass
class PredictConfig:
    """Inference: coarse model -> organ box -> fine model -> post-processing, on the GPU or the CPU."""

    # each stage's checkpoint, or a list of checkpoints of that one stage (k-fold models: a fold ensemble, whose
    # sigmoid probabilities are averaged); their configs come from the checkpoints
    coarse: Path | list[Path] | None = None  # coarse checkpoint(s)
    fine: Path | list[Path] | None = None  # fine checkpoint(s)
    stages: list[Path | list[Path]] | None = None  # any chain instead: first = ROI (whole volume), the rest inside it
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    # auto: fp16 on CUDA; on the CPU under OpenVINO int8 for networks whose stored int8 check passed (flareseg
    # quantize), else bf16 where the CPU has native bf16, else fp32. int8: OpenVINO only (the int8 extra)
    precision: Literal["auto", "fp32", "fp16", "bf16", "int8"] = "auto"
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
    # what is written per case: nifti (<case> as the input's format; .nii.gz for DICOM), dicom-seg (<case>_seg.dcm),
    # rtstruct (<case>_rtstruct.dcm); the DICOM ones need a DICOM series as input and the dicom extra
    output_format: list[Literal["nifti", "dicom-seg", "rtstruct"]] = field(default_factory=lambda: ["nifti"])
    labels: list[str | int] | None = None  # write only these labels (names or ids); null = all; the models still run
    statistics: bool = False  # also <case>_statistics.json per case and statistics.csv per folder
    overwrite: bool = False  # predict every case again; false: a rerun skips cases whose outputs are all there
    read_ahead: bool = True  # read the next case and write the last one while the networks run (one case ahead)
    window_overlap: float = 0.25  # fixed-spacing stages: overlap of the sliding-window patches (fraction per axis)
    png: bool = False  # also write <case>.png: axial and coronal slices with the predicted contours
    # test-time augmentation: none, or mirror (the 8 flips of the 3 spatial axes, each prediction flipped back and
    # the sigmoid probabilities averaged, with a fold ensemble's members: members x 8 network passes per stage)
    tta: Literal["none", "mirror"] = "none"

    def validate(self, prefix: str = "predict.") -> None:
        if self.keep_components < 1 or any(k < 0 for k in (self.keep_components_per_label or {}).values()):
            raise ConfigError(f"'{prefix}keep_components' must be >= 1 (per-label overrides >= 0, 0 = keep all)")
        if not 0.0 <= self.window_overlap < 1.0:
            raise ConfigError(f"'{prefix}window_overlap' must be in [0, 1), got {self.window_overlap}")
        if self.stages is not None and not self.stages:
            raise ConfigError(f"'{prefix}stages' must list at least one checkpoint (or be null)")
        entries = {"coarse": self.coarse, "fine": self.fine}
        entries |= {f"stages[{k}]": entry for k, entry in enumerate(self.stages or [])}
        for key, entry in entries.items():
            if isinstance(entry, list) and not entry:
                raise ConfigError(f"'{prefix}{key}' lists no checkpoint: give a checkpoint or a non-empty list")
        if not self.output_format or len(set(self.output_format)) != len(self.output_format):
            raise ConfigError(
                f"'{prefix}output_format' lists nifti, dicom-seg, rtstruct (each once), got {self.output_format}"
            )
        if self.labels is not None and not self.labels:
            raise ConfigError(f"'{prefix}labels' names at least one label (or is null for all)")
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
            min_volume_mm3_per_label=dict(own.min_volume_mm3_per_label or {}),
            keep_components=self.keep_components if own.keep_components is None else own.keep_components,
            keep_components_per_label={
                **(self.keep_components_per_label or {}),
                **(own.keep_components_per_label or {}),
            },
        )
