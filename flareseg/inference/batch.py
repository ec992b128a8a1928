"""Predict every image of a folder: a progress bar, one line per bad input, a CSV of time and memory per case."""

from __future__ import annotations

import csv
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from flareseg.atomic import atomic_path, remove_stale_temporaries
from flareseg.config import Config, save_config
from flareseg.data.cases import find_images
from flareseg.inference.predictor import Predictor
from flareseg.io import image_suffix
from flareseg.memory import peak_cuda_mb, peak_rss_mb, reset_peak_memory

TIMING_FILE = "timing.csv"


@dataclass
class PredictSummary:
    out_dir: Path
    predicted: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (case id, "file: reason")
    rows: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def output_name(case_id: str, image: Path) -> str:
    """`<case>_0000.nii.gz` -> `<case>.nii.gz` (same format as the input; DICOM series -> .nii.gz)."""
    return case_id + (image_suffix(image) or ".nii.gz") if image.is_file() else f"{case_id}.nii.gz"


def predict_folder(config: Config, input_dir: Path, out_dir: Path, progress: bool = True) -> PredictSummary:
    """Segment every `<case>_0000` image (or DICOM series folder) in `input_dir` into `out_dir`.

    A case with two images or a broken link, and a case that fails, is reported on one line and listed as failed
    in timing.csv; the others are predicted. Temporaries left in `out_dir` by killed runs are removed first.
    """
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    if out_dir.resolve() == input_dir.resolve():
        raise ValueError(f"the output folder {out_dir} is the input folder; give another output folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir}: is a file; the output must be a folder")
    found = find_images(input_dir, exclude=out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    save_config(config, out_dir)
    predictor = Predictor(config.predict)
    summary = PredictSummary(out_dir)
    for case_id, problem in found.problems:  # two images for one case, a broken link: that case fails alone
        row = {"case": case_id}
        _fail(summary, row, problem)
        summary.rows.append(row)
    inputs = {path.resolve() for path in found.paths.values()}
    for case_id, image in tqdm(
        found.paths.items(), desc="predict", unit="case", disable=not progress, dynamic_ncols=True
    ):
        reset_peak_memory(torch.device("cpu"))
        if predictor.device.type == "cuda":
            reset_peak_memory(predictor.device)
        start = time.perf_counter()
        row = {"case": case_id, "status": "ok", "message": ""}
        output = out_dir / output_name(case_id, image)
        try:
            if output.resolve() in inputs:  # an input linked into the output folder: never write over it
                raise ValueError(f"{image}: its prediction {output} would overwrite an input image")
            timings = predictor.predict_file(image, output)
            row.update({step: round(timings.steps.get(step, 0.0), 4) for step in predictor.steps.all})
            summary.predicted.append(case_id)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:  # noqa: BLE001 - one bad case is reported, the others are still predicted
            message = str(error) if str(error).startswith(str(image)) else f"{image}: {type(error).__name__}: {error}"
            _fail(summary, row, message)
        row["seconds"] = round(time.perf_counter() - start, 4)
        row["peak_rss_mb"] = round(peak_rss_mb(), 1)
        row["peak_gpu_mb"] = round(peak_cuda_mb(predictor.device), 1) if predictor.device.type == "cuda" else ""
        summary.rows.append(row)
    summary.rows.sort(key=lambda row: row["case"])
    _write_rows(out_dir / TIMING_FILE, summary.rows, predictor.steps.all)
    return summary


def _fail(summary: PredictSummary, row: dict, message: str) -> None:
    """Record a failed case: in the summary, in its timing.csv row, and on one line of stderr."""
    summary.failed.append((row["case"], message))
    row.update(status="failed", message=message)
    tqdm.write(f"failed: {message}", file=sys.stderr)


def _write_rows(path: Path, rows: list[dict], steps: tuple[str, ...]) -> None:
    """timing.csv: a row per case, a column of seconds per step (each stage's under its name)."""
    columns = ["case", "status", "seconds", *steps, "peak_rss_mb", "peak_gpu_mb", "message"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
