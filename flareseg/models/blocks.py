"""The building blocks of flareseg's networks. Shapes are (B, C, D, H, W) = (batch, channels, z, y, x).

- ConvUnit: Conv3d (no bias) -> norm -> Dropout3d -> activation ("CIR" in the FLARE21 reference), or without
  the activation ("CI").
- ResidualBlock: CIR 3^3 (carries the stride) -> CI 3^3, plus a shortcut (identity, or CI 1^3 with the stride
  when the shape changes or a projection is asked for), then the activation after the sum.
- AnisotropicBlock: the same with kernels (3, 3, 1) then (1, 1, 3), in tensor order on [z, y, x] data.
- ContextBlock: the EfficientSegNet bottleneck: pyramid average pooling + strip pooling along each axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flareseg.models.layers import Activation, Norm, make_activation, make_norm


@dataclass(frozen=True)
class UnitStyle:
    """How every conv unit of a network is normalised, regularised and activated."""

    norm: Norm = "instance"
    norm_affine: bool = False
    dropout: float = 0.2
    activation: Activation = "relu"


REFERENCE_STYLE = UnitStyle()  # the FLARE21 reference: instance norm without affine, Dropout3d(0.2), ReLU


def check_network_arguments(in_channels: int, num_classes: int, channels, blocks_per_stage: int) -> None:
    """Shared argument checks of the networks, with messages that say what is wrong."""
    if in_channels < 1 or num_classes < 1:
        raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels} and {num_classes}")
    if len(channels) < 2 or min(channels) < 1:
        raise ValueError(f"channels must list at least 2 positive widths (one per stage), got {list(channels)}")
    if blocks_per_stage < 1:
        raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")


class ConvUnit(nn.Module):
    """Conv3d (bias=False) -> norm -> Dropout3d -> activation (activation omitted when `act=False`)."""

    def __init__(self, cin: int, cout: int, kernel, style: UnitStyle, stride=1, padding=None, act: bool = True):
        super().__init__()
        kernel = _triple(kernel)
        padding = tuple(k // 2 for k in kernel) if padding is None else _triple(padding)
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.norm = make_norm(style.norm, cout, style.norm_affine)
        self.drop = nn.Dropout3d(style.dropout) if style.dropout > 0 else nn.Identity()
        self.act = make_activation(style.activation) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.dtype != torch.float32:
            # Under fp16/bf16 autocast the statistics are taken in float32: on small feature maps (a few voxels
            # per channel at the bottleneck) reduced-precision normalisation overflows in the backward pass.
            x = self.norm(x.float()).to(x.dtype)
        else:
            x = self.norm(x)
        return self.act(self.drop(x))


class ResidualBlock(nn.Module):
    """CIR k -> CI k (+ shortcut) -> activation. `kernels` = (first, second) conv kernels."""

    def __init__(
        self,
        cin: int,
        cout: int,
        style: UnitStyle,
        stride: int = 1,
        project: bool = False,
        kernels=((3, 3, 3), (3, 3, 3)),
    ):
        super().__init__()
        self.conv1 = ConvUnit(cin, cout, kernels[0], style, stride=stride)
        self.conv2 = ConvUnit(cout, cout, kernels[1], style, act=False)
        needs_projection = project or stride != 1 or cin != cout
        self.shortcut = ConvUnit(cin, cout, 1, style, stride=stride, act=False) if needs_projection else nn.Identity()
        self.act = make_activation(style.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class AnisotropicBlock(ResidualBlock):
    """A residual block with kernels (3, 3, 1) then (1, 1, 3) (FLARE21 reference order on [z, y, x] tensors)."""

    def __init__(self, cin: int, cout: int, style: UnitStyle, project: bool = True):
        super().__init__(cin, cout, style, stride=1, project=project, kernels=((3, 3, 1), (1, 1, 3)))


class ContextBlock(nn.Module):
    """Efficient context block at the bottleneck; every pooling follows the size of its input.

    x0 = CIR 1^3 (cin -> mid)
    pyramid: on CIR 1^3(x0): CI 3^3 at full size + CI 3^3 after AvgPool 2^3 + CI 3^3 after AvgPool 4^3, each
        upsampled back, summed, activation, CIR 3^3
    strips: on CIR 1^3(x0): average pools over two whole axes at a time ((1, H, W), (D, 1, W), (D, H, 1)), each
        followed by a 1-D CI conv along its remaining axis, broadcast back, summed, activation, CIR 3^3
    out = act(x0 + CI 1^3(concat(pyramid, strips))) -> CIR 3^3 (mid -> mid) -> conv 1^3 (mid -> cout)
    """

    pyramid_scales = (1, 2, 4)

    def __init__(self, cin: int, mid: int, cout: int, style: UnitStyle):
        super().__init__()
        self.reduce = ConvUnit(cin, mid, 1, style)
        self.pyramid_in = ConvUnit(mid, mid, 1, style)
        self.pyramid = nn.ModuleList(ConvUnit(mid, mid, 3, style, act=False) for _ in self.pyramid_scales)
        self.pyramid_out = ConvUnit(mid, mid, 3, style)
        self.strip_in = ConvUnit(mid, mid, 1, style)
        self.strip_d = ConvUnit(mid, mid, (3, 1, 1), style, act=False)  # along z, after pooling y and x
        self.strip_h = ConvUnit(mid, mid, (1, 3, 1), style, act=False)
        self.strip_w = ConvUnit(mid, mid, (1, 1, 3), style, act=False)
        self.strip_out = ConvUnit(mid, mid, 3, style)
        self.fuse = ConvUnit(2 * mid, mid, 1, style, act=False)
        self.refine = ConvUnit(mid, mid, 3, style)
        self.expand = nn.Conv3d(mid, cout, 1, bias=False)
        self.act = make_activation(style.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.reduce(x)
        pyramid = self.act(self._pyramid(self.pyramid_in(x0)))
        strips = self.act(self._strips(self.strip_in(x0)))
        fused = self.act(x0 + self.fuse(torch.cat([self.pyramid_out(pyramid), self.strip_out(strips)], dim=1)))
        return self.expand(self.refine(fused))

    def _pyramid(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pyramid[0](x)
        for scale, conv in zip(self.pyramid_scales[1:], self.pyramid[1:]):
            # AvgPool scale^3 (12 -> 6 and 3 at the reference size). On small or odd sizes the kernel shrinks so
            # that at least 2 voxels per axis remain (instance norm needs more than one value), and a partial last
            # window is averaged over what it covers.
            kernel = [max(1, min(scale, n // 2)) for n in x.shape[2:]]
            pooled = F.avg_pool3d(x, kernel, stride=kernel, ceil_mode=True)
            out = out + F.interpolate(conv(pooled), size=x.shape[2:], mode="trilinear", align_corners=True)
        return out

    def _strips(self, x: torch.Tensor) -> torch.Tensor:
        along_d = self.strip_d(x.mean(dim=(3, 4), keepdim=True))  # (B, C, D, 1, 1)
        along_h = self.strip_h(x.mean(dim=(2, 4), keepdim=True))  # (B, C, 1, H, 1)
        along_w = self.strip_w(x.mean(dim=(2, 3), keepdim=True))  # (B, C, 1, 1, W)
        return along_d + along_h + along_w  # broadcast back to (B, C, D, H, W)


class EncoderDecoder(nn.Module):
    """The forward every flareseg network shares. Each encoder stage's output is a skip; the deepest, through
    `bottleneck`, goes up the decoder steps, each joining the next skip; a 1x1x1 head gives the logits.

    Subclasses build `encoder` and `decoder` (nn.ModuleLists) and `head`, and may override `downsample` (what a
    stage's input goes through first: pooling, where the stages do not stride themselves) and `bottleneck`."""

    encoder: nn.ModuleList
    decoder: nn.ModuleList
    head: nn.Module

    def downsample(self, level: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, stage in enumerate(self.encoder):
            x = stage(self.downsample(level, x))
            skips.append(x)
        x = self.bottleneck(skips.pop())
        for step in self.decoder:
            x = step(x, skips.pop())
        return self.head(x)


def _triple(value) -> tuple[int, int, int]:
    return (value,) * 3 if isinstance(value, int) else tuple(value)
