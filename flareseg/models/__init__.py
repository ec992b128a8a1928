"""Networks (coarse BaseUNet, fine EfficientSegNet, FLARE24 small U-Net), their blocks, and `build_model`."""

from flareseg.models.base_unet import BaseUNet
from flareseg.models.blocks import AnisotropicBlock, ContextBlock, ConvUnit, ResidualBlock, UnitStyle
from flareseg.models.complexity import count_multiply_adds, count_parameters
from flareseg.models.efficient_segnet import EfficientSegNet
from flareseg.models.registry import MODELS, build_model, register_model
from flareseg.models.small_unet import SmallUNet

__all__ = [
    "MODELS",
    "AnisotropicBlock",
    "BaseUNet",
    "ContextBlock",
    "ConvUnit",
    "EfficientSegNet",
    "ResidualBlock",
    "SmallUNet",
    "UnitStyle",
    "build_model",
    "count_multiply_adds",
    "count_parameters",
    "register_model",
]
