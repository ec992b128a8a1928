"""Peak memory of a stretch of work: the process's resident set on the CPU, torch's allocations on CUDA."""

from __future__ import annotations

from pathlib import Path

import torch


def reset_peak_memory(device: torch.device | None = None) -> float:
    """Start a new peak window; returns the memory in use now (MB), the baseline of the window."""
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:  # Linux: "5" resets the process's peak resident set size (VmHWM) to the current one
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _proc_status_mb("VmRSS:") or 0.0


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MB) since the last reset (or since start where no reset works)."""
    peak = _proc_status_mb("VmHWM:")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_cuda_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20


def _proc_status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
