"""One call that checks flareseg on a GPU machine and keeps every figure: `bash bench/gpu_check.sh OUT_DIR`.

    bash bench/gpu_check.sh OUT_DIR                  # the GPU machine: at most 8 minutes in all
    bash bench/gpu_check.sh OUT_DIR --cpu-dry-run    # the same steps at tiny sizes on the CPU (1-2 minutes on 2 cores)
    options: --only STEP[,STEP]  run only these steps; --fail STEP  make STEP fail on purpose (tests the report)

Steps, each a fresh process with its own time limit (the last one gets whatever time is left):

- gpu_tests: the tests marked `gpu` (`pytest -m gpu` on the test files that hold the marker); on a machine without
  CUDA they skip themselves, and the step is reported as skipped.
- predict: bench/bench_predict.py on a 512x512x200 phantom CT, fp16 on the GPU (resampling on the device): median
  seconds per case and peak GPU memory, beside the FLARE21 winner's 0.46 s and 2269 MB.
- train: bench/bench_train.py at the reference sizes (coarse BaseUNet 160^3, fine EfficientSegNet 192^3, batch 2,
  AMP): samples/s and the GPU memory in use, beside what `flareseg plan`'s memory model budgets for them.
- ddp: one process under torchrun, on a tiny prepared phantom dataset: a DDP probe with the backend the trainer
  uses for the device (nccl on CUDA, gloo on the CPU: a process group, a DistributedDataParallel backward pass, an
  all-reduce), then fine_seg/run.py (the stage script that fine_seg/run.sh starts) trains 1 epoch. (One training
  process joins no process group, so the probe is what touches nccl.)
- cores: bench/bench_cores.py: predict's cases/hour from 1 core to all of them, on the CPU.

OUT_DIR receives gpu_check.json (versions, device, and per step its status: ok, failed, timeout or skipped, its
seconds, its error and its figures; rewritten after every step, so a step that fails or hangs never loses the
others' figures) and one log per step (setup.log, gpu_tests.log, ...): 7 files. Everything is made on the spot
(phantoms, random-weight networks); nothing is downloaded. When flareseg does not import, setup runs `pip install
-e .` offline (with --find-links .whl where the repository holds such a folder of wheels) and says so. The exit
status is 0 when no step failed or ran out of time, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("gpu_tests", "predict", "train", "ddp", "cores")
# Seconds. Each step's limit; the whole check's budget (the last step gets what is left of it): within 8 minutes.
LIMITS = {"setup": 60, "gpu_tests": 60, "predict": 100, "train": 120, "ddp": 75, "cores": None}
BUDGET_S = 450
DRY_LIMITS = {"setup": 60, "gpu_tests": 60, "predict": 90, "train": 90, "ddp": 90, "cores": None}
DRY_BUDGET_S = 300
FLARE21_WINNER = {"seconds": 0.46, "gpu_mb": 2269}  # per case, FLARE21's efficiency ranking
FORCED_FAILURE = "--gpu-check-forced-failure"  # an argument no step accepts: --fail STEP appends it
MODES = ("threads", "processes")  # bench_cores.py's


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in INTERNAL:  # the ddp step's own processes
        return INTERNAL[argv[0]](argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for gpu_check.json and the logs")
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU, gloo, no GPU")
    parser.add_argument("--only", type=step_names, default=list(STEPS), help="comma-separated steps to run")
    parser.add_argument("--fail", choices=STEPS, help="make this step fail on purpose (checks the report)")
    args = parser.parse_args(argv)
    dry = args.cpu_dry_run
    limits, budget = (DRY_LIMITS, DRY_BUDGET_S) if dry else (LIMITS, BUDGET_S)
    started = time.monotonic()
    deadline = started + budget
    args.out.mkdir(parents=True, exist_ok=True)
    print(
        f"gpu_check{' --cpu-dry-run' if dry else ''}: budget {budget} s in all; limits "
        + ", ".join(f"{step} {limit} s" if limit else f"{step} the rest" for step, limit in limits.items())
        + f"; logs and gpu_check.json in {args.out}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="flareseg-gpu-check-") as work:
        work = Path(work)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLARESEG_CACHE_DIR": str(work / "cache")}
        if dry:
            env["CUDA_VISIBLE_DEVICES"] = ""  # the whole dry run on the CPU, even on a GPU machine
        report = {"mode": "cpu-dry-run" if dry else "gpu", "budget_s": budget, "seconds": None}
        report["setup"] = setup(args.out / "setup.log", env, limits["setup"], work)
        report.update(versions=report["setup"].pop("versions", {}), steps={})
        write_report(args.out, report)
        for name in STEPS:
            left = deadline - time.monotonic()
            report["steps"][name] = check_step(name, args, work, env, min(limits[name] or left, left), report)
            report["seconds"] = round(time.monotonic() - started, 1)
            write_report(args.out, report)
    bad = [name for name, step in report["steps"].items() if step["status"] in ("failed", "timeout")]
    print(
        f"gpu_check: {report['seconds']:.0f} s of the {budget} s budget; "
        + (f"failed or out of time: {', '.join(bad)}" if bad else "no step failed")
        + f"; figures in {args.out / 'gpu_check.json'}"
    )
    return 1 if bad or report["setup"]["status"] != "ok" else 0


def check_step(name: str, args: argparse.Namespace, work: Path, env: dict, limit: float, report: dict) -> dict:
    """Run one step within `limit` seconds; its status, seconds, error and figures (those it left, if it failed)."""
    if name not in args.only:
        return {"status": "skipped", "note": "not selected (--only)"}
    if limit < 5:
        return {"status": "skipped", "note": "no time left in the budget"}
    command, figures = STEP_COMMANDS[name](work, args.cpu_dry_run, report["versions"])
    if name == args.fail:
        command = [*command, FORCED_FAILURE]
    result = run_step(command, limit, args.out / f"{name}.log", env)
    try:
        result["figures"] = figures(result)
    except (OSError, ValueError, KeyError, ElementTree.ParseError) as error:  # no figures: say why
        result["figures"] = None
        result["error"] = result["error"] or f"no figures: {error}"
        result["status"] = "failed" if result["status"] == "ok" else result["status"]
    try:
        line = summary(name, result)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):  # partial figures: kept, not summed up
        line = ""
    print(f"  {name}: {result['status']} in {result['seconds']:.1f} s{line}", flush=True)
    return result


def step_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STEPS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEPS)}")
    return names


# --- setup -------------------------------------------------------------------------------------------------------

NOT_INSTALLED = 3  # the versions probe's exit status when flareseg does not import
VERSIONS = """
import json, os, platform, sys
try:
    import flareseg.cli
except ImportError as error:
    print(f"flareseg does not import: {error}", file=sys.stderr)
    sys.exit(3)  # NOT_INSTALLED
found = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "flareseg": flareseg.__version__}
try:
    found["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except (OSError, StopIteration):
    found["cpu"] = platform.processor()
import torch
found.update(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
if torch.cuda.is_available():
    properties = torch.cuda.get_device_properties(0)
    found.update(gpu=properties.name, gpu_memory_gb=round(properties.total_memory / 2**30, 1),
                 gpu_capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                 nccl=".".join(map(str, torch.cuda.nccl.version())))
else:
    found["gpu"] = None
for module in ("numpy", "SimpleITK", "lmdb", "openvino", "onnx", "pytest"):
    try:
        found[module] = getattr(__import__(module), "__version__", "present")
    except ImportError:
        found[module] = None
print(json.dumps(found))
"""


def setup(log_path: Path, env: dict, limit: float, work: Path) -> dict:
    """Read the versions and the device; where flareseg does not import, `pip install -e .` (offline) first."""
    started = time.monotonic()
    result = {"status": "ok", "installed": False, "error": None, "log": log_path.name}
    output = work / "versions.json"
    with log_path.open("w") as log:
        probe = _run([sys.executable, "-c", VERSIONS], log, env, limit, work, output)  # (in `work`: not from REPO)
        if probe == NOT_INSTALLED:
            wheels = REPO / ".whl"  # a folder of wheels for what the machine lacks, where one was carried along
            command = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-index"]
            command += ["--find-links", str(wheels)] if wheels.is_dir() else []
            command += ["-e", str(REPO)]
            print(f"gpu_check: flareseg does not import (setup.log says why); installing it: {shlex.join(command)}")
            result["installed"] = True
            _run(command, log, env, limit, REPO)
            probe = _run([sys.executable, "-c", VERSIONS], log, env, limit, work, output)
        if probe != 0:
            result.update(status="failed", error=tail(log_path))
    result["versions"] = json.loads(output.read_text()) if result["status"] == "ok" else {}
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def _run(command: list[str], log, env: dict, limit: float, cwd: Path, output: Path | None = None) -> int:
    """Run a setup command in `cwd`, logged (its standard output to `output` where given); its exit status."""
    log.write(f"$ {shlex.join(command) if len(command[-1]) < 200 else shlex.join(command[:-1]) + ' ...'}\n")
    log.flush()
    with open(output or os.devnull, "w") as out:
        try:
            done = subprocess.run(command, stdout=out if output else log, stderr=log, env=env, timeout=limit, cwd=cwd)
        except subprocess.TimeoutExpired:
            log.write(f"(stopped after {limit:.0f} s)\n")
            return -1
    return done.returncode


# --- running a step ----------------------------------------------------------------------------------------------


def run_step(command: list[str], limit: float, log_path: Path, env: dict) -> dict:
    """Run `command` in a process group of its own, logged; past `limit` seconds the whole group is stopped."""
    started = time.monotonic()
    with log_path.open("w") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=limit)
            status = "ok" if code == 0 else "failed"
            error = None if code == 0 else f"exit status {code}: {tail(log_path)}"
        except subprocess.TimeoutExpired:
            _stop(process)
            status, error = "timeout", f"stopped at its limit of {limit:.0f} s: {tail(log_path)}"
    seconds = round(time.monotonic() - started, 1)
    return {"status": status, "seconds": seconds, "limit_s": round(limit), "error": error, "log": log_path.name}


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the step's process group (the step and the processes it started), SIGKILL 10 s later."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(log_path: Path, lines: int = 15, chars: int = 2000) -> str:
    text = "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    return text[-chars:]


def write_report(out: Path, report: dict) -> None:
    temporary = out / ".gpu_check.json.tmp"
    temporary.write_text(json.dumps(report, indent=1, default=str) + "\n")
    temporary.replace(out / "gpu_check.json")


# --- the steps: command and figures ------------------------------------------------------------------------------


def gpu_tests(work: Path, dry: bool, versions: dict):
    files = sorted(str(path.relative_to(REPO)) for path in (REPO / "tests").glob("test_*.py") if _marks_gpu(path))
    junit = work / "gpu_tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]

    def figures(result: dict) -> dict:
        if not files:
            raise ValueError("no test file holds a test marked gpu")
        suite = ElementTree.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        if result["status"] == "ok" and counts["passed"] == 0:  # no CUDA here: they skipped themselves
            result.update(status="skipped", note=f"{counts['skipped']} gpu test(s) skipped: torch sees no CUDA")
        return {**counts, "files": files}

    return [*command, *files], figures


def _marks_gpu(path: Path) -> bool:
    return "pytest.mark.gpu" in path.read_text()


def predict(work: Path, dry: bool, versions: dict):
    out = work / "predict.json"
    options = ["--tiny", "--device", "cpu", "--backend", "torch"] if dry else ["--device", "cuda", "--repeats", "5"]
    command = [sys.executable, "bench/bench_predict.py", "--precision", "fp32" if dry else "fp16", *options]

    def figures(result: dict) -> dict:
        return {**json.loads(out.read_text()), "reference_flare21_winner": FLARE21_WINNER}

    return [*command, "--json", str(out)], figures


def train(work: Path, dry: bool, versions: dict):
    out = work / "train.json"
    # on the GPU: 2 phantoms of 512x512x200 (each takes seconds to make and prepare), the reference batch of 2
    options = ["--tiny", "--device", "cpu"] if dry else ["--device", "cuda", "--cases", "2", "--batch-size", "2"]
    options += [] if dry else ["--steps", "10"]
    command = [sys.executable, "bench/bench_train.py", *options, "--json", str(out)]

    def figures(result: dict) -> dict:
        figures = json.loads(out.read_text())
        for stage in figures["stages"].values():  # the planner's model against the memory in use
            used = stage["gpu_used_gb"]
            stage["planned_over_used"] = stage["planned_gb"] / used if used else None
        return figures

    return command, figures


def ddp(work: Path, dry: bool, versions: dict):
    out = work / "ddp.json"
    command = [sys.executable, str(Path(__file__)), "ddp-step", str(work / "ddp"), str(out), "cpu" if dry else "cuda"]
    return command, lambda result: json.loads(out.read_text())


def cores(work: Path, dry: bool, versions: dict):
    out = work / "cores.json"
    if dry:
        options = ["--tiny", "--cores", "1,2"]
    else:  # without OpenVINO the CPU runs PyTorch fp32, several times slower: one case per process
        options = ["--cases", "2" if versions.get("openvino") else "1", "--repeats", "1"]
    command = [sys.executable, "bench/bench_cores.py", *options, "--json", str(out)]
    return command, lambda result: json.loads(out.read_text())


STEP_COMMANDS = {"gpu_tests": gpu_tests, "predict": predict, "train": train, "ddp": ddp, "cores": cores}


def summary(name: str, result: dict) -> str:
    """One line of a step's main figures (or its error)."""
    figures = result.get("figures")
    if result["status"] in ("failed", "timeout") and not figures:
        return f": {result['error'].splitlines()[-1] if result['error'] else ''}"
    if not figures:
        return ""
    if name == "gpu_tests":
        failed = figures["failures"] + figures["errors"]
        return f": {figures['passed']} passed, {failed} failed, {figures['skipped']} skipped"
    if name == "predict":
        gpu = figures["peak_gpu_mb"]
        return (
            f": {figures['seconds']:.2f} s per case, peak GPU {'-' if gpu is None else f'{gpu:.0f}'} MB "
            f"(FLARE21 winner {FLARE21_WINNER['seconds']} s, {FLARE21_WINNER['gpu_mb']} MB)"
        )
    if name == "train":
        parts = []
        for stage, row in figures["stages"].items():
            used = "-" if row["gpu_used_gb"] is None else f"{row['gpu_used_gb']:.1f}"
            parts.append(
                f"{stage} {row['training_samples_per_s']:.2f} samples/s, GPU {used} GiB in use, "
                f"planner {row['planned_gb']:.1f} GiB"
            )
        return ": " + "; ".join(parts)
    if name == "ddp":
        return f": backend {figures['probe']['backend']}, training loss {figures['training']['train_loss']:.3f}"
    if name == "cores":  # (a run cut short may lack a mode)
        rates = [
            f"{count} cores " + " / ".join(f"{modes[m]['cases_per_hour']:.0f}" if m in modes else "-" for m in MODES)
            for count, modes in figures.get("results", {}).items()
        ]
        return f": {', '.join(rates)} cases/hour (threads / processes)"
    return ""


# --- the ddp step's processes ------------------------------------------------------------------------------------

LABELS = "data.labels=[liver, kidney, spleen, pancreas]"
TINY_NETWORK = ["model.channels=[4,8,8,16,16]", "model.input_size=[32,32,32]", "model.dropout=0"]
GRIDS = ["prepare.grids.coarse.size=[24,24,24]", "prepare.grids.fine.size=[32,32,32]"]


def ddp_step(argv: list[str]) -> int:
    """Prepare a tiny phantom dataset; under torchrun (1 process), the DDP probe, then the fine stage's script
    (fine_seg/run.py, as fine_seg/run.sh starts it) trains 1 epoch in that same process."""
    parser = argparse.ArgumentParser(prog="gpu_check.py ddp-step")
    parser.add_argument("work", type=Path)
    parser.add_argument("json", type=Path)
    parser.add_argument("device", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    from flareseg.config import load_config
    from flareseg.data.phantom import write_phantom_dataset
    from flareseg.data.prepare import prepare_dataset

    raw, data, run, probe = (args.work / name for name in ("raw", "prepared", "run", "probe.json"))
    started = time.monotonic()
    write_phantom_dataset(raw, 4, seed=11, shape=(32, 56, 56), orientation="identity")
    prepare = load_config(
        None,
        [
            LABELS,
            "prepare.label_map={1: 1, 2: 2, 13: 2, 3: 3, 4: 4}",
            *GRIDS,
            "prepare.folds=2",
            "prepare.workers=1",  # in this process: 4 tiny cases
            f"prepare.images={raw / 'imagesTr'}",
            f"prepare.labels={raw / 'labelsTr'}",
            f"prepare.out={data}",
        ],
    )
    if not prepare_dataset(prepare, progress=False).ok:
        raise RuntimeError("preparing the phantom dataset failed")
    print(f"ddp-step: phantom dataset prepared in {time.monotonic() - started:.1f} s", flush=True)
    overrides = [
        LABELS,
        *GRIDS,
        *TINY_NETWORK,
        "train.fold=-1",
        "train.epochs=1",
        "train.iterations_per_epoch=1",
        "train.batch_size=2",
        "train.workers=0",
        "train.progress=false",
        f"train.device={args.device}",
        f"train.data={data}",
        f"train.out={run}",
    ]
    stage = [str(REPO / "fine_seg" / "run.py"), "--config", str(REPO / "configs" / "fine.yaml")]
    stage += [f"--set={override}" for override in overrides]
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(Path(__file__))]
        + ["ddp-worker", str(probe), args.device, *stage],
        check=True,
    )
    seconds = time.monotonic() - started
    print(f"ddp-step: torchrun (the probe, then 1 epoch of training) took {seconds:.1f} s", flush=True)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    if [record["epoch"] for record in history] != [0] or not math.isfinite(history[0]["train_loss"]):
        raise RuntimeError(f"unexpected training history: {history}")
    training = {"epochs": len(history), "processes": history[0]["processes"], "train_loss": history[0]["train_loss"]}
    found = {"torchrun_seconds": seconds, "training": training, "probe": json.loads(probe.read_text())}
    args.json.write_text(json.dumps(found, indent=1))
    return 0


def ddp_worker(argv: list[str]) -> int:
    """Under torchrun: the probe (a process group with the trainer's backend, a DDP backward pass, an all-reduce),
    then the stage script given after it, as `__main__` in this process."""
    import runpy

    import torch
    import torch.distributed as dist

    from flareseg.config import load_config
    from flareseg.engine.distributed import setup_distributed
    from flareseg.models import build_model

    probe, device, script = Path(argv[0]), argv[1], argv[2]
    context = setup_distributed(device)  # torchrun's environment and this process's device, as training does
    backend = "nccl" if context.device.type == "cuda" else "gloo"  # setup_distributed's choice for several processes
    dist.init_process_group(backend=backend)
    try:
        torch.manual_seed(0)
        network = build_model(load_config(None, [LABELS, *TINY_NETWORK])).to(context.device)
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(network, device_ids=device_ids)
        loss = model(torch.randn(2, 1, 32, 32, 32, device=context.device)).float().square().mean()
        loss.backward()  # DDP all-reduces the gradients through the backend
        finite = all(torch.isfinite(p.grad).all() for p in network.parameters() if p.grad is not None)
        total = torch.full((1,), float(dist.get_rank() + 1), device=context.device)
        dist.all_reduce(total)
        found = {
            "backend": dist.get_backend(),
            "world_size": dist.get_world_size(),
            "device": str(context.device),
            "all_reduce": total.item(),
            "loss": loss.item(),
            "gradients_finite": bool(finite),
        }
    finally:
        dist.destroy_process_group()
    if not finite or found["all_reduce"] != 1.0:
        raise RuntimeError(f"the DDP probe gave {found}")
    probe.write_text(json.dumps(found, indent=1))
    sys.argv = argv[2:]
    runpy.run_path(script, run_name="__main__")  # the stage script ends the process (sys.exit)
    return 0


INTERNAL = {"ddp-step": ddp_step, "ddp-worker": ddp_worker}

if __name__ == "__main__":
    sys.exit(main())
