"""What a case's prediction is written as: the label map (NIfTI, or the input's format), DICOM-SEG, RTSTRUCT, an
overlay PNG and its statistics. Every file is written atomically, so a present file is a complete one, and a case
whose outputs are all present is done (`CaseOutputs.complete`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flareseg.atomic import atomic_write_text
from flareseg.config.predict_section import PredictConfig
from flareseg.io import Geometry, image_suffix, write_image

SEG_SUFFIX = "_seg.dcm"
RTSTRUCT_SUFFIX = "_rtstruct.dcm"
STATISTICS_SUFFIX = "_statistics.json"


def label_map_name(case_id: str, image: Path) -> str:
    """`<case>_0000.nii.gz` -> `<case>.nii.gz` (same format as the input; DICOM series -> .nii.gz)."""
    return case_id + (image_suffix(image) or ".nii.gz") if image.is_file() else f"{case_id}.nii.gz"


@dataclass(frozen=True)
class CaseOutputs:
    """The files one case's prediction is written to, by kind."""

    case_id: str
    image: Path  # the input: an image file or a DICOM series folder
    paths: dict[str, Path]  # "nifti", "dicom-seg", "rtstruct", "statistics", "png"

    @classmethod
    def plan(cls, case_id: str, image: Path, out_dir: Path, settings: PredictConfig) -> CaseOutputs:
        names = {
            "nifti": label_map_name(case_id, image),
            "dicom-seg": case_id + SEG_SUFFIX,
            "rtstruct": case_id + RTSTRUCT_SUFFIX,
        }
        paths = {kind: out_dir / names[kind] for kind in settings.output_format}
        if settings.statistics:
            paths["statistics"] = out_dir / (case_id + STATISTICS_SUFFIX)
        if settings.png:
            paths["png"] = out_dir / (case_id + ".png")
        return cls(case_id, image, paths)

    @property
    def complete(self) -> bool:
        """Whether every output is there (atomic writes: present means complete) and newer than the input: an
        input replaced after its prediction was written is predicted again, never left with a stale output."""
        try:
            written = min(path.stat().st_mtime_ns for path in self.paths.values())
        except (FileNotFoundError, ValueError):  # an output missing (or none asked)
            return False
        return written >= _newest_change(self.image)

    def check_input(self) -> None:
        """DICOM outputs reference the source series: a ValueError naming the input when it is no DICOM folder."""
        dicom = [kind for kind in ("dicom-seg", "rtstruct") if kind in self.paths]
        if dicom and not self.image.is_dir():
            raise ValueError(
                f"{self.image}: {' and '.join(dicom)} output needs a DICOM series as input (a folder), not an image "
                "file; use --output-format nifti for it"
            )

    def write(self, label: np.ndarray, image: np.ndarray, geometry: Geometry, names: list[str]) -> dict | None:
        """Write every output; returns the statistics (when asked). The DICOM writers log what the user must know
        (UIDs they generated, an empty map that wrote nothing)."""
        figures = None
        if "nifti" in self.paths:
            write_image(self.paths["nifti"], label, geometry)
        for kind in ("dicom-seg", "rtstruct"):
            if kind in self.paths:
                from flareseg.io import dicom_outputs

                writer = dicom_outputs.write_dicom_seg if kind == "dicom-seg" else dicom_outputs.write_rtstruct
                writer(label, self.image, self.paths[kind], names, geometry=geometry)
        if "statistics" in self.paths:
            from flareseg.inference.statistics import label_statistics

            figures = label_statistics(label, image, geometry, names)
            atomic_write_text(self.paths["statistics"], json.dumps(figures, indent=1) + "\n")
        if "png" in self.paths:
            from flareseg.visualize import overlay_png

            overlay_png(image, geometry, label, self.paths["png"], names=names)
        return figures


def _newest_change(image: Path) -> int:
    """The last modification of an input: the file's, or the newest of a DICOM folder's files (and the folder's own,
    which changes when files are added or removed)."""
    try:
        times = [image.stat().st_mtime_ns]
        if image.is_dir():
            times += [entry.stat().st_mtime_ns for entry in image.iterdir() if entry.is_file()]
    except OSError:  # gone or unreadable: predicting it again reports why
        return 2**63
    return max(times)
