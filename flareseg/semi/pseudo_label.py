"""Pseudo-label a partially labelled dataset: a teacher fills the organs each case does not annotate.

For every `<case>_0000` image with a `<case>` label map: read both, check that the label is on the image's grid,
let the teacher (coarse + fine checkpoints, `Predictor.predict_array`) segment the image, fuse its prediction with
the case's partial label (`fuse_labels`: annotated voxels win, the teacher only fills unannotated organs) and
write `out/<case>.nii.gz` (uint8, the image's exact geometry, atomically). Then

    out/annotated.json      {case id: [label ids]} for every written case: its annotated ids plus the ids the
                            teacher filled in, so that `flareseg prepare -l out` treats them as annotated
    out/pseudo_label.csv    one row per case: case, status (ok / skipped / failed), filled ids, message

A bad case (two files for one case, a broken link, unreadable file, label on another grid, non-integer label
values, a teacher failure) is reported on stderr in one line naming the file and the reason, listed as failed, and
skipped; the others go on. Images without a label map (and label maps without an image) are skipped and reported,
but are not failures.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from flareseg.atomic import atomic_path, atomic_write_text
from flareseg.config import ConfigError
from flareseg.config.schema import PredictConfig
from flareseg.data.cases import ANNOTATED_FILE, CaseFiles, discover_cases, label_grid_problem
from flareseg.inference.predictor import Predictor
from flareseg.io import ImageReadError, read_image, write_image
from flareseg.semi.fusion import MAX_LABEL, as_label_ids, fuse_labels

REPORT_FILE = "pseudo_label.csv"
UNLISTED = "not listed in the annotated-labels file: treated as fully annotated, nothing filled"

log = logging.getLogger(__name__)


class PseudoLabelError(ValueError):
    """A case that cannot be pseudo-labelled; the message names the file and the reason."""


@dataclass
class PseudoLabelSummary:
    """What a pseudo-labelling run did."""

    out_dir: Path
    written: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (case id, "file: reason"): no image / no label
    failed: list[tuple[str, str]] = field(default_factory=list)  # (case id, "file: reason")
    annotated: dict[str, list[int]] = field(default_factory=dict)  # written case -> ids annotated in its output
    filled: dict[str, list[int]] = field(default_factory=dict)  # written case -> ids the teacher filled in
    rows: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def exit_code(self) -> int:
        """1 when any case failed, else 0."""
        return 0 if self.ok else 1


def pseudo_label_folder(
    images_dir: str | os.PathLike,
    labels_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: PredictConfig,
    annotated: dict[str, list[int]] | None,
    progress: bool = True,
) -> PseudoLabelSummary:
    """Fill the unannotated organs of every labeled case of `images_dir`/`labels_dir` with the teacher's labels.

    `settings`: the teacher (predict.coarse and predict.fine checkpoints, device, post-processing).
    `annotated`: {case id: [label ids the case annotates]}. A case missing from it (or every case, when it is
    None) is treated as fully annotated: its label map is written unchanged (the teacher is not run for it) and
    annotated.json lists the ids present in its map. Ids present in a listed case's map but not in its list are
    treated as unannotated: dropped, then possibly refilled by the teacher.

    The output folder must differ from the image and label folders. Outputs of earlier runs for cases that fail
    or are skipped now are removed, so that the folder and its annotated.json always agree.
    Returns the summary; `summary.exit_code` is 1 when any case failed.
    """
    images_dir, labels_dir, out_dir = Path(images_dir), Path(labels_dir), Path(out_dir)
    for folder in (images_dir, labels_dir):
        if out_dir.resolve() == folder.resolve():
            raise ConfigError(f"the output folder {out_dir} must differ from the image and label folders")
    found = discover_cases(images_dir, labels_dir, None)
    if annotated is None:
        log.warning("no annotated-labels file: every case counts as fully annotated and is written unchanged")
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher = Predictor(settings)
    summary = PseudoLabelSummary(out_dir)

    for case_id, problem in found.unpaired:
        summary.skipped.append((case_id, problem))
        summary.rows.append({"case": case_id, "status": "skipped", "filled": "", "message": problem})
        _remove_stale(out_dir, case_id)
        tqdm.write(f"skipped: {problem}", file=sys.stderr)
    for case_id, problem in found.invalid:  # two files for one case, a broken link: a failure of that case
        _fail(summary, case_id, problem, out_dir)

    for case in tqdm(found.cases, desc="pseudo-label", unit="case", disable=not progress, dynamic_ncols=True):
        listed = None if annotated is None else annotated.get(case.case_id)
        try:
            ids, filled, message = _pseudo_label_case(case, teacher, listed, out_dir)
        except (KeyboardInterrupt, SystemExit):
            raise
        except (ImageReadError, PseudoLabelError) as error:  # these already name the file
            _fail(summary, case.case_id, str(error), out_dir)
            continue
        except Exception as error:  # noqa: BLE001 - one bad case is reported, the others are still labelled
            _fail(summary, case.case_id, f"{case.image}: {type(error).__name__}: {error}", out_dir)
            continue
        summary.written.append(case.case_id)
        summary.annotated[case.case_id] = ids
        summary.filled[case.case_id] = filled
        row = {"case": case.case_id, "status": "ok", "filled": " ".join(map(str, filled)), "message": message}
        summary.rows.append(row)

    summary.rows.sort(key=lambda row: row["case"])
    _write_json(out_dir / ANNOTATED_FILE, dict(sorted(summary.annotated.items())))
    _write_rows(out_dir / REPORT_FILE, summary.rows)
    return summary


def _pseudo_label_case(
    case: CaseFiles, teacher: Predictor, listed: list[int] | None, out_dir: Path
) -> tuple[list[int], list[int], str]:
    """Write one fused label map; returns (ids annotated in the output, ids filled in, a note or "")."""
    image, geometry = read_image(case.image)
    label, label_geometry = read_image(case.label)
    problem = label_grid_problem(case, label_geometry, geometry)
    if problem:
        raise PseudoLabelError(problem)
    try:
        partial = as_label_ids(label, "partial")
    except ValueError as error:
        raise PseudoLabelError(f"{case.label}: {error}") from None
    present = _present(partial)
    if listed is None:
        fused, ids, filled, message = partial, present, [], UNLISTED
    else:
        own = sorted({int(v) for v in listed} - {0})
        fused = fuse_labels(partial, own, teacher.predict_array(image, geometry))
        filled = [v for v in _present(fused) if v not in own]
        ids = sorted(set(own) | set(filled))
        dropped = [v for v in present if v not in own]
        message = (
            f"ids {dropped} of the label map are not listed as annotated: replaced by the teacher" if dropped else ""
        )
    write_image(out_dir / f"{case.case_id}.nii.gz", np.ascontiguousarray(fused, dtype=np.uint8), geometry)
    return ids, filled, message


def _present(label: np.ndarray) -> list[int]:
    """The non-zero ids of a uint8 label map."""
    counts = np.bincount(label.ravel(), minlength=MAX_LABEL + 1)
    return [int(v) for v in np.flatnonzero(counts) if v != 0]


def _fail(summary: PseudoLabelSummary, case_id: str, message: str, out_dir: Path) -> None:
    summary.failed.append((case_id, message))
    summary.rows.append({"case": case_id, "status": "failed", "filled": "", "message": message})
    _remove_stale(out_dir, case_id)
    tqdm.write(f"failed: {message}", file=sys.stderr)


def _remove_stale(out_dir: Path, case_id: str) -> None:
    (out_dir / f"{case_id}.nii.gz").unlink(missing_ok=True)


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def _write_rows(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case", "status", "filled", "message"])
        writer.writeheader()
        writer.writerows(rows)
