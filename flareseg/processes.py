"""Child processes that never outlive the work they belong to.

flareseg starts worker processes (prepare's pool, torchrun's trainers, DataLoader workers). If the process that
started them is killed, even with SIGKILL, they must die too, or they keep running, holding memory and racing a
rerun on the same files. On Linux the kernel does it: `die_with_parent` asks for a signal when the parent exits
(prctl PR_SET_PDEATHSIG). `parent_watchdog` is the portable backstop for a parent that is not the direct parent
(forkserver workers are children of the fork server, not of the process that asked for them).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

from flareseg.atomic import process_alive

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM, expected_parent: int | None = None) -> bool:
    """Have the kernel send `sig` to this process when its parent exits. Returns False where unsupported.

    If the parent is already gone (it died before this call; `expected_parent` is the pid it had), this
    process exits at once.
    """
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)  # the parent died before the request was in place
    return True


def tie_to_process(main_pid: int) -> None:
    """In a worker started from the fork server: end this worker when the process that asked for it (`main_pid`)
    ends, even by SIGKILL.

    Such a worker is a child of the fork server, not of `main_pid`, and the fork server waits for its workers
    before it exits: the watchdog ends the worker once `main_pid` is gone; the kernel's parent-death signal covers
    a fork server that is killed on its own."""
    die_with_parent()
    parent_watchdog(main_pid)


def parent_watchdog(pid: int, interval: float = 1.0) -> threading.Thread:
    """A daemon thread that ends this process (exit status 1) once process `pid` no longer exists."""

    def watch() -> None:
        while process_alive(pid):
            time.sleep(interval)
        os._exit(1)

    thread = threading.Thread(target=watch, name=f"flareseg-watch-{pid}", daemon=True)
    thread.start()
    return thread
