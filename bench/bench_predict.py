"""Per-case inference time and peak memory on a 512x512x200 CT, with the breakdown by step.

    python bench/bench_predict.py [--image CT] [--repeats 3] [--device auto|cpu|cuda] [--backend torch|openvino]
    python bench/bench_predict.py --tiny        # a seconds-long smoke run (used by the tests)

Reference-size networks with random weights (speed does not depend on the weights): coarse BaseUNet 8..128 at
160^3 and fine EfficientSegNet 16..256 at 192^3, 13 classes. Random weights make the coarse box most of the body,
so the fine and post-processing steps see about their largest input. Without --image the CT is a 512x512x200
phantom at 0.8x0.8x2.5 mm. Each repeat is a whole `predict` of one case (read to write) after one warm-up case;
the figures are medians. Peak memory: the process's peak resident set during the case (and torch's peak CUDA
allocation on a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from flareseg.config import load_config, to_plain
from flareseg.data.phantom import make_phantom
from flareseg.engine.checkpoint import save_checkpoint
from flareseg.inference.predictor import Predictor
from flareseg.io import write_image
from flareseg.memory import peak_cuda_mb, peak_rss_mb, reset_peak_memory
from flareseg.models import build_model

NETWORKS = {
    "coarse": ["model.name=base_unet", "model.channels=[8,16,32,64,128]", "model.input_size=[160,160,160]"],
    "fine": ["model.name=efficient_segnet", "model.channels=[16,32,64,128,256]", "model.input_size=[192,192,192]"],
}
TINY = {"coarse": ["model.input_size=[32,32,32]"], "fine": ["model.input_size=[32,32,32]"]}
STEPS = ("read", "coarse", "box", "fine", "postprocess", "write")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, help="a CT file or DICOM folder (default: a 512x512x200 phantom)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", default="auto", help="predict.backend: auto (= torch), torch or openvino")
    parser.add_argument("--tiny", action="store_true", help="small phantom and networks: checks that the script runs")
    args = parser.parse_args()
    repeats = 1 if args.tiny else args.repeats
    with tempfile.TemporaryDirectory(prefix="flareseg-bench-") as tmp:
        tmp = Path(tmp)
        image = args.image
        if image is None:
            shape, spacing = ((200, 512, 512), (2.5, 0.8, 0.8)) if not args.tiny else ((24, 48, 48), (5.0, 4.0, 4.0))
            phantom = make_phantom(0, shape=shape, spacing=spacing, orientation="ras")
            image = write_image(tmp / "ct_0000.nii.gz", phantom.image, phantom.geometry)
        checkpoints = {}
        for stage, overrides in NETWORKS.items():
            config = load_config(None, [*overrides, *(TINY[stage] if args.tiny else [])])
            torch.manual_seed(0)
            checkpoints[stage] = save_checkpoint(
                tmp / f"{stage}.pt", {"model": build_model(config).state_dict(), "config": to_plain(config)}
            )
        settings = load_config(
            None,
            [
                f"predict.coarse={checkpoints['coarse']}",
                f"predict.fine={checkpoints['fine']}",
                f"predict.device={args.device}",
                f"predict.backend={args.backend}",
            ],
        ).predict
        predictor = Predictor(settings)
        predictor.predict_file(image, tmp / "warmup.nii.gz")
        runs = []
        for k in range(repeats):
            reset_peak_memory(torch.device("cpu"))
            if predictor.device.type == "cuda":
                reset_peak_memory(predictor.device)
            timings = predictor.predict_file(image, tmp / f"out{k}.nii.gz")
            gpu = peak_cuda_mb(predictor.device) if predictor.device.type == "cuda" else None
            runs.append((sum(timings.steps.values()), timings.steps, peak_rss_mb(), gpu))

    print(
        f"{image if args.image else 'phantom 512x512x200 at 0.8x0.8x2.5 mm'}; device {predictor.device}; "
        f"torch threads {torch.get_num_threads()}; median of {repeats} after a warm-up case"
    )
    print("| total s | " + " | ".join(f"{step} s" for step in STEPS) + " | peak RSS MB | peak GPU MB |")
    print("|---" * (len(STEPS) + 3) + "|")
    median = statistics.median
    steps = {step: median(run[1].get(step, 0.0) for run in runs) for step in STEPS}
    gpu = median(run[3] for run in runs) if runs[0][3] is not None else None
    print(
        f"| {median(run[0] for run in runs):.2f} | "
        + " | ".join(f"{steps[s]:.2f}" for s in STEPS)
        + f" | {median(run[2] for run in runs):.0f} | {'-' if gpu is None else f'{gpu:.0f}'} |"
    )


if __name__ == "__main__":
    main()
