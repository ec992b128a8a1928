"""Find the cases of a dataset folder: `<case>_0000.nii.gz` images and `<case>.nii.gz` labels, FLARE/nnU-Net style.

Every supported format is accepted (.nii.gz, .nii, .nrrd, .mha), and a sub-folder holding a DICOM series is an
image whose case id is the folder name (with any `_0000` removed). Files of other channels (`_0001`...) are
ignored: flareseg segments single-channel CT.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from flareseg.config import ConfigError
from flareseg.io import Geometry, image_suffix, is_dicom_dir, strip_image_suffix

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class CaseFiles:
    """The input files of one case."""

    case_id: str
    image: Path
    label: Path | None = None

    @property
    def labeled(self) -> bool:
        return self.label is not None


class DuplicateCaseError(ValueError):
    """Two inputs claim the same case id (e.g. case.nii.gz and case.mha)."""


def find_images(folder: Path) -> dict[str, Path]:
    """Case id -> image path for every channel-0 image (file or DICOM folder) in `folder`, sorted by id."""
    found: dict[str, Path] = {}
    for path in sorted(Path(folder).iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            if not is_dicom_dir(path):
                continue
            stem = path.name
        elif image_suffix(path):
            stem = strip_image_suffix(path)
        else:
            continue
        match = _CHANNEL.match(stem)
        if match and int(match["channel"]) != 0:
            continue
        case_id = match["case"] if match else stem
        if case_id in found:
            raise DuplicateCaseError(f"case '{case_id}' has two images: {found[case_id]} and {path}")
        found[case_id] = path
    return dict(sorted(found.items()))


def find_labels(folder: Path) -> dict[str, Path]:
    """Case id -> label map path for every image file in `folder` (no channel suffix on labels)."""
    found: dict[str, Path] = {}
    for path in sorted(Path(folder).iterdir()):
        if path.name.startswith(".") or not path.is_file() or not image_suffix(path):
            continue
        case_id = strip_image_suffix(path)
        if case_id in found:
            raise DuplicateCaseError(f"case '{case_id}' has two label maps: {found[case_id]} and {path}")
        found[case_id] = path
    return found


def find_cases(
    images: Path | None, labels: Path | None, unlabeled: Path | None
) -> tuple[list[CaseFiles], list[tuple[str, str]]]:
    """Pair images with labels. Returns the cases and the problems as (case id, "file: reason").

    An image in `images` without a label is a problem when `labels` is given (it is most likely a mistake);
    a label without an image too. Unlabeled cases come from their own folder.
    """
    cases: list[CaseFiles] = []
    problems: list[tuple[str, str]] = []
    for folder, name in ((images, "images"), (labels, "labels"), (unlabeled, "unlabeled")):
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"{name} folder {folder} does not exist")
    if images is not None:
        image_files = find_images(images)
        label_files = find_labels(labels) if labels is not None else {}
        for case_id, image in image_files.items():
            label = label_files.get(case_id)
            if labels is not None and label is None:
                problems.append((case_id, f"{image}: no label map named {case_id}.* in {labels}"))
                continue
            cases.append(CaseFiles(case_id, image, label))
        for case_id in sorted(set(label_files) - set(image_files)):
            problems.append((case_id, f"{label_files[case_id]}: no image named {case_id}_0000.* in {images}"))
    if unlabeled is not None:
        known = {case.case_id for case in cases}
        for case_id, image in find_images(unlabeled).items():
            if case_id in known:
                problems.append((case_id, f"{image}: case id '{case_id}' is also a labeled case"))
                continue
            cases.append(CaseFiles(case_id, image, None))
    return cases, problems


ANNOTATED_FILE = "annotated.json"  # {case id: [annotated label ids]} beside partially labeled label maps


def default_annotated_file(labels: Path | None) -> Path | None:
    """labels/annotated.json when it exists."""
    candidate = None if labels is None else Path(labels) / ANNOTATED_FILE
    return candidate if candidate is not None and candidate.is_file() else None


def read_annotated_file(path: str | os.PathLike, max_label: int = 255) -> dict[str, list[int]]:
    """The {case id: [annotated label ids]} file of a partially labeled dataset, checked (ids 1..max_label)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the annotated-labels file ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object {{case id: [label ids]}}")
    for case_id, ids in data.items():
        valid = isinstance(ids, list) and all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= max_label for v in ids
        )
        if not valid:
            raise ConfigError(f"{path}: case '{case_id}' must list label ids between 1 and {max_label}, got {ids!r}")
    return data


def label_grid_problem(case: CaseFiles, label_geometry: Geometry, geometry: Geometry) -> str | None:
    """A "label file: reason" line when a case's label map is not on its image's voxel grid, else None."""
    if label_geometry.same_grid(geometry, atol=1e-3):
        return None
    return (
        f"{case.label}: label grid does not match the image {case.image.name} "
        f"(label shape {label_geometry.shape}, spacing {_fmt(label_geometry.spacing)}, origin "
        f"{_fmt(label_geometry.origin)}; image shape {geometry.shape}, spacing {_fmt(geometry.spacing)}, "
        f"origin {_fmt(geometry.origin)})"
    )


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
