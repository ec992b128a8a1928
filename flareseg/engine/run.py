"""Run training in this process, as one rank of a torchrun job or alone."""

from __future__ import annotations

import os

import torch

from flareseg.config import Config
from flareseg.engine.distributed import cleanup_distributed, setup_distributed
from flareseg.engine.trainer import Trainer


def train(config: Config, device: str = "auto") -> list[dict]:
    """Train the configured stage; returns the per-epoch records (on rank 0; [] on the others)."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_processes > 1:  # the CPU cores are shared by the processes of this node
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes))
    context = setup_distributed(device)
    try:
        if config.semi_supervised.enabled:
            from flareseg.engine.cps import CrossPseudoSupervisionTrainer

            return CrossPseudoSupervisionTrainer(config, context).fit()
        if config.distill.enabled:
            from flareseg.engine.distill import DistillationTrainer

            return DistillationTrainer(config, context).fit()
        return Trainer(config, context).fit()
    finally:
        cleanup_distributed()
