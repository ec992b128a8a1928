"""Tiny phantom datasets and checkpoints shared by the inference and semi-supervised tests: enough to run the
pipelines in seconds, not to be accurate."""

from __future__ import annotations

from pathlib import Path

import torch

from flareseg.checkpoint import LATEST
from flareseg.config import load_config
from flareseg.data.prepare import prepare_dataset
from flareseg.engine.distributed import DistributedContext
from flareseg.engine.trainer import Trainer

CPU = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
LABELS = "data.labels=[liver, kidney, spleen]"
LIVER_KIDNEY_SPLEEN = [LABELS, "prepare.label_map={1: 1, 2: 2, 13: 2, 3: 3}"]
STAGE_MODELS = {
    "coarse": ["model.name=base_unet", "model.channels=[4,8,8,16]", "model.input_size=[24,24,24]"],
    "fine": ["model.channels=[4,8,8,16,16]", "model.input_size=[32,32,32]"],
}


def prepare_tiny(raw: Path, out: Path, *overrides: str) -> Path:
    """Prepare raw/imagesTr, raw/labelsTr (and raw/unlabeled when present) at 24^3 coarse and 32^3 fine."""
    unlabeled = [f"prepare.unlabeled={raw / 'unlabeled'}"] if (raw / "unlabeled").is_dir() else []
    config = load_config(
        None,
        [
            "prepare.grids.coarse.size=[24,24,24]",
            "prepare.grids.fine.size=[32,32,32]",
            f"prepare.images={raw / 'imagesTr'}",
            f"prepare.labels={raw / 'labelsTr'}",
            f"prepare.out={out}",
            *unlabeled,
            *overrides,
        ],
    )
    assert prepare_dataset(config, progress=False).ok
    return out


def train_tiny(data: Path, out: Path, stage: str, *overrides: str, network: str | None = None) -> Path:
    """Train the tiny `stage` network (STAGE_MODELS[network], default the stage's own) for one epoch of two steps on
    every labeled case; returns its checkpoint."""
    config = load_config(
        None,
        [
            f"train.data={data}",
            "train.fold=-1",
            "train.epochs=1",
            "train.workers=0",
            "train.progress=false",
            "train.iterations_per_epoch=2",
            "model.dropout=0",
            *STAGE_MODELS[network or stage],
            f"train.stage={stage}",
            f"train.out={out}",
            *overrides,
        ],
    )
    Trainer(config, CPU).fit()
    return out / LATEST
