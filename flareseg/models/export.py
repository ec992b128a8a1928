"""Export an inference model as TorchScript and as ONNX (the `onnx` extra), written atomically."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from flareseg.atomic import atomic_write


def export_torchscript(model: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> Path:
    """Trace `model` (eval mode) on `example` (B, C, D, H, W) and save it; load with torch.jit.load."""
    model = model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # Shapes are traced as constants on purpose: the model is exported for its configured input size.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        traced = torch.jit.trace(model, example)
    return atomic_write(path, lambda tmp: traced.save(str(tmp)))


def export_onnx(
    model: nn.Module, example: torch.Tensor, path: str | os.PathLike, opset: int = 18, output_name: str = "logits"
) -> Path:
    """Export to ONNX at the example's static shape (input "image", output `output_name`)."""
    try:
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise RuntimeError("ONNX export needs the onnx extra: pip install 'flareseg[onnx]'") from None
    model = model.eval()

    def write(tmp: Path) -> None:
        # the exporter's notes about torchvision operators and deprecated pytree classes do not concern these networks
        registration = logging.getLogger("torch.onnx._internal.exporter._registration")
        level = registration.level
        registration.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                program = torch.onnx.export(
                    model,
                    (example,),
                    input_names=["image"],
                    output_names=[output_name],
                    opset_version=opset,
                    dynamo=True,
                    verbose=False,
                )
        finally:
            registration.setLevel(level)
        program.save(tmp)

    return atomic_write(path, write)


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a state dict, or a checkpoint holding one under "model", strictly (shapes and names must match)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    model.load_state_dict(state, strict=True)
