"""The start of a prepare worker process, apart from prepare.py so that reaching it imports nothing heavy.

A pool worker imports its initializer's module before running it, and only afterwards the modules of its tasks
(torch, SimpleITK: seconds). Were the initializer in prepare.py, a worker started just before its preparing process
was killed would live on for those seconds unprotected; here it is protected at once.
"""

from __future__ import annotations

from flareseg.processes import tie_to_process


def init_worker(main_pid: int) -> None:
    """Tie this worker's life to the preparing process `main_pid`, then give it one thread (the pool is the
    parallelism)."""
    tie_to_process(main_pid)  # so that it does not hold memory or write into a folder that a rerun is preparing
    import SimpleITK as sitk
    import torch

    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
