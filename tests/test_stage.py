"""The trained-stage contract (flareseg.stage.TrainedStage): what a checkpoint says about its network, read in one
place, outside the training package."""

from __future__ import annotations

import subprocess
import sys

import torch

from flareseg.checkpoint import save_checkpoint
from flareseg.config import load_config, to_plain
from flareseg.config.schema import GridConfig
from flareseg.models import build_model
from flareseg.stage import TrainedStage

LESION_MODEL = [
    "data.labels=[liver, kidney, spleen, lesion]",
    "data.hu_window=[-200, 300]",
    "train.stage=lesion",
    "train.label_groups=[[4], [1, 2, 3]]",  # lesions, with the organs as one context region
    "prepare.grids={lesion: {region: labels, spacing: [2.0, 1.5, 1.5]}}",
    "model.name=small_unet",
    "model.channels=[4,8,8,16]",
    "model.input_size=[16,24,24]",
    "model.channels_last=true",
]


def _checkpoint(tmp_path, overrides):
    config = load_config(None, overrides)
    torch.manual_seed(3)
    weights = build_model(config).state_dict()
    return save_checkpoint(tmp_path / "stage.pt", {"model": weights, "config": to_plain(config)}), weights


def test_a_checkpoint_says_its_grid_classes_and_the_ids_they_write(tmp_path):
    path, _ = _checkpoint(tmp_path, LESION_MODEL)
    stage = TrainedStage.load(path)
    assert stage.name == "lesion" and stage.grid == GridConfig(region="labels", spacing=(2.0, 1.5, 1.5), margin_mm=20.0)
    assert stage.grid.fixed_spacing and stage.input_size == (16, 24, 24) and stage.hu_window == (-200, 300)
    assert stage.class_groups == [[4], [1, 2, 3]] and stage.class_names == ["lesion", "liver+kidney+spleen"]
    assert stage.written_ids == [4, 0]  # the merged organ region is context: it is not written
    assert stage.region_ids == [4, 1]
    assert stage.label_names == ["liver", "kidney", "spleen", "lesion"] and stage.channels_last


def test_the_network_carries_the_weights_and_leaves_the_random_stream_alone(tmp_path):
    path, weights = _checkpoint(tmp_path, LESION_MODEL)
    stage = TrainedStage.load(path)
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    network = stage.network()
    assert torch.equal(torch.rand(1), expected_next)
    assert not network.training
    assert all(torch.equal(network.state_dict()[name], tensor) for name, tensor in weights.items())


def test_deployed_inference_does_not_import_the_training_package():
    code = (
        "import sys, flareseg.inference.predictor, flareseg.inference.batch, flareseg.stage; "
        "print(sorted(m for m in sys.modules if m.startswith('flareseg.engine')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
