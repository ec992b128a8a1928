"""Prepare a dataset: every case through `prepare_case` in a process pool, recorded in one LMDB index.

One prepare at a time writes a prepared folder: a second is refused at once, naming the first. A rerun reconciles
the folder with its inputs: it skips the cases the index already holds from the same input files, prepares changed
ones again, and deletes the records and arrays of cases that are no longer among the inputs or now fail; the fold
splits are then recomputed. A killed run resumes where it stopped, because a case's record is written only after its
arrays, and the next run removes the temporaries it left. A bad case is reported by name with its reason, listed in
failures.csv, and skipped; the others are prepared.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from flareseg import __version__
from flareseg.atomic import atomic_path, remove_stale_temporaries
from flareseg.config import Config, ConfigError, save_config, to_plain
from flareseg.data.cases import CaseFiles, default_annotated_file, discover_cases, find_cases, read_annotated_file
from flareseg.data.index import INDEX_DIR, META_SETTINGS, META_SPLITS, META_VERSION, IndexWriter, close_reader
from flareseg.data.layouts import LABELS_DIR, check_label_names, read_dataset
from flareseg.data.prepare_case import ARRAY_DIR, CaseError, prepare_case
from flareseg.data.prepare_worker import init_worker
from flareseg.data.prepared import labeled_case_ids
from flareseg.data.splits import kfold_splits
from flareseg.io import ImageReadError
from flareseg.locks import FolderLock
from flareseg.workers import worker_context

FAILURES_FILE = "failures.csv"

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
    skipped: list[str] = field(default_factory=list)  # already in the index, from the same input files
    removed: list[str] = field(default_factory=list)  # no longer among the inputs: records and arrays deleted
    failed: list[tuple[str, str]] = field(default_factory=list)  # (case id, "file: reason"); no record is kept
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # summed seconds per step over prepared cases

    @property
    def ok(self) -> bool:
        return not self.failed


def prepare_dataset(config: Config, progress: bool = True) -> PrepareSummary:
    """Prepare every case named by `config.prepare` (dataset, or images and labels; unlabeled -> out).

    Raises FolderBusyError when another process is preparing the same folder, IndexFormatError for an index of
    another format (prepare it again with prepare.overwrite), ConfigError for other settings than the folder's or
    for a prepare.dataset whose dataset.json names other labels than data.labels.
    """
    settings = config.prepare
    if settings.out is None:
        raise ConfigError("'prepare.out' is not set: give -o/--out DIR or set it in the config")
    if settings.dataset is None and settings.images is None and settings.unlabeled is None:
        raise ConfigError(
            "nothing to prepare: set prepare.dataset, or give -i/--images (and -l/--labels) or -u/--unlabeled"
        )
    settings.check_inputs()
    start = time.perf_counter()
    out_dir = Path(settings.out)
    summary = PrepareSummary(out_dir)
    cases, problems, labels_dir = _find_inputs(config)
    summary.failed += problems
    annotated_file = settings.annotated_file or default_annotated_file(labels_dir)
    annotated = {} if annotated_file is None else read_annotated_file(annotated_file, len(config.data.labels))

    # The lock comes before any write into the folder: two runs at once would mix arrays of different runs.
    with FolderLock(out_dir, "prepare"):
        for folder in (out_dir, out_dir / ARRAY_DIR):
            for path in remove_stale_temporaries(folder):
                log.info("removed %s, left by a killed run", path)
        if settings.overwrite:
            _clear(out_dir)
        with IndexWriter(out_dir / INDEX_DIR) as index:
            _claim_index(index, config)
            save_config(config, out_dir)
            for _, problem in problems:
                _report(problem)
            summary.removed = _remove_cases_not_among(cases, problems, index, out_dir)
            todo = []
            for case in cases:
                if _is_prepared(index.get(case.case_id), case, out_dir, annotated.get(case.case_id)):
                    summary.skipped.append(case.case_id)
                else:
                    todo.append(case)
            _prepare_cases(todo, config, annotated, index, summary, progress)
            _remove_unreferenced_arrays(index, out_dir)
            _write_splits(index, settings.folds, settings.split_seed)
        _write_failures(out_dir / FAILURES_FILE, summary.failed)
    summary.seconds = time.perf_counter() - start
    return summary


def _find_inputs(config: Config) -> tuple[list[CaseFiles], list[tuple[str, str]], Path | None]:
    """The cases to prepare, the inputs that make none, and the labels folder: from prepare.dataset (its labels
    checked against data.labels) or prepare.images and prepare.labels, with prepare.unlabeled beside either."""
    settings = config.prepare
    if settings.dataset is None:
        cases, problems = find_cases(settings.images, settings.labels, settings.unlabeled)
        return cases, problems, settings.labels
    layout = read_dataset(settings.dataset)
    check_label_names(layout, config.data.labels, config.prepare.label_map)
    cases, problems = list(layout.discovery.cases), layout.discovery.problems
    if settings.unlabeled is not None:
        labeled = {case.case_id for case in cases}
        unlabeled = discover_cases(None, None, settings.unlabeled)
        problems += unlabeled.problems
        for case in unlabeled.cases:
            if case.case_id in labeled:
                problems.append((case.case_id, f"{case.image}: case id '{case.case_id}' is also a labeled case"))
            else:
                cases.append(case)
    return cases, problems, layout.root / LABELS_DIR


def _prepare_cases(
    todo: list[CaseFiles], config: Config, annotated: dict, index: IndexWriter, summary: PrepareSummary, progress: bool
) -> None:
    """Prepare `todo`, recording each case as it finishes (a failed case loses any older record)."""
    bar = tqdm(total=len(todo), desc="prepare", unit="case", disable=not progress, dynamic_ncols=True)
    for case, outcome in _run_all(todo, config, summary.out_dir, annotated, config.prepare.workers):
        bar.update(1)
        if isinstance(outcome, str):
            summary.failed.append((case.case_id, outcome))
            _report(outcome)
            _remove_case(index, summary.out_dir, case.case_id)  # an older record would disagree with the inputs
            continue
        record, timings = outcome
        index.put(case.case_id, record)
        summary.prepared.append(case.case_id)
        for step, seconds in timings.items():
            summary.timings[step] = summary.timings.get(step, 0.0) + seconds
    bar.close()


def _clear(out_dir: Path) -> None:
    """An overwriting run starts from nothing: the index first (no record may point at a deleted array)."""
    close_reader(out_dir / INDEX_DIR)
    shutil.rmtree(out_dir / INDEX_DIR, ignore_errors=True)
    shutil.rmtree(out_dir / ARRAY_DIR, ignore_errors=True)
    (out_dir / FAILURES_FILE).unlink(missing_ok=True)


def _remove_cases_not_among(
    cases: list[CaseFiles], problems: list[tuple[str, str]], index: IndexWriter, out_dir: Path
) -> list[str]:
    """Delete the records and arrays of indexed cases that are not among the inputs; returns the removed ids.

    A case whose inputs are now a problem (a label map gone, say) is deleted too, but counted as failed.
    """
    inputs = {case.case_id for case in cases}
    failing = {case_id for case_id, _ in problems}
    removed = []
    for case_id in index.case_ids():
        if case_id not in inputs and _remove_case(index, out_dir, case_id) and case_id not in failing:
            removed.append(case_id)
    if removed:
        shown = ", ".join(removed[:10]) + (", ..." if len(removed) > 10 else "")
        log.info("removed %d cases that are no longer among the inputs: %s", len(removed), shown)
    return removed


def _remove_case(index: IndexWriter, out_dir: Path, case_id: str) -> bool:
    """Delete a case's record, then its arrays (in this order: a record never points at a missing array)."""
    record = index.get(case_id)
    if record is None:
        return False
    index.delete(case_id)
    for path in record["arrays"].values():
        (out_dir / path).unlink(missing_ok=True)
    return True


def _remove_unreferenced_arrays(index: IndexWriter, out_dir: Path) -> None:
    """Delete the arrays no record points at (a failed or interrupted case's, a removal a kill cut short):
    the arrays folder holds exactly what the index describes."""
    folder = out_dir / ARRAY_DIR
    if not folder.is_dir():
        return
    referenced = {Path(path).name for case_id in index.case_ids() for path in index.get(case_id)["arrays"].values()}
    for path in folder.glob("*.npy"):
        # Hidden names are temporaries: a live writer's must stay (dead writers' went at the start).
        if not path.name.startswith(".") and path.name not in referenced:
            path.unlink(missing_ok=True)


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
    with ProcessPoolExecutor(
        workers, mp_context=worker_context(), initializer=init_worker, initargs=(os.getpid(),)
    ) as pool:
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
        # Taken before the files are read: an input that changes while it is prepared is prepared again next time.
        source_stat = _source_stat(case)
        prepared = prepare_case(case, config, out_dir, annotated)
        prepared.record["source_stat"] = source_stat
        return prepared.record, prepared.timings
    except (ImageReadError, CaseError) as error:  # these already name the file
        return str(error)
    except Exception as error:  # noqa: BLE001 - any failure of one case is reported, the batch goes on
        return f"{case.image}: {type(error).__name__}: {error}"


def _claim_index(index: IndexWriter, config: Config) -> None:
    """Refuse to mix settings in one index (an overwriting run has cleared the folder before)."""
    settings = _settings_fingerprint(config)
    stored = index.meta(META_SETTINGS)
    if stored is not None and stored != settings:
        changed = [key for key in settings if stored.get(key) != settings[key]]
        raise ConfigError(
            f"{index.path} was prepared with other settings ({', '.join(changed)} differ); "
            "use a new --out folder or --set prepare.overwrite=true"
        )
    index.put_meta(META_VERSION, __version__)
    index.put_meta(META_SETTINGS, settings)


def _settings_fingerprint(config: Config) -> dict:
    prepare = to_plain(config.prepare)
    keys = ("grids", "label_resampling", "annotation", "foreground_samples", "label_map", "source_margin_mm")
    settings = {"data.labels": list(config.data.labels), **{f"prepare.{key}": prepare[key] for key in keys}}
    return json.loads(json.dumps(settings))  # as the index stores it (JSON: label_map keys become strings)


def _is_prepared(record: dict | None, case: CaseFiles, out_dir: Path, annotated: list[int] | None) -> bool:
    """Whether the index already holds this case from the same inputs, with all its arrays."""
    if record is None:
        return False
    try:
        if record.get("source_stat") != _source_stat(case):
            return False
    except CaseError:  # an input gone (a dangling link, say): prepared again, where it fails on its own line
        return False
    if annotated is not None and record["annotated"] != sorted(set(annotated)):
        return False
    return all((out_dir / path).is_file() for path in record["arrays"].values())


def _source_stat(case: CaseFiles) -> list:
    """Size and modification time of the inputs: a changed input file is prepared again."""
    stats = []
    for path in (case.image, case.label):
        if path is None:
            continue
        try:
            info = path.stat()
        except OSError as error:
            hint = "; a link to a missing file" if path.is_symlink() else ""
            raise CaseError(f"{path}: cannot be read ({error.strerror or error}{hint})") from None
        stats.append([str(path), info.st_size, info.st_mtime_ns])
    return stats


def _write_splits(index: IndexWriter, folds: int, seed: int) -> None:
    """The k-fold split of the labeled cases the index holds now (recomputed by every run)."""
    labeled = labeled_case_ids(index)
    if not labeled:
        index.delete_meta(META_SPLITS)
        return
    if len(labeled) < folds:
        log.warning("only %d labeled cases: using a %d-fold split instead of %d", len(labeled), len(labeled), folds)
        folds = len(labeled)
    index.put_meta(META_SPLITS, {"folds": folds, "seed": seed, "splits": kfold_splits(labeled, folds, seed)})


def _write_failures(path: Path, failed: list[tuple[str, str]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "reason"])
        writer.writerows(failed)


def _report(message: str) -> None:
    tqdm.write(f"skipped: {message}", file=sys.stderr)
