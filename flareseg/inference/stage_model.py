"""A trained stage network loaded from its checkpoint, run on a volume that is already on the device."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from flareseg.config import Config, ConfigError
from flareseg.config.loader import build_config
from flareseg.data.intensity import window_and_zscore
from flareseg.data.resample import resize_image
from flareseg.engine.checkpoint import load_checkpoint
from flareseg.models import build_model
from flareseg.models.runtime import autocast


class StageModel:
    """One stage: its config (from the checkpoint), network, input size and HU window."""

    def __init__(self, checkpoint: str | os.PathLike, device: torch.device, precision: str):
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        state = load_checkpoint(path)
        if "config" not in state or "model" not in state:
            raise ConfigError(f"{path} is not a flareseg checkpoint (it needs 'model' and 'config')")
        self.config: Config = build_config(Config, state["config"], path.parent).validate()
        self.model = build_model(self.config)
        self.model.load_state_dict(state["model"])
        self.model.eval().to(device)
        if self.config.model.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        self.device, self.precision = device, precision
        self.input_size = tuple(self.config.model.input_size)
        self.window = self.config.data.hu_window
        self.labels = list(self.config.data.labels)[: self.config.num_classes]

    @torch.inference_mode()
    def label_map(self, volume: torch.Tensor) -> torch.Tensor:
        """Label ids (uint8, at the model's input size) of a raw-HU [z, y, x] volume on the device.

        A voxel takes the label with the highest logit among those whose sigmoid exceeds 0.5 (logit > 0).
        """
        image = window_and_zscore(resize_image(volume, self.input_size), self.window)[None, None]
        if self.config.model.channels_last:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        with autocast(self.device, self.precision):
            logits = self.model(image)[0]
        best, index = logits.max(dim=0)
        return ((index + 1) * (best > 0)).to(torch.uint8)
