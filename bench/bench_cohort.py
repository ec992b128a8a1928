"""Cohort throughput of `flareseg predict` on a folder: one case at a time against reading and writing overlapped
with the networks, and two shards of one thread each against one process of two threads.

    python bench/bench_cohort.py [--cases 12] [--repeats 3]
    python bench/bench_cohort.py --tiny        # a seconds-long smoke run (used by the tests)

The folder holds `--cases` copies of one 512x512x200 phantom CT (0.8x0.8x2.5 mm, .nii.gz); the networks are the
reference-size pair of bench_predict.py with random weights, and every stage hands on the phantom's own labels after
running its network (bench_predict's --outputs phantom), so post-processing and writing see organ-shaped maps.

How it is measured. A first process fills the ONNX export cache. Then, per repeat and mode, fresh processes run
`predict_folder` on the folder: "one at a time" (predict.read_ahead false, 2 threads), "overlapped" (read_ahead
true, 2 threads), and "2 shards x 1 thread" (two processes at once, --part 0 and 1 of 2, 1 thread each). Figures:
cases/hour over the case loop (model loading excluded; for the shards, all cases over the slower shard's loop), the
median over repeats, and the peak resident memory of each process. Ratios are taken within each repeat.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import NETWORKS, TINY, use_phantom_outputs  # noqa: E402

from flareseg.checkpoint import save_checkpoint  # noqa: E402
from flareseg.config import load_config, to_plain  # noqa: E402
from flareseg.data.phantom import make_phantom  # noqa: E402
from flareseg.io import write_image  # noqa: E402
from flareseg.models import build_model  # noqa: E402

MODES = {  # name: [(read_ahead, threads, part, parts) per process]
    "one at a time": [(False, 2, 0, 1)],
    "overlapped": [(True, 2, 0, 1)],
    "2 shards x 1 thread": [(True, 1, 0, 2), (True, 1, 1, 2)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--tiny", action="store_true", help="2 small cases, tiny networks in PyTorch, one repeat, no warm-up"
    )
    args = parser.parse_args()
    cases, repeats = (2, 1) if args.tiny else (args.cases, args.repeats)
    with tempfile.TemporaryDirectory(prefix="flareseg-cohort-") as tmp:
        tmp = Path(tmp)
        label = make_cohort(tmp / "images", cases, args.tiny)
        backend = "torch" if args.tiny else "auto"  # (the smoke run needs no export)
        overrides = [*checkpoint_overrides(tmp, args.tiny), "predict.device=cpu", f"predict.backend={backend}"]
        job = {"overrides": overrides, "images": str(tmp / "images"), "label": str(label)}
        if not args.tiny:
            run_processes(job, [(True, 2, 0, 1)], tmp / "warmup", cases=1)  # fills the export cache
        results: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for repeat in range(repeats):
            for k, (mode, processes) in enumerate(MODES.items()):  # a fresh output folder per run: nothing to resume
                results[mode].append(run_processes(job, processes, tmp / f"out_{repeat}_{k}"))
        report(results, cases, repeats)


def make_cohort(folder: Path, cases: int, tiny: bool) -> Path:
    """`cases` copies of one phantom CT; returns its label map (for the phantom outputs)."""
    shape, spacing = ((24, 48, 48), (5.0, 4.0, 4.0)) if tiny else ((200, 512, 512), (2.5, 0.8, 0.8))
    phantom = make_phantom(0, shape=shape, spacing=spacing, orientation="ras")
    first = write_image(folder / "case000_0000.nii.gz", phantom.image, phantom.geometry)
    for k in range(1, cases):
        shutil.copyfile(first, folder / f"case{k:03d}_0000.nii.gz")
    return write_image(folder.parent / "truth.nii.gz", phantom.label.astype("uint8"), phantom.geometry)


def checkpoint_overrides(folder: Path, tiny: bool, extra: list[str] = ()) -> list[str]:
    """Random-weight checkpoints of the reference networks (`extra`: more model overrides for both)."""
    overrides = []
    for stage, network in NETWORKS.items():
        config = load_config(None, [*network, *(TINY[stage] if tiny else []), *extra])
        torch.manual_seed(0)
        path = save_checkpoint(
            folder / f"{stage}.pt", {"model": build_model(config).state_dict(), "config": to_plain(config)}
        )
        overrides.append(f"predict.{stage}={path}")
    return overrides


def run_processes(
    job: dict, processes: list[tuple], out: Path, cases: int | None = None, barrier: Path | None = None
) -> dict:
    """Start one fresh process per shard at once; their results and the mode's cases/hour.

    With `barrier` (a folder), each process loads its networks and predicts one warm-up case, then waits there
    until all have done so: the case loops start together, whatever each process spent loading and compiling.
    """
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_cohort as b; "
    code += "print(json.dumps(b.measure(**json.loads(sys.argv[1]))))"
    running = []
    for read_ahead, threads, part, parts in processes:
        spec = {**job, "out": str(out), "read_ahead": read_ahead, "threads": threads, "part": part, "parts": parts}
        spec["limit"] = cases
        if barrier is not None:
            spec["barrier"] = str(barrier)
        output, errors = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # files: no pipe fills up
        process = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], stdout=output, stderr=errors)
        running.append((process, output, errors))
    if barrier is not None:
        _release(barrier, [process for process, _, _ in running])
    for process, _, _ in running:
        process.wait()
    failed = [(p.returncode, errors) for p, _, errors in running if p.returncode != 0]
    if failed:  # the report of one that failed by itself, not of one that _release ended
        errors = sorted(failed, key=lambda item: item[0] < 0)[0][1]
        errors.seek(0)
        raise RuntimeError(f"a measuring process failed:\n{errors.read()[-3000:]}")
    results = []
    for _, output, _ in running:
        output.seek(0)
        results.append(json.loads(output.read().strip().splitlines()[-1]))
    done = sum(result["cases"] for result in results)
    return {"processes": results, "cases_per_hour": 3600.0 * done / max(result["seconds"] for result in results)}


def _release(barrier: Path, processes: list[subprocess.Popen]) -> None:
    """Let the processes start their case loops once every one is ready; if one ends before (it failed), end the
    others, which would wait for it forever."""
    while len(list(barrier.glob("ready_*"))) < len(processes):
        if any(process.poll() is not None for process in processes):
            for process in processes:
                if process.poll() is None:
                    process.kill()
            return
        time.sleep(0.05)
    (barrier / "go").touch()


def measure(overrides, images, label, out, read_ahead, threads, part, parts, limit, barrier=None) -> dict:
    """In a fresh process: predict_folder on this shard, every stage handing on the phantom's labels."""
    import flareseg.inference.batch as batch
    from flareseg.memory import _proc_status_mb, peak_rss_mb

    real = batch.Predictor

    def predictor_with_phantom_outputs(settings):
        predictor = real(settings)
        use_phantom_outputs(predictor, label)
        if barrier is not None:
            first = sorted(Path(images).iterdir())[0]
            predictor.predict_file(first, Path(f"{out}_warmup_{part}") / first.name)  # (no cases yet in `out`)
            (Path(barrier) / f"ready_{part}").touch()
            while not (Path(barrier) / "go").exists():
                time.sleep(0.01)
        return predictor

    batch.Predictor = predictor_with_phantom_outputs
    config = load_config(
        None, [*overrides, f"predict.read_ahead={str(read_ahead).lower()}", f"predict.threads={threads}"]
    )
    source = Path(images)
    if limit is not None:  # the warm-up: one case
        source = Path(out).with_name(Path(out).name + "_in")
        source.mkdir(parents=True)
        first = sorted(Path(images).iterdir())[0]
        (source / first.name).symlink_to(first)
    summary = batch.predict_folder(config, source, Path(out), progress=False, part=part, parts=parts)
    if summary.failed:
        raise RuntimeError(f"cases failed: {summary.failed}")
    return {
        "cases": len(summary.predicted),
        "seconds": summary.seconds,
        "peak_rss_mb": _proc_status_mb("VmHWM:") or peak_rss_mb(),
        "threads": torch.get_num_threads(),
    }


def report(results: dict, cases: int, repeats: int) -> None:
    median = statistics.median
    base = results["one at a time"]
    print(f"{cases} cases of one phantom CT, organ-shaped outputs; median of {repeats} repeat(s), fresh processes")
    print("| mode | cases/hour | vs one at a time (same repeat) | peak RSS per process MB |")
    print("|---|---|---|---|")
    for mode, runs in results.items():
        ratio = median(run["cases_per_hour"] / reference["cases_per_hour"] for run, reference in zip(runs, base))
        rss = " / ".join(
            f"{median(run['processes'][k]['peak_rss_mb'] for run in runs):.0f}"
            for k in range(len(runs[0]["processes"]))
        )
        print(f"| {mode} | {median(run['cases_per_hour'] for run in runs):.0f} | {ratio:.2f}x | {rss} |")


if __name__ == "__main__":
    main()
