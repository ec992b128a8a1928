"""DataLoader start-up cost per worker start method: fork, forkserver, forkserver with flareseg's preload, spawn.

    python bench/bench_loader_start.py              # 5 repeats of 4 epochs per variant
    python bench/bench_loader_start.py --tiny       # one short repeat (used by the tests)

Data: 4 phantoms prepared at a 32^3 coarse grid (not timed); training samples of the coarse stage, augmented, batch 2,
2 workers, a new loader per epoch as the trainer builds them (workers not persistent). Each repeat runs every variant
in a fresh interpreter that has already imported flareseg and torch (as a trainer has), the variants alternated.
Figures are medians over repeats:
    first batch    seconds from iter() to the first batch of the first epoch (includes starting the fork server)
    later epochs   the same for epochs 2..N (median within a run): the start-up each epoch pays
    overhead       later epochs minus the time to compute one batch in-process: what starting workers adds per epoch
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Only the standard library at the top: forkserver workers and the fork server import this main module, and the
# plain forkserver variant must not get torch preloaded through it.
VARIANTS = ("fork", "forkserver", "forkserver+preload", "spawn")
GRID = ["prepare.grids.coarse.size=[32,32,32]", "prepare.grids.fine.size=[32,32,32]", "model.input_size=[32,32,32]"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="one repeat of 2 epochs: checks that the script runs")
    parser.add_argument("--measure", choices=VARIANTS, help=argparse.SUPPRESS)  # one run, in a child interpreter
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(_measure(args.measure, args.data, args.epochs, args.workers)))
        return 0
    if args.tiny:
        args.repeats, args.epochs = 1, 2
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    with tempfile.TemporaryDirectory(prefix="flareseg-bench-") as tmp:
        data = _prepare(Path(tmp))
        runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
        for repeat in range(args.repeats):
            order = VARIANTS if repeat % 2 == 0 else tuple(reversed(VARIANTS))  # alternate, no variant always first
            for variant in order:
                runs[variant].append(_child(variant, data, args.epochs, args.workers))
    print(f"{args.workers} workers, batch 2, {args.epochs} epochs of 4 batches, medians of {args.repeats} runs")
    print("| start method | first batch s | later epochs: first batch s | one batch in-process s | overhead s/epoch |")
    print("|---|---|---|---|---|")
    for variant, results in runs.items():
        first, later, batch = (statistics.median(r[key] for r in results) for key in ("first", "later", "batch"))
        print(f"| {variant} | {first:.2f} | {later:.2f} | {batch:.3f} | {later - batch:.2f} |")
    return 0


def _prepare(root: Path) -> Path:
    from flareseg.config import load_config
    from flareseg.data.phantom import write_phantom_dataset
    from flareseg.data.prepare import prepare_dataset

    write_phantom_dataset(root / "raw", 4, seed=0, shape=(32, 64, 64), orientation="ras")
    settings = [f"prepare.images={root / 'raw' / 'imagesTr'}", f"prepare.labels={root / 'raw' / 'labelsTr'}"]
    config = load_config(None, [*settings, f"prepare.out={root / 'data'}", "prepare.folds=1", *GRID])
    if not prepare_dataset(config, progress=False).ok:
        raise RuntimeError("preparing the benchmark data failed")
    return root / "data"


def _child(variant: str, data: Path, epochs: int, workers: int) -> dict:
    command = [sys.executable, __file__, "--measure", variant, "--data", str(data), "--epochs", str(epochs)]
    result = subprocess.run([*command, "--workers", str(workers)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def _measure(variant: str, data: Path, epochs: int, workers: int) -> dict:
    import functools
    import multiprocessing
    import os

    from torch.utils.data import DataLoader

    from flareseg.config import load_config
    from flareseg.data.prepared import PreparedData
    from flareseg.data.training_sets import TrainingSamples
    from flareseg.engine.loaders import start_worker
    from flareseg.workers import worker_context

    config = load_config(None, [*GRID, f"train.data={data}"])
    prepared = PreparedData(data)
    dataset = TrainingSamples(prepared, prepared.case_ids(), config, "coarse", length=8)
    context = worker_context() if variant == "forkserver+preload" else multiprocessing.get_context(variant)
    firsts = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        loader = DataLoader(  # as flareseg.engine.loaders.data_loader builds it, in the variant's context
            dataset,
            batch_size=2,
            num_workers=workers,
            worker_init_fn=functools.partial(start_worker, os.getpid()),
            multiprocessing_context=context,
        )
        start = time.perf_counter()
        batches = iter(loader)
        next(batches)
        firsts.append(time.perf_counter() - start)
        for _ in batches:
            pass
    in_process = DataLoader(dataset, batch_size=2)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        next(iter(in_process))
        times.append(time.perf_counter() - start)
    return {"first": firsts[0], "later": statistics.median(firsts[1:]), "batch": statistics.median(times)}


if __name__ == "__main__":
    sys.exit(main())
