"""Forward time of the reference networks on the CPU: eager PyTorch against the OpenVINO backend, in one run.

    python bench/bench_backends.py [--repeats 3] [--threads 2]
    python bench/bench_backends.py --tiny       # a seconds-long smoke run (used by the tests)

Coarse BaseUNet 8..128 at 160^3 and fine EfficientSegNet 16..256 at 192^3, 13 classes, random weights, fp32,
batch 1. Each network goes through the predictor's own StageModel with predict.backend torch and openvino (the
ONNX export is cached before timing starts). The two backends alternate; the figures are medians, the speed-up is
taken within the run, and the largest logit difference is reported against the logits' range.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flareseg.config import load_config, to_plain
from flareseg.engine.checkpoint import save_checkpoint
from flareseg.inference.backends import openvino_available
from flareseg.inference.stage_model import StageModel
from flareseg.models import build_model

NETWORKS = {
    "coarse BaseUNet 160^3": [
        "model.name=base_unet",
        "model.channels=[8,16,32,64,128]",
        "model.input_size=[160,160,160]",
    ],
    "fine EfficientSegNet 192^3": [
        "model.name=efficient_segnet",
        "model.channels=[16,32,64,128,256]",
        "model.input_size=[192,192,192]",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="32^3 inputs: checks that the script runs")
    args = parser.parse_args()
    if not openvino_available():
        raise SystemExit("the openvino extra is not installed: pip install 'flareseg[openvino]'")
    torch.set_num_threads(args.threads)
    repeats = 1 if args.tiny else args.repeats
    cpu = torch.device("cpu")
    rows = []
    with tempfile.TemporaryDirectory(prefix="flareseg-backends-") as tmp:
        for name, overrides in NETWORKS.items():
            config = load_config(None, [*overrides, *(["model.input_size=[32,32,32]"] if args.tiny else [])])
            torch.manual_seed(0)
            path = save_checkpoint(
                Path(tmp) / "net.pt", {"model": build_model(config).state_dict(), "config": to_plain(config)}
            )
            stages = {backend: StageModel(path, cpu, "fp32", backend=backend) for backend in ("torch", "openvino")}
            image = torch.randn(1, 1, *config.model.input_size)
            seconds = {backend: [] for backend in stages}
            logits = {}
            with torch.inference_mode():
                for _ in range(repeats):
                    for backend, stage in stages.items():
                        start = time.perf_counter()
                        logits[backend] = stage._forward(image)
                        seconds[backend].append(time.perf_counter() - start)
            torch_s, openvino_s = (statistics.median(seconds[b]) for b in ("torch", "openvino"))
            difference = float((logits["torch"] - logits["openvino"]).abs().max())
            scale = float(logits["torch"].abs().max())
            rows.append((name, torch_s, openvino_s, difference / scale))
    print(f"CPU fp32, {args.threads} threads, batch 1, median of {repeats} (backends alternating)")
    print("| network | torch s | openvino s | speed-up | max logit difference / range |")
    print("|---|---|---|---|---|")
    for name, torch_s, openvino_s, relative in rows:
        print(f"| {name} | {torch_s:.2f} | {openvino_s:.2f} | {torch_s / openvino_s:.2f}x | {relative:.1e} |")


if __name__ == "__main__":
    main()
