"""Faults of the shared file machinery: atomic writes, the temporaries of killed writers, folder locks, and child
processes that must die with their parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flareseg.atomic import atomic_path, atomic_write_text, is_temporary, remove_stale_temporaries, temporary_path
from flareseg.locks import FolderBusyError, FolderLock


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    target = atomic_write_text(tmp_path / "scores.csv", "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv"]  # no temporary left


def test_temporary_keeps_the_format_suffix_that_libraries_choose_by(tmp_path):
    assert temporary_path(tmp_path / "case.nii.gz").name.endswith(".nii.gz")
    assert temporary_path(tmp_path / "curve.png").name.endswith(".png")
    assert is_temporary(temporary_path(tmp_path / "checkpoint_latest.pt"))
    assert not is_temporary(tmp_path / "checkpoint_latest.pt")


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = tmp_path / f".checkpoint_latest.pt.tmp-{_dead_pid()}-0123abcd.pt"
    live_writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = tmp_path / f".case.nii.gz.tmp-{live_writer.pid}-89abcdef.nii.gz"
        mine = temporary_path(tmp_path / "mine.npy")
        user_file = tmp_path / ".notes.tmp-1-x.txt"  # not one of ours: the random part is not 8 hex digits
        for path in (dead, live, mine, user_file):
            path.write_bytes(b"partial")
        removed = remove_stale_temporaries(tmp_path)
        assert removed == [dead]
        assert live.exists() and mine.exists() and user_file.exists() and not dead.exists()
    finally:
        live_writer.kill()
        live_writer.wait()


def test_folder_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    with FolderLock(tmp_path, "training"):
        script = f"from flareseg.locks import FolderLock; FolderLock({str(tmp_path)!r}, 'training').acquire()"
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert result.returncode != 0
        assert "FolderBusyError" in result.stderr and f"process {os.getpid()}" in result.stderr
    with FolderLock(tmp_path, "training") as lock:  # released on exit: free again
        assert lock.held


def test_a_killed_holder_never_leaves_the_lock_stuck(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        from flareseg.locks import FolderLock
        FolderLock({str(tmp_path)!r}, "prepare").acquire()
        print("locked", flush=True)
        time.sleep(60)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderBusyError, match=f"process {holder.pid}"):
            FolderLock(tmp_path, "prepare").acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        lock = FolderLock(tmp_path, "prepare").acquire()
        lock.release()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_child_that_asked_to_die_with_its_parent_does(tmp_path):
    """Parent P starts child C (which calls die_with_parent) and is then SIGKILLed: C must be gone too."""
    child_code = "import os, time; from flareseg.processes import die_with_parent; "
    child_code += "die_with_parent(expected_parent=os.getppid()); print(os.getpid(), flush=True); time.sleep(60)"
    parent_code = textwrap.dedent(
        f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", {child_code!r}], stdout=subprocess.PIPE, text=True)
        print(child.stdout.readline().strip(), flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        assert _gone_within(child_pid, 10.0)
    finally:
        parent.kill()
        parent.wait()


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status")
        if not status.exists() or "State:\tZ" in status.read_text():
            return True
        time.sleep(0.1)
    return False


def test_an_exited_but_unreaped_process_counts_as_dead():
    """A zombie (its parent has not waited for it yet) must not keep workers or temporaries alive."""
    from flareseg.atomic import process_alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while "State:\tZ" not in Path(f"/proc/{child.pid}/status").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not process_alive(child.pid)
    finally:
        child.wait()
    assert process_alive(os.getpid())
