"""The prepare section: the folders and the named stage grids a prepared folder holds."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from flareseg.config.loader import ConfigError

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

    # a dataset root read as it is: nnU-Net v2 raw or Decathlon (dataset.json: labels must match data.labels) or
    # FLARE (imagesTr/<case>_0000, labelsTr/<case>); replaces images and labels, which must then be null
    dataset: Path | None = None
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
        self.check_inputs(prefix)
        if self.source_margin_mm < 0:
            raise ConfigError(f"'{prefix}source_margin_mm' must be >= 0, got {self.source_margin_mm}")
        for source, target in (self.label_map or {}).items():
            if not 0 <= source <= 255 or target < 0:
                raise ConfigError(f"'{prefix}label_map' maps {source} -> {target}; ids must be 0..255 and >= 0")

    def check_inputs(self, prefix: str = "prepare.") -> None:
        """The input keys agree: prepare.dataset replaces images and labels; labels need images."""
        if self.dataset is not None and (self.images is not None or self.labels is not None):
            given = " and ".join(f"'{prefix}{key}'" for key in ("images", "labels") if getattr(self, key) is not None)
            raise ConfigError(
                f"'{prefix}dataset' replaces '{prefix}images' and '{prefix}labels': set {given} to null, "
                f"or '{prefix}dataset' to null"
            )
        if self.labels is not None and self.images is None:
            raise ConfigError(f"'{prefix}labels' is set but '{prefix}images' is not")
