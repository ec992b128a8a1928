"""Faults of the prepared folder: it must never disagree with its inputs, and never lose or mix work.

One writer at a time; reruns reconcile the index with the inputs (removed and failing cases leave it with their
arrays); case ids never collide with the index's metadata; an older index format is refused with what to do; a
killed prepare leaves no worker running and no temporary behind; a dangling link fails its own case only.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest

from flareseg.cli import main
from flareseg.config import load_config
from flareseg.data.index import (
    INDEX_DIR,
    INDEX_FORMAT,
    META_FORMAT,
    META_SETTINGS,
    META_SPLITS,
    CaseIndex,
    IndexFormatError,
)
from flareseg.data.phantom import write_phantom_dataset
from flareseg.data.prepare import prepare_dataset
from flareseg.data.prepared import PreparedArrays, PreparedData
from flareseg.io import read_image, write_image

SMALL = ["prepare.grids.coarse.size=[16, 16, 16]", "prepare.grids.fine.size=[16, 20, 20]", "prepare.folds=2"]
CASES = [f"phantom_{i:03d}" for i in range(4)]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("raw")
    write_phantom_dataset(raw, 4, seed=11, shape=(20, 36, 40), orientation="identity")
    return raw


def _config(raw: Path, out: Path, *extra: str, workers: int = 1):
    overrides = [f"prepare.images={raw / 'imagesTr'}", f"prepare.labels={raw / 'labelsTr'}", f"prepare.out={out}"]
    return load_config(None, [*overrides, f"prepare.workers={workers}", *SMALL, *extra])


def _cli_args(raw: Path, out: Path, *extra: str, workers: int = 1) -> list[str]:
    args = ["prepare", "-i", str(raw / "imagesTr"), "-l", str(raw / "labelsTr"), "-o", str(out), "-w", str(workers)]
    return [*args, "-q", *[arg for setting in SMALL for arg in ("--set", setting)], *extra]


def _copy(raw: Path, to: Path) -> Path:
    shutil.copytree(raw, to)
    return to


def _arrays_of(out: Path, case_id: str) -> list[Path]:
    return sorted((out / "arrays").glob(f"{case_id}_*.npy"))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- fault 4: one writer at a time; fault 9: temporaries of killed writers ------------------------------------------

HOLDER_SCRIPT = """
import sys, time
import flareseg.data.prepare as prepare
from flareseg.atomic import temporary_path
from flareseg.cli import main
original = prepare._prepare_one
def stall_in_second_case(case, config, out_dir, annotated):
    if case.case_id == "phantom_001":  # half-way through writing an array, then stopped there
        temporary_path(out_dir / "arrays" / "phantom_001_coarse_image.npy").write_bytes(b"partial")
        time.sleep(120)
    return original(case, config, out_dir, annotated)
prepare._prepare_one = stall_in_second_case
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_prepare_is_refused_and_a_killed_ones_temporaries_are_removed(raw, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, *_cli_args(raw, out)], stderr=subprocess.PIPE)
    live_writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 60
        while not list((out / "arrays").glob(".phantom_001_*.tmp-*")) and time.monotonic() < deadline:
            assert holder.poll() is None, holder.stderr.read().decode()
            time.sleep(0.05)
        leftover = next((out / "arrays").glob(".phantom_001_*.tmp-*"))

        # A concurrent overwriting run would delete or rewrite the holder's arrays: refused at once, one line.
        capsys.readouterr()
        assert main(_cli_args(raw, out, "--overwrite")) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and f"process {holder.pid}" in err[0] and "in use" in err[0], err
        assert CaseIndex(out / INDEX_DIR).case_ids() == ["phantom_000"] and leftover.exists()
        assert all(path.is_file() for path in _arrays_of(out, "phantom_000"))

        holder.send_signal(signal.SIGKILL)
        holder.wait()
        live = [
            out / "arrays" / f".phantom_009_fine_image.npy.tmp-{live_writer.pid}-0123abcd.npy",
            out / f".failures.csv.tmp-{live_writer.pid}-89abcdef.csv",
        ]
        dead_csv = out / f".failures.csv.tmp-{_dead_pid()}-01234567.csv"
        for path in (*live, dead_csv):
            path.write_bytes(b"partial")

        # The kernel released the killed holder's lock: the rerun goes ahead and cleans up after it.
        summary = prepare_dataset(_config(raw, out), progress=False)
        assert summary.ok and summary.skipped == ["phantom_000"] and summary.prepared == CASES[1:]
        assert not leftover.exists() and not dead_csv.exists()
        assert all(path.exists() for path in live)  # a live writer's temporary is not ours to remove
        assert CaseIndex(out / INDEX_DIR).case_ids() == CASES
    finally:
        for process in (holder, live_writer):
            process.kill()
            process.wait()


# --- fault 4: reruns reconcile the index with the inputs -------------------------------------------------------------


def test_a_rerun_removes_cases_that_left_the_inputs_and_recomputes_the_splits(raw, tmp_path, capsys):
    inputs, out = _copy(raw, tmp_path / "raw"), tmp_path / "out"
    assert prepare_dataset(_config(inputs, out), progress=False).ok
    assert _arrays_of(out, "phantom_003")
    (inputs / "imagesTr" / "phantom_003_0000.nii.gz").unlink()
    (inputs / "labelsTr" / "phantom_003.nii.gz").unlink()

    capsys.readouterr()
    assert main(_cli_args(inputs, out)) == 0
    assert "already done 3, removed 1, failed 0" in capsys.readouterr().out
    index = CaseIndex(out / INDEX_DIR)
    assert index.case_ids() == CASES[:3] and _arrays_of(out, "phantom_003") == []
    splits = index.meta(META_SPLITS)["splits"]
    assert all(set(split["train"]) | set(split["val"]) == set(CASES[:3]) for split in splits)
    summary = prepare_dataset(_config(inputs, out), progress=False)  # removed once, not again
    assert summary.removed == [] and summary.skipped == CASES[:3]


def test_a_case_that_now_fails_loses_its_old_record_and_arrays(raw, tmp_path):
    inputs, out = _copy(raw, tmp_path / "raw"), tmp_path / "out"
    assert prepare_dataset(_config(inputs, out), progress=False).ok
    label_file = inputs / "labelsTr" / "phantom_001.nii.gz"
    label, geometry = read_image(label_file)
    write_image(label_file, np.where(label > 0, 20, 0).astype(np.uint8), geometry)  # ids outside data.labels
    summary = prepare_dataset(_config(inputs, out), progress=False)
    assert [case_id for case_id, _ in summary.failed] == ["phantom_001"] and summary.removed == []
    # The old record described inputs that no longer exist: training must not use it.
    index = CaseIndex(out / INDEX_DIR)
    assert "phantom_001" not in index and _arrays_of(out, "phantom_001") == []
    splits = index.meta(META_SPLITS)["splits"]
    assert all("phantom_001" not in split["train"] + split["val"] for split in splits)


def test_overwrite_removes_the_old_arrays_too(raw, tmp_path):
    inputs, out = _copy(raw, tmp_path / "raw"), tmp_path / "out"
    assert prepare_dataset(_config(inputs, out), progress=False).ok
    (inputs / "imagesTr" / "phantom_003_0000.nii.gz").unlink()
    (inputs / "labelsTr" / "phantom_003.nii.gz").unlink()
    coarse = "prepare.grids.coarse.size=[12, 12, 12]"
    summary = prepare_dataset(_config(inputs, out, coarse, "prepare.overwrite=true"), progress=False)
    assert summary.ok and summary.prepared == CASES[:3]
    arrays = sorted(path.name for path in (out / "arrays").iterdir())
    assert arrays and all(name.startswith(tuple(CASES[:3])) for name in arrays)
    assert all(np.load(path).shape == (12, 12, 12) for path in (out / "arrays").glob("*_coarse_*.npy"))


# --- fault 5: case ids and metadata in separate key spaces; older formats refused ------------------------------------


def test_cases_named_like_metadata_keys_are_cases(raw, tmp_path):
    inputs = tmp_path / "raw"
    (inputs / "imagesTr").mkdir(parents=True)
    (inputs / "labelsTr").mkdir()
    for source, case_id in zip(CASES, ["__meta__", "__splits__", "__x", "phantom_003"]):
        shutil.copy(raw / "imagesTr" / f"{source}_0000.nii.gz", inputs / "imagesTr" / f"{case_id}_0000.nii.gz")
        shutil.copy(raw / "labelsTr" / f"{source}.nii.gz", inputs / "labelsTr" / f"{case_id}.nii.gz")
    ids = ["__meta__", "__splits__", "__x", "phantom_003"]
    out = tmp_path / "out"
    summary = prepare_dataset(_config(inputs, out), progress=False)
    assert summary.ok and sorted(summary.prepared) == ids
    index = CaseIndex(out / INDEX_DIR)
    assert index.case_ids() == ids and index.get("__meta__")["case_id"] == "__meta__"
    assert index.meta(META_SETTINGS)["prepare.grids"]["coarse"]["size"] == [16, 16, 16]
    assert index.meta(META_FORMAT) == INDEX_FORMAT
    splits = index.meta(META_SPLITS)["splits"]
    assert sorted(splits[0]["train"] + splits[0]["val"]) == ids
    assert len(PreparedArrays(PreparedData(out), "coarse")) == 4
    rerun = prepare_dataset(_config(inputs, out), progress=False)  # the settings record survived the cases
    assert rerun.ok and sorted(rerun.skipped) == ids


def _old_format_index(path: Path) -> None:
    """An index as flareseg wrote it before format 3: cases and "__meta__"/"__splits__" in one key space."""
    path.mkdir(parents=True)
    env = lmdb.open(str(path), subdir=True)
    with env.begin(write=True) as txn:
        txn.put(b"__meta__", b'{"format":2,"flareseg":"0.1","settings":{}}')
        txn.put(b"__splits__", b'{"folds":1,"seed":0,"splits":[{"train":["a"],"val":[]}]}')
        txn.put(b"a", b'{"case_id":"a","labeled":true,"arrays":{}}')
    env.close()


def test_an_index_of_the_older_format_is_refused_with_what_to_do(raw, tmp_path, capsys):
    out = tmp_path / "out"
    _old_format_index(out / INDEX_DIR)
    # Training opens it through CaseIndex (the trainer, its datasets): a clear error at the first read.
    with pytest.raises(IndexFormatError, match="index format 2.*--overwrite"):
        CaseIndex(out / INDEX_DIR).meta(META_SETTINGS)
    with pytest.raises(IndexFormatError, match="--overwrite"):
        PreparedArrays(PreparedData(out), "fine")
    capsys.readouterr()
    assert main(_cli_args(raw, out)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "index format 2" in err[0] and "--overwrite" in err[0], err
    assert main(_cli_args(raw, out, "--overwrite")) == 0
    index = CaseIndex(out / INDEX_DIR)
    assert index.case_ids() == CASES and index.meta(META_FORMAT) == INDEX_FORMAT


def test_metadata_names_are_checked(raw, tmp_path):
    out = tmp_path / "out"
    assert prepare_dataset(_config(raw, out), progress=False).ok
    with pytest.raises(KeyError, match="not an index metadata name"):
        CaseIndex(out / INDEX_DIR).meta("__splits__")


# --- fault 7: workers die with a killed prepare ----------------------------------------------------------------------


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (from /proc)."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            table[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return table


def _descendants(pid: int) -> list[int]:
    parents = _parents()
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _running(pid: int) -> bool:
    """Exists and is not a zombie (a zombie has exited; it only waits for its parent to read its status)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_workers_die_when_prepare_is_killed(raw, tmp_path):
    command = [sys.executable, "-m", "flareseg", *_cli_args(raw, tmp_path / "out", workers=2)]
    prepare = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    family: list[int] = []
    workers: list[int] = []
    try:
        # The pool's workers are grandchildren: children of the fork server, which is a child of prepare.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and prepare.poll() is None:
            family = _descendants(prepare.pid)
            workers = [pid for pid in family if pid not in _children(prepare.pid)]
            if len(workers) >= 2:
                break
            time.sleep(0.02)
        assert prepare.poll() is None and len(workers) >= 2, "prepare ended before its workers were seen"
        prepare.send_signal(signal.SIGKILL)
        prepare.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_running(pid) for pid in family):
            time.sleep(0.05)
        assert [pid for pid in family if _running(pid)] == []
    finally:
        prepare.kill()
        prepare.wait()
        for pid in family:  # without the fix they would live on: do not leave them behind
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    return [child for child, parent in _parents().items() if parent == pid]


# --- fault 8: a dangling link among the inputs on a rerun -----------------------------------------------------------


def test_a_dangling_link_on_a_rerun_fails_its_case_alone(raw, tmp_path, capsys):
    inputs, out = tmp_path / "raw", tmp_path / "out"
    for folder in ("imagesTr", "labelsTr"):
        (inputs / folder).mkdir(parents=True)
        for path in (raw / folder).iterdir():
            (inputs / folder / path.name).symlink_to(path)
    assert prepare_dataset(_config(inputs, out), progress=False).ok
    moved = tmp_path / "moved.nii.gz"
    shutil.copy(raw / "imagesTr" / "phantom_002_0000.nii.gz", moved)
    link = inputs / "imagesTr" / "phantom_002_0000.nii.gz"
    link.unlink()
    link.symlink_to(moved)
    moved.unlink()  # the link now points at nothing
    capsys.readouterr()
    summary = prepare_dataset(_config(inputs, out), progress=False)
    assert [case_id for case_id, _ in summary.failed] == ["phantom_002"]
    assert sorted(summary.skipped) == ["phantom_000", "phantom_001", "phantom_003"]
    lines = [line for line in capsys.readouterr().err.splitlines() if "phantom_002" in line]
    assert len(lines) == 1 and str(link) in lines[0], lines
    assert "phantom_002" not in CaseIndex(out / INDEX_DIR) and _arrays_of(out, "phantom_002") == []
