"""How flareseg starts worker processes (DataLoader workers, process pools): never by forking the calling process.

A forked child is a copy of its parent's memory with only the thread that called fork. A process that has run
OpenVINO or torch owns thread pools whose threads may hold locks or be half-way through their work at that moment;
the child inherits that state without the threads and can crash or hang (a forked child hung collecting inherited
OpenVINO objects). And each forked worker's exit interrupts its parent with a signal (SIGCHLD), which is where a
process that predicted with OpenVINO and then trained died with SIGSEGV (see backends.openvino_core in
flareseg.inference). So every worker starts from the fork server instead: a fresh interpreter started by
fork+exec, which imports the modules workers need once (PRELOAD) and never computes, so each worker is a cheap fork
of a process without busy thread pools (numpy's OpenBLAS stops its idle threads around a fork by itself), and a
child of the fork server, not of the process that asked for it. Where there is no fork server (Windows), spawn.

A script that starts workers must do so under `if __name__ == "__main__":`, because workers import the main module.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext

START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
# The modules whose code runs in flareseg's workers (DataLoaders, prepare's and evaluate's pools): imported once by
# the fork server instead of by every worker, where they take seconds (torch) per worker and, since DataLoader
# workers are started per epoch, per epoch (bench/bench_loader_start.py). One list for all pools: a process has one
# fork server, started by whichever pool comes first.
PRELOAD = [
    "flareseg.data.training_sets",
    "flareseg.engine.loaders",
    "flareseg.data.prepare",
    "flareseg.evaluation.evaluate",
]


def worker_context() -> BaseContext:
    """The multiprocessing context of every flareseg worker process: forkserver (warmed with PRELOAD), or spawn.

    The preload list belongs to the one fork server of this process and only matters until it has started; setting
    it changes what the server imports, nothing that workers compute."""
    context = multiprocessing.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        context.set_forkserver_preload(PRELOAD)
    return context
