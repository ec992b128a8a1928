"""The files of one folder, by case id: the scanning shared by dataset discovery (flareseg.data.cases) and
evaluation. A case with several files or a broken symbolic link becomes a problem, (case id, "file: reason"), that
the caller reports as a failed case; the other cases go on."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from flareseg.io.image_io import image_suffix, strip_image_suffix


@dataclass
class FolderCases:
    """The cases of one folder: case id -> file (or DICOM folder), and the cases that cannot be used."""

    paths: dict[str, Path] = field(default_factory=dict)  # sorted by case id
    problems: list[tuple[str, str]] = field(default_factory=list)  # (case id, "file: reason")


def existing_folder(folder: str | os.PathLike) -> Path:
    """`folder` as a Path; a missing folder or a file raises with a one-line reason."""
    folder = Path(folder)
    if is_broken_link(folder):
        raise FileNotFoundError(f"{folder}: broken symbolic link to {os.readlink(folder)}")
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such folder")
    if not folder.is_dir():
        hint = "; pass the folder that holds it" if image_suffix(folder) else ""
        raise NotADirectoryError(f"{folder}: is a file, not a folder{hint}")
    return folder


def is_broken_link(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def resolve_cases(candidates: dict[str, list[Path]], what: str) -> FolderCases:
    """One path per case id; a case with several files or a broken link becomes a problem."""
    found = FolderCases()
    for case_id, paths in sorted(candidates.items()):
        if len(paths) > 1:
            names = ", ".join(map(str, paths[:-1])) + f" and {paths[-1]}"
            found.problems.append((case_id, f"{names}: {len(paths)} {what} for case '{case_id}'; keep one"))
        elif is_broken_link(paths[0]):
            found.problems.append((case_id, f"{paths[0]}: broken symbolic link to {os.readlink(paths[0])}"))
        else:
            found.paths[case_id] = paths[0]
    return found


def find_labels(folder: str | os.PathLike) -> FolderCases:
    """Every label map (`<case>.<ext>`, no channel suffix) of `folder`, by case id; other entries are ignored."""
    folder = existing_folder(folder)
    candidates: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not image_suffix(path) or path.is_dir():
            continue
        candidates.setdefault(strip_image_suffix(path), []).append(path)
    return resolve_cases(candidates, "label maps")
