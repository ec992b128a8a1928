"""A small 4-stage U-Net in the style of the FLARE24 Task 1 winner (nnU-Net's plain conv U-Net, 4 stages).

    x (B, 1, D, H, W)
    -> stage 0: 2 x (conv 3^3 -> norm -> activation) (1 -> c0)     at D
    -> stages 1..3: the same, the first conv with stride 2       D/2 .. D/8
    -> 3 decoder steps: transposed conv 2^3 stride 2 (c_{i+1} -> c_i), concat the skip, 2 conv units (2 c_i -> c_i)
    -> head 1^3 conv (c0 -> C)

With channels 32, 64, 128, 256 it has about 5.6 M parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from flareseg.models.blocks import ConvUnit, EncoderDecoder, UnitStyle, check_network_arguments

NNUNET_STYLE = UnitStyle(norm_affine=True, dropout=0.0, activation="leaky_relu")  # nnU-Net's conv unit


def conv_stage(cin: int, cout: int, convs: int, stride: int, style: UnitStyle) -> nn.Sequential:
    return nn.Sequential(
        *[ConvUnit(cin if i == 0 else cout, cout, 3, style, stride=stride if i == 0 else 1) for i in range(convs)]
    )


class UpStep(nn.Module):
    """Transposed conv x2 (cropped to the skip's size) -> concat [up, skip] -> conv units."""

    def __init__(self, cin: int, cout: int, convs: int, style: UnitStyle):
        super().__init__()
        self.up = nn.ConvTranspose3d(cin, cout, 2, stride=2, bias=False)
        self.convs = conv_stage(2 * cout, cout, convs, 1, style)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)[:, :, : skip.shape[2], : skip.shape[3], : skip.shape[4]]  # odd sizes: 2 * ceil(n / 2) -> n
        return self.convs(torch.cat([x, skip], dim=1))


class SmallUNet(EncoderDecoder):
    """Input (B, in_channels, D, H, W), any size; output (B, num_classes, D, H, W) logits."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 14,
        channels: tuple[int, ...] = (32, 64, 128, 256),
        blocks_per_stage: int = 2,
        style: UnitStyle = NNUNET_STYLE,
    ):
        super().__init__()
        check_network_arguments(in_channels, num_classes, channels, blocks_per_stage)
        cins = (in_channels, *channels[:-1])
        self.encoder = nn.ModuleList(
            conv_stage(cin, cout, blocks_per_stage, stride=1 if i == 0 else 2, style=style)
            for i, (cin, cout) in enumerate(zip(cins, channels))
        )
        self.decoder = nn.ModuleList(
            UpStep(channels[i + 1], channels[i], blocks_per_stage, style) for i in reversed(range(len(channels) - 1))
        )
        self.head = nn.Conv3d(channels[0], num_classes, 1, bias=False)
