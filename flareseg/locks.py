"""One writer at a time per folder: an exclusive lock that the kernel releases when its holder dies.

The lock is a `flock` on `<folder>/.flareseg.lock`; the file also records who holds it (process id, host,
command, start time), so that a refused second writer can say which process to wait for or stop. A killed
holder (even with SIGKILL) releases the lock with its last file descriptor: nothing is ever left stuck, and no
stale-lock guessing is needed. The lock file itself stays; it is not a sign that anyone holds the lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".flareseg.lock"


class FolderBusyError(RuntimeError):
    """Another live process holds the folder's lock; the message names the folder and the holder."""


class FolderLock:
    """`with FolderLock(folder, "prepare"):` holds `folder` for this process, or raises FolderBusyError at once."""

    def __init__(self, folder: str | os.PathLike, purpose: str):
        self.folder = Path(folder)
        self.purpose = purpose
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_FILE

    def acquire(self) -> FolderLock:
        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderBusyError(
                f"{self.folder} is in use by {describe_holder(self.path)}; wait for it to finish or stop it "
                f"(one {self.purpose} at a time per folder)"
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "purpose": self.purpose,
            "command": " ".join(sys.argv)[:300],
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def describe_holder(lock_file: Path) -> str:
    """The holder recorded in a lock file ("process 1234 on host (...)"), or "another process"."""
    try:
        holder = json.loads(lock_file.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    if "pid" not in holder:
        return "another process"
    return (
        f"process {holder['pid']} on {holder.get('host', '?')} ({holder.get('purpose', '?')}: "
        f"{holder.get('command', '?')}, since {holder.get('since', '?')})"
    )
