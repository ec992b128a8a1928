"""Networks by name: `build_model(config)` builds the one that `model.name` names."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from flareseg.config import Config
from flareseg.config.schema import ModelConfig
from flareseg.models.base_unet import BaseUNet
from flareseg.models.blocks import UnitStyle
from flareseg.models.efficient_segnet import EfficientSegNet
from flareseg.models.small_unet import SmallUNet
from flareseg.registry import Registry

Builder = Callable[[ModelConfig, int, UnitStyle], nn.Module]
MODELS: Registry[Builder] = Registry("model", "model.name")


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Add a network builder under `name` (names are unique)."""
    return MODELS.register(name)


@register_model("base_unet")
def _base_unet(cfg: ModelConfig, num_classes: int, style: UnitStyle) -> nn.Module:
    return BaseUNet(cfg.in_channels, num_classes, tuple(cfg.channels), cfg.blocks_per_stage, style)


@register_model("efficient_segnet")
def _efficient_segnet(cfg: ModelConfig, num_classes: int, style: UnitStyle) -> nn.Module:
    return EfficientSegNet(
        cfg.in_channels, num_classes, tuple(cfg.channels), cfg.blocks_per_stage, cfg.context_channels, style
    )


@register_model("small_unet")
def _small_unet(cfg: ModelConfig, num_classes: int, style: UnitStyle) -> nn.Module:
    return SmallUNet(cfg.in_channels, num_classes, tuple(cfg.channels), cfg.blocks_per_stage, style)


def build_model(config: Config, init: bool = True) -> nn.Module:
    """The network of `config.model`, in the configured memory format; its convolutions Kaiming-normal initialised
    unless `init` is False (weights loaded next: on the meta device, kaiming_normal_ imports torch._dynamo, sympy
    and torch._inductor, 2-3 s of a prediction's start-up)."""
    cfg = config.model
    builder = MODELS.lookup(cfg.name)
    style = UnitStyle(norm=cfg.norm, norm_affine=cfg.norm_affine, dropout=cfg.dropout, activation=cfg.activation)
    model = builder(cfg, config.num_classes, style)
    if init:
        init_weights(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    return model


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convolution weights (fan out, ReLU gain), zero biases, unit norm scales."""
    for module in model.modules():
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.InstanceNorm3d, nn.BatchNorm3d, nn.GroupNorm)) and module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
