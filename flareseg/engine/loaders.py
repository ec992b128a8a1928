"""The trainers' DataLoaders: worker processes start from the fork server (flareseg.workers), never by fork."""

from __future__ import annotations

import functools
import os
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from flareseg.processes import tie_to_process
from flareseg.workers import worker_context


def data_loader(
    dataset: Dataset, batch_size: int, workers: int, sampler: Sampler | None = None, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader over `dataset` in `workers` worker processes (0: in this process), in `sampler`'s order.

    Build one per epoch: its workers receive a copy of the dataset as it is when iteration starts, including the
    epoch set by `set_epoch` (training items are seeded by seed, epoch and index). Workers are therefore not
    persistent; from the warm fork server a fresh start costs a fraction of a second per epoch
    (bench/bench_loader_start.py)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=False,
        persistent_workers=False,
        worker_init_fn=functools.partial(start_worker, os.getpid()),
        multiprocessing_context=worker_context() if workers > 0 else None,  # torch rejects a context without workers
    )


def start_worker(main_pid: int, worker_id: int) -> None:
    """In each DataLoader worker: end it with the process `main_pid` that iterates the loader, then seed numpy and
    random from the seed torch gave the worker (distinct per worker and rank)."""
    # torch's own check (is my parent still there?) never fires for a fork-server worker: see tie_to_process
    tie_to_process(main_pid)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
