"""Checkpoints: tensors and plain types only (loadable with torch.load(weights_only=True)), written atomically.

A checkpoint that cannot be used (empty, truncated, not a checkpoint, weights of another network) is a
CheckpointError whose one-line message names the file and what is wrong with it.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from flareseg.atomic import atomic_write
from flareseg.config import ConfigError

LATEST = "checkpoint_latest.pt"
BEST = "checkpoint_best.pt"


# what torch.load raises for a damaged or foreign file depends on where its bytes stop making sense
_LOAD_ERRORS = (EOFError, OSError, RuntimeError, ValueError, LookupError, TypeError, pickle.UnpicklingError)


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be used; the message names the file and the reason.

    A ConfigError because a checkpoint is always given by a config key (train.pretrained, distill.teacher,
    predict.coarse ...) or chosen by one (train.out with train.resume).
    """


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write `state` to a temporary file in the same folder, then rename it: never a half-written checkpoint."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """A checkpoint's state, loaded safely (tensors and plain types only), on the CPU.

    `what` starts every error message ("'train.pretrained': checkpoint"). A missing file is a FileNotFoundError;
    a file torch cannot load, or one that holds no mapping, is a CheckpointError saying why.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder, not a checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as error:
        raise CheckpointError(f"{what} {path} {_why_unloadable(path, error)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{what} {path} holds a {type(state).__name__}, not a checkpoint (a dict of tensors)")
    return state


def _why_unloadable(path: Path, error: Exception) -> str:
    """Why torch.load failed, told from the file itself: torch's messages depend on where the bytes ran out."""
    if isinstance(error, PermissionError):
        return f"cannot be read ({error.strerror})"
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes): its writer was stopped before writing it; delete it or train it again"
    with path.open("rb") as file:
        head = file.read(4)
    if head == b"PK\x03\x04":  # torch.save writes a zip archive
        if not zipfile.is_zipfile(path):
            return f"is truncated ({size} bytes, the end of the archive is missing): copy or train it again"
    elif head[:1] != b"\x80":  # nor is it the pickle of torch's legacy format
        return f"is not a PyTorch checkpoint ({size} bytes that torch.save did not write)"
    if "Weights only load failed" in str(error):
        return (
            "holds Python objects besides tensors and plain types: it was not written by flareseg "
            "(loading it would run code from the file, which flareseg refuses)"
        )
    reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
    return f"is a damaged PyTorch checkpoint ({size} bytes; torch says: {reason})"


def check_weights(model: nn.Module, weights: dict, what: str) -> None:
    """Raise a CheckpointError naming `what` unless `weights` has exactly the model's tensor names and shapes.

    load_state_dict's own error is a multi-line list of every tensor; this names the count and the first few.
    """
    if not all(isinstance(value, torch.Tensor) for value in weights.values()):
        raise CheckpointError(f"{what} holds no state dict of tensors")
    own = unwrap(model).state_dict()
    missing = [name for name in own if name not in weights]
    unexpected = [name for name in weights if name not in own]
    reshaped = [
        f"{name} {list(weights[name].shape)} there, {list(tensor.shape)} here"
        for name, tensor in own.items()
        if name in weights and weights[name].shape != tensor.shape
    ]
    problems = [
        f"{len(names)} {title} (e.g. {names[0]})"
        for title, names in (
            ("tensors of another shape", reshaped),
            ("tensors missing", missing),
            ("unknown tensors", unexpected),
        )
        if names
    ]
    if problems:
        raise CheckpointError(f"{what} does not fit this network: {'; '.join(problems)}")


def load_weights(model: nn.Module, weights: dict, what: str) -> None:
    """`model.load_state_dict(weights)` (DDP or compile wrappers allowed), or a one-line CheckpointError."""
    check_weights(model, weights, what)
    unwrap(model).load_state_dict(weights)


@dataclass
class LoadReport:
    """What a partial load of pretrained weights did."""

    loaded: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)  # "name: checkpoint shape -> model shape"
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        for title, names in (
            ("skipped, shape differs", self.shape_mismatch),
            ("not in the checkpoint", self.missing),
            ("not in the model", self.unexpected),
        ):
            if names:
                lines.append(f"{title} ({len(names)}): {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
        return "; ".join(lines)


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Fine-tuning start: copy every tensor whose name and shape match; report the rest.

    A file that is no checkpoint, or one that fits fewer than half of `model`'s tensors (another architecture or
    width; another class count only skips the head), is a CheckpointError: a network left mostly random while
    believed fine-tuned would go unnoticed.
    """
    what = "'train.pretrained': checkpoint"
    state = load_checkpoint(path, what)
    if isinstance(state.get("model"), dict):
        state = state["model"]
    if not state or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{what} {path} holds no network weights (neither 'model' nor a state dict)")
    own = unwrap(model).state_dict()
    report = LoadReport()
    usable = {}
    for name, tensor in state.items():
        if name not in own:
            report.unexpected.append(name)
        elif own[name].shape != tensor.shape:
            report.shape_mismatch.append(f"{name}: {tuple(tensor.shape)} -> {tuple(own[name].shape)}")
        else:
            usable[name] = tensor
            report.loaded.append(name)
    report.missing = [name for name in own if name not in state]
    if 2 * len(usable) < len(own):
        raise CheckpointError(
            f"{what} {path} fits only {len(usable)} of the {len(own)} tensors of this network: it is another "
            f"architecture or width (model.name, model.channels) ({report.summary()})"
        )
    unwrap(model).load_state_dict(usable, strict=False)
    return report
