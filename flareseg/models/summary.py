"""`flareseg summary`: parameters, multiply-adds, and the measured forward time and peak memory of a network."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from flareseg.config import Config
from flareseg.memory import peak_cuda_mb, peak_rss_mb, reset_peak_memory
from flareseg.models.complexity import count_multiply_adds, count_parameters
from flareseg.models.registry import build_model
from flareseg.models.runtime import Precision, as_input, autocast, prepare_for_inference


@dataclass
class ModelSummary:
    name: str
    parameters: int
    multiply_adds: int
    input_shape: tuple[int, ...]
    device: str
    precision: str
    channels_last: bool
    forward_seconds: list[float]
    peak_memory_mb: float
    added_memory_mb: float
    memory_kind: str

    def lines(self) -> list[str]:
        seconds = statistics.median(self.forward_seconds)
        return [
            f"model            {self.name}",
            f"parameters       {self.parameters:,}",
            f"multiply-adds    {self.multiply_adds / 2**30:.1f} x 2^30 at input {list(self.input_shape)}",
            f"device           {self.device}, {self.precision}, channels_last_3d {self.channels_last}",
            f"forward time     {seconds:.3f} s (median of {len(self.forward_seconds)}, after 1 warm-up)",
            f"throughput       {2 * self.multiply_adds / seconds / 1e9:.1f} GFLOP/s",
            f"peak memory      {self.peak_memory_mb:.0f} MB ({self.memory_kind}; "
            f"{self.added_memory_mb:.0f} MB above the model at rest)",
        ]


def summarize(config: Config, device: torch.device, precision: Precision = "fp32", repeats: int = 3) -> ModelSummary:
    """Build the configured network and measure one forward pass at `model.input_size` (batch 1)."""
    model = build_model(config)
    shape = (1, config.model.in_channels, *config.model.input_size)
    parameters, multiply_adds = count_parameters(model), count_multiply_adds(model, shape)
    channels_last = config.model.channels_last
    model = prepare_for_inference(model, device, channels_last)
    x = as_input(torch.randn(shape, device=device), channels_last)
    times = []
    with torch.inference_mode(), autocast(device, precision):
        model(x)  # warm-up: allocator, oneDNN / cuDNN kernel choice
        baseline = reset_peak_memory(device)
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            model(x)
            _synchronize(device)
            times.append(time.perf_counter() - start)
    peak, kind = _peak_memory(device)
    return ModelSummary(
        config.model.name,
        parameters,
        multiply_adds,
        shape,
        str(device),
        precision,
        channels_last,
        times,
        peak,
        max(0.0, peak - baseline),
        kind,
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return peak_cuda_mb(device), "peak CUDA memory allocated by torch"
    return peak_rss_mb(), "peak resident memory of the process"
