"""Distributed data parallel set up from torchrun's environment: nccl on GPUs, gloo on CPUs.

Without torchrun (no WORLD_SIZE in the environment) everything runs in one process as rank 0 of 1.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flareseg.models.runtime import resolve_device
from flareseg.processes import die_with_parent

# The stage scripts export the launcher's process id (the shell's $$, which `exec` hands to torchrun), so that a
# worker can tell that its launcher died even before it asked to die with it.
LAUNCHER_PID = "FLARESEG_LAUNCHER_PID"


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistributedContext:
    """Join the process group that torchrun describes (if any) and pick this process's device.

    The device is resolved as prediction resolves it (flareseg.models.runtime.resolve_device: an unknown name or
    CUDA without a GPU is an error, never a silent CPU run). "auto" and "cuda" give each process of a node its own
    GPU (by local rank); "cuda:N" names one GPU, so it is refused for several processes on one node.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device)
    if target.type == "cuda":
        if target.index is not None and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise ValueError(
                f"device {device!r} names one GPU, but this node runs several training processes: "
                "use 'cuda' (one GPU per process) and CUDA_VISIBLE_DEVICES to choose the GPUs"
            )
        index = target.index if target.index is not None else local_rank % torch.cuda.device_count()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} was asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(index)
        target = torch.device("cuda", index)
    elif target.type != "cpu":
        raise ValueError(f"device {device!r}: training runs on cpu, cuda or cuda:N")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistributedContext(rank, world_size, local_rank, target)


def wrap_for_processes(model: torch.nn.Module, context: DistributedContext) -> torch.nn.Module:
    """`model` in DistributedDataParallel when several processes train (on this process's GPU, if any), else itself."""
    if not context.distributed:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def die_with_launcher() -> bool:
    """Under torchrun, have this process end (SIGTERM) when its launcher dies, even by SIGKILL.

    torchrun starts each worker in a session of its own (start_new_session), so a signal to the launcher's process
    group never reaches the workers, and a launcher killed with SIGKILL passes nothing on: the trainer would run on
    unsupervised and race a rerun on the same checkpoint and log files. Returns whether the request was made.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # not started by torchrun: nothing to follow
        return False
    launcher = os.environ.get(LAUNCHER_PID, "")
    expected = int(launcher) if launcher.isdigit() and int(launcher) != os.getpid() else os.getppid()
    return die_with_parent(signal.SIGTERM, expected_parent=expected)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    if context.distributed:
        dist.barrier()


def mean_over_processes(value: float, context: DistributedContext) -> float:
    """The mean of a number over all processes (the number itself in a single process)."""
    if not context.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / context.world_size


def any_process(flag: bool, context: DistributedContext) -> bool:
    """True in every process when it is true in any (so that all processes take the same branch)."""
    if not context.distributed:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)
