"""BaseUNet (FLARE21 reference coarse network): residual encoder with max-pool downsampling, concatenating decoder.

x (B, 1, D, H, W)
-> level 0: 2 chained residual blocks (1 -> c0)             at D
-> levels 1..4: MaxPool3d(3, stride 2, pad 1), 2 residual blocks   D/2 .. D/16
-> 4 decoder steps: x2 trilinear upsample, concat the encoder skip, 1 residual block (c_{i+1} + c_i -> c_i)
-> head 1^3 conv (c0 -> C): one logit per organ
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flareseg.models.blocks import (
    REFERENCE_STYLE,
    EncoderDecoder,
    ResidualBlock,
    UnitStyle,
    check_network_arguments,
)


class ConcatDecoderStep(nn.Module):
    """Trilinear upsample to the skip's size -> concat [upsampled, skip] -> residual block (-> cout)."""

    def __init__(self, cin: int, cskip: int, cout: int, style: UnitStyle):
        super().__init__()
        self.block = ResidualBlock(cin + cskip, cout, style)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=True)
        return self.block(torch.cat([x, skip], dim=1))


class BaseUNet(EncoderDecoder):
    """Coarse whole-volume network. Input (B, in_channels, D, H, W), any size; output (B, num_classes, D, H, W)."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 13,
        channels: tuple[int, ...] = (8, 16, 32, 64, 128),
        blocks_per_stage: int = 2,
        style: UnitStyle = REFERENCE_STYLE,
    ):
        super().__init__()
        check_network_arguments(in_channels, num_classes, channels, blocks_per_stage)
        cins = (in_channels, *channels[:-1])
        self.encoder = nn.ModuleList(
            nn.Sequential(*[ResidualBlock(cin if b == 0 else cout, cout, style) for b in range(blocks_per_stage)])
            for cin, cout in zip(cins, channels)
        )
        self.pool = nn.MaxPool3d(3, stride=2, padding=1)
        self.decoder = nn.ModuleList(
            ConcatDecoderStep(channels[i + 1], channels[i], channels[i], style)
            for i in reversed(range(len(channels) - 1))
        )
        self.head = nn.Conv3d(channels[0], num_classes, 1, bias=False)

    def downsample(self, level: int, x: torch.Tensor) -> torch.Tensor:
        return x if level == 0 else self.pool(x)
