"""How much GPU memory a network needs to train on a patch: measured from the network itself, not guessed.

Training memory is dominated by the activations autograd saves for the backward pass, and they grow linearly with
the patch's voxels. They are counted exactly, without computing anything: the network runs on fake tensors (shapes
and dtypes only) under autocast, as torch.amp trains it, and every tensor autograd saves is summed. Two patch sizes
give the bytes per voxel (the slope); the rest of a training step is budgeted around it:

    memory = context + 16 bytes x parameters (fp32 weights, gradients, Adam's two moments)
             + batch x voxels x saved bytes per voxel x BACKWARD_FACTOR
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from flareseg.config import Config, to_plain
from flareseg.models import build_model

BACKWARD_FACTOR = 1.3  # gradients of the activations alive during backward, over the saved activations
CONTEXT_BYTES = 1.0 * 2**30  # the CUDA context and cuDNN workspace
PARAMETER_BYTES = 16  # fp32 weight + gradient + Adam's two moments
_SIZES = (32, 64)  # the two measured patch edges (every stage of a 5-level network stays above one voxel)


@dataclass(frozen=True)
class NetworkMemory:
    """A network's training memory: saved activation bytes per input voxel, and its parameter count."""

    bytes_per_voxel: float
    parameters: int

    def max_voxels(self, gpu_memory_gb: float, batch_size: int) -> int:
        """The largest patch (voxels) that trains at `batch_size` within `gpu_memory_gb` GiB."""
        free = gpu_memory_gb * 2**30 - CONTEXT_BYTES - PARAMETER_BYTES * self.parameters
        return max(0, int(free / (batch_size * self.bytes_per_voxel * BACKWARD_FACTOR)))

    def gigabytes(self, voxels: int, batch_size: int) -> float:
        """The training memory (GiB) of `batch_size` patches of `voxels`."""
        used = CONTEXT_BYTES + PARAMETER_BYTES * self.parameters
        used += batch_size * voxels * self.bytes_per_voxel * BACKWARD_FACTOR
        return used / 2**30


def network_memory(config: Config) -> NetworkMemory:
    """Measure the network of `config` (config.model with config.num_classes outputs); once per process."""
    key = json.dumps([to_plain(config.model), config.num_classes], sort_keys=True)
    if key not in _MEASURED:
        network = build_model(config)
        small, large = (_saved_bytes(network, edge, config.model.in_channels) for edge in _SIZES)
        per_voxel = (large - small) / (_SIZES[1] ** 3 - _SIZES[0] ** 3)
        _MEASURED[key] = NetworkMemory(per_voxel, sum(p.numel() for p in network.parameters()))
    return _MEASURED[key]


_MEASURED: dict[str, NetworkMemory] = {}


def _saved_bytes(network: torch.nn.Module, edge: int, channels: int) -> int:
    """Bytes of the tensors autograd saves in one training forward pass of a 1 x channels x edge^3 patch."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    saved: dict[int, tuple[torch.Tensor, int]] = {}  # by tensor id, the tensor held so that no id is reused

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor if tensor._base is None else tensor._base  # a view saves no memory of its own
        saved[id(base)] = (base, math.prod(base.shape) * base.element_size())
        return tensor

    network.train()
    with FakeTensorMode(allow_non_fake_inputs=True):
        patch = torch.empty(1, channels, edge, edge, edge)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            with torch.autocast("cpu", dtype=torch.bfloat16):  # 2-byte activations, as fp16 AMP on a GPU
                network(patch)
    return sum(size for _, size in saved.values())
