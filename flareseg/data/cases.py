"""Find the cases of a dataset folder: `<case>_0000.nii.gz` images and `<case>.nii.gz` labels, FLARE/nnU-Net style.

Every supported format is accepted (.nii.gz, .nii, .nrrd, .mha), and a sub-folder holding a DICOM series is an
image whose case id is the folder name (with any `_0000` removed). Files of other channels (`_0001`...) are
ignored: flareseg segments single-channel CT.

Discovery never stops at one bad entry. A case with two files (`a_0000.nii.gz` and `a_0000.mha`) or a broken
symbolic link is returned as a problem, (case id, "file: reason"), for the caller to report as a failed case. An
image file not named `<case>_0000.<ext>` and a sub-folder without a DICOM series are logged as warnings and left
out. A folder that yields no image at all raises InputFolderError, saying what it holds and what to pass instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from flareseg.config import ConfigError
from flareseg.io import IMAGE_SUFFIXES, Geometry, image_suffix, is_dicom_dir, strip_image_suffix
from flareseg.io.folders import FolderCases, existing_folder, find_labels, is_broken_link, resolve_cases

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
IMAGE_NAMING = "<case>_0000.<ext>"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseFiles:
    """The input files of one case."""

    case_id: str
    image: Path
    label: Path | None = None

    @property
    def labeled(self) -> bool:
        return self.label is not None


class InputFolderError(ValueError):
    """An input folder that yields no image; the message says what it holds and what to pass instead."""


def find_images(folder: str | os.PathLike, exclude: str | os.PathLike | None = None) -> FolderCases:
    """Every channel-0 image (`<case>_0000.<ext>` file or DICOM folder) of `folder`, by case id.

    `exclude`: a sub-folder to pass over silently (an output folder inside the input folder).
    Raises FileNotFoundError or NotADirectoryError for a missing folder, InputFolderError when it holds no image.
    """
    folder = existing_folder(folder)
    skip = Path(exclude).resolve() if exclude is not None else None
    candidates: dict[str, list[Path]] = {}
    misnamed: list[Path] = []  # image files without the channel suffix
    not_dicom: list[Path] = []  # sub-folders without a readable DICOM series
    others: list[Path] = []  # files that are no image at all
    channels: list[Path] = []  # images of other channels (_0001...)
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or (skip is not None and path.resolve() == skip):
            continue
        broken = is_broken_link(path)
        if path.is_dir():
            if not _holds_dicom_series(path):
                not_dicom.append(path)
                continue
            stem = path.name
        elif image_suffix(path) or broken:  # a broken link without a suffix may have pointed to a DICOM folder
            stem = strip_image_suffix(path)
        else:
            others.append(path)
            continue
        match = _CHANNEL.match(stem)
        if match is None and image_suffix(path):
            misnamed.append(path)
            continue
        if match is not None and int(match["channel"]) != 0:
            channels.append(path)  # flareseg segments channel 0 only
            continue
        candidates.setdefault(match["case"] if match else stem, []).append(path)
    if not candidates:
        raise InputFolderError(_nothing_found(folder, misnamed, not_dicom, channels, others))
    for path in misnamed:
        log.warning("ignored %s: not named %s", path, IMAGE_NAMING)
    for path in not_dicom:
        log.warning("ignored %s: a folder without a readable DICOM series", path)
    return resolve_cases(candidates, "images")


@dataclass
class Discovery:
    """The cases of an images/labels/unlabeled folder set, and the inputs that do not make a case."""

    cases: list[CaseFiles] = field(default_factory=list)
    invalid: list[tuple[str, str]] = field(default_factory=list)  # two files for one case, broken links
    unpaired: list[tuple[str, str]] = field(default_factory=list)  # an image without label, a label without image

    @property
    def problems(self) -> list[tuple[str, str]]:
        return self.invalid + self.unpaired


def discover_cases(images: Path | None, labels: Path | None, unlabeled: Path | None) -> Discovery:
    """Pair images with labels; every input that does not make a case is listed as (case id, "file: reason").

    An image in `images` without a label is unpaired when `labels` is given (it is most likely a mistake); a label
    without an image too. Unlabeled cases come from their own folder. A given images or unlabeled folder without
    any image raises InputFolderError.
    """
    found = Discovery()
    for folder in (images, labels, unlabeled):
        if folder is not None:
            existing_folder(folder)
    labeled: set[str] = set()
    if images is not None:
        image_files = find_images(images)
        label_files = find_labels(labels) if labels is not None else FolderCases()
        found.invalid += image_files.problems + label_files.problems
        reported = {case_id for case_id, _ in found.invalid}
        for case_id, image in image_files.paths.items():
            if case_id in reported:
                continue
            label = label_files.paths.get(case_id)
            if labels is not None and label is None:
                found.unpaired.append((case_id, f"{image}: no label map named {case_id}.* in {labels}"))
                continue
            found.cases.append(CaseFiles(case_id, image, label))
            labeled.add(case_id)
        for case_id in sorted(set(label_files.paths) - set(image_files.paths) - reported):
            path = label_files.paths[case_id]
            found.unpaired.append((case_id, f"{path}: no image named {case_id}_0000.* in {images}"))
    if unlabeled is not None:
        unlabeled_files = find_images(unlabeled)
        found.invalid += unlabeled_files.problems
        for case_id, image in unlabeled_files.paths.items():
            if case_id in labeled:
                found.invalid.append((case_id, f"{image}: case id '{case_id}' is also a labeled case"))
                continue
            found.cases.append(CaseFiles(case_id, image, None))
    return found


def find_cases(
    images: Path | None, labels: Path | None, unlabeled: Path | None
) -> tuple[list[CaseFiles], list[tuple[str, str]]]:
    """`discover_cases` as (cases, problems), every problem as (case id, "file: reason")."""
    found = discover_cases(images, labels, unlabeled)
    return found.cases, found.problems


def _holds_dicom_series(folder: Path) -> bool:
    """`is_dicom_dir` without ITK's multi-line warning for a folder without a series (an expected answer here)."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return is_dicom_dir(folder)
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _nothing_found(
    folder: Path, misnamed: list[Path], not_dicom: list[Path], channels: list[Path], others: list[Path]
) -> str:
    """Why `folder` yields no image, and what to do about it."""
    expected = (
        f"images are files named {IMAGE_NAMING} ({', '.join(IMAGE_SUFFIXES)}) or sub-folders holding a DICOM series"
    )
    if others and _holds_dicom_series(folder):
        return f"{folder}: holds a DICOM series itself; pass its parent folder ({expected})"
    held = [
        _count(misnamed, f"image file not named {IMAGE_NAMING}", f"image files not named {IMAGE_NAMING}"),
        _count(not_dicom, "sub-folder without a readable DICOM series", "sub-folders without a readable DICOM series"),
        _count(channels, "image of another channel than _0000", "images of other channels than _0000"),
        _count(others, "file that is not an image", "files that are not images"),
    ]
    held = [text for text in held if text]
    if not held:
        return f"{folder}: no image found, the folder is empty ({expected})"
    return f"{folder}: no image found; it holds {'; '.join(held)} ({expected})"


def _count(paths: list[Path], one: str, many: str) -> str:
    """A count with up to three example names, "2 files (a, b)"; empty for no paths."""
    if not paths:
        return ""
    names = ", ".join(path.name for path in paths[:3]) + (", ..." if len(paths) > 3 else "")
    return f"{len(paths)} {one if len(paths) == 1 else many} ({names})"


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
