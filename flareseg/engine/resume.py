"""Whether a run folder's checkpoint_latest.pt can continue under this run's config, and if not, why in one line.

A resumed run continues the network and optimizer state of its checkpoint. A checkpoint of another network (the
config's model section or classes changed since) or of another optimizer cannot be continued: the error names the
setting that differs and the two ways out.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from flareseg.checkpoint import CheckpointError, check_weights, load_checkpoint
from flareseg.config import Config, to_plain

TRAINING_STATE = ("model", "optimizer", "scaler", "epoch", "best_val_dice_mean", "elapsed_seconds", "rng_cpu")
FRESH_START = "use a new train.out, or set train.resume=false to start over in this folder"
# the settings that decide the network's tensors (named when the checkpoint's tensors do not fit)
_NETWORK_KEYS = ("model", "data.labels", "train.label_groups")


def resume_what(path: Path) -> str:
    """The start of every resume error message."""
    return f"'train.resume': {path}"


def read_training_state(path: Path, config: Config, model: nn.Module) -> dict:
    """The state of checkpoint `path`, checked to continue `config`'s network (`model`) and optimizer."""
    try:
        state = load_checkpoint(path, "'train.resume': checkpoint")
    except CheckpointError as error:
        raise CheckpointError(f"{error}; {FRESH_START}") from None
    check_resumable(state, config, model, path)
    return state


def check_resumable(state: dict, config: Config, model: nn.Module, path: Path) -> None:
    """Raise a CheckpointError unless `state` (loaded from `path`) continues with `config`'s network and optimizer."""
    what = resume_what(path)
    missing = [key for key in (*TRAINING_STATE, "config") if key not in state]
    if missing:
        raise CheckpointError(f"{what} is not a flareseg training checkpoint (no {', '.join(missing)}): {FRESH_START}")
    saved = _flatten(state["config"])
    optimizer = saved.get("train.optimizer")
    if optimizer != config.train.optimizer:
        raise CheckpointError(
            f"{what} was trained with train.optimizer={optimizer}, this run asks for {config.train.optimizer}: "
            f"set train.optimizer={optimizer} to continue it, or {FRESH_START}"
        )
    try:
        check_weights(model, state["model"], what)
    except CheckpointError as error:
        now = _flatten(to_plain(config))
        changed = [
            f"{key} {saved.get(key)} there, {now.get(key)} here"
            for key in sorted(set(saved) | set(now))
            if key.startswith(_NETWORK_KEYS) and saved.get(key) != now.get(key)
        ]
        if not changed:
            raise CheckpointError(f"{error}: {FRESH_START}") from None
        raise CheckpointError(
            f"{what} holds another network than this config builds ({'; '.join(changed)}): {FRESH_START}"
        ) from None


def check_same_split(state: dict, split: dict[str, list[str]], path: Path) -> None:
    """Raise a CheckpointError when the fold's training or validation cases changed since the run started (a
    rerun of prepare removed or added cases, so the splits were dealt anew): continuing would validate, and choose
    the best checkpoint, on cases the network has trained on. Checkpoints without a stored split are not checked."""
    saved = state.get("split")
    if saved is None or saved == split:
        return
    moved = []
    for part in ("train", "val"):
        added, removed = sorted(set(split[part]) - set(saved[part])), sorted(set(saved[part]) - set(split[part]))
        if added or removed:
            moved.append(f"{part}: {len(added)} added ({_few(added)}), {len(removed)} removed ({_few(removed)})")
    raise CheckpointError(
        f"{resume_what(path)} was trained on another split of this fold's cases (the prepared data changed since: "
        f"{'; '.join(moved)}); continuing would validate on cases it trained on: {FRESH_START}"
    )


def _few(ids: list[str]) -> str:
    return ", ".join(ids[:3]) + (" ..." if len(ids) > 3 else "") if ids else "none"


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, what: str) -> None:
    """`optimizer.load_state_dict(state)`, or a one-line CheckpointError when its parameter groups differ."""
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{what}: its optimizer state does not fit this run ({error}): {FRESH_START}") from None


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict) -> None:
    """Restore the fp16 loss scaler; a run that used no fp16 until now saved an empty state: start it afresh."""
    if state or not scaler.is_enabled():
        scaler.load_state_dict(state)


def _flatten(tree: object, prefix: str = "") -> dict[str, object]:
    """{"model.channels": [..], ...} of a nested plain config."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat: dict[str, object] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat
