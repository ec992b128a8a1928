"""Training throughput: loader samples/second per worker and training samples/second for each stage.

    python bench/bench_train.py                 # reference sizes: coarse BaseUNet 160^3, fine EfficientSegNet 192^3
    python bench/bench_train.py --tiny          # a seconds-long smoke run (used by the tests)

Data: 512x512x200 phantoms (13 organs) prepared at the reference sizes (not timed). The loader figure is one worker
process's rate: samples drawn in this process with one torch thread, augmentation as configured (the reference
per-organ HU shift), median over samples. The training figure is the median time of a full train_step (autocast
forward, loss, backward, clip, optimizer step) at batch 1 after one warm-up step, on CPU here or CUDA when present.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flareseg.config import load_config
from flareseg.data.phantom import write_phantom_dataset
from flareseg.data.prepare import prepare_dataset
from flareseg.data.prepared import PreparedData
from flareseg.data.training_sets import TrainingSamples
from flareseg.engine.distributed import DistributedContext
from flareseg.engine.trainer import Trainer
from flareseg.models.runtime import resolve_device

STAGES = {
    "coarse": ["model.name=base_unet", "model.channels=[8,16,32,64,128]", "model.input_size=[160,160,160]"],
    "fine": ["model.name=efficient_segnet", "model.channels=[16,32,64,128,256]", "model.input_size=[192,192,192]"],
}
TINY = {"coarse": ["model.input_size=[32,32,32]"], "fine": ["model.input_size=[32,32,32]"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8, help="loader samples timed per stage")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per stage")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="small phantoms and grids: checks that the script runs")
    args = parser.parse_args()
    shape = (200, 512, 512) if not args.tiny else (32, 64, 64)
    grids = [] if not args.tiny else ["prepare.grids.coarse.size=[32,32,32]", "prepare.grids.fine.size=[32,32,32]"]
    if args.tiny:
        args.cases, args.samples, args.steps = 3, 2, 1
    device = resolve_device(args.device)

    with tempfile.TemporaryDirectory(prefix="flareseg-bench-") as tmp:
        raw, data = Path(tmp) / "raw", Path(tmp) / "data"
        write_phantom_dataset(raw, args.cases, seed=0, shape=shape, orientation="ras")
        prepare = load_config(
            None,
            [
                f"prepare.images={raw / 'imagesTr'}",
                f"prepare.labels={raw / 'labelsTr'}",
                f"prepare.out={data}",
                "prepare.folds=1",
                *grids,
            ],
        )
        prepare_dataset(prepare, progress=False)
        rows = []
        for stage, model in STAGES.items():
            overrides = [
                *model,
                *(TINY[stage] if args.tiny else []),
                f"train.stage={stage}",
                f"train.data={data}",
                f"train.out={Path(tmp) / stage}",
                "train.fold=-1",
                "train.batch_size=1",
                "train.workers=0",
                "train.progress=false",
                "train.resume=false",
            ]
            config = load_config(None, overrides)
            rows.append(
                (stage, *_loader_rate(data, config, stage, args.samples), _training_rate(config, device, args.steps))
            )

    print(f"device {device}, torch threads {torch.get_num_threads()}, batch 1")
    print("| stage | input | loader samples/s per worker | training samples/s |\n|---|---|---|---|")
    for stage, size, loader, training in rows:
        print(f"| {stage} | {'x'.join(map(str, size))} | {loader:.2f} | {training:.3f} |")


def _loader_rate(data: Path, config, stage: str, samples: int) -> tuple[tuple[int, ...], float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what one DataLoader worker gets
    try:
        prepared = PreparedData(data)
        dataset = TrainingSamples(prepared, prepared.labeled_ids(), config, stage, length=samples + 1)
        dataset[0]  # warm-up: page cache, imports
        times = []
        for k in range(1, samples + 1):
            start = time.perf_counter()
            dataset[k]
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return tuple(config.model.input_size), 1.0 / statistics.median(times)


def _training_rate(config, device: torch.device, steps: int) -> float:
    context = DistributedContext(rank=0, world_size=1, local_rank=0, device=device)
    trainer = Trainer(config, context)
    trainer.network.train()
    loader = torch.utils.data.DataLoader(trainer.train_set, batch_size=1, shuffle=False)
    batches = iter(loader)
    trainer.train_step(next(batches))  # warm-up
    times = []
    for _ in range(steps):
        batch = next(batches, None) or next(iter(loader))
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train_step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1.0 / statistics.median(times)


if __name__ == "__main__":
    main()
