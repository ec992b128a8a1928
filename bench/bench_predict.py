"""Per-case inference time and peak memory on a 512x512x200 CT, with the breakdown by step.

    python bench/bench_predict.py [--image CT] [--repeats 3] [--device auto|cpu|cuda] [--backend auto|torch|openvino]
                                  [--precision auto|fp32|bf16|fp16] [--outputs phantom|network] [--json OUT]
    python bench/bench_predict.py --tiny        # a seconds-long smoke run (used by the tests)

Reference-size networks with random weights (their cost does not depend on the weights): coarse BaseUNet 8..128 at
160^3 and fine EfficientSegNet 16..256 at 192^3, 13 classes. Without --image the CT is a 512x512x200 phantom at
0.8x0.8x2.5 mm.

What the later steps see. The networks always run, but random weights label every voxel at random: 51 % of the
fine grid's 2x2x2 cells then hold several labels, and filtering components and resampling label by label cost
seconds on that noise and milliseconds on organ-shaped maps. With --outputs phantom (the default for the phantom)
each stage runs its network for its cost and then hands on the phantom's own labels on its grid, so the box, the
components, the resampling back and the writing see what a trained model gives them. --outputs network keeps the
noise (the worst case; the only choice with --image). --precision int8 quantizes the random networks on a few
random inputs (their cost does not depend on the calibration; accuracy: bench/compare_precision.py).

How it is measured. A first process fills the ONNX export cache (as a first `predict` would). A second, fresh
process loads the models, predicts one warm-up case, then `--repeats` cases, each a whole `predict` from reading to
writing. Figures: the median per case; "case peak" is the peak resident set during a case, "process peak" the
peak of that whole process (loading, warm-up and every case), what a container's memory limit sees. On CUDA, "GPU
MB" is torch's peak allocated memory per case; --json also holds its peak reserved memory and the device's memory
in use after the cases (the CUDA context included, what nvidia-smi shows).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from flareseg.checkpoint import save_checkpoint
from flareseg.config import load_config, to_plain
from flareseg.data.phantom import make_phantom
from flareseg.data.resample import resize_label
from flareseg.inference.quantize import RandomInputs, quantize_network
from flareseg.io import read_image, to_canonical, write_image
from flareseg.memory import _proc_status_mb, peak_cuda_mb, peak_rss_mb, reset_peak_memory
from flareseg.models import build_model

NETWORKS = {  # the FLARE21 pair, each trained (here: random weights) on its default prepared grid
    "coarse": [
        "train.stage=coarse",
        "model.name=base_unet",
        "model.channels=[8,16,32,64,128]",
        "model.input_size=[160,160,160]",
    ],
    "fine": [
        "train.stage=fine",
        "model.name=efficient_segnet",
        "model.channels=[16,32,64,128,256]",
        "model.input_size=[192,192,192]",
    ],
}
TINY = {"coarse": ["model.input_size=[32,32,32]"], "fine": ["model.input_size=[32,32,32]"]}
CALIBRATION_INPUTS = 4  # --precision int8: random inputs; int8's cost does not depend on its calibration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, help="a CT file or DICOM folder (default: a 512x512x200 phantom)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", default="auto", help="predict.backend: auto, torch or openvino")
    parser.add_argument(
        "--precision", default="auto", help="predict.precision: auto, fp32, bf16, fp16 or int8 (speed only, see above)"
    )
    parser.add_argument(
        "--outputs", choices=("phantom", "network"), help="see above (default: phantom without --image)"
    )
    parser.add_argument("--tiny", action="store_true", help="small phantom and networks: checks that the script runs")
    parser.add_argument("--json", type=Path, help="also write the figures (medians) to this file")
    args = parser.parse_args()
    outputs = args.outputs or ("network" if args.image else "phantom")
    if outputs == "phantom" and args.image:
        parser.error("--outputs phantom needs the phantom (no --image): a CT file has no labels to hand on")
    repeats = 1 if args.tiny else args.repeats
    with tempfile.TemporaryDirectory(prefix="flareseg-bench-") as tmp:
        tmp = Path(tmp)
        image, label = args.image, None
        if image is None:
            shape, spacing = ((200, 512, 512), (2.5, 0.8, 0.8)) if not args.tiny else ((24, 48, 48), (5.0, 4.0, 4.0))
            phantom = make_phantom(0, shape=shape, spacing=spacing, orientation="ras")
            image = write_image(tmp / "ct_0000.nii.gz", phantom.image, phantom.geometry)
            label = write_image(tmp / "ct.nii.gz", phantom.label.astype("uint8"), phantom.geometry)
        checkpoints = {}
        for stage, overrides in NETWORKS.items():
            config = load_config(None, [*overrides, *(TINY[stage] if args.tiny else [])])
            torch.manual_seed(0)
            model = build_model(config).eval()
            checkpoints[stage] = save_checkpoint(
                tmp / f"{stage}.pt", {"model": model.state_dict(), "config": to_plain(config)}
            )
            if args.precision == "int8":  # random weights have no data: calibrated on random inputs (speed only)
                size = tuple(config.model.input_size)
                quantize_network(model, checkpoints[stage], size, "classes", RandomInputs(size, CALIBRATION_INPUTS))
        overrides = [
            f"predict.coarse={checkpoints['coarse']}",
            f"predict.fine={checkpoints['fine']}",
            f"predict.device={args.device}",
            f"predict.backend={args.backend}",
            f"predict.precision={args.precision}",
        ]
        job = {"overrides": overrides, "image": str(image), "tmp": str(tmp)}
        job["label"] = str(label) if outputs == "phantom" else None
        if not args.tiny:  # (the smoke run measures the first process, export included)
            in_fresh_process(job, repeats=0)  # fills the export cache, as the first `predict` with these would
        result = in_fresh_process(job, repeats)
    report(result, args, outputs, repeats)
    if args.json:
        args.json.write_text(json.dumps(figures(result, outputs, repeats), indent=1) + "\n")


def in_fresh_process(job: dict, repeats: int) -> dict:
    """`measure` in a new Python process (nothing from this one's memory counts); its result."""
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_predict as b; "
    code += "print(json.dumps(b.measure(**json.loads(sys.argv[1]))))"
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps({**job, "repeats": repeats})], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"the measuring process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(overrides: list[str], image: str, label: str | None, tmp: str, repeats: int) -> dict:
    """In a fresh process: load the predictor, predict a warm-up case, then `repeats` measured cases."""
    from flareseg.inference.predictor import Predictor

    predictor = Predictor(load_config(None, overrides).predict)
    if label is not None:
        use_phantom_outputs(predictor, label)
    predictor.predict_file(image, Path(tmp) / "warmup.nii.gz")
    loading_and_warmup = _proc_status_mb("VmHWM:") or peak_rss_mb()
    runs = []
    for k in range(repeats):
        reset_peak_memory(torch.device("cpu"))
        if predictor.device.type == "cuda":
            reset_peak_memory(predictor.device)
        timings = predictor.predict_file(image, Path(tmp) / f"out{k}.nii.gz")
        gpu = peak_cuda_mb(predictor.device) if predictor.device.type == "cuda" else None
        reserved = torch.cuda.max_memory_reserved(predictor.device) / 2**20 if gpu is not None else None
        runs.append(
            {
                "total": sum(timings.steps.values()),
                "steps": timings.steps,
                "rss": peak_rss_mb(),
                "gpu": gpu,
                "gpu_reserved": reserved,
            }
        )
    gpu_used = None
    if predictor.device.type == "cuda":  # what nvidia-smi shows: the CUDA context and torch's cache included
        free, total = torch.cuda.mem_get_info(predictor.device)
        gpu_used = (total - free) / 2**20
    backends = sorted({f"{stage.backend} {stage.precision}" for stage in [predictor.roi, *predictor.segmenters]})
    return {
        "runs": runs,
        "steps": list(predictor.steps.all),
        "device": str(predictor.device),
        "backends": backends,
        "threads": torch.get_num_threads(),
        "shape": "x".join(map(str, read_image(image)[0].shape[::-1])),
        "process_peak": max([loading_and_warmup, *(run["rss"] for run in runs)]),
        "gpu_used": gpu_used,
    }


def use_phantom_outputs(predictor, label_path: str) -> None:
    """Make every stage run its network (for its cost) and then return the phantom's labels on its own grid."""
    label, geometry = read_image(label_path)
    truth = torch.from_numpy(to_canonical(label, geometry)[0].copy())
    region: dict = {"slices": None}
    find_region = predictor._region_of_interest

    def region_of_interest(volume, canonical, timings):
        box = find_region(volume, canonical, timings)
        region["slices"] = None if box is None else box.slices
        return box

    def stage_outputs(stage):
        run_network = stage.label_map

        def label_map(volume, spacing, regions=False):
            run_network(volume, spacing, regions)
            seen = truth if stage is predictor.roi or region["slices"] is None else truth[region["slices"]]
            return resize_label(seen, stage.grid_size(volume.shape, spacing), "nearest").to(volume.device)

        return label_map

    predictor._region_of_interest = region_of_interest
    for stage in [predictor.roi, *predictor.segmenters]:
        if stage is not None:
            stage.label_map = stage_outputs(stage)


def figures(result: dict, outputs: str, repeats: int) -> dict:
    """The medians of the measured cases (for --json); GPU memory in MB: torch's peak allocated and reserved
    memory per case, and the device memory in use after the cases (CUDA context included)."""
    runs, median = result["runs"], statistics.median
    on_gpu = bool(runs) and runs[0]["gpu"] is not None
    return {
        "seconds": median(run["total"] for run in runs),
        "steps": {step: median(run["steps"].get(step, 0.0) for run in runs) for step in result["steps"]},
        "case_peak_rss_mb": median(run["rss"] for run in runs),
        "process_peak_rss_mb": result["process_peak"],
        "peak_gpu_mb": median(run["gpu"] for run in runs) if on_gpu else None,
        "peak_gpu_reserved_mb": median(run["gpu_reserved"] for run in runs) if on_gpu else None,
        "gpu_used_mb": result["gpu_used"],
        "device": result["device"],
        "backends": result["backends"],
        "threads": result["threads"],
        "shape": result["shape"],
        "outputs": outputs,
        "repeats": repeats,
    }


def report(result: dict, args, outputs: str, repeats: int) -> None:
    runs, median, steps_run = result["runs"], statistics.median, result["steps"]
    print(
        f"{args.image or 'a phantom of ' + result['shape']}; device {result['device']}, "
        f"{', '.join(result['backends'])}; {result['threads']} threads; later steps see {outputs} outputs; "
        f"median of {repeats} after a warm-up case, in a fresh process"
    )
    print(
        "| total s | "
        + " | ".join(f"{step} s" for step in steps_run)
        + " | case peak RSS MB | process peak RSS MB | GPU MB |"
    )
    print("|---" * (len(steps_run) + 4) + "|")
    steps = {step: median(run["steps"].get(step, 0.0) for run in runs) for step in steps_run}
    gpu = median(run["gpu"] for run in runs) if runs[0]["gpu"] is not None else None
    print(
        f"| {median(run['total'] for run in runs):.2f} | "
        + " | ".join(f"{steps[s]:.2f}" for s in steps_run)
        + f" | {median(run['rss'] for run in runs):.0f} | {result['process_peak']:.0f} |"
        + f" {'-' if gpu is None else f'{gpu:.0f}'} |"
    )


if __name__ == "__main__":
    main()
