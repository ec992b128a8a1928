"""Predict every image of a folder, at cohort scale: resumable, shardable, with reading and writing overlapped.

- Resume: a case whose outputs are all present is skipped (every output is written atomically, so present means
  complete) unless predict.overwrite. The folder remembers the settings it was predicted with
  (`prediction_settings.json`: the predict settings that change outputs and each checkpoint's size and time); a
  rerun with other settings is refused instead of mixing two models' outputs in one folder.
- Shards: `part` K of `parts` N takes the cases whose position in the sorted case list is K modulo N, so N
  processes (one per GPU, one per node) share a cohort; each writes its own timing (and statistics) CSV.
- Overlap: while the networks run on one case, a reader thread reads the next and a writer thread writes the last
  (at most one case ahead and one behind: bounded memory).
- timing.csv keeps every run's rows (a `run` column), one per case: status, seconds, seconds per step (each stage
  under its name), network passes per stage (`<stage>_passes`: fold members x TTA flips x sliding windows), peak
  memory, the error message of a failed case. A progress bar shows cases, failures and ETA.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from tqdm import tqdm

from flareseg.atomic import atomic_path, atomic_write_text, remove_stale_temporaries
from flareseg.config import Config, ConfigError, save_config, to_plain
from flareseg.data.cases import find_images
from flareseg.inference.outputs import CaseOutputs
from flareseg.inference.predictor import CaseTimings, Predictor, checkpoint_files
from flareseg.io import read_image
from flareseg.memory import peak_cuda_mb, peak_rss_mb, reset_peak_memory

TIMING_FILE = "timing.csv"
STATISTICS_FILE = "statistics.csv"
SETTINGS_FILE = "prediction_settings.json"
# predict keys that change no output: a rerun may differ in them and still resume
RUNTIME_KEYS = ("device", "threads", "backend", "overwrite", "read_ahead", "png", "statistics", "output_format")


@dataclass
class PredictSummary:
    out_dir: Path
    predicted: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (case id, "file: reason")
    done_before: list[str] = field(default_factory=list)  # skipped: their outputs were all there
    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    timing_file: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def cases_per_hour(self) -> float:
        return 3600.0 * len(self.predicted) / self.seconds if self.seconds > 0 else 0.0


def predict_folder(
    config: Config, input_dir: Path, out_dir: Path, progress: bool = True, part: int = 0, parts: int = 1
) -> PredictSummary:
    """Segment every `<case>_0000` image (or DICOM series folder) of `input_dir` (this shard's share) into `out_dir`.

    A case with two images or a broken link, and a case that fails, is reported on one line and listed as failed
    in timing.csv; the others are predicted. Temporaries left in `out_dir` by killed runs are removed first.
    """
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    if not 0 <= part < parts:
        raise ValueError(f"--part must be in 0..{parts - 1} for --parts {parts}, got {part}")
    if out_dir.resolve() == input_dir.resolve():
        raise ValueError(f"the output folder {out_dir} is the input folder; give another output folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir}: is a file; the output must be a folder")
    found = find_images(input_dir, exclude=out_dir)
    settings = config.predict
    fingerprint = _check_settings(out_dir, config)  # before loading the networks: a refusal costs nothing
    predictor = Predictor(settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / SETTINGS_FILE, json.dumps(fingerprint, indent=1, sort_keys=True) + "\n")
    remove_stale_temporaries(out_dir)
    save_config(config, out_dir)
    summary = PredictSummary(out_dir, timing_file=out_dir / _shard_name(TIMING_FILE, part, parts))
    run = datetime.now().isoformat(timespec="seconds")
    for case_id, problem in _share(found.problems, part, parts, key=lambda item: item[0]):  # two images, a broken link
        _fail(summary, {"case": case_id, "run": run}, problem)
    cases = [CaseOutputs.plan(case_id, image, out_dir, settings) for case_id, image in found.paths.items()]
    todo, shard = [], _share(cases, part, parts, key=lambda case: case.case_id)
    inputs = {path.resolve() for path in found.paths.values()}
    for case in shard:
        if any(path.resolve() in inputs for path in case.paths.values()):  # an input linked into the output folder
            message = f"{case.image}: its prediction would overwrite an input image in {out_dir}"
            _fail(summary, {"case": case.case_id, "run": run}, message)
        elif case.complete and not settings.overwrite:
            summary.done_before.append(case.case_id)
        else:
            todo.append(case)
    start = time.perf_counter()
    with _Pipeline(settings.read_ahead) as pipeline, _progress(len(todo), progress) as bar:
        for case, read in pipeline.cases(todo):
            row = {"case": case.case_id, "run": run, "status": "ok", "message": ""}
            _predict_case(predictor, case, read, pipeline, row, summary)
            bar.update(1)
            bar.set_postfix(failed=len(summary.failed), refresh=False)
        pipeline.finish()  # the last case's outputs are written before the CSVs say it is done
    summary.seconds = time.perf_counter() - start
    passes = tuple(f"{step}_passes" for step in predictor.steps.stages)
    _append_rows(summary.timing_file, summary.rows, (*predictor.steps.all, *passes))
    if settings.statistics:  # every case of the shard with statistics, those of earlier runs included
        from flareseg.inference.statistics import write_statistics_csv

        per_case = {
            case.case_id: json.loads(case.paths["statistics"].read_text())
            for case in shard
            if case.paths["statistics"].is_file()
        }
        write_statistics_csv(out_dir / _shard_name(STATISTICS_FILE, part, parts), per_case)
    return summary


def _predict_case(predictor, case, read, pipeline, row, summary) -> None:
    """One case: its read (done ahead), the networks, and its outputs handed to the writer."""
    reset_peak_memory(torch.device("cpu"))
    if predictor.device.type == "cuda":
        reset_peak_memory(predictor.device)
    started = time.perf_counter()
    try:
        case.check_input()
        image, geometry, read_seconds = read.result()
        timings = CaseTimings(steps={"read": read_seconds})
        label = predictor.predict_array(image, geometry, timings)

        def write() -> None:
            case.write(label, image, geometry, predictor.labels)

        pipeline.write(case, write, row, summary)
        row.update({step: round(timings.steps.get(step, 0.0), 4) for step in predictor.steps.all if step != "write"})
        row.update({f"{step}_passes": timings.passes.get(step, 0) for step in predictor.steps.stages})
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:  # noqa: BLE001 - one bad case is reported, the others are still predicted
        _fail(summary, row, _message(case, error))
    row["seconds"] = round(time.perf_counter() - started, 4)
    row["peak_rss_mb"] = round(peak_rss_mb(), 1)
    row["peak_gpu_mb"] = round(peak_cuda_mb(predictor.device), 1) if predictor.device.type == "cuda" else ""
    if row["status"] != "failed":
        summary.rows.append(row)


class _Pipeline:
    """Reads one case ahead and writes one case behind, each in its own thread (or in line without read_ahead)."""

    def __init__(self, overlap: bool):
        self.overlap = overlap
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="flareseg-io") if overlap else None
        self.pending: tuple[Future, CaseOutputs, dict, PredictSummary] | None = None

    def __enter__(self) -> _Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def cases(self, cases: list[CaseOutputs]):
        """(case, a future of its (image, geometry, read seconds)): with overlap the next case's read has already
        started; without, the case is read now (one image in memory)."""
        if not self.overlap:
            for case in cases:
                yield case, self._read(case)
            return
        ahead = self._read(cases[0]) if cases else None
        for k, case in enumerate(cases):
            current, ahead = ahead, (self._read(cases[k + 1]) if k + 1 < len(cases) else None)
            yield case, current

    def write(self, case: CaseOutputs, write, row: dict, summary: PredictSummary) -> None:
        """Hand a case's outputs to the writer, after the previous case's write has finished (one behind)."""
        self.finish()
        future = self._run(_timed, write)
        self.pending = (future, case, row, summary)
        if not self.overlap:
            self.finish()

    def finish(self) -> None:
        """Wait for the pending write; a failed write fails its case (its partial files were never renamed)."""
        if self.pending is None:
            return
        future, case, row, summary = self.pending
        self.pending = None
        try:
            row["write"] = round(future.result(), 4)
            summary.predicted.append(case.case_id)
        except Exception as error:  # noqa: BLE001 - that case fails alone
            _fail(summary, row, _message(case, error))

    def _read(self, case: CaseOutputs) -> Future:
        return self._run(_timed_read, case.image)

    def _run(self, function, *args) -> Future:
        if self.pool is not None:
            return self.pool.submit(function, *args)
        future: Future = Future()
        try:
            future.set_result(function(*args))
        except Exception as error:  # noqa: BLE001 - raised where the result is asked for
            future.set_exception(error)
        return future


def _timed_read(image: Path):
    start = time.perf_counter()
    array, geometry = read_image(image)
    return array, geometry, time.perf_counter() - start


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _check_settings(out_dir: Path, config: Config) -> dict:
    """The settings this run's predictions are made with; a ConfigError when the folder holds predictions made with
    others (unless predict.overwrite)."""
    settings = _fingerprint(config)
    path = out_dir / SETTINGS_FILE
    if len(settings["checkpoint files"]) < len(checkpoint_files(config.predict)):  # a missing one: the predictor's
        return settings
    if path.is_file() and not config.predict.overwrite:
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = None
        if stored != settings:
            changed = sorted(key for key in settings if (stored or {}).get(key) != settings[key])
            raise ConfigError(
                f"{out_dir} holds predictions made with other settings ({', '.join(changed) or 'unreadable'} "
                f"differ, see {SETTINGS_FILE}): use --overwrite to predict every case again, or another -o folder"
            )
    return settings


def _fingerprint(config: Config) -> dict:
    """The predict settings that change outputs, and each checkpoint file's size and modification time."""
    predict = {key: value for key, value in to_plain(config.predict).items() if key not in RUNTIME_KEYS}
    files = []
    for path in checkpoint_files(config.predict):  # every ensemble member; a missing one is the predictor's to report
        if path is not None and Path(path).is_file():
            info = Path(path).stat()
            files.append([str(Path(path).resolve()), info.st_size, info.st_mtime_ns])
    settings = {**{f"predict.{key}": value for key, value in predict.items()}, "checkpoint files": files}
    return json.loads(json.dumps(settings))  # as the file stores it (JSON: mapping keys become strings)


def _share(items: list, part: int, parts: int, key) -> list:
    """Shard `part` of `parts`: every parts-th item of the list sorted by case id (`key`), from position `part`."""
    return sorted(items, key=key)[part::parts]


def _shard_name(name: str, part: int, parts: int) -> str:
    if parts == 1:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}_part{part}of{parts}.{suffix}"


def _progress(total: int, enabled: bool) -> tqdm:
    return tqdm(total=total, desc="predict", unit="case", disable=not enabled, dynamic_ncols=True)


def _message(case: CaseOutputs, error: Exception) -> str:
    text = str(error)
    return text if text.startswith(str(case.image)) else f"{case.image}: {type(error).__name__}: {text}"


def _fail(summary: PredictSummary, row: dict, message: str) -> None:
    """Record a failed case: in the summary, in its timing.csv row, and on one line of stderr."""
    summary.failed.append((row["case"], message))
    row.update(status="failed", message=message)
    if not any(other is row for other in summary.rows):
        summary.rows.append(row)
    tqdm.write(f"failed: {message}", file=sys.stderr)


def _append_rows(path: Path, rows: list[dict], steps: tuple[str, ...]) -> None:
    """timing.csv: the earlier runs' rows, then this run's (sorted by case), each step's seconds in its column."""
    columns = ["run", "case", "status", "seconds", *steps, "peak_rss_mb", "peak_gpu_mb", "message"]
    earlier = []
    if path.is_file():
        with open(path, newline="") as handle:
            earlier = list(csv.DictReader(handle))
        for row in earlier:
            columns += [key for key in row if key not in columns]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(earlier)
        writer.writerows(sorted(rows, key=lambda row: row["case"]))
