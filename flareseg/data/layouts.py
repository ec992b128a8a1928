"""Read a dataset root in one of the common layouts: nnU-Net v2 raw, the Medical Segmentation Decathlon, FLARE.

- nnunet: a dataset.json with `channel_names`, `labels` (name -> id, background 0) and `file_ending`; images
  `imagesTr/<case>_0000<file_ending>`, labels `labelsTr/<case><file_ending>` (or the files its optional `dataset`
  key lists, relative to the root).
- msd: a dataset.json with `modality`, `labels` ({"0": "background", "1": "liver"}) and `training` (a list of
  {"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}); only the listed files are read, so the
  archive's `._` macOS files never are. The case id is the image file name without its suffix.
- flare: no dataset.json; `imagesTr/<case>_0000.<ext>` and `labelsTr/<case>.<ext>` (what discover_cases reads).

flareseg segments single-channel CT: a dataset.json naming more than one channel (4-D images) or another modality
is refused, as are nnU-Net's region-based labels and its ignore label. A malformed dataset.json raises ConfigError
naming the file and what is wrong; a root that holds none of the layouts raises InputFolderError. An input that does
not make a case (a listed file that is missing, two files for one case, an image without its label) is a problem,
(case id, "file: reason"), in the returned Discovery, as with discover_cases: one bad case never stops the others.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from flareseg.config import ConfigError
from flareseg.data.cases import CaseFiles, Discovery, InputFolderError, discover_cases
from flareseg.io import IMAGE_SUFFIXES, image_suffix, strip_image_suffix
from flareseg.io.folders import existing_folder, is_broken_link

DATASET_JSON = "dataset.json"
IMAGES_DIR = "imagesTr"
LABELS_DIR = "labelsTr"
MAX_LABEL_ID = 255  # label maps are stored as uint8

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetLayout:
    """A dataset root read as one of the common layouts."""

    kind: Literal["nnunet", "msd", "flare"]
    root: Path
    discovery: Discovery  # the cases, and the inputs that make none (invalid, unpaired)
    label_names: dict[int, str] | None  # foreground label id -> name, by id, from dataset.json; None for flare


def read_dataset(root: str | os.PathLike) -> DatasetLayout:
    """The cases and label names of the dataset at `root`: nnU-Net v2 raw or Decathlon (a dataset.json), or FLARE
    (imagesTr + labelsTr). Label ids are returned as dataset.json numbers them (1, 2, 5 stays so).

    Raises FileNotFoundError/NotADirectoryError for a missing root, ConfigError for a dataset.json that is malformed
    or describes data flareseg cannot segment, InputFolderError for a root that holds no layout.
    """
    root = existing_folder(root)
    path = root / DATASET_JSON
    if not path.exists() and not path.is_symlink():
        return _read_flare(root)
    data = _load_json(path)
    if "channel_names" in data:
        return _read_nnunet(root, path, data)
    if "modality" in data or "training" in data:
        return _read_msd(root, path, data)
    raise ConfigError(
        f"{path}: neither an nnU-Net v2 dataset.json (no 'channel_names' key) nor a Medical Segmentation Decathlon "
        "one (no 'modality' or 'training' key)"
    )


def _read_flare(root: Path) -> DatasetLayout:
    images, labels = root / IMAGES_DIR, root / LABELS_DIR
    if not images.is_dir():
        hint = "; pass its parent folder" if root.name in (IMAGES_DIR, LABELS_DIR) else ""
        raise InputFolderError(
            f"{root}: not a dataset folder: no {DATASET_JSON} (nnU-Net v2, Medical Segmentation Decathlon) and no "
            f"{IMAGES_DIR} folder (FLARE: {IMAGES_DIR}/<case>_0000.nii.gz, {LABELS_DIR}/<case>.nii.gz){hint}"
        )
    if not labels.is_dir():
        raise InputFolderError(
            f"{root}: holds {IMAGES_DIR} but no {LABELS_DIR} folder and no {DATASET_JSON}; "
            "give images without labels as prepare.unlabeled"
        )
    return DatasetLayout("flare", root, discover_cases(images, labels, None), None)


def _read_nnunet(root: Path, path: Path, data: dict) -> DatasetLayout:
    channels = _key(path, data, "channel_names", dict, 'a mapping of channel to name, e.g. {"0": "CT"}')
    _check_single_ct(path, "channel_names", channels, "channel")
    labels = _key(path, data, "labels", dict, 'a mapping of label name to id, e.g. {"background": 0, "liver": 1}')
    names: dict[int, str] = {}
    for name, value in labels.items():
        if isinstance(value, list):
            raise ConfigError(
                f"{path}: label '{name}' is the region {value} (region-based training); flareseg needs one id per "
                "label: write label maps of plain ids and list them as name: id"
            )
        label_id = _label_id(path, value, f"label '{name}'")
        if name == "ignore":
            raise ConfigError(
                f"{path}: label 'ignore' (id {label_id}) marks unannotated voxels, which flareseg cannot train with; "
                "remove it from the label maps and from 'labels'"
            )
        if label_id:
            _add_label(path, names, label_id, name)
    ending = _key(path, data, "file_ending", str, 'the image file suffix, e.g. ".nii.gz"')
    if ending.lower() not in IMAGE_SUFFIXES:
        readable = ", ".join(IMAGE_SUFFIXES)
        raise ConfigError(f"{path}: file_ending '{ending}' is not a format flareseg reads ({readable})")
    if "dataset" in data:
        discovery = _listed_cases(_nnunet_listed(root, path, data["dataset"]), path, "dataset")
    else:
        discovery = _with_ending(discover_cases(root / IMAGES_DIR, root / LABELS_DIR, None), ending, path)
    _check_count(path, data, discovery)
    return DatasetLayout("nnunet", root, discovery, dict(sorted(names.items())))


def _nnunet_listed(root: Path, path: Path, listed: Any) -> list[tuple[str, Path, Path]]:
    """The (case id, image, label) entries of an nnU-Net dataset.json's `dataset` key (paths relative to root)."""
    entry_shape = '{"images": ["<image>"], "label": "<label map>"}'
    if not isinstance(listed, dict):
        raise ConfigError(f"{path}: 'dataset' must map each case to {entry_shape}, got {_short(listed)}")
    entries = []
    for case_id, entry in listed.items():
        images = entry.get("images") if isinstance(entry, dict) else None
        label = entry.get("label") if isinstance(entry, dict) else None
        one_image = isinstance(images, list) and len(images) == 1 and isinstance(images[0], str)
        if not one_image or not isinstance(label, str):
            raise ConfigError(f"{path}: dataset['{case_id}'] must be {entry_shape} (one channel), got {_short(entry)}")
        entries.append((case_id, root / images[0], root / label))
    return entries


def _read_msd(root: Path, path: Path, data: dict) -> DatasetLayout:
    modality = _key(path, data, "modality", dict, 'a mapping of channel to modality, e.g. {"0": "CT"}')
    _check_single_ct(path, "modality", modality, "modality", " (4-D images cannot be prepared)")
    labels = _key(path, data, "labels", dict, 'a mapping of label id to name, e.g. {"0": "background", "1": "liver"}')
    names: dict[int, str] = {}
    for key, name in labels.items():
        try:
            label_id = int(key)
        except ValueError:
            example = '{"1": "liver"}'
            raise ConfigError(f"{path}: 'labels' key {key!r} is not a label id; expected e.g. {example}") from None
        label_id = _label_id(path, label_id, f"label {key!r}")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{path}: label {key!r} must be named by a non-empty string, got {_short(name)}")
        if label_id:
            _add_label(path, names, label_id, name)
    training = _key(path, data, "training", list, 'a list of {"image": ..., "label": ...}')
    entries = []
    for i, entry in enumerate(training):
        image = entry.get("image") if isinstance(entry, dict) else None
        label = entry.get("label") if isinstance(entry, dict) else None
        if not isinstance(image, str) or not isinstance(label, str):
            raise ConfigError(
                f'{path}: training[{i}] must be {{"image": "./{IMAGES_DIR}/<case>.nii.gz", "label": '
                f'"./{LABELS_DIR}/<case>.nii.gz"}}, got {_short(entry)}'
            )
        if Path(image).name.startswith("._"):  # macOS resource forks, shipped in the Decathlon archives
            continue
        entries.append((strip_image_suffix(image), root / image, root / label))
    discovery = _listed_cases(entries, path, "training")
    _check_count(path, data, discovery)
    return DatasetLayout("msd", root, discovery, dict(sorted(names.items())))


def _listed_cases(entries: list[tuple[str, Path, Path]], path: Path, key: str) -> Discovery:
    """The cases dataset.json lists; a case listed twice or with a missing or unreadable file is a problem."""
    by_case: dict[str, list[tuple[Path, Path]]] = {}
    for case_id, image, label in entries:
        by_case.setdefault(case_id, []).append((image, label))
    found = Discovery()
    for case_id, files in sorted(by_case.items()):
        if len(files) > 1:
            names = " and ".join(str(image) for image, _ in files)
            found.invalid.append((case_id, f"{names}: case '{case_id}' is listed {len(files)} times in {path} '{key}'"))
            continue
        image, label = files[0]
        problem = _file_problem(image, path, key) or _file_problem(label, path, key)
        if problem:
            found.invalid.append((case_id, problem))
        else:
            found.cases.append(CaseFiles(case_id, image, label))
    return found


def _file_problem(file: Path, path: Path, key: str) -> str | None:
    """Why a file dataset.json lists cannot be read as an image, or None."""
    if is_broken_link(file):
        return f"{file}: broken symbolic link to {os.readlink(file)}"
    if not file.exists():
        return f"{file}: no such file (listed in {path} '{key}')"
    if file.is_dir():
        return f"{file}: is a folder, not an image file (listed in {path} '{key}')"
    if image_suffix(file) is None:
        return f"{file}: not an image file ({', '.join(IMAGE_SUFFIXES)})"
    return None


def _with_ending(found: Discovery, ending: str, path: Path) -> Discovery:
    """Only the cases whose files end in dataset.json's file_ending; the others become problems."""
    kept = Discovery(invalid=list(found.invalid), unpaired=list(found.unpaired))
    for case in found.cases:
        other = [file for file in (case.image, case.label) if file is not None and not _ends(file, ending)]
        if other:
            kept.invalid.append((case.case_id, f"{other[0]}: not a {ending} file, the file_ending of {path}"))
        else:
            kept.cases.append(case)
    return kept


def _ends(file: Path, ending: str) -> bool:
    return file.name.lower().endswith(ending.lower())


def _check_single_ct(path: Path, key: str, channels: dict, noun: str, hint: str = "") -> None:
    if len(channels) != 1:
        listed = ", ".join(str(name) for name in channels.values()) or "none"
        raise ConfigError(
            f"{path}: '{key}' lists {len(channels)} {noun} entries ({listed}); flareseg segments single-channel CT "
            f'({key}: {{"0": "CT"}}){hint}'
        )
    (name,) = channels.values()
    if not isinstance(name, str) or name.strip().casefold() != "ct":
        raise ConfigError(f"{path}: '{key}' names {_short(name)}, not CT; flareseg segments single-channel CT{hint}")


def _label_id(path: Path, value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LABEL_ID:
        raise ConfigError(f"{path}: {what} has the id {_short(value)}; expected an integer 0..{MAX_LABEL_ID}")
    return value


def _add_label(path: Path, names: dict[int, str], label_id: int, name: str) -> None:
    if label_id in names:
        raise ConfigError(f"{path}: labels '{names[label_id]}' and '{name}' share the id {label_id}")
    names[label_id] = name


def _check_count(path: Path, data: dict, found: Discovery) -> None:
    """numTraining is informative only: a different count is logged, the cases found are what is prepared."""
    expected = data.get("numTraining")
    seen = len(found.cases) + len(found.problems)
    if isinstance(expected, int) and expected != seen:
        log.warning("%s: numTraining is %d but %d training cases were found", path, expected, seen)


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ConfigError(f"{path}: cannot be read ({reason})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _key(path: Path, data: dict, key: str, kind: type, what: str) -> Any:
    if key not in data:
        raise ConfigError(f"{path}: missing key '{key}' ({what})")
    value = data[key]
    if not isinstance(value, kind):
        raise ConfigError(f"{path}: '{key}' must be {what}, got {_short(value)}")
    return value


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_label_names(layout: DatasetLayout, labels: list[str], label_map: dict[int, int] | None) -> None:
    """dataset.json's labels, renumbered by `label_map` (prepare.label_map) when it is set, must be `labels`
    (data.labels) in id order (names compared ignoring case, spaces, hyphens and underscores); labels merged into
    one id may be named anything. A ConfigError says what to set otherwise."""
    names = layout.label_names
    if names is None:
        return
    targets: dict[int, list[str]] = {}
    for source, name in names.items():
        target = source if label_map is None else label_map.get(source, 0)
        if target:
            targets.setdefault(target, []).append(name)
    expected = [targets.get(target, []) for target in range(1, max(targets, default=0) + 1)]
    if len(expected) == len(labels) and all(
        len(found) > 1 or (found and _name_key(found[0]) == _name_key(label)) for found, label in zip(expected, labels)
    ):
        return
    shown = "{" + ", ".join(f"{label_id}: {name}" for label_id, name in names.items()) + "}"
    wanted = f"data.labels is [{', '.join(labels)}]"
    if label_map is None:
        if list(names) == list(range(1, len(names) + 1)):
            fix = f"set data.labels: [{', '.join(names.values())}] or prepare.label_map (dataset id -> data.labels id)"
        else:
            renumber = ", ".join(f"{label_id}: {k + 1}" for k, label_id in enumerate(names))
            fix = (
                f"its ids are not 1..{len(names)}: set data.labels: [{', '.join(names.values())}] and "
                f"prepare.label_map: {{{renumber}}}"
            )
        raise ConfigError(f"{layout.root / DATASET_JSON} names the labels {shown} but {wanted}; {fix}")
    after = ", ".join("+".join(found) if found else "(none)" for found in expected)
    raise ConfigError(
        f"{layout.root / DATASET_JSON} names the labels {shown}, which prepare.label_map makes [{after}], but "
        f"{wanted}; set data.labels to match or change prepare.label_map"
    )


def _name_key(name: str) -> str:
    """A label name for comparison: "Right Kidney", "right-kidney" and "right_kidney" are the same label."""
    return re.sub(r"[\s\-_]+", "_", name.strip().casefold())
