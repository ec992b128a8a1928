"""flareseg against nnU-Net v2 on the same CT: whole-process wall time and peak memory of each, in one run.

    bash bench/setup_nnunet.sh                          # once: nnU-Net v2 in its own virtual environment
    python bench/compare_nnunet.py [--image CT] [--repeats N] [--nnunet-venv DIR] [--work DIR] [--precision int8]
                                   [--systems flareseg nnunet_iso2.5]   # a subset (flareseg always runs)
    python bench/compare_nnunet.py --tiny               # seconds-long smoke run (the tests); no nnU-Net unless
                                                        # --with-nnunet is given and the venv exists

Both sides are measured the same way: one command per prediction, its wall time from start to exit (start-up,
imports, reading, preprocessing, networks, resampling back, writing) and the peak resident set of its largest
process. Each command runs under a small Python wrapper process that starts the clock, waits for the command and
reads `resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`: the largest peak RSS of the command and of every descendant
it waited for (nnU-Net's preprocessing and export workers included); the wrapper's own start-up is not counted.
With --repeats N the three commands run in turn N times and the figures are medians. Threads: each side's default,
all cores (flareseg's predict.threads: null; nnU-Net's `-device cpu` sets torch to all cores).

- flareseg: `python -m flareseg predict --device cpu --set predict.backend=openvino` (--backend; torch where the
  openvino extra is missing) with the reference-size networks of bench/bench_predict.py (coarse BaseUNet 8..128 at
  160^3, fine EfficientSegNet 16..256 at 192^3, 13 classes), random weights. Two rows for the phantom (one for a
  --image): `flareseg` runs the whole command in a process where each stage runs its network for its full cost and
  then hands on the phantom's own labels on its grid (bench_predict.use_phantom_outputs), so the box, components,
  resampling back and writing see organ-shaped maps, as from a trained network; `flareseg_noise` keeps the random
  networks' noise maps, the worst case for flareseg's post-processing. One unmeasured run first fills the ONNX
  export cache (once per checkpoint). `--precision` sets predict.precision (default auto); int8 quantizes the
  random networks on random inputs first, as bench_predict.py does (speed only: the weights are random).
- nnU-Net v2: `nnUNetv2_predict --disable_tta -device cpu -npp 1 -nps 1` with networks planned by nnU-Net's own
  planner for a FLARE-like phantom dataset (--nnunet-cases phantoms of --nnunet-shape at 2.5x0.8x0.8 mm, 13
  labels), trained for one iteration (as fast as a converged network): `nnunet_fullres` is the default 3d_fullres
  plan, `nnunet_iso2.5` the 3d_fullres plan at 2.5 mm isotropic (FLARE24 Task 2's choice; plans nnUNetPlans_iso25
  from `nnUNetv2_plan_experiment -overwrite_target_spacing 2.5 2.5 2.5`). The plan depends on the dataset's median
  shape: the default 200x512x512 phantoms give nnU-Net's FLARE plan (patch 64x192x160, 6 stages); small phantoms
  give small patches and networks. nnU-Net's folders (nnUNet_raw, nnUNet_preprocessed, nnUNet_results) live in
  --work/<dataset tag>/ and are reused: only the first run plans, preprocesses and trains (several minutes).

Without --image the CT is a 512x512x200 phantom at 0.8x0.8x2.5 mm. The last line is
`flareseg S s RSS MB | nnunet_fullres S s RSS MB | nnunet_iso2.5 S s RSS MB` (n/a where nnU-Net did not run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import CALIBRATION_INPUTS, NETWORKS, TINY  # noqa: E402

from flareseg.checkpoint import save_checkpoint  # noqa: E402
from flareseg.config import load_config, to_plain  # noqa: E402
from flareseg.config.schema import FLARE_ORGANS  # noqa: E402
from flareseg.data.phantom import make_phantom, write_phantom_dataset  # noqa: E402
from flareseg.inference.backends import openvino_available  # noqa: E402
from flareseg.inference.quantize import RandomInputs, quantize_network  # noqa: E402
from flareseg.io import read_image, write_image  # noqa: E402
from flareseg.models import build_model  # noqa: E402

CACHE = Path.home() / ".cache" / "flareseg-bench"
DATASET_ID = 901
DATASET = f"Dataset{DATASET_ID}_FlaresegBench"
TRAINER = "nnUNetTrainerFlaresegBench"
FLARE_SPACING = (2.5, 0.8, 0.8)
# name in the table -> nnU-Net plans identifier, nnUNetv2_plan_experiment's arguments beyond -d
ISO = "nnUNetPlans_iso25"
NNUNET_PLANS = {
    "nnunet_fullres": ("nnUNetPlans", ()),
    "nnunet_iso2.5": (ISO, ("-overwrite_target_spacing", "2.5", "2.5", "2.5", "-overwrite_plans_name", ISO)),
}
SYSTEMS = ("flareseg", "flareseg_noise", *NNUNET_PLANS)

# `flareseg` with organ-shaped outputs: the flareseg command (argv[2:]) in a process whose predictors hand on the
# phantom's labels (argv[1]) after running each network (bench_predict.use_phantom_outputs)
PHANTOM_OUTPUTS = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from bench_predict import use_phantom_outputs
from flareseg.cli import main
from flareseg.inference.predictor import Predictor
build = Predictor.__init__
def init(self, settings):
    build(self, settings)
    use_phantom_outputs(self, sys.argv[1])
Predictor.__init__ = init
sys.exit(main(sys.argv[2:]))
"""

# Runs the command given after LOG, its output into LOG; prints its wall time and the largest peak RSS (kB on
# Linux) of it and the descendants it waited for.
WRAPPER = """
import json, resource, subprocess, sys, time
with open(sys.argv[1], "w") as log:
    start = time.perf_counter()
    rc = subprocess.call(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
print(json.dumps({"rc": rc, "seconds": seconds, "maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""

# Runs in the nnU-Net venv: trains the plans' 3d_fullres network for one iteration of batch 1 on all cases (fold
# "all", no final validation), then names nnU-Net's own nnUNetTrainer in the checkpoint (same network) so that
# nnUNetv2_predict finds the class without searching its trainer folders.
TRAIN_SCRIPT = """
import json, os, sys
import torch
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerFlaresegBench(nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cpu")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 1
        self.num_val_iterations_per_epoch = 1

    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()
        self.batch_size = 1  # a cheaper iteration; prediction does not use the batch size


dataset, plans_name = sys.argv[1:3]
folder = os.path.join(nnUNet_preprocessed, dataset)
with open(os.path.join(folder, plans_name + ".json")) as f:
    plans = json.load(f)
with open(os.path.join(folder, "dataset.json")) as f:
    dataset_json = json.load(f)
plans["continue_training"] = False  # what nnU-Net's run_training puts there (nnunetv2 2.8)
trainer = nnUNetTrainerFlaresegBench(plans, "3d_fullres", "all", dataset_json, device=torch.device("cpu"))
trainer.run_training()
path = os.path.join(trainer.output_folder, "checkpoint_final.pth")
checkpoint = torch.load(path, map_location="cpu", weights_only=False)
checkpoint["trainer_name"] = "nnUNetTrainer"
torch.save(checkpoint, path + ".tmp")
os.replace(path + ".tmp", path)
best = os.path.join(trainer.output_folder, "checkpoint_best.pth")
if os.path.exists(best):
    os.remove(best)
parameters = sum(p.numel() for p in trainer.network.parameters())
with open(os.path.join(trainer.output_folder, "flareseg_bench.json"), "w") as f:
    json.dump({"parameters": parameters}, f)
"""


class BenchError(RuntimeError):
    pass


def measure(command: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MB of the largest process) of one command; its output goes to `log`."""
    result = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(log), *command], env=env, capture_output=True, text=True, check=True
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    if figures["rc"] != 0:
        raise BenchError(f"{' '.join(command)} failed (exit {figures['rc']}):\n{tail(log)}")
    return figures["seconds"], figures["maxrss_kb"] / 1024


def tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def run_step(command: list[str], log: Path, env: dict[str, str]) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        rc = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        raise BenchError(f"{' '.join(command)} failed (exit {rc}), log {log}:\n{tail(log)}")


def flareseg_checkpoints(folder: Path, tiny: bool, int8: bool = False) -> dict[str, Path]:
    """The two reference-size checkpoints of bench_predict.py (random weights, seed 0); with `int8`, their int8
    models too, calibrated on random inputs as bench_predict.py does (speed only: the weights are random)."""
    checkpoints = {}
    for stage, overrides in NETWORKS.items():
        config = load_config(None, [*overrides, *(TINY[stage] if tiny else [])])
        torch.manual_seed(0)
        model = build_model(config).eval()
        checkpoints[stage] = save_checkpoint(
            folder / f"{stage}.pt", {"model": model.state_dict(), "config": to_plain(config)}
        )
        if int8:
            size = tuple(config.model.input_size)
            quantize_network(model, checkpoints[stage], size, "classes", RandomInputs(size, CALIBRATION_INPUTS))
    return checkpoints


class NnUNet:
    """One nnU-Net v2 venv and work folder: the dataset, both plans and their one-iteration networks."""

    def __init__(self, venv: Path, work: Path, cases: int, shape: tuple[int, ...], spacing: tuple[float, ...]):
        self.venv = venv
        tag = f"phantoms{cases}_{'x'.join(map(str, shape))}_{'x'.join(f'{s:g}' for s in spacing)}"
        self.root = work / tag
        self.cases, self.shape, self.spacing = cases, shape, spacing
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            self.env[name] = str(self.root / name)
        self.env.pop("nnUNet_compile", None)
        self.env.pop("nnUNet_n_proc_DA", None)
        self.workers = str(min(2, os.cpu_count() or 1))

    def tool(self, name: str, *arguments: str) -> list[str]:
        return [str(self.venv / "bin" / name), *arguments]

    def prepare(self) -> None:
        """Whatever is missing of: the raw dataset, each plans' preprocessed data, each one-iteration network."""
        raw = self.root / "nnUNet_raw" / DATASET
        if not (raw / "dataset.json").exists():  # written last: marks a complete dataset
            print(f"nnU-Net: writing {self.cases} phantoms {self.shape} at {self.spacing} mm to {raw}", flush=True)
            shutil.rmtree(raw, ignore_errors=True)
            write_phantom_dataset(raw, self.cases, seed=1, shape=self.shape, spacing=self.spacing, orientation="ras")
            labels = {"background": 0, **{name: i + 1 for i, name in enumerate(FLARE_ORGANS)}}
            dataset = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": self.cases}
            (raw / "dataset.json").write_text(json.dumps({**dataset, "file_ending": ".nii.gz"}, indent=1) + "\n")
        preprocessed = self.root / "nnUNet_preprocessed" / DATASET
        logs = self.root / "logs"
        dataset_id = str(DATASET_ID)
        for plans, extra in NNUNET_PLANS.values():
            done = preprocessed / f".flareseg-bench-{plans}"
            if not done.exists():
                print(f"nnU-Net: planning and preprocessing {plans} (logs in {logs})", flush=True)
                if not (preprocessed / "dataset_fingerprint.json").exists():
                    fingerprint = self.tool("nnUNetv2_extract_fingerprint", "-d", dataset_id, "-np", self.workers)
                    run_step([*fingerprint, "--verify_dataset_integrity"], logs / "fingerprint.log", self.env)
                plan = self.tool("nnUNetv2_plan_experiment", "-d", dataset_id, *extra)
                run_step(plan, logs / f"plan_{plans}.log", self.env)
                preprocess = ("-d", dataset_id, "-plans_name", plans, "-c", "3d_fullres", "-np", self.workers)
                run_step(self.tool("nnUNetv2_preprocess", *preprocess), logs / f"preprocess_{plans}.log", self.env)
                done.touch()
            if not (self.checkpoint(plans).parent / "flareseg_bench.json").exists():  # written after the checkpoint
                print(f"nnU-Net: training the {plans} network for one iteration", flush=True)
                script = self.root / "train_one_iteration.py"
                script.write_text(TRAIN_SCRIPT)
                env = {**self.env, "nnUNet_n_proc_DA": "0"}  # no augmentation workers (0 would break the planner)
                run_step(self.tool("python", str(script), DATASET, plans), logs / f"train_{plans}.log", env)

    def checkpoint(self, plans: str) -> Path:
        model = self.root / "nnUNet_results" / DATASET / f"{TRAINER}__{plans}__3d_fullres"
        return model / "fold_all" / "checkpoint_final.pth"

    def describe(self, plans: str) -> str:
        configuration = json.loads((self.root / "nnUNet_preprocessed" / DATASET / f"{plans}.json").read_text())
        configuration = configuration["configurations"]["3d_fullres"]
        arch = configuration["architecture"]["arch_kwargs"]
        info = json.loads((self.checkpoint(plans).parent / "flareseg_bench.json").read_text())
        spacing = "x".join(f"{s:.2g}" for s in configuration["spacing"])
        patch = "x".join(map(str, configuration["patch_size"]))
        return (
            f"3d_fullres (z, y, x): spacing {spacing} mm, patch {patch}, {arch['n_stages']} stages "
            f"({'-'.join(map(str, arch['features_per_stage']))}), {info['parameters'] / 1e6:.1f} M parameters"
        )

    def command(self, plans: str, inputs: Path, out: Path) -> list[str]:
        return self.tool(
            "nnUNetv2_predict",
            *("-i", str(inputs), "-o", str(out), "-d", str(DATASET_ID), "-tr", TRAINER, "-p", plans),
            *("-c", "3d_fullres", "-f", "all", "-chk", "checkpoint_final.pth", "--disable_tta", "-device", "cpu"),
            *("-npp", "1", "-nps", "1"),
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, help="a CT file or DICOM folder (default: a 512x512x200 phantom)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each command; medians when more than one")
    parser.add_argument("--nnunet-venv", type=Path, default=CACHE / "nnunet-venv", help="from bench/setup_nnunet.sh")
    parser.add_argument("--work", type=Path, default=CACHE / "nnunet-work", help="nnU-Net's folders (reused)")
    parser.add_argument("--nnunet-cases", type=int, help="phantoms nnU-Net plans and trains on (default 4)")
    parser.add_argument(
        "--nnunet-shape", type=int, nargs=3, metavar=("Z", "Y", "X"), help="their shape (default 200 512 512)"
    )
    parser.add_argument(
        "--backend", choices=("torch", "openvino"), help="flareseg's predict.backend (default: openvino if installed)"
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "int8"),
        help="flareseg's predict.precision (int8: the openvino backend; quantized on random inputs, speed only)",
    )
    parser.add_argument(
        "--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS), help="a subset to run (default: all three)"
    )
    parser.add_argument("--tiny", action="store_true", help="small phantom and networks: checks that the script runs")
    parser.add_argument("--with-nnunet", action="store_true", help="with --tiny: run nnU-Net too (on tiny data)")
    args = parser.parse_args()
    repeats = max(1, args.repeats)
    backend = args.backend or ("openvino" if openvino_available() else "torch")
    spacing = FLARE_SPACING if not args.tiny else (5.0, 4.0, 4.0)
    cases = args.nnunet_cases or (4 if not args.tiny else 2)
    shape = tuple(args.nnunet_shape or ((200, 512, 512) if not args.tiny else (24, 48, 48)))

    nnunet = None
    if not (args.nnunet_venv / "bin" / "nnUNetv2_predict").exists():
        print(
            f"nnU-Net v2 venv not found at {args.nnunet_venv}: create it with "
            f"`bash bench/setup_nnunet.sh {args.nnunet_venv}` (a few minutes, about 2 GB); nnU-Net is skipped"
        )
    elif args.tiny and not args.with_nnunet:
        print("--tiny: nnU-Net skipped (add --with-nnunet to run it on tiny data)")
    else:
        nnunet = NnUNet(args.nnunet_venv.absolute(), args.work.absolute(), cases, shape, spacing)

    with tempfile.TemporaryDirectory(prefix="flareseg-compare-") as tmp:
        tmp = Path(tmp)
        inputs = tmp / "input"
        inputs.mkdir()
        label = None
        if args.image is None:
            ct_shape = (200, 512, 512) if not args.tiny else (24, 48, 48)
            phantom = make_phantom(0, shape=ct_shape, spacing=spacing, orientation="ras")
            image = write_image(inputs / "ct_0000.nii.gz", phantom.image, phantom.geometry)
            label = write_image(tmp / "ct_label.nii.gz", phantom.label, phantom.geometry)
        elif args.image.name.endswith(".nii.gz"):
            image = Path(shutil.copyfile(args.image, inputs / "ct_0000.nii.gz"))
        else:  # nnU-Net's dataset reads .nii.gz: the same voxels and geometry, converted once
            image = write_image(inputs / "ct_0000.nii.gz", *read_image(args.image))
        array, geometry = read_image(image)
        ct = (
            f"{args.image or 'phantom'}: {'x'.join(map(str, array.shape[::-1]))} voxels (x, y, z) at "
            f"{'x'.join(f'{s:.3g}' for s in geometry.spacing[::-1])} mm"
        )
        del array

        if args.precision == "int8" and backend != "openvino":
            parser.error("--precision int8 needs the openvino backend (pip install 'flareseg[openvino,int8]')")
        checkpoints = flareseg_checkpoints(tmp, args.tiny, int8=args.precision == "int8")
        predict = [
            *("predict", "-i", str(inputs), "-o", "{out}"),
            *("--coarse", str(checkpoints["coarse"]), "--fine", str(checkpoints["fine"]), "--device", "cpu", "-q"),
            *("--set", f"predict.backend={backend}", "--set", f"predict.precision={args.precision}"),
        ]
        networks = (
            "coarse BaseUNet 8..128 at 160^3 + fine EfficientSegNet 16..256 at 192^3"
            + (" (--tiny: 32^3)" if args.tiny else "")
            + f", {backend} backend, precision {args.precision}"
        )
        commands = {"flareseg": [sys.executable, "-m", "flareseg", *predict]}
        configurations = {"flareseg": f"{networks}, the random networks' noise maps"}
        if label is not None:
            commands = {
                "flareseg": [sys.executable, "-c", PHANTOM_OUTPUTS, str(label), *predict],
                "flareseg_noise": commands["flareseg"],
            }
            configurations = {
                "flareseg": f"{networks}, organ-shaped maps",
                "flareseg_noise": configurations["flareseg"],
            }
        if backend == "openvino" and not args.tiny:  # the one-time ONNX export, as nnU-Net's setup, is not measured
            warm = [str(tmp / "warm") if part == "{out}" else part for part in commands["flareseg"]]
            run_step(warm, tmp / "flareseg_warmup.log", dict(os.environ))
        if nnunet is not None:
            try:
                nnunet.prepare()
            except BenchError as error:
                print(f"nnU-Net setup failed: {error}", file=sys.stderr)
                return 1
            for name, (plans, _) in NNUNET_PLANS.items():
                if name not in args.systems:
                    continue
                commands[name] = nnunet.command(plans, inputs, Path("{out}"))
                configurations[name] = nnunet.describe(plans)

        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for repeat in range(repeats):
            for name, command in commands.items():
                out = tmp / f"out_{name}_{repeat}"
                command = [str(out) if part == "{out}" else part for part in command]
                env = nnunet.env if name in NNUNET_PLANS else None
                print(f"run {repeat + 1}/{repeats}: {name}", file=sys.stderr, flush=True)
                try:
                    runs[name].append(measure(command, tmp / f"{name}_{repeat}.log", env))
                except BenchError as error:
                    print(error, file=sys.stderr)
                    return 1
                if not (out / "ct.nii.gz").exists():
                    print(f"{name} wrote no ct.nii.gz:\n{tail(tmp / f'{name}_{repeat}.log')}", file=sys.stderr)
                    return 1
                shutil.rmtree(out)

    figures = {
        name: (statistics.median(s for s, _ in runs[name]), statistics.median(m for _, m in runs[name]))
        if runs.get(name)
        else None
        for name in SYSTEMS
    }
    print(
        f"{ct}; CPU, {os.cpu_count()} cores, torch threads: each side's default (all cores); "
        f"{'median of ' + str(repeats) + ' runs' if repeats > 1 else 'one run'} per command, wall time from start "
        "to exit, peak RSS of the largest process"
    )
    if nnunet is not None:
        shape, mm = "x".join(map(str, nnunet.shape)), "x".join(f"{s:g}" for s in nnunet.spacing)
        print(f"nnU-Net planned on {nnunet.cases} phantoms of {shape} voxels (z, y, x) at {mm} mm")
    print("| system | configuration | wall s | peak RSS MB | time / flareseg | time / flareseg_noise", end="")
    print(" | RSS / flareseg |")
    print("|---|---|---|---|---|---|---|")
    base_seconds, base_mb = figures["flareseg"]
    noise_seconds = figures["flareseg_noise"][0] if figures["flareseg_noise"] else None
    for name in SYSTEMS:
        if figures[name] is None:
            print(f"| {name} | not run | n/a | n/a | n/a | n/a | n/a |")
            continue
        seconds, mb = figures[name]
        against_noise = f"{seconds / noise_seconds:.2f}x" if noise_seconds else "n/a"
        print(
            f"| {name} | {configurations[name]} | {seconds:.1f} | {mb:.0f} | "
            f"{seconds / base_seconds:.2f}x | {against_noise} | {mb / base_mb:.2f}x |"
        )
    print(" | ".join(f"{name} {f'{f[0]:.1f} s {f[1]:.0f}' if f else 'n/a s n/a'} MB" for name, f in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
