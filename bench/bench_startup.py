"""Start-up of `flareseg predict`: what its imports cost, and how long a process takes before it reads its image.

    python bench/bench_startup.py [--runs 5] [--backend auto|torch|openvino]
    python bench/bench_startup.py --tiny        # a seconds-long smoke run (used by the tests)

Imports: `import torch` alone (the floor every prediction pays), `import flareseg.cli` (what `flareseg --help` and
`show-config` pay) and `import flareseg.inference.batch` (the whole prediction path), each in a fresh interpreter:
the statement's wall time, and its largest parts by `python -X importtime` (the cumulative time of each package it
loads that is neither flareseg nor part of Python, with what that package imports; "flareseg+stdlib" is the rest).

Processes: `flareseg predict` on one small phantom case (.nii.gz) with the reference-size networks of bench_predict.py
(random weights: loading and compiling them is what start-up pays), each in a fresh process, split at the moment
its image read starts: the first open of the image file, seen by an audit hook installed before anything else is
imported. Start-up = process start until then (imports, config, loading the networks); the rest = reading, the
networks, writing and exiting. The export and compiled-network caches are the run's own (FLARESEG_CACHE_DIR in a
temporary folder): the first process fills them, as a first `predict` would; the median of --runs after it.

The floor without torch (OpenVINO runs only): a fresh process that imports what a predictor needs at the least
(the command line, numpy, SimpleITK, OpenVINO) and loads the compiled networks the predict processes cached, with
their compile settings, and does nothing else: no torch, no checkpoint, no image. What a prediction path written
without torch would still pay before reading its image.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cohort import checkpoint_overrides  # noqa: E402

from flareseg.data.phantom import make_phantom  # noqa: E402
from flareseg.io import write_image  # noqa: E402

IMPORTS = {  # module -> what its row stands for
    "torch": "torch alone",
    "flareseg.cli": "the command line",
    "flareseg.inference.batch": "the predict path",
}
# `flareseg ARGS`, printing the wall-clock time of the first open of an input image (<case>_0000.<ext>) to stderr
READ_PROBE = """
import sys, time

seen = []

def probe(event, args):
    if event == "open" and not seen and isinstance(args[0], str) and "_0000." in args[0]:
        seen.append(args[0])
        print(f"image read starts at {time.time():.6f}", file=sys.stderr, flush=True)

sys.addaudithook(probe)
from flareseg.cli import main
sys.exit(main(sys.argv[1:]))
"""
READ_LINE = re.compile(r"image read starts at (\d+\.\d+)")
# What a predictor without torch could not skip before its image read: the command line, numpy, SimpleITK and
# OpenVINO imported, and every compiled network of the run's cache loaded with the predictor's own compile settings
# (flareseg.inference.openvino_settings); no torch, no scipy (wanted only after the networks). Prints when done.
FLOOR_PROBE = """
import sys, time
from pathlib import Path

import flareseg.cli, numpy, SimpleITK, openvino
from flareseg.inference.openvino_settings import cache_dir, compile_settings

print(f"imported at {time.time():.6f}", file=sys.stderr, flush=True)
core = openvino.Core()
hint = "bf16" if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"
for network in sorted((cache_dir() / "onnx").glob("*.onnx")):
    core.compile_model(str(network), "CPU", compile_settings(hint, None)).create_infer_request()
print(f"loaded at {time.time():.6f}", file=sys.stderr, flush=True)
if "torch" in sys.modules:
    sys.exit("the floor probe imported torch")
"""
FLOOR_LINES = re.compile(r"imported at (\d+\.\d+)\nloaded at (\d+\.\d+)")
MARK = "-- the measured import starts"
IMPORTTIME_LINE = re.compile(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per figure (their median)")
    parser.add_argument("--backend", default="auto", help="predict.backend: auto, torch or openvino")
    parser.add_argument("--tiny", action="store_true", help="tiny networks and case, one run of each")
    args = parser.parse_args()
    runs = 1 if args.tiny else args.runs
    imports = {module: [import_time(module) for _ in range(runs)] for module in IMPORTS}
    with tempfile.TemporaryDirectory(prefix="flareseg-startup-") as tmp:
        tmp = Path(tmp)
        shape, spacing = ((24, 48, 48), (5.0, 4.0, 4.0)) if args.tiny else ((64, 128, 128), (5.0, 3.0, 3.0))
        phantom = make_phantom(0, shape=shape, spacing=spacing, orientation="ras")
        write_image(tmp / "images" / "ct_0000.nii.gz", phantom.image, phantom.geometry)
        overrides = [*checkpoint_overrides(tmp, args.tiny), f"predict.backend={args.backend}"]
        env = {**os.environ, "FLARESEG_CACHE_DIR": str(tmp / "cache")}
        first = None if args.tiny else predict_process(tmp, overrides, env)  # (the smoke run measures the first)
        later = [predict_process(tmp, overrides, env) for _ in range(runs)]
        openvino = args.backend != "torch" and importlib.util.find_spec("openvino") is not None
        floor = [torch_free_floor(tmp, env) for _ in range(runs)] if openvino else []  # (it loads OpenVINO's)
    networks = "tiny networks" if args.tiny else "reference-size networks (random weights)"
    case = f"one {'x'.join(map(str, shape[::-1]))} phantom case, backend {args.backend}, {networks}"
    report(imports, first, later, floor, case, runs)


def import_time(module: str) -> dict:
    """`import module` in a fresh interpreter: its wall time and, by -X importtime, the cumulative time of each
    package it loaded that is neither flareseg nor part of Python (what one imports counts in it), the rest as
    "flareseg+stdlib" (seconds). The interpreter's own start-up imports (site...) come before MARK: not counted."""
    code = f"import sys, time\nprint({MARK!r}, file=sys.stderr, flush=True)\nstart = time.perf_counter()\n"
    code += f"import {module}\nprint(time.perf_counter() - start)"
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"import {module} failed:\n{done.stderr[-3000:]}")
    lines = done.stderr.splitlines()
    lines = lines[lines.index(MARK) + 1 :]
    rows = [(int(m[1]) / 1e6, len(m[2]) // 2, m[3]) for m in map(IMPORTTIME_LINE.match, lines) if m]
    packages: dict[str, float] = {}
    enclosing: list[str | None] = []  # per depth: the counted package that the row at that depth is part of
    for seconds, depth, name in reversed(rows):  # parents first (importtime prints a module after its imports)
        del enclosing[depth:]
        inside = next((package for package in reversed(enclosing) if package is not None), None)
        package = name.split(".")[0]
        counted = inside is None and package not in (*sys.stdlib_module_names, "flareseg")
        if counted:
            packages[package] = packages.get(package, 0.0) + seconds
        enclosing.append(package if counted else inside)
    total = float(done.stdout.strip().splitlines()[-1])
    packages["flareseg+stdlib"] = max(0.0, total - sum(packages.values()))
    return {"total": total, "packages": packages}


def predict_process(tmp: Path, overrides: list[str], env: dict) -> dict:
    """One `flareseg predict` process on the case: seconds from its start to its image read, and from there on."""
    out = tmp / "out"
    shutil.rmtree(out, ignore_errors=True)  # nothing to resume
    command = [sys.executable, "-c", READ_PROBE, "predict", "-i", str(tmp / "images"), "-o", str(out), "-q"]
    for override in overrides:
        command += ["--set", override]
    start = time.time()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    end = time.time()
    read = READ_LINE.search(done.stderr)
    if done.returncode != 0 or read is None:
        raise RuntimeError(f"flareseg predict failed (exit status {done.returncode}):\n{done.stderr[-3000:]}")
    return {"startup": float(read[1]) - start, "rest": end - float(read[1])}


def torch_free_floor(tmp: Path, env: dict) -> dict:
    """Seconds from the start of a fresh process to FLOOR_PROBE's end ("floor"), and to the end of its imports
    ("imports"). A RuntimeError if it compiled anything (a cache miss would time compiling, not loading)."""
    compiled = tmp / "cache" / "openvino"
    before = sorted(compiled.iterdir()) if compiled.is_dir() else []
    start = time.time()
    done = subprocess.run([sys.executable, "-c", FLOOR_PROBE], capture_output=True, text=True, env=env)
    stamps = FLOOR_LINES.search(done.stderr)
    if done.returncode != 0 or stamps is None:
        raise RuntimeError(f"the torch-free floor probe failed (exit status {done.returncode}):\n{done.stderr[-3000:]}")
    if not before or sorted(compiled.iterdir()) != before:
        raise RuntimeError(f"the torch-free floor probe missed the compiled networks of {compiled}: it compiled them")
    return {"imports": float(stamps[1]) - start, "floor": float(stamps[2]) - start}


def report(imports: dict, first: dict | None, later: list[dict], floor: list[dict], case: str, runs: int) -> None:
    median = statistics.median
    print(f"medians of {runs} fresh process(es) each; `python -X importtime` for the parts of an import")
    print("| import | ms | largest parts, cumulative ms |")
    print("|---|---|---|")
    for module, times in imports.items():
        names = {name for run in times for name in run["packages"]}
        parts = {name: median(t["packages"].get(name, 0.0) for t in times) for name in names}
        largest = sorted(parts.items(), key=lambda item: -item[1])[:5]
        shown = ", ".join(f"{name} {1000 * seconds:.0f}" for name, seconds in largest if seconds >= 0.0005)
        print(f"| `import {module}` ({IMPORTS[module]}) | {1000 * median(t['total'] for t in times):.0f} | {shown} |")
    print()
    print(f"`flareseg predict` on {case}")
    print("| process | start-up s (to the image read) | rest s (read, networks, write, exit) | total s |")
    print("|---|---|---|---|")
    rows = {"first (fills the export and compile caches)": [first]} if first is not None else {}
    rows[f"{'later, ' if first is not None else ''}median of {runs}"] = later
    for name, processes in rows.items():
        startup, rest = median(p["startup"] for p in processes), median(p["rest"] for p in processes)
        print(f"| {name} | {startup:.2f} | {rest:.2f} | {median(p['startup'] + p['rest'] for p in processes):.2f} |")
    if floor:
        imported, loaded = median(p["imports"] for p in floor), median(p["floor"] for p in floor)
        print(
            f"| floor without torch, median of {runs}: the imports of the CLI, numpy, SimpleITK and OpenVINO "
            f"({imported:.2f} s), then the cached compiled networks ({loaded - imported:.2f} s) | {loaded:.2f} | | |"
        )


if __name__ == "__main__":
    main()
