"""A dataset's fingerprint: what `flareseg plan` decides from, computed once with worker processes, saved as JSON.

Per case, on the canonical [z, y, x] grid that prepare and predict use: spacing, shape, orientation, physical
extent; for labeled cases, per label its voxel count, volume, extent in mm and connected components (26-connected,
as post-processing counts them), the box of all labels and the room around it to the image border, and a seeded
sample of foreground HU values (nnU-Net's CT normalisation takes its percentiles over every case's sample).

One pass per case: one bincount for the volumes, one find_objects for the boxes, component labelling only inside
each label's box. A case that cannot be read is reported on one line and left out; the rest are planned.
"""

from __future__ import annotations

import json
import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from flareseg.atomic import atomic_write_text
from flareseg.data.cases import CaseFiles
from flareseg.io import Geometry, read_image, to_canonical
from flareseg.workers import worker_context

FOREGROUND_SAMPLES = 10_000  # HU values drawn per labeled case (nnU-Net draws 10,000 too)
COMPONENTS_LISTED = 8  # the largest components of a label recorded per case
FORMAT = 1  # of the saved JSON

log = logging.getLogger(__name__)


@dataclass
class Fingerprint:
    """Every case's figures (`cases`), the pooled foreground intensities and the cases that could not be read."""

    cases: list[dict]
    intensity: dict[str, float]  # foreground HU over all labeled cases: p00_5, p99_5, mean, std, median
    label_names: dict[int, str]  # foreground label ids found or named, by id
    failed: list[tuple[str, str]] = field(default_factory=list)  # (case id, "file: reason")

    @property
    def labeled(self) -> list[dict]:
        return [case for case in self.cases if case["labeled"]]

    def save(self, path: str | os.PathLike) -> Path:
        payload = {
            "format": FORMAT,
            "label_names": {str(k): v for k, v in self.label_names.items()},
            "intensity": self.intensity,
            "failed": [list(item) for item in self.failed],
            "cases": self.cases,
        }
        return atomic_write_text(Path(path), json.dumps(payload, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Fingerprint:
        payload = json.loads(Path(path).read_text())
        if payload.get("format") != FORMAT:
            raise ValueError(f"{path}: a fingerprint of format {payload.get('format')}, expected {FORMAT}")
        names = {int(k): v for k, v in payload["label_names"].items()}
        failed = [tuple(item) for item in payload["failed"]]
        return cls(payload["cases"], payload["intensity"], names, failed)


def fingerprint_dataset(
    cases: list[CaseFiles],
    label_names: dict[int, str] | None = None,
    workers: int = 2,
    seed: int = 0,
    label_map: dict[int, int] | None = None,
) -> Fingerprint:
    """The fingerprint of `cases` (labeled and unlabeled). `label_names`: names by id (dataset.json); without,
    every id found in the label maps is named label_<id>. `label_map`: source id -> id, as prepare.label_map
    renumbers (unlisted ids -> 0), applied before anything is counted."""
    ordered = sorted(cases, key=lambda case: case.case_id)
    jobs = [(case, seed + k, label_map) for k, case in enumerate(ordered)]
    records, samples, failed = [], [], []
    for (case, _, _), outcome in zip(jobs, _run(jobs, workers)):
        if isinstance(outcome, str):
            log.error("left out of the plan: %s", outcome)
            failed.append((case.case_id, outcome))
            continue
        record, sample = outcome
        records.append(record)
        if sample.size:
            samples.append(sample)
    if not any(record["labeled"] for record in records):
        raise ValueError("no labeled case could be read: a plan needs labeled cases (see the lines above)")
    found = sorted({int(k) for record in records if record["labeled"] for k in record["labels"]})
    names = dict(label_names) if label_names else {k: f"label_{k}" for k in found}
    unnamed = sorted(set(found) - set(names))
    if unnamed:
        raise ValueError(f"the label maps hold ids {unnamed} that the label names ({names}) do not name")
    return Fingerprint(records, _intensity(np.concatenate(samples) if samples else np.zeros(0)), names, failed)


def _run(jobs: list[tuple], workers: int):
    """Each job's outcome in order: (record, foreground sample), or "file: reason"."""
    if workers <= 1 or len(jobs) <= 1:
        return [_case_outcome(*job) for job in jobs]
    from flareseg.data.prepare_worker import init_worker

    with ProcessPoolExecutor(
        min(workers, len(jobs)), mp_context=worker_context(), initializer=init_worker, initargs=(os.getpid(),)
    ) as pool:
        return list(pool.map(_case_outcome, *zip(*jobs)))


def _case_outcome(case: CaseFiles, seed: int, label_map: dict[int, int] | None):
    try:
        return case_fingerprint(case, seed, label_map)
    except Exception as error:  # noqa: BLE001 - one unreadable case is reported, the others are planned
        text = str(error)
        return text if text.startswith(str(case.image)) else f"{case.image}: {type(error).__name__}: {text}"


def case_fingerprint(
    case: CaseFiles, seed: int = 0, label_map: dict[int, int] | None = None
) -> tuple[dict, np.ndarray]:
    """One case's figures and its foreground HU sample (empty for an unlabeled case); labels renumbered by
    `label_map` first when given."""
    image, geometry = read_image(case.image)
    image, canonical, plan = to_canonical(image, geometry)
    spacing = canonical.spacing
    record = {
        "case": case.case_id,
        "labeled": case.labeled,
        "spacing": list(spacing),
        "shape": list(canonical.shape),
        "orientation": orientation_code(geometry),
        "extent_mm": [round(n * s, 2) for n, s in zip(canonical.shape, spacing)],
    }
    if not case.labeled:
        return record, np.zeros(0, dtype=np.float32)
    label, label_geometry = read_image(case.label)
    if label_geometry.shape != geometry.shape:
        raise ValueError(f"{case.label}: its label map has {label_geometry.shape} voxels, its image {geometry.shape}")
    if not np.issubdtype(label.dtype, np.integer) or label.min() < 0:
        raise ValueError(f"{case.label}: a label map holds non-negative integers, this one {label.dtype}")
    if label_map is not None:
        table = np.zeros(int(label.max()) + 1, dtype=np.uint8)
        for source, target in label_map.items():
            if source < table.size:
                table[source] = target
        label = table[label]
    label = plan.apply(label.astype(np.uint16 if label.max() > 255 else np.uint8, copy=False))
    counts = np.bincount(label.ravel())
    voxel_ml = math.prod(spacing) / 1000.0
    labels, lo_all, hi_all = {}, [math.inf] * 3, [-math.inf] * 3
    for value, box in enumerate(ndimage.find_objects(label), start=1):
        if box is None:
            continue
        lo, hi = [s.start for s in box], [s.stop for s in box]
        lo_all, hi_all = [min(a, b) for a, b in zip(lo_all, lo)], [max(a, b) for a, b in zip(hi_all, hi)]
        sizes = _component_sizes(label[box] == value)
        labels[str(value)] = {
            "voxels": int(counts[value]),
            "volume_ml": round(float(counts[value]) * voxel_ml, 3),
            "extent_mm": [round((b - a) * s, 2) for a, b, s in zip(lo, hi, spacing)],
            "components": int(sizes.size),
            "component_ml": [round(float(n) * voxel_ml, 3) for n in sizes[:COMPONENTS_LISTED]],
        }
    record["labels"] = labels
    if labels:
        record["labels_box_mm"] = [round((b - a) * s, 2) for a, b, s in zip(lo_all, hi_all, spacing)]
        # room between the box of all labels and the image border, below and above on each axis (mm)
        record["room_mm"] = [
            [round(a * s, 2), round((n - b) * s, 2)] for a, b, n, s in zip(lo_all, hi_all, canonical.shape, spacing)
        ]
    foreground = image[label > 0]
    rng = np.random.default_rng(seed)
    if foreground.size > FOREGROUND_SAMPLES:
        foreground = rng.choice(foreground, FOREGROUND_SAMPLES, replace=False)
    return record, foreground.astype(np.float32)


def _component_sizes(mask: np.ndarray) -> np.ndarray:
    """Voxel counts of the 26-connected components of `mask`, largest first."""
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    return np.sort(np.bincount(components.ravel(), minlength=count + 1)[1:])[::-1]


def _intensity(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    p005, p50, p995 = np.percentile(values, [0.5, 50.0, 99.5])
    return {
        "p00_5": round(float(p005), 2),
        "p99_5": round(float(p995), 2),
        "median": round(float(p50), 2),
        "mean": round(float(values.mean()), 2),
        "std": round(float(values.std()), 2),
        "samples": int(values.size),
    }


def orientation_code(geometry: Geometry) -> str:
    """The three-letter code of the voxel axes' directions (ITK's convention: LPS = x towards the left...)."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(geometry.direction)
