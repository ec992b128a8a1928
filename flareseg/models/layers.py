"""Layer factories chosen by name: normalisation and activation, so networks take their layer types as config."""

from __future__ import annotations

from typing import Literal

from torch import nn

Norm = Literal["instance", "batch", "group"]
Activation = Literal["relu", "leaky_relu", "gelu", "silu"]
NORMS = ("instance", "batch", "group")
ACTIVATIONS = ("relu", "leaky_relu", "gelu", "silu")


def make_norm(kind: Norm, channels: int, affine: bool) -> nn.Module:
    """A 3D normalisation layer over `channels` feature maps."""
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=affine)
    if kind == "batch":
        return nn.BatchNorm3d(channels, affine=affine)
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels, affine=affine)
    raise ValueError(f"unknown norm {kind!r}; choose one of {', '.join(NORMS)}")


def make_activation(kind: Activation) -> nn.Module:
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "leaky_relu":
        return nn.LeakyReLU(0.01, inplace=True)
    if kind == "gelu":
        return nn.GELU()
    if kind == "silu":
        return nn.SiLU(inplace=True)
    raise ValueError(f"unknown activation {kind!r}; choose one of {', '.join(ACTIVATIONS)}")
