"""Forward time of the reference networks on the CPU per backend and precision, against the compute floor.

    python bench/bench_backends.py [--repeats 3] [--threads 2]
    python bench/bench_backends.py --tiny       # a seconds-long smoke run (used by the tests)

Coarse BaseUNet 8..128 at 160^3 and fine EfficientSegNet 16..256 at 192^3, 13 classes, random weights, batch 1,
logits out: eager PyTorch fp32, OpenVINO fp32, OpenVINO bf16 (where the CPU computes it natively) and OpenVINO int8
(where NNCF is installed; quantized on CALIBRATION_INPUTS random inputs: speed only, the accuracy of int8 on trained
networks is bench/compare_precision.py's) (exports and int8 models made before timing starts). The
variants alternate within each repeat; figures are medians and speed-ups are taken within the run. The largest
logit difference of OpenVINO fp32 is given against the logits' range (bf16's accuracy on trained networks:
bench/compare_precision.py).

The compute floor: this machine's conv3d throughput is measured on a large, well-shaped convolution (32 -> 32
channels, 3x3x3, a 96^3 input; per backend and precision, best of the repeats); the floor of a network is its
multiply-adds x 2 divided by the best throughput measured, and "x floor" says how far the measured time is from it.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from flareseg.checkpoint import save_checkpoint
from flareseg.config import load_config, to_plain
from flareseg.inference.backends import OpenVinoRunner, cpu_has_native_bf16, openvino_available
from flareseg.inference.quantize import RandomInputs, int8_folder, quantize_network, read_record
from flareseg.models import build_model
from flareseg.models.complexity import count_multiply_adds

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
VARIANTS = ("torch fp32", "openvino fp32", "openvino bf16", "openvino int8")
CALIBRATION_INPUTS = 4


def runners(model: nn.Module, checkpoint: Path, size: tuple[int, int, int], threads: int, variants) -> dict:
    """One logits runner per variant ("torch fp32", "openvino fp32", "openvino bf16", "openvino int8")."""
    found = {}
    for variant in variants:
        backend, precision = variant.split()
        if backend == "torch":
            found[variant] = model
            continue
        if precision == "int8" and read_record(int8_folder(model, checkpoint, size, "logits")) is None:
            quantize_network(model, checkpoint, size, "logits", RandomInputs(size, CALIBRATION_INPUTS))
        found[variant] = OpenVinoRunner(model, checkpoint, size, threads, precision, "logits")
    return found


def available_variants() -> tuple[str, ...]:
    """The variants this machine runs: bf16 where the CPU computes it natively, int8 where NNCF is installed."""
    skip = set()
    if not cpu_has_native_bf16():
        skip.add("openvino bf16")
    if importlib.util.find_spec("nncf") is None:
        skip.add("openvino int8")
    return tuple(variant for variant in VARIANTS if variant not in skip)


def time_variants(found: dict, image: torch.Tensor, repeats: int) -> tuple[dict, dict]:
    """Seconds per variant (alternating, `repeats` each after one warm-up) and each variant's last output."""
    seconds, outputs = {variant: [] for variant in found}, {}
    with torch.inference_mode():
        for run in found.values():
            run(image)  # warm-up: kernel choice, buffer allocation
        for _ in range(repeats):
            for variant, run in found.items():
                start = time.perf_counter()
                outputs[variant] = run(image)
                seconds[variant].append(time.perf_counter() - start)
    return seconds, outputs


def conv3d_throughput(folder: Path, threads: int, variants, repeats: int, size: int) -> dict[str, float]:
    """GFLOP/s of a 32 -> 32 channel 3x3x3 convolution on a size^3 input (behind a 1 -> 32 one that makes its input
    and costs 1/32 of it), best of `repeats`, per variant."""
    torch.manual_seed(0)
    probe = nn.Sequential(nn.Conv3d(1, 32, 3, padding=1), nn.Conv3d(32, 32, 3, padding=1)).eval()
    path = folder / "conv.pt"
    torch.save(probe.state_dict(), path)
    shape = (1, 1, size, size, size)
    flops = 2 * count_multiply_adds(probe, shape)
    seconds, _ = time_variants(runners(probe, path, (size,) * 3, threads, variants), torch.randn(shape), repeats)
    return {variant: flops / min(times) / 1e9 for variant, times in seconds.items()}


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
    variants = available_variants()
    rows = []
    with tempfile.TemporaryDirectory(prefix="flareseg-backends-") as tmp:
        tmp = Path(tmp)
        throughput = conv3d_throughput(tmp, args.threads, variants, repeats, 24 if args.tiny else 96)
        best = max(throughput.values())
        for name, overrides in NETWORKS.items():
            config = load_config(None, [*overrides, *(["model.input_size=[32,32,32]"] if args.tiny else [])])
            torch.manual_seed(0)
            model = build_model(config).eval()
            path = save_checkpoint(tmp / "net.pt", {"model": model.state_dict(), "config": to_plain(config)})
            size = tuple(config.model.input_size)
            image = torch.randn(1, 1, *size)
            multiply_adds = count_multiply_adds(model, tuple(image.shape))
            seconds, outputs = time_variants(runners(model, path, size, args.threads, variants), image, repeats)
            reference = outputs["torch fp32"]
            difference = float((reference - outputs["openvino fp32"]).abs().max()) / float(reference.abs().max())
            medians = {variant: statistics.median(times) for variant, times in seconds.items()}
            rows.append((name, multiply_adds, medians, difference))
    print(
        f"CPU, {args.threads} threads, batch 1, median of {repeats} (variants alternating). conv3d throughput "
        "(GFLOP/s): " + ", ".join(f"{variant} {value:.0f}" for variant, value in throughput.items())
    )
    print(
        "| network | multiply-adds G | "
        + " | ".join(f"{variant} s" for variant in variants)
        + f" | {variants[-1]} speed-up | {variants[-1]} GFLOP/s | floor s | x floor | openvino fp32 max logit diff |"
        + " int8 vs fastest float OpenVINO |"
    )
    print("|---" * (len(variants) + 8) + "|")
    for name, multiply_adds, medians, difference in rows:
        fastest = medians[variants[-1]]
        floor = 2 * multiply_adds / best / 1e9
        print(
            f"| {name} | {multiply_adds / 1e9:.0f} | "
            + " | ".join(f"{medians[variant]:.2f}" for variant in variants)
            + f" | {medians['torch fp32'] / fastest:.2f}x | {2 * multiply_adds / fastest / 1e9:.0f} | {floor:.2f} |"
            + f" {fastest / floor:.1f} | {difference:.1e} | {_int8_ratio(medians)} |"
        )


def _int8_ratio(medians: dict) -> str:
    floats = [medians[variant] for variant in ("openvino fp32", "openvino bf16") if variant in medians]
    return f"{min(floats) / medians['openvino int8']:.2f}x" if "openvino int8" in medians else "-"


if __name__ == "__main__":
    main()
