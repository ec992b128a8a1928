"""Export an inference model as TorchScript and as ONNX (the `onnx` extra), written atomically."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from flareseg.atomic import atomic_write

log = logging.getLogger(__name__)
# The loggers the ONNX exporter reports through (its passes log ~100 INFO lines per network; torch's own loggers
# print to stderr through handlers of their own, which is why they are swapped, not just silenced by a level).
EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")


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
        program = torch.onnx.export(
            model,
            (example,),
            input_names=["image"],
            output_names=[output_name],
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
        program.save(tmp)

    with _exporter_output() as output:
        try:
            written = atomic_write(path, write)
        except BaseException:
            log.error("ONNX export to %s failed; the exporter said:\n%s", path, output.getvalue() or "(nothing)")
            raise
    if output.getvalue():
        log.debug("ONNX export to %s; the exporter said:\n%s", path, output.getvalue())
    return written


@contextlib.contextmanager
def _exporter_output() -> Iterator[io.StringIO]:
    """Collect what is printed, warned or logged by EXPORTER_LOGGERS inside the block in one buffer, off the console:
    the caller logs it at debug level, or at error level when the export fails."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    saved = [(logger.handlers, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.handlers, logger.propagate = [handler], False
    try:
        with (
            warnings.catch_warnings(record=True) as caught,
            contextlib.redirect_stdout(buffer),
            contextlib.redirect_stderr(buffer),
        ):
            warnings.simplefilter("always")
            try:
                yield buffer
            finally:
                buffer.writelines(f"{w.category.__name__}: {w.message}\n" for w in caught)
    finally:
        for logger, (handlers, propagate) in zip(loggers, saved):
            logger.handlers, logger.propagate = handlers, propagate
