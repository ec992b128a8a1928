"""Do OpenVINO in bf16 and int8 give trained networks the same labels as PyTorch in fp32? Scores, voxel agreement.

    python bench/compare_precision.py --demo DIR     # a finished `flareseg demo --out DIR` (trained models)
    python bench/compare_precision.py [--minutes 10] # runs the demo first, into a temporary folder
    python bench/compare_precision.py --tiny         # seconds-long smoke run (the tests): untrained tiny networks

The demo's held-out phantoms are predicted with its trained coarse and fine checkpoints, once per
backend/precision (torch fp32, openvino fp32, openvino bf16, and openvino int8 where NNCF is installed: both
networks quantized first, as `flareseg quantize` does, calibrated on the demo's prepared training arrays), and
scored with the demo's protocol (FLARE21: DSC, NSD at 1 mm), per organ and in the mean. "differs" is the share of
voxels labelled foreground by either run whose label differs from the torch fp32 run's.
Speed is measured by bench/bench_predict.py and bench/bench_backends.py, not here.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from flareseg.config import load_config
from flareseg.demo import PRESET, SMOKE_SETTINGS, DemoSettings, run_demo
from flareseg.evaluation import evaluate_folder
from flareseg.inference.backends import openvino_available
from flareseg.inference.batch import predict_folder
from flareseg.inference.quantize import DEFAULT_SAMPLES, int8_model
from flareseg.io import read_image
from flareseg.stage import TrainedStage

VARIANTS = (("torch", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8"))


def predict_variant(demo: Path, out: Path, backend: str, precision: str) -> float:
    """Predict the demo's held-out images with one backend and precision; the median seconds per case."""
    config = load_config(
        None,
        [
            f"predict.coarse={demo / 'coarse' / 'checkpoint_best.pt'}",
            f"predict.fine={demo / 'fine' / 'checkpoint_best.pt'}",
            "predict.device=cpu",
            f"predict.backend={backend}",
            f"predict.precision={precision}",
            "predict.keep_components_per_label={2: 2}",  # as the demo: the merged kidney label has two components
        ],
    )
    summary = predict_folder(config, demo / "phantoms" / "imagesTs", out, progress=False)
    if not summary.ok:
        raise RuntimeError(f"{backend} {precision}: {summary.failed}")
    return statistics.median(
        sum(float(row[step]) for step in ("read", "coarse", "box", "fine", "postprocess", "write"))
        for row in summary.rows
    )


def differing_share(reference: Path, other: Path) -> float:
    """Share of the voxels that either folder's label maps call foreground on which the two disagree."""
    differ = foreground = 0
    for path in sorted(reference.glob("*.nii.gz")):
        a, _ = read_image(path)
        b, _ = read_image(other / path.name)
        differ += int(np.count_nonzero(a != b))
        foreground += int(np.count_nonzero((a > 0) | (b > 0)))
    return differ / max(foreground, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, help="a finished demo folder (default: run the demo first)")
    parser.add_argument("--minutes", type=float, default=10.0, help="the demo's budget when it is run here")
    parser.add_argument("--tiny", action="store_true", help="tiny untrained demo: checks that the script runs")
    args = parser.parse_args()
    if not openvino_available():
        print("needs the openvino extra: pip install 'flareseg[openvino]'")
        return 1
    with tempfile.TemporaryDirectory(prefix="flareseg-precision-") as tmp:
        tmp = Path(tmp)
        demo = args.demo
        if demo is None:
            demo = tmp / "demo"
            minutes, settings = (0.0, SMOKE_SETTINGS) if args.tiny else (args.minutes, DemoSettings())
            run_demo(demo, minutes=minutes, device="cpu", settings=settings, progress=not args.tiny)
        rows, organs = [], {}
        variants = VARIANTS if importlib.util.find_spec("nncf") else VARIANTS[:-1]
        if ("openvino", "int8") in variants:  # the int8 models, as `flareseg quantize` makes them (--tiny: 8 inputs)
            for stage in ("coarse", "fine"):
                trained = TrainedStage.load(demo / stage / "checkpoint_best.pt")
                output = "classes" if trained.grid.spacing is None else "logits"
                samples = 8 if args.tiny else DEFAULT_SAMPLES
                int8_model(trained.network(), trained.path, trained.input_size, output, samples=samples)
        for backend, precision in variants:
            out = tmp / f"{backend}-{precision}"
            seconds = predict_variant(demo, out, backend, precision)
            _, summary = evaluate_folder(demo / "phantoms" / "labelsTs", out, preset=PRESET)  # workers never fork
            rows.append((backend, precision, summary["mean"]["dsc"], summary["mean"]["nsd"], out, seconds))
            organs[f"{backend} {precision}"] = summary["organs"]
        reference = rows[0][4]
        print(
            f"demo {args.demo or '(run here)'}: {len(list(reference.glob('*.nii.gz')))} held-out phantoms, "
            f"{PRESET.name} protocol"
        )
        print("| backend | precision | mean DSC | mean NSD | differs from torch fp32 | s per case |")
        print("|---|---|---|---|---|---|")
        for backend, precision, dsc, nsd, out, seconds in rows:
            share = differing_share(reference, out)
            print(f"| {backend} | {precision} | {dsc:.4f} | {nsd:.4f} | {100 * share:.3f} % | {seconds:.2f} |")
        print("\nper organ, DSC / NSD:")
        print("| organ | " + " | ".join(organs) + " |")
        print("|---|" + "---|" * len(organs))
        for organ in organs["torch fp32"]:
            cells = (f"{o[organ]['dsc']:.4f} / {o[organ]['nsd']:.4f}" for o in organs.values())
            print(f"| {organ} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
