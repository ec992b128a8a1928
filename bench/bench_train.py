"""Training throughput: loader samples/second per worker and training samples/second for each stage.

    python bench/bench_train.py                 # reference sizes: coarse BaseUNet 160^3, fine EfficientSegNet 192^3
    python bench/bench_train.py --tiny          # a seconds-long smoke run (used by the tests)

Data: 512x512x200 phantoms (13 organs) prepared at the reference sizes (not timed). The loader figure is one worker
process's rate: samples drawn in this process with one torch thread, augmentation as configured (the reference
per-organ HU shift), median over samples. The training figure is the median time of a full train_step (autocast
forward, loss, backward, clip, optimizer step) at --batch-size (default 1) after one warm-up step, on CPU here or
CUDA when present. On CUDA it also gives the GPU memory of those steps (the device's memory in use after them, the
CUDA context included, and torch's peak allocated), beside the training memory that `flareseg plan` budgets for the
network (flareseg.planning.network_memory: NetworkMemory.gigabytes), so that the planner's model is checked.
"""

from __future__ import annotations

import argparse
import gc
import json
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
from flareseg.planning.network_memory import network_memory

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
    parser.add_argument("--batch-size", type=int, default=1, help="training batch (the reference trains at 2)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
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
                f"train.batch_size={args.batch_size}",
                "train.workers=0",
                "train.progress=false",
                "train.resume=false",
            ]
            config = load_config(None, overrides)
            size, loader = _loader_rate(data, config, stage, args.samples)
            training, memory = _training_rate(config, device, args.steps)
            voxels = size[0] * size[1] * size[2]
            planned = network_memory(config).gigabytes(voxels, args.batch_size)  # what `flareseg plan` budgets
            rows.append({"stage": stage, "input": list(size), "loader_samples_per_s": loader, **training, **memory})
            rows[-1]["planned_gb"] = planned

    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}")
    print(
        "| stage | input | loader samples/s per worker | training samples/s | GPU GiB in use (peak allocated) "
        "| GiB planned (`flareseg plan`'s model) |\n|---|---|---|---|---|---|"
    )
    for row in rows:
        gpu = "-" if row["gpu_used_gb"] is None else f"{row['gpu_used_gb']:.2f} ({row['peak_allocated_gb']:.2f})"
        print(
            f"| {row['stage']} | {'x'.join(map(str, row['input']))} | {row['loader_samples_per_s']:.2f} "
            f"| {row['training_samples_per_s']:.3f} | {gpu} | {row['planned_gb']:.2f} |"
        )
    if args.json:
        figures = {"device": str(device), "batch_size": args.batch_size, "stages": {row["stage"]: row for row in rows}}
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


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


def _training_rate(config, device: torch.device, steps: int) -> tuple[dict, dict]:
    """Samples/s of train_step; on CUDA, the peak memory of the steps (GiB): torch's allocated and reserved, and
    the device's memory in use after them (the CUDA context included, as the planner's model counts it)."""
    context = DistributedContext(rank=0, world_size=1, local_rank=0, device=device)
    trainer = Trainer(config, context)
    trainer.network.train()
    batch_size = config.train.batch_size
    loader = torch.utils.data.DataLoader(trainer.train_set, batch_size=batch_size, shuffle=False, drop_last=True)
    batches = iter(loader)
    if device.type == "cuda":  # the figures of this stage alone: the last stage's cached memory is given back
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
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
    memory = {"gpu_used_gb": None, "peak_allocated_gb": None, "peak_reserved_gb": None}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        memory = {
            "gpu_used_gb": (total - free) / 2**30,
            "peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    return {"training_samples_per_s": batch_size / statistics.median(times)}, memory


if __name__ == "__main__":
    main()
