"""Inference backends: how a stage network turns a normalised [1, 1, z, y, x] input into logits or class indices.

    torch     the network itself, under autocast in predict.precision (CUDA or CPU)
    openvino  CPU only: the network exported once to ONNX at its static input size and compiled by OpenVINO, in
              bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX) and float32 elsewhere.
              Needs the `openvino` extra (pip install "flareseg[openvino]").
    auto      openvino on the CPU where it is installed (and the precision is fp32, bf16 or auto), else torch

OpenVINO runs thread pools in the process that uses it, so that process must never fork: a forked child inherits
the pools' state without their threads (it hung collecting inherited OpenVINO objects). flareseg starts every worker
process from the fork server instead (flareseg.workers), so predicting and then training in one process is safe.
All runners share one Core for the life of the process (see openvino_core: Cores destroyed in the wrong order left
the process on a freed signal stack, and it died of SIGSEGV at the next signal, such as a forked worker's exit).

A stage that runs its whole grid in one pass (a fixed-size stage of one network without TTA) asks for class
indices, not logits: the per-voxel "best class whose logit is > 0" is then part of the compiled graph, so the
13-channel float map at 192^3 (370 MB) is never handed out; OpenVINO plans the rest of its buffers around that.
Sliding-window stages, fold ensembles and mirror TTA average several outputs, so they need the logits.

The ONNX export (10-20 s for the fine network) is cached under $FLARESEG_CACHE_DIR (default ~/.cache/flareseg),
keyed by the network's structure and weights, the input size, the output and the torch and flareseg versions, so
only the first run pays.
It logs one line before and one after (with its time); what the exporter says goes to debug logging.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from flareseg.inference.openvino_settings import cache_dir, compile_settings
from flareseg.models.runtime import autocast, resolve_precision

if TYPE_CHECKING:
    import openvino

log = logging.getLogger(__name__)
Runner = Callable[[torch.Tensor], torch.Tensor]
Output = Literal["logits", "classes"]
BACKENDS = ("auto", "torch", "openvino")
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}  # int8: an NNCF-quantized model (flareseg.inference.quantize)
OPENVINO_CHOICES = ("auto", *OPENVINO_PRECISIONS, "int8")


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None and importlib.util.find_spec("onnxscript") is not None


def choose_backend(backend: str, device: torch.device, precision: str) -> str:
    """The backend that `backend` ("auto", "torch" or "openvino") means on this device and precision."""
    if backend not in BACKENDS:
        raise ValueError(f"predict.backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        usable = device.type == "cpu" and precision in OPENVINO_CHOICES and openvino_available()
        backend = "openvino" if usable else "torch"
    elif backend == "openvino":
        if device.type != "cpu":
            raise ValueError(f"predict.backend 'openvino' runs on the CPU, but predict.device is {device}")
        if precision not in OPENVINO_CHOICES:
            raise ValueError(f"predict.backend 'openvino' runs in fp32, bf16 or int8, not {precision}")
        if not openvino_available():
            raise RuntimeError("predict.backend 'openvino' needs the openvino extra: pip install 'flareseg[openvino]'")
    if precision == "int8" and backend != "openvino":
        raise ValueError("predict.precision int8 runs on the OpenVINO CPU backend (pip install 'flareseg[int8]')")
    return backend


def choose_precision(precision: str, device: torch.device, backend: str, int8_checked: bool = False) -> str:
    """What predict.precision "auto" means: fp16 on CUDA; on the CPU under OpenVINO int8 where every network of
    the stage has an int8 model whose stored accuracy check passed (`int8_checked`: flareseg.inference.quantize,
    never a guess), else bf16 where the CPU computes it natively (measured: 2x faster, half the memory, the same
    labels from trained networks), else fp32."""
    if precision == "auto" and backend == "openvino" and int8_checked:
        return "int8"
    native_bf16 = precision == "auto" and device.type == "cpu" and backend == "openvino" and cpu_has_native_bf16()
    return resolve_precision(precision, device, cpu_bf16=native_bf16)


@functools.cache
def cpu_has_native_bf16() -> bool:
    return "BF16" in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@functools.cache
def openvino_core() -> openvino.Core:
    """The one OpenVINO Core of this process, kept until it exits.

    Each Core loads its own CPU plugin, which points the calling thread's alternate signal stack at a buffer of its
    own and, when destroyed, points it back at the one it found and frees its buffer. Two Cores destroyed in the
    order they were made (two stage runners) left the main thread's signal stack on freed memory, and the next
    signal with a Python handler (SIGCHLD from an exiting child process, Ctrl-C) crashed the process with SIGSEGV
    (tests/test_faults_fork.py reproduces it). One Core that lives as long as the process never does that."""
    import openvino

    return openvino.Core()


def classes_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """[B, C, ...] logits -> [B, ...] uint8 class index: 1 + the class with the highest logit among those whose
    sigmoid exceeds 0.5 (logit > 0), or 0 where none does."""
    best, index = logits.max(dim=1)
    return ((index + 1) * (best > 0)).to(torch.uint8)


class ClassHead(nn.Module):
    """`model` followed by classes_from_logits, as one graph (for export)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return classes_from_logits(self.model(image))


def torch_runner(model: nn.Module, device: torch.device, precision: str, channels_last: bool, output: Output) -> Runner:
    def run(image: torch.Tensor) -> torch.Tensor:
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        with autocast(device, precision):
            logits = model(image)
        return classes_from_logits(logits) if output == "classes" else logits

    return run


class OpenVinoRunner:
    """An OpenVINO CPU runner for `model` at its static `input_size`, in `precision` (fp32, bf16 or int8), giving
    `output` (logits, or class indices as uint8). The ONNX export is cached; int8 runs the network's NNCF-quantized
    model (flareseg.inference.quantize: cached; quantized first where there is none), the layers NNCF leaves in
    floating point in bf16 where the CPU computes it natively, else fp32.

    OpenVINO keeps its intermediate buffers after an inference (about 0.5 GB for the coarse network at 160^3 and
    0.8 GB for the fine one at 192^3, in bf16 with the class output), so two stages would hold both all the time.
    They are released after every inference (`CompiledModel.release_memory()`): the peak is then that of the larger
    network alone, for about 0.1 s of reallocation per inference.
    """

    def __init__(
        self,
        model: nn.Module,
        checkpoint: Path,
        input_size: tuple[int, int, int],
        threads: int | None,
        precision: str = "fp32",
        output: Output = "logits",
    ):
        if precision not in OPENVINO_CHOICES[1:]:
            raise ValueError(f"the OpenVINO backend runs in fp32, bf16 or int8, not {precision}")
        self.input_size, self.output = tuple(input_size), output
        if precision == "int8":
            from flareseg.inference.quantize import int8_model

            network_path = int8_model(model, checkpoint, self.input_size, output)
            hint = "bf16" if cpu_has_native_bf16() else "f32"
        else:
            network_path, hint = cached_onnx(model, checkpoint, self.input_size, output), OPENVINO_PRECISIONS[precision]
        config = compile_settings(hint, threads)
        self.compiled = openvino_core().compile_model(str(network_path), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if tuple(image.shape[2:]) != self.input_size:
            raise ValueError(f"the OpenVINO model takes {list(self.input_size)} inputs, got {list(image.shape[2:])}")
        outputs = self.request.infer({0: image.detach().float().contiguous().numpy()}, share_inputs=True)
        result = torch.from_numpy(outputs[0].copy())
        del outputs
        self.compiled.release_memory()
        return result


def cached_onnx(model: nn.Module, checkpoint: Path, input_size: tuple[int, int, int], output: Output) -> Path:
    from flareseg.models.export import export_onnx

    digest = network_digest(model, input_size, output)
    path = cache_dir() / "onnx" / f"{checkpoint.stem}-{output}-{digest[:16]}.onnx"
    if not path.is_file():
        log.info("exporting %s for OpenVINO (once, cached in %s) ...", checkpoint, path.parent)
        start = time.perf_counter()
        network = model.float().cpu().eval()
        export_onnx(
            ClassHead(network) if output == "classes" else network,
            torch.zeros(1, 1, *input_size),
            path,
            output_name=output,
        )
        log.info("exporting %s for OpenVINO: done in %.1f s", checkpoint, time.perf_counter() - start)
    return path


def network_digest(model: nn.Module, input_size: tuple[int, int, int], output: Output) -> str:
    """The key of an export: what decides its graph (the network's structure and weights, the input size, the
    output, the torch and flareseg versions), not the rest of the checkpoint file (history, paths), so that copies of
    a checkpoint, or a retraining to the same weights, share one export."""
    from flareseg import __version__

    digest = hashlib.sha256(f"{model!r} {list(input_size)} {output} {torch.__version__} {__version__}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
