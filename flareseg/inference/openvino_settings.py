"""How flareseg compiles a network with OpenVINO, without torch: the compile settings and the cache folders.

The OpenVINO runner (flareseg.inference.backends) compiles with these settings, and bench/bench_startup.py loads
the same cached compiled networks in a process that never imports torch (what a torch-free predictor would pay at
start-up); one definition keeps the two on the same cache entries.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$FLARESEG_CACHE_DIR, default ~/.cache/flareseg: onnx/ (exports), int8/ (quantized), openvino/ (compiled)."""
    return Path(os.environ.get("FLARESEG_CACHE_DIR", Path.home() / ".cache" / "flareseg"))


def compile_settings(hint: str, threads: int | None) -> dict:
    """OpenVINO CPU compile settings: latency first, `hint` the inference precision ("f32" or "bf16"), compiled
    networks cached under cache_dir()/openvino (later processes load, not compile), `threads` or every core."""
    config = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": hint,
        "CACHE_DIR": str(cache_dir() / "openvino"),
    }
    if threads is not None:  # None: OpenVINO's own default, every core
        config["INFERENCE_NUM_THREADS"] = threads
        # a process given fewer threads than cores shares the CPU (shards, --part/--parts): pinned, every such
        # process would put its threads on the same first cores, and two 1-thread shards ran at half speed
        config["ENABLE_CPU_PINNING"] = False
    return config
