"""A trained stage: the hand-off from training to everything that runs a trained network.

The predictor, pseudo-labelling (through the predictor), distillation's teacher and export read a checkpoint only
through TrainedStage: its grid (a fixed size or a fixed spacing, as the training data was prepared), network input
size, HU window, class groups and the label ids they write, label names and memory format. It lives outside the
training package, so deployed inference never imports `flareseg.engine`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flareseg.checkpoint import CheckpointError, check_weights, load_checkpoint
from flareseg.config import Config, ConfigError
from flareseg.config.schema import GridConfig


@dataclass(frozen=True)
class TrainedStage:
    """What a checkpoint says about the network it holds. Build it with `TrainedStage.load(path)`."""

    path: Path
    config: Config  # the resolved config it was trained with (the prepared grids included)
    weights: dict  # the network's state dict, checked against the network its config describes

    @classmethod
    def load(cls, path: str | os.PathLike, what: str = "checkpoint") -> TrainedStage:
        """A trained flareseg checkpoint, or a one-line CheckpointError naming `what` and the file."""

        path = Path(path)
        return cls.from_state(path, load_checkpoint(path, what), what)

    @classmethod
    def from_state(cls, path: Path, state: dict, what: str = "checkpoint") -> TrainedStage:
        """As `load`, from a checkpoint's state already loaded from `path`."""
        from flareseg.config.loader import build_config
        from flareseg.models import build_model

        if not isinstance(state.get("model"), dict) or not isinstance(state.get("config"), dict):
            raise CheckpointError(f"{what} {path} is not a flareseg checkpoint (it needs 'model' and 'config')")
        try:
            config = build_config(Config, state["config"], path.parent).validate()
            config.grid(config.train.stage)  # the grid it learned on travels with it
        except ConfigError as error:
            raise CheckpointError(f"{what} {path} holds a config this flareseg cannot use: {error}") from None
        # the weights must be those of the network its config describes (built on the meta device: no memory, no
        # time), so that `network` loads them without a second check
        with torch.device("meta"):
            skeleton = build_model(config, init=False)
        check_weights(skeleton, state["model"], f"{what} {path} (model.name {config.model.name})")
        return cls(path, config, state["model"])

    @property
    def name(self) -> str:
        """The stage it was trained as (train.stage: the name of the prepared grid it learned on)."""
        return self.config.train.stage

    @property
    def grid(self) -> GridConfig:
        """The prepared grid it learned on: its region (whole volume or label box), fixed size or fixed spacing."""
        return self.config.grid(self.name)

    @property
    def input_size(self) -> tuple[int, ...]:
        return tuple(self.config.model.input_size)

    @property
    def hu_window(self) -> tuple[float, float]:
        return tuple(self.config.data.hu_window)

    @property
    def class_groups(self) -> list[list[int]]:
        """The label ids each network class stands for (train.label_groups, or class k = label k + 1)."""
        return self.config.class_label_groups

    @property
    def class_names(self) -> list[str]:
        """One name per network class."""
        return self.config.class_names

    @property
    def label_names(self) -> list[str]:
        """Names of the label ids 1..N its outputs are written as (data.labels)."""
        return list(self.config.data.labels)

    @property
    def written_ids(self) -> list[int]:
        """The label id each network class writes: its group's id; 0 for a group merging several labels (a region,
        which a ROI stage uses for its box and a segmenting stage does not write)."""
        return [group[0] if len(group) == 1 else 0 for group in self.class_groups]

    @property
    def region_ids(self) -> list[int]:
        """The id each network class stands for as a region (its group's first id)."""
        return [group[0] for group in self.class_groups]

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def channels_last(self) -> bool:
        return self.config.model.channels_last

    def network(self) -> nn.Module:
        """A new network with these weights, in eval mode on the CPU (the caller moves it). Building it does not
        touch the global random stream."""
        from flareseg.models import build_model

        with torch.random.fork_rng(devices=[]):
            model = build_model(self.config, init=False)
        model.load_state_dict(self.weights)
        return model.eval()
