"""Networks: exact parity with the reference counts, shapes at odd sizes, gradients, precisions, build errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from flareseg.config import ConfigError, load_config
from flareseg.models import (
    BaseUNet,
    EfficientSegNet,
    SmallUNet,
    build_model,
    count_multiply_adds,
    count_parameters,
)
from flareseg.models.runtime import autocast

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _config(*overrides: str):
    return load_config(None, ["model.dropout=0", *overrides])


def test_efficient_segnet_matches_the_reference_exactly():
    model = build_model(load_config(None, ["model.num_classes=4"]))
    assert isinstance(model, EfficientSegNet)
    assert count_parameters(model) == 9_366_016
    assert round(count_multiply_adds(model, (1, 1, 192, 192, 192)) / 2**30, 1) == 333.1


def test_base_unet_matches_the_reference_exactly():
    model = build_model(
        load_config(None, ["model.name=base_unet", "model.channels=[8,16,32,64,128]", "model.num_classes=4"])
    )
    assert isinstance(model, BaseUNet)
    assert count_parameters(model) == 2_676_480
    assert round(count_multiply_adds(model, (1, 1, 160, 160, 160)) / 2**30, 1) == 93.3


def test_thirteen_class_variants_follow_from_the_same_code():
    assert count_parameters(EfficientSegNet(num_classes=13)) == 9_366_016 + 9 * 16  # only the head grows
    assert count_parameters(BaseUNet(num_classes=13)) == 2_676_480 + 9 * 8
    flare22 = BaseUNet(num_classes=13, channels=(16, 32, 64, 128, 256))
    assert round(count_parameters(flare22) / 1e6, 2) == 10.71  # the FLARE22 variant


def test_small_unet_has_about_5_6_million_parameters():
    model = build_model(load_config(REPO_CONFIGS / "flare24_small_unet.yaml"))
    assert isinstance(model, SmallUNet)
    assert 5.55e6 < count_parameters(model) < 5.65e6
    assert len(model.encoder) == 4


def test_multiply_add_counter_on_single_layers():
    conv = nn.Conv3d(3, 5, (3, 1, 3), stride=2, padding=(1, 0, 1), bias=False)
    # output 4x3x3 voxels, each 3*1*3 taps over 3 input channels, for 5 output channels
    assert count_multiply_adds(conv, (1, 3, 7, 5, 6)) == (4 * 3 * 3) * 5 * (3 * 1 * 3 * 3)
    up = nn.ConvTranspose3d(4, 2, 2, stride=2, bias=False)
    assert count_multiply_adds(up, (2, 4, 3, 3, 3)) == 2 * 27 * 4 * 2 * 8


@pytest.mark.parametrize("name", ["base_unet", "efficient_segnet", "small_unet"])
@pytest.mark.parametrize("shape", [(1, 1, 35, 41, 29), (2, 1, 32, 32, 32), (1, 1, 17, 64, 23)])
def test_output_has_the_input_size_at_odd_shapes(name, shape):
    channels = "[32,64,128,256]" if name == "small_unet" else "[4,8,8,16,16]"
    model = build_model(_config(f"model.name={name}", f"model.channels={channels}", "model.num_classes=3"))
    with torch.no_grad():
        out = model.eval()(torch.randn(shape))
    assert out.shape == (shape[0], 3, *shape[2:]) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["base_unet", "efficient_segnet", "small_unet"])
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    channels = "[8,16,16,32]" if name == "small_unet" else "[4,8,8,16,16]"
    model = build_model(_config(f"model.name={name}", f"model.channels={channels}", "model.num_classes=2")).train()
    out = model(torch.randn(2, 1, 33, 32, 34))
    (out * torch.randn_like(out)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_reduced_precision_and_channels_last_agree_with_fp32():
    torch.manual_seed(0)
    model = build_model(_config("model.channels=[8,16,16,32,32]", "model.num_classes=3")).eval()
    x = torch.randn(1, 1, 32, 40, 36)
    device = torch.device("cpu")
    with torch.no_grad():
        reference = model(x)
        scale = reference.abs().max()
        for precision, tolerance in (("bf16", 0.05), ("fp16", 0.01)):
            with autocast(device, precision):
                out = model(x)
            assert out.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
            assert (out.float() - reference).abs().max() / scale < tolerance
        last = model.to(memory_format=torch.channels_last_3d)(x.contiguous(memory_format=torch.channels_last_3d))
    assert torch.allclose(last, reference, atol=1e-5)


def test_channels_last_option_builds_a_channels_last_model():
    model = build_model(_config("model.channels=[4,8,8,16,16]", "model.channels_last=true"))
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv3d) and m.kernel_size == (3, 3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)


@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_runs_on_cuda(precision):
    device = torch.device("cuda")
    model = build_model(_config("model.num_classes=4")).eval().to(device)
    x = torch.randn(1, 1, 64, 64, 64, device=device)
    with torch.no_grad():
        reference = model(x)
        with autocast(device, precision):
            out = model(x)
    assert torch.isfinite(out).all() and (out.float() - reference).abs().max() / reference.abs().max() < 0.05


def test_build_errors_are_clear():
    with pytest.raises(ConfigError, match="did you mean 'efficient_segnet'.*known: base_unet, efficient_segnet"):
        build_model(load_config(None, ["model.name=efficient_segnett"]))
    with pytest.raises(ConfigError, match="'model.channels' needs at least 2 stages"):
        load_config(None, ["model.channels=[16]"])
    with pytest.raises(ConfigError, match="'model.dropout' must be in"):
        load_config(None, ["model.dropout=1.5"])
    with pytest.raises(ConfigError, match="'model.norm' must be one of"):
        load_config(None, ["model.norm=layer"])
    with pytest.raises(ValueError, match="blocks_per_stage must be >= 1"):
        EfficientSegNet(blocks_per_stage=0)
    with pytest.raises(ValueError, match="channels must list at least 2"):
        BaseUNet(channels=(8,))


def test_num_classes_follows_the_labels():
    model = build_model(load_config(None, ["data.labels=[liver, spleen, lesion]", "model.channels=[4,8,8,16,16]"]))
    assert model.head.out_channels == 3
