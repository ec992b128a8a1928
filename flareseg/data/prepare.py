"""Prepare a dataset: every case through `prepare_case` in a process pool, recorded in one LMDB index.

Rerunning skips the cases the index already holds (unless their input files changed); a killed run resumes
where it stopped, because a case's record is written only after its arrays. A bad case is reported by name
with its reason, listed in failures.csv, and skipped; the others are prepared.
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import sys
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk
import torch
from tqdm import tqdm

from flareseg import __version__
from flareseg.atomic import atomic_path
from flareseg.config import Config, ConfigError, save_config, to_plain
from flareseg.data.cases import CaseFiles, default_annotated_file, find_cases, read_annotated_file
from flareseg.data.index import IndexWriter
from flareseg.data.prepare_case import CaseError, prepare_case
from flareseg.data.splits import kfold_splits
from flareseg.io import ImageReadError

INDEX_DIR = "index.lmdb"
FAILURES_FILE = "failures.csv"
META_KEY = "__meta__"
SPLITS_KEY = "__splits__"
INDEX_FORMAT = 2
POOL_START_METHOD = "forkserver"  # workers start clean, with no threads or handles inherited from the caller

log = logging.getLogger(__name__)
_WORKER_DEATH_HINT = (
    'out of memory? From a Python script, call prepare_dataset under `if __name__ == "__main__":`, '
    "because the workers re-import the script"
)


@dataclass
class PrepareSummary:
    """What a prepare run did."""

    out_dir: Path
    prepared: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already in the index
    failed: list[tuple[str, str]] = field(default_factory=list)  # (case id, "file: reason")
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # summed seconds per step over prepared cases

    @property
    def ok(self) -> bool:
        return not self.failed


def prepare_dataset(config: Config, progress: bool = True) -> PrepareSummary:
    """Prepare every case named by `config.prepare` (images, labels, unlabeled -> out)."""
    settings = config.prepare
    if settings.out is None:
        raise ConfigError("'prepare.out' is not set: give -o/--out DIR or set it in the config")
    if settings.images is None and settings.unlabeled is None:
        raise ConfigError("nothing to prepare: give -i/--images (and -l/--labels) or -u/--unlabeled")
    start = time.perf_counter()
    out_dir = Path(settings.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir)
    summary = PrepareSummary(out_dir)

    cases, problems = find_cases(settings.images, settings.labels, settings.unlabeled)
    summary.failed += problems
    annotated_file = settings.annotated_file or default_annotated_file(settings.labels)
    annotated = {} if annotated_file is None else read_annotated_file(annotated_file, len(config.data.labels))

    with IndexWriter(out_dir / INDEX_DIR) as index:
        _claim_index(index, config)
        todo = []
        for case in cases:
            if _is_prepared(index.get(case.case_id), case, out_dir, annotated.get(case.case_id)):
                summary.skipped.append(case.case_id)
            else:
                todo.append(case)
        for _, problem in problems:
            _report(problem)
        bar = tqdm(total=len(todo), desc="prepare", unit="case", disable=not progress, dynamic_ncols=True)
        for case, outcome in _run_all(todo, config, out_dir, annotated, settings.workers):
            bar.update(1)
            if isinstance(outcome, str):
                summary.failed.append((case.case_id, outcome))
                _report(outcome)
                index.delete(case.case_id)
                continue
            record, timings = outcome
            record["source_stat"] = _source_stat(case)
            index.put(case.case_id, record)
            summary.prepared.append(case.case_id)
            for step, seconds in timings.items():
                summary.timings[step] = summary.timings.get(step, 0.0) + seconds
        bar.close()
        _write_splits(index, settings.folds, settings.split_seed)

    _write_failures(out_dir / FAILURES_FILE, summary.failed)
    summary.seconds = time.perf_counter() - start
    return summary


def _run_all(todo: list[CaseFiles], config: Config, out_dir: Path, annotated: dict, workers: int):
    """Yield (case, (record, timings)) or (case, "file: reason") as cases finish."""
    if workers == 1 or len(todo) <= 1:
        for case in todo:
            yield case, _prepare_one(case, config, out_dir, annotated.get(case.case_id))
        return
    pending = deque(todo)
    while pending:
        lost = yield from _run_pool(pending, workers, config, out_dir, annotated)
        # A worker killed from outside (out of memory, a crash in a library) breaks the whole pool, and which of
        # the cases in flight killed it is unknown: each is retried alone, so only the culprit is lost.
        for case in lost:
            for dead in (yield from _run_pool(deque([case]), 1, config, out_dir, annotated)):
                yield dead, f"{dead.image}: the worker process died while preparing it ({_WORKER_DEATH_HINT})"


def _run_pool(pending: deque, workers: int, config: Config, out_dir: Path, annotated: dict):
    """Run cases from `pending` in a process pool, yielding outcomes; returns the cases lost if the pool broke."""
    context = multiprocessing.get_context(POOL_START_METHOD)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
        running: dict[Future, CaseFiles] = {}
        try:
            while pending or running:
                while pending and len(running) < 2 * workers:
                    case = pending[0]
                    future = pool.submit(_prepare_one, case, config, out_dir, annotated.get(case.case_id))
                    running[future] = pending.popleft()
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    outcome = future.result()  # raises BrokenProcessPool when a worker died
                    yield running.pop(future), outcome
        except BrokenProcessPool:
            return list(running.values())
    return []


def _prepare_one(case: CaseFiles, config: Config, out_dir: Path, annotated: list[int] | None):
    """Run one case; errors become a one-line "file: reason" string so one bad case never stops the batch."""
    try:
        prepared = prepare_case(case, config, out_dir, annotated)
        return prepared.record, prepared.timings
    except (ImageReadError, CaseError) as error:  # these already name the file
        return str(error)
    except Exception as error:  # noqa: BLE001 - any failure of one case is reported, the batch goes on
        return f"{case.image}: {type(error).__name__}: {error}"


def _init_worker() -> None:
    # One thread per worker process: the pool is the parallelism.
    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _claim_index(index: IndexWriter, config: Config) -> None:
    """Refuse to mix settings in one index; an overwriting run starts it afresh."""
    settings = _settings_fingerprint(config)
    meta = index.get(META_KEY)
    if config.prepare.overwrite:
        index.clear()
    elif meta is not None and meta.get("settings") != settings:
        changed = [key for key in settings if meta.get("settings", {}).get(key) != settings[key]]
        raise ConfigError(
            f"{index.path} was prepared with other settings ({', '.join(changed)} differ); "
            "use a new --out folder or --set prepare.overwrite=true"
        )
    index.put(META_KEY, {"format": INDEX_FORMAT, "flareseg": __version__, "settings": settings})


def _settings_fingerprint(config: Config) -> dict:
    prepare = to_plain(config.prepare)
    keys = ("coarse", "fine", "label_resampling", "annotation", "foreground_samples", "label_map", "source_margin_mm")
    settings = {"data.labels": list(config.data.labels), **{f"prepare.{key}": prepare[key] for key in keys}}
    return json.loads(json.dumps(settings))  # as the index stores it (JSON: label_map keys become strings)


def _is_prepared(record: dict | None, case: CaseFiles, out_dir: Path, annotated: list[int] | None) -> bool:
    """Whether the index already holds this case from the same inputs, with all its arrays."""
    if record is None or record.get("source_stat") != _source_stat(case):
        return False
    if annotated is not None and record["annotated"] != sorted(set(annotated)):
        return False
    return all((out_dir / path).is_file() for path in record["arrays"].values())


def _source_stat(case: CaseFiles) -> list:
    """Size and modification time of the inputs: a changed input file is prepared again."""
    stats = []
    for path in (case.image, case.label):
        if path is not None:
            info = path.stat()
            stats.append([str(path), info.st_size, info.st_mtime_ns])
    return stats


def _write_splits(index: IndexWriter, folds: int, seed: int) -> None:
    labeled = [case_id for case_id in index.case_ids() if index.get(case_id)["labeled"]]
    if not labeled:
        index.delete(SPLITS_KEY)
        return
    if len(labeled) < folds:
        log.warning("only %d labeled cases: using a %d-fold split instead of %d", len(labeled), len(labeled), folds)
        folds = len(labeled)
    index.put(SPLITS_KEY, {"folds": folds, "seed": seed, "splits": kfold_splits(labeled, folds, seed)})


def _write_failures(path: Path, failed: list[tuple[str, str]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "reason"])
        writer.writerows(failed)


def _report(message: str) -> None:
    tqdm.write(f"skipped: {message}", file=sys.stderr)
