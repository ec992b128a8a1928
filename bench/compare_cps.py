"""Cross pseudo supervision against supervised-only training at the same number of steps, on phantoms.

    python bench/compare_cps.py [--labeled 1] [--epochs 50] [--weight 0.3] [--rampup 25] [--out DIR]
    python bench/compare_cps.py --tiny          # a seconds-long smoke run (used by the tests)

6 labeled phantoms (liver, kidneys, spleen) and 12 unlabeled ones at 48x96x96 are prepared once (coarse 32^3).
Fold 0 validates on the labeled cases it holds out; `--labeled N` keeps only N of its training cases labeled.
Both runs take the same steps (train.epochs x 4 iterations of batch 2, constant lr 1e-2, BaseUNet 8..64) from
the same seed; the CPS run adds an unlabeled batch of 2 per step and a second network. Printed: the mean
validation Dice every 5 epochs, its best and final values, and the seconds of each run.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from flareseg.config import load_config
from flareseg.data.index import INDEX_DIR, META_SPLITS, IndexWriter, close_reader
from flareseg.data.phantom import write_phantom_dataset
from flareseg.data.prepare import prepare_dataset
from flareseg.engine.cps import CrossPseudoSupervisionTrainer
from flareseg.engine.distributed import DistributedContext
from flareseg.engine.trainer import Trainer

LABELS = ["data.labels=[liver, kidney, spleen]", "prepare.label_map={1: 1, 2: 2, 13: 2, 3: 3}"]


def prepare(root: Path, tiny: bool, labeled: int | None) -> Path:
    raw, data = root / "raw", root / "data"
    shape = (24, 48, 48) if tiny else (48, 96, 96)
    write_phantom_dataset(raw, 4 if tiny else 6, seed=33, shape=shape, unlabeled=2 if tiny else 12)
    config = load_config(
        None,
        [
            *LABELS,
            "prepare.folds=2",
            "prepare.grids.coarse.size=[32,32,32]",
            "prepare.grids.fine.size=[32,32,32]",
            f"prepare.images={raw / 'imagesTr'}",
            f"prepare.labels={raw / 'labelsTr'}",
            f"prepare.unlabeled={raw / 'unlabeled'}",
            f"prepare.out={data}",
            "prepare.workers=1",
        ],
    )
    assert prepare_dataset(config, progress=False).ok
    if labeled is not None:  # fewer labeled training cases; the validation cases stay
        index_path = data / INDEX_DIR
        with IndexWriter(index_path) as index:
            splits = index.meta(META_SPLITS)
            splits["splits"][0]["train"] = splits["splits"][0]["train"][:labeled]
            index.put_meta(META_SPLITS, splits)
        close_reader(index_path)
    return data


def run(data: Path, out: Path, epochs: int, steps: int, cps: list[str] | None) -> tuple[list[tuple[int, float]], float]:
    overrides = [
        *LABELS,
        f"train.data={data}",
        f"train.out={out}",
        "train.fold=0",
        f"train.epochs={epochs}",
        f"train.iterations_per_epoch={steps}",
        "train.batch_size=2",
        "train.lr=1e-2",
        "train.schedule=constant",
        "train.workers=0",
        "train.progress=false",
        "train.stage=coarse",
        f"train.val_every={min(5, epochs)}",
        "train.resume=false",
        "model.name=base_unet",
        "model.channels=[8,16,32,64]",
        "model.input_size=[32,32,32]",
        "model.dropout=0",
        *(cps or []),
    ]
    config = load_config(None, overrides)
    context = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    trainer = (CrossPseudoSupervisionTrainer if cps else Trainer)(config, context)
    history = trainer.fit()
    dice = [(r["epoch"] + 1, r["val_dice_mean"]) for r in history if r.get("val_dice_mean") is not None]
    return dice, sum(r["seconds"] for r in history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labeled", type=int, help="labeled training cases kept (default: all of fold 0's, 3)")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--weight", type=float, default=0.3, help="semi_supervised.weight (lambda)")
    parser.add_argument("--rampup", type=int, default=25, help="semi_supervised.rampup_epochs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny phantoms, 2 epochs of 1 step: checks that the script runs"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    epochs, steps = (2, 1) if args.tiny else (args.epochs, 4)
    with tempfile.TemporaryDirectory(prefix="flareseg-cps-") as tmp:
        root = args.out or Path(tmp)
        data = prepare(root, args.tiny, args.labeled)
        cps = [
            "train.method=cps",
            "semi_supervised.unlabeled_batch_size=2",
            f"semi_supervised.weight={args.weight}",
            f"semi_supervised.rampup_epochs={args.rampup}",
        ]
        results = {
            "supervised": run(data, root / "supervised", epochs, steps, None),
            f"cps (lambda {args.weight}, ramp-up {args.rampup})": run(data, root / "cps", epochs, steps, cps),
        }
    print(f"coarse 32^3, {epochs} epochs x {steps} steps, labeled training cases: {args.labeled or 'all of fold 0'}")
    epochs_logged = [epoch for epoch, _ in next(iter(results.values()))[0]]
    print("| run | " + " | ".join(f"epoch {e}" for e in epochs_logged) + " | best | final | seconds |")
    print("|---" * (len(epochs_logged) + 4) + "|")
    for name, (dice, seconds) in results.items():
        values = [d for _, d in dice]
        cells = " | ".join(f"{d:.3f}" for d in values)
        print(f"| {name} | {cells} | {max(values):.3f} | {values[-1]:.3f} | {seconds:.0f} |")
    print("mean validation Dice (liver, kidneys, spleen)")


if __name__ == "__main__":
    main()
