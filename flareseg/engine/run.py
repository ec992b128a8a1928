"""Run training in this process, as one rank of a torchrun job or alone.

A run owns its folder (train.out) while it lives: rank 0 holds the folder's lock from before its first write to
its end, so a second run on the same folder (a resume started while the first still runs) refuses to start and
names the first. The kernel releases the lock when its holder dies, even by SIGKILL. A trainer started by torchrun
dies with its launcher; SIGTERM or SIGHUP end it through Python's exception path, so that a checkpoint being
written leaves no temporary behind.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from flareseg.atomic import remove_stale_temporaries
from flareseg.config import Config, ConfigError
from flareseg.engine.distributed import (
    DistributedContext,
    any_process,
    cleanup_distributed,
    die_with_launcher,
    setup_distributed,
)
from flareseg.engine.trainer import Trainer, run_folder
from flareseg.locks import FolderBusyError, FolderLock

log = logging.getLogger(__name__)


def train(config: Config) -> list[dict]:
    """Train the configured stage on `train.device`; returns the per-epoch records (on rank 0; [] on the others)."""
    die_with_launcher()
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_processes > 1:  # the CPU cores are shared by the processes of this node
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes))
    with _stop_on_termination():
        context = setup_distributed(config.train.device)
        try:
            with _hold_run_folder(run_folder(config), context):
                return trainer_class(config.train.method)(config, context).fit()
        finally:
            cleanup_distributed()


def trainer_class(method: str) -> type[Trainer]:
    """The trainer of a train.method: Trainer, or a subclass that overrides its extension points."""
    from flareseg.engine.cps import CrossPseudoSupervisionTrainer
    from flareseg.engine.distill import DistillationTrainer

    methods = {"supervised": Trainer, "cps": CrossPseudoSupervisionTrainer, "distill": DistillationTrainer}
    return methods[method]


@contextmanager
def _hold_run_folder(folder: Path, context: DistributedContext) -> Iterator[None]:
    """Rank 0 holds `folder`'s lock for the run and removes what killed writers left there; every rank learns
    whether rank 0 got the lock, so that none waits forever in a collective for a rank 0 that refused to start."""
    lock = FolderLock(folder, "training") if context.is_main else None
    refusal: Exception | None = None
    if lock is not None:
        try:
            lock.acquire()
        except FolderBusyError as error:
            refusal = error
        except OSError as error:  # the folder cannot be created (permissions, a file of that name ...)
            refusal = ConfigError(f"'train.out': cannot use {folder} as the run folder ({error.strerror or error})")
    if any_process(refusal is not None, context):
        if refusal is not None:
            raise refusal
        raise FolderBusyError(f"rank 0 could not take the run folder {folder} (its message says why)")
    try:
        if lock is not None:
            for path in remove_stale_temporaries(folder):
                log.info("removed %s, left by a writer that was killed", path.name)
        yield
    finally:
        if lock is not None:
            lock.release()


class Terminated(SystemExit):
    """Raised in the main thread by SIGTERM or SIGHUP; exit status 128 + the signal number, as a shell reports."""


@contextmanager
def _stop_on_termination() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP (torchrun, schedulers, a closed terminal) into a Terminated exception meanwhile.

    Python's default ends the process on the spot: `finally` blocks would not run, and the temporary of a checkpoint
    being written would stay. A signal that is ignored (nohup) stays ignored; a second signal ends at once.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def stop(signum: int, frame: object) -> None:
        signal.signal(signum, signal.SIG_DFL)
        raise Terminated(128 + signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            previous[sig] = signal.signal(sig, stop)
    try:
        yield
    except Terminated as error:
        name = signal.Signals(int(error.code) - 128).name
        log.warning("training stopped by %s; run the same command to resume from the last checkpoint", name)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
