"""EfficientSegNet (FLARE21 winner's fine network): residual encoder, context bottleneck, slim additive decoder.

x (B, 1, D, H, W)
-> stage 0: 2 residual blocks (1 -> c0)                  at D
-> stages 1..4: 2 residual blocks, the first with stride 2   D/2 .. D/16
-> context block on the bottleneck (c4 -> 64 -> c4)
-> 4 decoder steps: CIR 1^3 (c_{i+1} -> c_i), x2 trilinear upsample, + encoder skip, anisotropic block
-> head 1^3 conv (c0 -> C): one logit per organ, no background channel
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flareseg.models.blocks import (
    REFERENCE_STYLE,
    AnisotropicBlock,
    ContextBlock,
    ConvUnit,
    EncoderDecoder,
    ResidualBlock,
    UnitStyle,
    check_network_arguments,
)


def encoder_stage(cin: int, cout: int, blocks: int, stride: int, style: UnitStyle) -> nn.Sequential:
    """`blocks` residual blocks; the first carries the stride and always has a projection shortcut."""
    layers = [ResidualBlock(cin, cout, style, stride=stride, project=True)]
    layers += [ResidualBlock(cout, cout, style) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class SlimDecoderStep(nn.Module):
    """CIR 1^3 (cin -> cout) -> trilinear upsample to the skip's size -> + skip -> anisotropic block."""

    def __init__(self, cin: int, cout: int, style: UnitStyle):
        super().__init__()
        self.reduce = ConvUnit(cin, cout, 1, style)
        self.block = AnisotropicBlock(cout, cout, style, project=True)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.reduce(x), size=skip.shape[2:], mode="trilinear", align_corners=True)
        return self.block(x + skip)


class EfficientSegNet(EncoderDecoder):
    """Fine ROI network. Input (B, in_channels, D, H, W), any size; output (B, num_classes, D, H, W) logits."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 13,
        channels: tuple[int, ...] = (16, 32, 64, 128, 256),
        blocks_per_stage: int = 2,
        context_channels: int = 64,
        style: UnitStyle = REFERENCE_STYLE,
    ):
        super().__init__()
        check_network_arguments(in_channels, num_classes, channels, blocks_per_stage)
        if context_channels < 1:
            raise ValueError(f"context_channels must be >= 1, got {context_channels}")
        cins = (in_channels, *channels[:-1])
        self.encoder = nn.ModuleList(
            encoder_stage(cin, cout, blocks_per_stage, stride=1 if i == 0 else 2, style=style)
            for i, (cin, cout) in enumerate(zip(cins, channels))
        )
        self.context = ContextBlock(channels[-1], context_channels, channels[-1], style)
        self.decoder = nn.ModuleList(
            SlimDecoderStep(channels[i + 1], channels[i], style) for i in reversed(range(len(channels) - 1))
        )
        self.head = nn.Conv3d(channels[0], num_classes, 1, bias=False)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return self.context(x)
