"""Evaluate a folder of predicted label maps against a folder of ground-truth label maps."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flareseg.atomic import atomic_write_text
from flareseg.evaluation.metrics import HD_PERCENTS
from flareseg.evaluation.protocol import (
    DEFAULT_METRICS,
    Preset,
    Score,
    check_metrics,
    get_preset,
    score_case,
    summarize,
)
from flareseg.io import ImageReadError, read_image
from flareseg.io.folders import find_labels
from flareseg.processes import tie_to_process
from flareseg.workers import worker_context

logger = logging.getLogger(__name__)

CSV_COLUMNS = ("case", "label", "organ", "dsc", "nsd")  # with the default metrics; asked ones follow "organ"
SPACING_RTOL = 1e-4  # headers store spacing as float32; closer than this is the same grid
HEADERS = {"dsc": "DSC", "nsd": "NSD", "hd95": "HD95 mm", "hd": "HD mm"}  # of the printed summary
WIDTHS = {"dsc": 8, "nsd": 8, "hd95": 10, "hd": 10}


@dataclass
class CaseOutcome:
    """The scores of one case, or the reason it could not be evaluated."""

    case: str
    scores: list[Score] = field(default_factory=list)
    error: str | None = None
    missing_prediction: bool = False


def evaluate_folder(
    gt_dir: str | os.PathLike,
    pred_dir: str | os.PathLike,
    preset: str | Preset = "flare22",
    workers: int = 2,
    out: str | os.PathLike | None = None,
    metrics: Iterable[str] = DEFAULT_METRICS,
) -> tuple[list[Score], dict]:
    """The `metrics` (default Dice and NSD) of every case of `gt_dir` against the file of that case in `pred_dir`.

    metrics: any of dsc, nsd, hd95, hd (Hausdorff distances in mm; the surfaces are computed once for NSD and both).
    A missing prediction counts as an empty one. A prediction that cannot be read or whose grid (shape, spacing)
    differs from its ground truth, two files for one case, or a broken link fails that case alone; failed cases are
    left out of the means and listed under "failures". Cases run in `workers` processes. With `out` (a .csv path),
    the long table case,label,organ,<metrics> is written there (an undefined HD, one mask empty, is an empty cell)
    and the summary beside it (same stem, .json; mean and std per structure, see protocol.summarize).
    Returns (scores, summary).
    """
    preset = get_preset(preset)
    metrics = check_metrics(metrics)
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if out is not None and Path(out).is_dir():  # checked before the work, not when writing its result
        raise IsADirectoryError(f"{out}: is a folder; give a file name such as {Path(out) / 'scores.csv'}")
    gt, pred = find_labels(gt_dir), find_labels(pred_dir)
    if not gt.paths and not gt.problems:
        raise FileNotFoundError(f"{gt_dir}: no label maps (<case>.nii.gz, .nii, .nrrd or .mha)")
    gt_files, gt_problems, pred_files, pred_problems = gt.paths, dict(gt.problems), pred.paths, dict(pred.problems)
    cases = sorted({*gt_files, *gt_problems})
    problems = {**{case: pred_problems[case] for case in cases if case in pred_problems}, **gt_problems}
    jobs = [(case, gt_files[case], pred_files.get(case), preset, metrics) for case in cases if case not in problems]
    outcomes = {outcome.case: outcome for outcome in _run_all(jobs, workers)}
    outcomes.update({case: CaseOutcome(case, error=message) for case, message in problems.items()})

    scores = [score for case in cases for score in outcomes[case].scores]
    summary = summarize(scores, preset, metrics)
    summary["missing_predictions"] = [case for case in cases if outcomes[case].missing_prediction]
    summary["unmatched_predictions"] = sorted({*pred_files, *pred_problems} - set(cases))
    summary["failures"] = {case: outcomes[case].error for case in cases if outcomes[case].error}
    for case in summary["missing_predictions"]:
        logger.warning("%s: no prediction in %s; scored as an empty prediction", case, pred_dir)
    for case, error in summary["failures"].items():
        logger.warning("%s: not evaluated: %s", case, error)
    if out is not None:
        out = Path(out)
        _write_atomic(out, _csv_text(scores, metrics))
        _write_atomic(out.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
    return scores, summary


def format_summary(summary: dict) -> str:
    """A short table: one line per organ (mean and std of each metric), the mean of the organ means, lesions apart.

    Under it, for HD95 and HD, the structures with cases left out of the means because one mask was empty.
    """
    metrics = summary.get("metrics", DEFAULT_METRICS)

    def number(value: float | None, width: int) -> str:
        return f"{value:.4f}".rjust(width) if value is not None else "-".rjust(width)

    def line(name: str, entry: dict) -> str:
        cells = (number(entry[m], WIDTHS[m]) + number(entry.get(f"{m}_std"), WIDTHS[m]) for m in metrics)
        return f"{name:<22}" + "".join(cells)

    lines = [f"{'organ':<22}" + "".join(HEADERS[m].rjust(WIDTHS[m]) + "std".rjust(WIDTHS[m]) for m in metrics)]
    lines += [line(name, entry) for name, entry in summary["organs"].items()]
    if summary["organs"]:
        lines.append(line("mean", summary["mean"]))
    entries = dict(summary["organs"])
    if summary.get("lesion") is not None:
        lines.append(line("lesion", summary["lesion"]))
        entries["lesion"] = summary["lesion"]
    for metric in (m for m in metrics if m in HD_PERCENTS):
        key = f"{metric}_undefined"
        left_out = [f"{name} {entry[key]}" for name, entry in entries.items() if entry[key]]
        if left_out:
            lines.append(f"{HEADERS[metric]}: cases with one mask empty, left out of the means: {', '.join(left_out)}")
    return "\n".join(lines)


def _run_all(jobs: list[tuple], workers: int) -> Iterator[CaseOutcome]:
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            yield _evaluate_case(*job)
        return
    lost = yield from _run_pool(jobs, min(workers, len(jobs)))
    # A worker killed from outside (out of memory) breaks the whole pool and it is unknown which case did it: each
    # case in flight is retried alone, so that only the culprit fails.
    for job in lost:
        for dead in (yield from _run_pool([job], 1)):
            yield CaseOutcome(dead[0], error=f"{dead[1]}: the worker process died while evaluating it (out of memory?)")


def _run_pool(jobs: list[tuple], workers: int):
    """Yield outcomes of `jobs` run in a process pool; returns the jobs lost if the pool broke."""
    # workers start from the fork server, never forked from this process (see flareseg.workers)
    with ProcessPoolExecutor(
        workers, mp_context=worker_context(), initializer=_init_worker, initargs=(os.getpid(),)
    ) as pool:
        running: dict[Future, tuple] = {pool.submit(_evaluate_case, *job): job for job in jobs}
        try:
            for future in as_completed(running):
                yield future.result()  # raises BrokenProcessPool when a worker died
                running.pop(future)
        except BrokenProcessPool:
            return list(running.values())
    return []


def _evaluate_case(
    case: str, gt_path: Path, pred_path: Path | None, preset: Preset, metrics: tuple[str, ...] = DEFAULT_METRICS
) -> CaseOutcome:
    """Score one case; any error becomes a one-line reason so that one bad case never stops the others."""
    try:
        gt, gt_geometry = read_image(gt_path)
        if pred_path is None:
            pred = np.zeros_like(gt)
        else:
            pred, pred_geometry = read_image(pred_path)
            if pred_geometry.shape != gt_geometry.shape or not np.allclose(
                pred_geometry.spacing, gt_geometry.spacing, rtol=SPACING_RTOL, atol=0
            ):
                return CaseOutcome(
                    case,
                    error=f"{pred_path} (shape {pred_geometry.shape}, spacing {pred_geometry.spacing}) is not on the "
                    f"grid of {gt_path} (shape {gt_geometry.shape}, spacing {gt_geometry.spacing}); (z, y, x) order",
                )
        scores = score_case(gt, pred, gt_geometry.spacing, preset, case=case, metrics=metrics)
        return CaseOutcome(case, scores, missing_prediction=pred_path is None)
    except ImageReadError as error:  # already names the file
        return CaseOutcome(case, error=str(error))
    except Exception as error:  # noqa: BLE001 - any failure of one case is reported, the others go on
        return CaseOutcome(case, error=f"{pred_path or gt_path}: {type(error).__name__}: {error}")


def _init_worker(main_pid: int) -> None:
    import SimpleITK as sitk

    tie_to_process(main_pid)
    # One thread per worker process: the pool is the parallelism.
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _csv_text(scores: list[Score], metrics: tuple[str, ...] = DEFAULT_METRICS) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow((*CSV_COLUMNS[:3], *metrics))
    writer.writerows((s.case, s.label, s.organ, *(_csv_value(s.value(name)) for name in metrics)) for s in scores)
    return buffer.getvalue()


def _csv_value(value: float | None) -> str:
    """4 decimals; an undefined value (NaN: a Hausdorff distance with one mask empty) is an empty cell."""
    return "" if value is None or math.isnan(value) else f"{value:.4f}"


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves a partial file."""
    atomic_write_text(path, text)
