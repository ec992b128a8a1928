"""How `flareseg predict`'s cases/hour scale with CPU cores: one process of N threads against N processes (shards)
of one thread each, for N from 1 to all the cores of the machine.

    python bench/bench_cores.py [--cores 1,2,4,8,16] [--cases 2] [--repeats 3] [--json OUT]
    python bench/bench_cores.py --tiny        # a seconds-long smoke run (used by bench/gpu_check.sh --cpu-dry-run)

The cases and networks are bench_cohort.py's (copies of one 512x512x200 phantom CT, the reference-size networks
with random weights handing on the phantom's organ-shaped labels), and so is the measuring process
(`bench_cohort.measure`: `predict_folder` in a fresh process, --part K --parts P). Default core counts: 1, 2, 4, ...
up to os.cpu_count(), all the cores always included.

How it is measured. `--cases` is the number of cases per process: for N cores, "threads" is one process with
`predict.threads` N predicting `--cases` cases, "processes" is N processes at once with `predict.threads` 1 each,
every one predicting `--cases` cases of its own shard. Every process loads its networks and predicts one warm-up
case, then waits until all processes of the run have done so, so their case loops start together (loading,
compiling and exporting are not timed; the first run fills the ONNX export cache). Figures: cases/hour = all the
run's cases over the slowest process's case loop; the speed-up over 1 core is taken within each repeat; medians
over `--repeats`. Per repeat the core counts run as 1, then from the most to the fewest, so that a run cut short
still has the baseline and the all-cores figures; --json is rewritten after every run for the same reason.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cohort import checkpoint_overrides, make_cohort, run_processes  # noqa: E402

MODES = ("threads", "processes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", type=core_counts, help="core counts, e.g. 1,2,16 (default: 1, 2, 4, ... all)")
    parser.add_argument("--cases", type=int, default=2, help="cases per process (default 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="auto", help="predict.backend: auto, torch or openvino")
    parser.add_argument("--json", type=Path, help="also write the figures to this file (rewritten after every run)")
    parser.add_argument(
        "--tiny", action="store_true", help="small phantom and networks in PyTorch, 1 case per process, one repeat"
    )
    args = parser.parse_args()
    cores = sorted({1, *(args.cores or default_core_counts(os.cpu_count() or 1))})  # 1: the baseline
    cases, repeats = (1, 1) if args.tiny else (args.cases, args.repeats)
    if cases < 1 or repeats < 1:
        parser.error("--cases and --repeats must be >= 1")
    backend = "torch" if args.tiny else args.backend  # (the smoke run needs no export)
    figures = {
        "machine": machine(),
        "settings": {
            "cores": cores,
            "cases_per_process": cases,
            "repeats": repeats,
            "backend": backend,
            "case": "24x48x48 phantom, narrow networks at 32^3"
            if args.tiny
            else "512x512x200 phantom CT, reference networks",
        },
        "runs": [],
        "complete": False,
    }
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped (gpu_check's limit): remove the cases too
    with tempfile.TemporaryDirectory(prefix="flareseg-cores-", ignore_cleanup_errors=True) as tmp:
        tmp = Path(tmp)
        # one folder of max(cores) x cases: process k of a run takes shard k of max(cores) (`processes`)
        label = make_cohort(tmp / "images", max(cores) * cases, args.tiny)
        narrow = ["model.channels=[4,8,8,16,16]"] if args.tiny else []  # a smoke run: the processes, not the networks
        overrides = [*checkpoint_overrides(tmp, args.tiny, narrow), "predict.device=cpu", f"predict.backend={backend}"]
        job = {"overrides": overrides, "images": str(tmp / "images"), "label": str(label)}
        run_all(job, cores, repeats, tmp, figures, args.json)
    figures["complete"] = True
    if args.json:
        write_json(args.json, figures)
    report(figures)


def run_all(job: dict, cores: list[int], repeats: int, folder: Path, figures: dict, json_path: Path | None) -> None:
    """Every run of every repeat: 1 core, then from the most cores to the fewest, each mode; the figures after each."""
    started = time.perf_counter()
    for repeat in range(repeats):
        for count in [1, *sorted((n for n in cores if n != 1), reverse=True)]:
            for mode in MODES if count > 1 else MODES[:1]:  # (on 1 core both modes are one process, 1 thread)
                name = f"{repeat}_{count}_{mode}"
                (folder / f"barrier_{name}").mkdir()
                specs = processes(mode, count, parts=max(cores))
                run = run_processes(job, specs, folder / f"out_{name}", barrier=folder / f"barrier_{name}")
                for predictions in folder.glob(f"out_{name}*"):  # (and the warm-ups'): not needed, only disk
                    shutil.rmtree(predictions)
                run.update(repeat=repeat, cores=count, mode=mode, cases=sum(p["cases"] for p in run["processes"]))
                figures["runs"].append(run)
                figures["results"] = summarize(figures["runs"], cores)
                figures["seconds"] = time.perf_counter() - started
                if json_path:
                    write_json(json_path, figures)


def core_counts(text: str) -> list[int]:
    counts = sorted({int(value) for value in text.split(",") if value.strip()})
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"core counts must be integers >= 1, got {text!r}")
    return counts


def default_core_counts(available: int) -> list[int]:
    """1, 2, 4, ... below `available`, and `available` itself."""
    counts, count = [], 1
    while count < available:
        counts.append(count)
        count *= 2
    return [*counts, available]


def processes(mode: str, count: int, parts: int) -> list[tuple]:
    """bench_cohort's process specs (read_ahead, threads, part, parts) of one run on `count` cores."""
    if mode == "threads":
        return [(True, count, 0, parts)]
    return [(True, 1, part, parts) for part in range(count)]


def summarize(runs: list[dict], cores: list[int]) -> dict:
    """Per core count and mode, the median cases/hour and speed-up over 1 core (within each repeat)."""
    baseline = {run["repeat"]: run["cases_per_hour"] for run in runs if run["cores"] == 1}
    results = {}
    for count in cores:
        for mode in MODES:
            done = [r for r in runs if r["cores"] == count and (r["mode"] == mode or count == 1)]
            if not done:
                continue
            speedups = [r["cases_per_hour"] / baseline[r["repeat"]] for r in done if r["repeat"] in baseline]
            results.setdefault(str(count), {})[mode] = {
                "cases_per_hour": statistics.median(r["cases_per_hour"] for r in done),
                "speedup": statistics.median(speedups) if speedups else None,
                "peak_rss_mb": statistics.median(max(p["peak_rss_mb"] for p in r["processes"]) for r in done),
                "repeats": len(done),
            }
    return results


def machine() -> dict:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), platform.processor()
    )
    flags = next((line.split(":", 1)[1].split() for line in _cpuinfo() if line.startswith("flags")), [])
    try:
        import openvino

        openvino_version = openvino.__version__
    except ImportError:
        openvino_version = None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "bf16_instructions": sorted(set(flags) & {"avx512_bf16", "amx_bf16"}),
        "torch": torch.__version__,
        "openvino": openvino_version,
    }


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def write_json(path: Path, figures: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(figures, indent=1) + "\n")
    temporary.replace(path)  # a reader (gpu_check, after a timeout) never sees half a file


def report(figures: dict) -> None:
    settings, results = figures["settings"], figures["results"]
    cpu = figures["machine"]
    print(
        f"{settings['case']}, {settings['cases_per_process']} case(s) per process, backend {settings['backend']}; "
        f"{cpu['cpu']}, {cpu['cpu_count']} cores; median of {settings['repeats']} repeat(s), fresh processes"
    )
    print(
        "| cores | 1 process x N threads: cases/hour | speed-up | N processes x 1 thread: cases/hour | speed-up "
        "| peak RSS per process MB (threads / processes) |"
    )
    print("|---|---|---|---|---|---|")
    for count, modes in results.items():
        threads, shards = modes["threads"], modes.get("processes", modes["threads"])
        print(
            f"| {count} | {threads['cases_per_hour']:.0f} | {threads['speedup']:.2f}x | "
            f"{shards['cases_per_hour']:.0f} | {shards['speedup']:.2f}x | "
            f"{threads['peak_rss_mb']:.0f} / {shards['peak_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
