"""Model size and cost: parameters, and multiply-adds of a forward pass counted on the meta device (no compute).

Multiply-adds count the convolutions (and linear layers), which is where all but a fraction of a percent of the
arithmetic is; normalisation, activation, pooling and interpolation are not counted (as in the FLARE21
reference's "333 GB flops").
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_multiply_adds(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds of one forward pass at `input_shape` (B, C, D, H, W), from shapes alone."""
    meta_model = copy.deepcopy(model).to("meta").eval()
    total = 0

    def conv_hook(module: nn.Module, inputs, output) -> None:
        nonlocal total
        kernel = math.prod(module.kernel_size) * module.in_channels // module.groups
        if isinstance(module, nn.ConvTranspose3d):
            # Every input voxel is spread over a kernel of outputs.
            total += inputs[0].numel() * kernel * module.out_channels // module.in_channels
        else:
            total += output.numel() * kernel

    def linear_hook(module: nn.Linear, inputs, output) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for module in meta_model.modules():
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    with torch.no_grad():
        meta_model(torch.empty(input_shape, device="meta"))
    for handle in handles:
        handle.remove()
    return total
