"""Accuracy options at prediction time, on phantoms: one model, a 3-fold ensemble, mirror TTA, and both.

    python bench/compare_accuracy_options.py [--minutes-per-model 1.0] [--folds 3] [--out DIR]
    python bench/compare_accuracy_options.py --tiny          # a seconds-long smoke run

The demo's recipe (flareseg.demo_settings: liver, kidneys, spleen, pancreas; BaseUNet coarse and EfficientSegNet
fine on fixed grids of DemoSettings' sizes; Adam at a constant lr) on `flareseg demo`'s phantoms: the training
phantoms are prepared once with prepare.folds = --folds, and the coarse and the fine network of every fold train for
--minutes-per-model each (fold k validates on its own held-out share and keeps its best checkpoint), with mirroring
of all three axes (flip_p 0.5): mirror TTA flips only the axes a network learned mirrored (a network trained without
flips is refused it; fed all 8 flips anyway, such networks went from a mean DSC of 0.71 to 0.00 here). The held-out
phantoms are then predicted (the real Predictor, default backend) with

    single      fold 0's coarse + fine
    ensemble    every fold's coarse + fine (predict.coarse / predict.fine as lists: probabilities averaged)
    mirror TTA  fold 0 with predict.tta: mirror (the 8 flips of the three learned axes, averaged)
    both        every fold with mirror TTA (folds x 8 passes per stage)

and scored with the FLARE21 protocol (flareseg.evaluation, the demo's). Printed: a markdown table with the median
over cases of each case's mean DSC (over the 4 organs), the mean over cases, the network passes per case and the
median seconds per case (the predictor on an image in memory: networks, resampling, post-processing; no reading or
writing). Each option predicts one case before the timed ones, so ONNX exports and compilation are not timed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from flareseg.checkpoint import BEST
from flareseg.config import Config
from flareseg.data.prepare import prepare_dataset
from flareseg.demo import make_phantoms
from flareseg.demo_settings import LABEL_MAP, ORGANS, PRESET, SMOKE_SETTINGS, DemoSettings
from flareseg.engine.run import train
from flareseg.evaluation import score_case
from flareseg.inference.predictor import CaseTimings, Predictor
from flareseg.io import read_image

OPTIONS = {  # name: (every fold, or fold 0 alone; predict.tta)
    "single (fold 0)": (False, "none"),
    "ensemble": (True, "none"),
    "mirror TTA (fold 0)": (False, "mirror"),
    "ensemble + mirror TTA": (True, "mirror"),
}


def prepare(out: Path, settings: DemoSettings, folds: int) -> None:
    """The demo's prepared folder (fixed grids), split into `folds` folds."""
    config = Config()
    config.data.labels = list(ORGANS)
    grids = config.prepare.grids
    grids["coarse"].size, grids["fine"].size = (settings.coarse_size,) * 3, (settings.fine_size,) * 3
    config.prepare.label_map = dict(LABEL_MAP)
    config.prepare.images, config.prepare.labels = out / "phantoms" / "imagesTr", out / "phantoms" / "labelsTr"
    config.prepare.out, config.prepare.folds, config.prepare.overwrite = out / "prepared", folds, True
    assert prepare_dataset(config.validate(), progress=False).ok


def stage_config(
    out: Path, stage: str, settings: DemoSettings, fold: int, seconds: float, device: str, flips: bool
) -> Config:
    """One fold's training config of one stage: the demo's networks and recipe, with a time budget (and, with
    `flips`, mirroring of all three axes, which mirror TTA assumes)."""
    config = Config()
    config.data.labels = list(ORGANS)
    grids = config.prepare.grids
    grids["coarse"].size, grids["fine"].size = (settings.coarse_size,) * 3, (settings.fine_size,) * 3
    model, train = config.model, config.train
    if stage == "coarse":
        model.name, model.channels, size = "base_unet", list(settings.coarse_channels), settings.coarse_size
    else:
        model.name, model.channels, size = "efficient_segnet", list(settings.fine_channels), settings.fine_size
    model.input_size, model.dropout = (size,) * 3, 0.0
    train.stage, train.data, train.out, train.fold = stage, out / "prepared", out / f"{stage}_fold{fold}", fold
    train.epochs, train.time_budget_minutes = 1000, seconds / 60.0  # the budget ends training (one epoch at least)
    train.batch_size, train.iterations_per_epoch = settings.batch_size, settings.steps_per_epoch
    train.lr, train.schedule, train.val_every = settings.lr, "constant", settings.val_every
    train.workers, train.resume, train.progress, train.device = 0, False, False, device
    train.augment.organ_hu_shift_p = 0.0  # phantom organs have one HU each (as in the demo)
    if flips:
        train.augment.flip_p, train.augment.flip_axes = 0.5, [0, 1, 2]
    return config.validate()


def train_folds(
    out: Path, settings: DemoSettings, folds: int, seconds: float, device: str, flips: bool
) -> dict[str, list[Path]]:
    """Every fold's coarse and fine network; returns their best checkpoints by stage, fold 0 first."""
    checkpoints: dict[str, list[Path]] = {"coarse": [], "fine": []}
    for fold in range(folds):
        for stage in ("coarse", "fine"):
            config = stage_config(out, stage, settings, fold, seconds, device, flips)
            start = time.perf_counter()
            history = train(config)
            best = max((r["val_dice_mean"] for r in history if r.get("val_dice_mean") is not None), default=None)
            print(
                f"  {stage} fold {fold}: {len(history)} epochs in {time.perf_counter() - start:.0f} s, best validation "
                f"Dice {best if best is None else round(best, 4)}",
                flush=True,
            )
            checkpoints[stage].append(config.train.out / BEST)
    return checkpoints


def evaluate_option(
    checkpoints: dict[str, list[Path]],
    every_fold: bool,
    tta: str,
    cases: list[tuple[Path, Path]],
    device: str,
    backend: str,
    threads: int,
) -> dict:
    """Predict every held-out case with one option; its per-case mean DSC, seconds and passes."""
    settings = replace(
        Config().predict,
        coarse=checkpoints["coarse"] if every_fold else checkpoints["coarse"][0],
        fine=checkpoints["fine"] if every_fold else checkpoints["fine"][0],
        tta=tta,
        device=device,
        backend=backend,
        threads=threads,
        keep_components_per_label={2: 2},  # the merged kidney label has two components (as the demo's config)
    )
    settings.validate()
    predictor = Predictor(settings)
    images = [read_image(image) for image, _ in cases]
    predictor.predict_array(*images[0])  # exports, compilation and first-call costs: not timed
    dsc, seconds, passes = [], [], []
    for (image, geometry), (_, truth_path) in zip(images, cases):
        timings = CaseTimings()
        start = time.perf_counter()
        label = predictor.predict_array(image, geometry, timings)
        seconds.append(time.perf_counter() - start)
        passes.append(sum(timings.passes.values()))
        truth, truth_geometry = read_image(truth_path)
        scores = score_case(truth, label, truth_geometry.spacing, PRESET, metrics=["dsc"])
        dsc.append(float(np.mean([score.dsc for score in scores])))
    return {"dsc": dsc, "seconds": seconds, "passes": passes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes-per-model", type=float, default=1.0, help="training budget of each network")
    parser.add_argument("--folds", type=int, default=3, help="folds, each a coarse and a fine network (default 3)")
    parser.add_argument("--train-cases", type=int, default=12, help="training phantoms, split into the folds")
    parser.add_argument("--test-cases", type=int, default=5, help="held-out phantoms predicted with each option")
    parser.add_argument("--threads", type=int, default=2, help="torch and OpenVINO threads (default 2; --tiny: 1)")
    parser.add_argument("--device", default="cpu", help="training and prediction device (default cpu)")
    parser.add_argument("--backend", default="auto", help="predict.backend (default auto; --tiny: torch)")
    parser.add_argument("--out", type=Path, help="keep the phantoms, models and predictions here (default: a temp dir)")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny phantoms and networks, one epoch each: checks that the script runs"
    )
    args = parser.parse_args()
    if args.tiny:  # 2 folds, one epoch per network, one thread, and no ONNX exports (the torch backend)
        settings, seconds = replace(SMOKE_SETTINGS, train_cases=4, test_cases=2), 0.0
        args.folds, args.backend, args.threads = 2, "torch", 1
    else:
        settings = replace(DemoSettings(), train_cases=args.train_cases, test_cases=args.test_cases)
        seconds = 60.0 * args.minutes_per_model
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="flareseg-accuracy-") as tmp:
        out = args.out or Path(tmp)
        start = time.perf_counter()
        _, test_ids, _ = make_phantoms(out / "phantoms", settings)
        prepare(out, settings, args.folds)
        print(f"{settings.train_cases} training phantoms in {args.folds} folds, {len(test_ids)} held out", flush=True)
        checkpoints = train_folds(out, settings, args.folds, seconds, args.device, flips=True)
        cases = [
            (out / "phantoms" / "imagesTs" / f"{case}_0000.nii.gz", out / "phantoms" / "labelsTs" / f"{case}.nii.gz")
            for case in test_ids
        ]
        results = {
            name: evaluate_option(checkpoints, every_fold, tta, cases, args.device, args.backend, args.threads)
            for name, (every_fold, tta) in OPTIONS.items()
        }
        total = time.perf_counter() - start
    shape = "x".join(map(str, settings.shape))
    print(
        f"\n{len(cases)} held-out phantoms ({shape}), {args.folds} folds, coarse {settings.coarse_size}^3 + fine "
        f"{settings.fine_size}^3, {seconds / 60:g} min of training per network, {args.threads} threads, "
        f"{args.device}, backend {args.backend}, trained with flips of all three axes; "
        f"{total / 60:.1f} min in all\n"
    )
    print("| option | passes per case (coarse + fine) | median case DSC | mean DSC | median s per case |")
    print("|---|---|---|---|---|")
    for name, result in results.items():
        print(
            f"| {name} | {statistics.median(result['passes']):g} | {statistics.median(result['dsc']):.4f} | "
            f"{statistics.mean(result['dsc']):.4f} | {statistics.median(result['seconds']):.2f} |"
        )
    print(f"\nDSC: FLARE21 protocol ({', '.join(ORGANS)}), a case's mean over the organs; medians and means over cases")


if __name__ == "__main__":
    main()
