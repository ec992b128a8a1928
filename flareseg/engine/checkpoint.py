"""Checkpoints: tensors and plain types only (loadable with torch.load(weights_only=True)), written atomically."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from flareseg.atomic import atomic_write

LATEST = "checkpoint_latest.pt"
BEST = "checkpoint_best.pt"


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


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint's state, loaded safely (tensors and plain types only), on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


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


def load_trained(path: str | os.PathLike, what: str = "checkpoint"):
    """The state and the resolved, validated config of a trained flareseg checkpoint (a clear error otherwise)."""
    from flareseg.config import Config, ConfigError
    from flareseg.config.loader import build_config

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    state = load_checkpoint(path)
    if "model" not in state or "config" not in state:
        raise ConfigError(f"{what} {path} is not a flareseg checkpoint (it needs 'model' and 'config')")
    return state, build_config(Config, state["config"], path.parent).validate()


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Fine-tuning start: copy every tensor whose name and shape match; report the rest."""
    state = load_checkpoint(path)
    if isinstance(state.get("model"), dict):
        state = state["model"]
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
    unwrap(model).load_state_dict(usable, strict=False)
    return report
