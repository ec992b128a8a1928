"""Where and in what precision a network runs: device choice, autocast contexts, memory format."""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch import nn

Precision = Literal["fp32", "fp16", "bf16"]
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    """ "auto" = CUDA when available, else CPU; "cuda" without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists twenty device types; a user needs these four
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but torch sees no CUDA GPU")
    return device


def resolve_precision(choice: str, device: torch.device, cpu_bf16: bool = False) -> Precision:
    """What precision "auto" means, for training and prediction alike: fp16 on CUDA; on the CPU bf16 where the
    runner computes it natively (`cpu_bf16`: OpenVINO on a CPU with bf16 instructions), else fp32."""
    if choice != "auto":
        return choice
    if device.type == "cuda":
        return "fp16"
    return "bf16" if cpu_bf16 else "fp32"


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """torch.autocast in fp16 or bf16 on `device`, or a null context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in _DTYPES:
        raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def prepare_for_inference(model: nn.Module, device: torch.device, channels_last: bool = False) -> nn.Module:
    """Eval mode on `device`, optionally in channels_last_3d memory format."""
    model = model.eval().to(device)
    return model.to(memory_format=torch.channels_last_3d) if channels_last else model


def as_input(volume: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """A (B, C, D, H, W) input in the memory format the model expects."""
    return volume.contiguous(memory_format=torch.channels_last_3d) if channels_last else volume.contiguous()
