"""Inference backends: how a stage network turns a normalised [1, 1, z, y, x] input into logits.

    torch     the network itself, under autocast in predict.precision (CUDA or CPU)
    openvino  CPU only: the network exported once to ONNX at its static input size, compiled by OpenVINO in
              float32 (measured 3.9-4.3x faster than eager PyTorch on 2 cores for the reference networks, logits
              within 0.03 of PyTorch's). Needs the `openvino` extra (pip install "flareseg[openvino]").
    auto      torch for now: OpenVINO stays opt-in because a process that loaded it and later forks (DataLoader
              workers, fork-started pools) crashed with a segmentation fault in our test suite

The ONNX export (10-20 s for the fine network) is cached under $FLARESEG_CACHE_DIR (default ~/.cache/flareseg),
keyed by the checkpoint's content, the input size and the torch version, so only the first run pays for it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from flareseg.models.runtime import autocast

log = logging.getLogger(__name__)
Runner = Callable[[torch.Tensor], torch.Tensor]
BACKENDS = ("auto", "torch", "openvino")


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None and importlib.util.find_spec("onnxscript") is not None


def choose_backend(backend: str, device: torch.device, precision: str) -> str:
    """The backend that `backend` ("auto", "torch" or "openvino") means on this device and precision."""
    if backend not in BACKENDS:
        raise ValueError(f"predict.backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "torch"
    if backend == "openvino":
        if device.type != "cpu":
            raise ValueError(f"predict.backend 'openvino' runs on the CPU, but predict.device is {device}")
        if not openvino_available():
            raise RuntimeError("predict.backend 'openvino' needs the openvino extra: pip install 'flareseg[openvino]'")
    return backend


def torch_runner(model: nn.Module, device: torch.device, precision: str, channels_last: bool) -> Runner:
    def run(image: torch.Tensor) -> torch.Tensor:
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        with autocast(device, precision):
            return model(image)

    return run


class OpenVinoRunner:
    """An OpenVINO float32 CPU runner for `model` at its static `input_size` (the ONNX export is cached).

    OpenVINO keeps its intermediate buffers after an inference (1.3 GB for the fine network at 192^3).
    `CompiledModel.release_memory()` would free them, but with OpenVINO 2026.4 it made the process crash later
    (a segmentation fault in unrelated code, reproduced in the test suite), so it is not called.
    """

    def __init__(self, model: nn.Module, checkpoint: Path, input_size: tuple[int, int, int], threads: int):
        import openvino

        self.input_size = tuple(input_size)
        onnx_path = _cached_onnx(model, checkpoint, self.input_size)
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
        self.compiled = openvino.Core().compile_model(str(onnx_path), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if tuple(image.shape[2:]) != self.input_size:
            raise ValueError(f"the OpenVINO model takes {list(self.input_size)} inputs, got {list(image.shape[2:])}")
        outputs = self.request.infer({0: image.detach().float().contiguous().numpy()}, share_inputs=True)
        return torch.from_numpy(outputs[0].copy())


def cache_dir() -> Path:
    return Path(os.environ.get("FLARESEG_CACHE_DIR", Path.home() / ".cache" / "flareseg"))


def _cached_onnx(model: nn.Module, checkpoint: Path, input_size: tuple[int, int, int]) -> Path:
    from flareseg.models.export import export_onnx

    digest = hashlib.sha256()
    with open(checkpoint, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    digest.update(f"{list(input_size)} torch {torch.__version__}".encode())
    path = cache_dir() / "onnx" / f"{checkpoint.stem}-{digest.hexdigest()[:16]}.onnx"
    if not path.is_file():
        log.info("exporting %s to ONNX for OpenVINO (once; cached in %s)", checkpoint, path.parent)
        export_onnx(model.float().cpu().eval(), torch.zeros(1, 1, *input_size), path)
    return path
