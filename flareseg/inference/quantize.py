"""int8 networks for the OpenVINO CPU backend: post-training quantization with NNCF, and the check that lets
`predict.precision: auto` use them.

    checkpoint -> its ONNX export (flareseg.inference.backends, cached)
    -> NNCF post-training quantization, calibrated on `samples` inputs that the stage's own training sampler draws
       from its prepared training arrays (its fold's training cases, the training seed, item k of epoch 0)
    -> an int8 OpenVINO model in the cache, keyed like the export (the network's structure and weights, the input
       size, the output), with quantization.json beside it: the calibration set (prepared folder, fold, case ids,
       number of inputs), the versions and the seconds it took; and, once `flareseg quantize` has run it, the check.

The check: the stage's validation cases (its fold's; its training cases where it trained on every case), each
predicted on its prepared grid through the stage's own inference path (StageModel, as predict runs it) in fp32 and
in int8, scored against the prepared labels: mean DSC and NSD (1 mm) over labels and cases. It passes when int8
loses at most MAX_DSC_LOSS DSC and MAX_NSD_LOSS NSD. `predict.precision: auto` takes int8 for a network only where
its stored check passed; `int8` takes it where an int8 model exists (quantizing one first when the checkpoint's
prepared data is there), checked or not.

Needs the `int8` extra (NNCF): pip install "flareseg[int8]".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flareseg.atomic import atomic_write_text, remove_stale_temporaries, temporary_path
from flareseg.inference.backends import Output, cache_dir, cached_onnx, network_digest, openvino_core

log = logging.getLogger(__name__)
DEFAULT_SAMPLES = 300  # NNCF's default calibration subset
MAX_DSC_LOSS = 0.005
MAX_NSD_LOSS = 0.01
NSD_TOLERANCE_MM = 1.0
RECORD = "quantization.json"
MODEL = "model.xml"


class QuantizationError(ValueError):
    """A checkpoint that cannot be quantized here (no NNCF, no prepared data): one line."""


def quantize_checkpoint(
    checkpoint: Path, data: Path | None = None, samples: int = DEFAULT_SAMPLES, threads: int | None = None
) -> dict:
    """`flareseg quantize`: the int8 model of a stage checkpoint (for the output predict runs it with alone: class
    indices for a fixed-size grid, logits for a fixed spacing) and its accuracy check, stored beside it."""
    from flareseg.stage import TrainedStage

    trained = TrainedStage.load(checkpoint)
    output: Output = "classes" if trained.grid.spacing is None else "logits"
    model = trained.network()
    path = int8_model(model, Path(checkpoint), trained.input_size, output, data, samples)
    check = check_int8(Path(checkpoint), data, threads)
    store_check(path.parent, check)
    return {"folder": path.parent, **read_record(path.parent)}


def describe(checkpoint: Path, result: dict) -> str:
    """One line: where the int8 model is, how it was calibrated, and its check."""
    check, calibration = result["check"], result["calibration"]
    fp32, int8 = check["fp32"], check["int8"]
    verdict = "passed: predict.precision auto uses int8" if check["passed"] else "failed: auto keeps fp32/bf16"
    return (
        f"{checkpoint}: int8 model in {result['folder']} ({calibration['inputs']} calibration inputs from "
        f"{len(calibration['cases'])} cases, {result['seconds']:g} s); check on {len(check['cases'])} "
        f"{check['which'].split(' ')[0]} cases: DSC {fp32['dsc']:.4f} -> {int8['dsc']:.4f}, NSD {fp32['nsd']:.4f} -> "
        f"{int8['nsd']:.4f}, {100 * check['changed_foreground']:.2f} % of foreground voxels changed: {verdict}"
    )


def int8_folder(model: nn.Module, checkpoint: Path, input_size: tuple[int, ...], output: Output) -> Path:
    """Where the int8 model of this network, input size and output lives (whether or not it exists yet)."""
    digest = network_digest(model, tuple(input_size), output)
    return cache_dir() / "int8" / f"{Path(checkpoint).stem}-{output}-{digest[:16]}"


def read_record(folder: Path) -> dict | None:
    """The folder's quantization.json, or None where no complete int8 model is there."""
    path = folder / RECORD
    if not path.is_file() or not (folder / MODEL).is_file():
        return None
    return json.loads(path.read_text())


def check_passed(model: nn.Module, checkpoint: Path, input_size: tuple[int, ...], output: Output) -> bool:
    """Whether the int8 model of this network exists and its stored accuracy check passed."""
    record = read_record(int8_folder(model, checkpoint, input_size, output))
    return bool(record and record.get("check", {}).get("passed"))


def int8_model(
    model: nn.Module,
    checkpoint: Path,
    input_size: tuple[int, ...],
    output: Output,
    data: Path | None = None,
    samples: int = DEFAULT_SAMPLES,
) -> Path:
    """The int8 OpenVINO model (model.xml) of `model`, quantized once and cached. `data`: the prepared folder to
    calibrate on (default: the checkpoint's train.data)."""
    folder = int8_folder(model, checkpoint, input_size, output)
    if read_record(folder) is None:
        from flareseg.stage import TrainedStage

        calibration = CalibrationSet(TrainedStage.load(checkpoint).config, data, samples)
        quantize_network(model, checkpoint, input_size, output, calibration)
    return folder / MODEL


def quantize_network(model: nn.Module, checkpoint: Path, input_size: tuple[int, ...], output: Output, calibration):
    """Quantize `model` on `calibration` (an iterable of [1, 1, z, y, x] float32 inputs, iterable more than once,
    with len() and describe()) and cache it where int8_model finds it; the model.xml path."""
    folder = int8_folder(model, checkpoint, input_size, output)
    described = calibration.describe()
    log.info(
        "quantizing %s to int8 (once, cached in %s): %d calibration inputs from %s ...",
        checkpoint,
        folder.parent,
        len(calibration),
        described.get("prepared", "the caller"),
    )
    start = time.perf_counter()
    quantized = _quantize(cached_onnx(model, Path(checkpoint), tuple(input_size), output), calibration)
    seconds = time.perf_counter() - start
    record = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "output": output,
        "input_size": list(input_size),
        "calibration": described,
        "seconds": round(seconds, 1),
        "versions": _versions(),
    }
    _save_atomically(quantized, record, folder)
    log.info("quantizing %s to int8: done in %.1f s", checkpoint, seconds)
    return folder / MODEL


@dataclass
class CalibrationSet:
    """The inputs NNCF calibrates on: item k (k < samples) of epoch 0 of the stage's training sampler over its
    fold's training cases, as [1, 1, z, y, x] float32 arrays. Iterable more than once, with the same inputs each
    time, holding one input at a time."""

    config: object
    data: Path | None
    samples: int

    def __post_init__(self):
        from flareseg.data.prepared import PreparedData

        self.data = Path(self.data or self.config.train.data)
        if self.samples < 1:
            raise QuantizationError(f"int8 calibration needs at least one input, got {self.samples}")
        if not self.data.is_dir():
            raise QuantizationError(
                f"no prepared data at {self.data} to calibrate int8 on: run `flareseg quantize CHECKPOINT --data "
                "PREPARED` where the stage's prepared folder is"
            )
        try:
            self.prepared = PreparedData(self.data)
            self.fold = self.config.train.fold
            self.cases, _ = self.prepared.fold(self.fold)
        except Exception as error:  # noqa: BLE001 - any unreadable folder is this one line
            raise QuantizationError(f"cannot calibrate int8 on {self.data}: {error}") from None

    def __iter__(self):
        from flareseg.data.training_sets import TrainingSamples

        sampler = TrainingSamples(self.prepared, self.cases, self.config, self.config.train.stage, self.samples)
        sampler.set_epoch(0)
        for k in range(self.samples):
            yield sampler[k]["image"][None].numpy().astype(np.float32, copy=False)

    def __len__(self) -> int:
        return self.samples

    def describe(self) -> dict:
        return {
            "prepared": str(self.data.resolve()),
            "stage": self.config.train.stage,
            "fold": self.fold,
            "cases": list(self.cases),
            "inputs": self.samples,
            "sampler": "the stage's training sampler (flareseg.data.training_sets.TrainingSamples), epoch 0, "
            f"seed {self.config.train.seed}",
        }


class RandomInputs:
    """Calibration on seeded random normal inputs, for speed measurements only (the benchmarks' random-weight
    networks have no data; accuracy needs the stage's own, CalibrationSet)."""

    def __init__(self, size: tuple[int, ...], count: int):
        self.size, self.count = tuple(size), count

    def __iter__(self):
        generator = np.random.default_rng(0)
        for _ in range(self.count):
            yield generator.standard_normal((1, 1, *self.size), dtype=np.float32)

    def __len__(self) -> int:
        return self.count

    def describe(self) -> dict:
        return {"inputs": self.count, "source": "seeded random normal inputs (a speed benchmark)"}


def _quantize(onnx_path: Path, calibration: CalibrationSet):
    try:
        import nncf
    except ImportError:
        raise QuantizationError("predict.precision int8 needs NNCF: pip install 'flareseg[int8]'") from None
    network = openvino_core().read_model(str(onnx_path))
    nncf.set_log_level(logging.WARNING)
    # NNCF draws progress bars (rich, with non-ASCII characters) on stdout, which holds results (the quantize
    # command's lines); on a stream whose encoding is ASCII (LANG=C, common in containers) drawing them raised
    # UnicodeEncodeError and the quantization failed. They go nowhere: the log says when it starts and ends.
    with open(os.devnull, "w", encoding="utf-8") as devnull:
        with contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
            return nncf.quantize(
                network,
                nncf.Dataset(calibration),
                subset_size=len(calibration),
                target_device=nncf.TargetDevice.CPU,
                fast_bias_correction=True,
            )


def _save_atomically(network, record: dict, folder: Path) -> None:
    """Write model.xml/.bin and the record into a temporary sibling folder (flareseg.atomic's name, with this
    process's id), then rename it into place: a folder that exists is complete. A process killed mid-way leaves its
    temporary folder, which the next quantization here removes."""
    import openvino

    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder.parent)
    temporary = temporary_path(folder)
    try:
        temporary.mkdir()
        openvino.save_model(network, str(temporary / MODEL), compress_to_fp16=False)
        (temporary / RECORD).write_text(json.dumps(record, indent=1) + "\n")
        try:
            os.rename(temporary, folder)
        except OSError:
            if read_record(folder) is None:  # not another process's complete model: a real failure
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def store_check(folder: Path, check: dict) -> None:
    """Add the accuracy check to the folder's record (atomically replaced)."""
    record = read_record(folder)
    if record is None:
        raise QuantizationError(f"no int8 model in {folder} to record a check for")
    record["check"] = check
    atomic_write_text(folder / RECORD, json.dumps(record, indent=1) + "\n")


def check_int8(checkpoint: Path, data: Path | None = None, threads: int | None = None) -> dict:
    """Predict the stage's validation cases on its prepared grid in fp32 and in int8 (its int8 model must exist)
    and score both against the prepared labels; the result, with `passed`."""
    from flareseg.data.prepared import PreparedData
    from flareseg.evaluation.metrics import dice_and_nsd
    from flareseg.inference.stage_model import StageModel

    device = torch.device("cpu")
    runs = {p: StageModel(checkpoint, device, p, backend="openvino", threads=threads) for p in ("fp32", "int8")}
    config = runs["fp32"].config
    prepared = PreparedData(Path(data or config.train.data))
    train_ids, val_ids = prepared.fold(config.train.fold)
    cases, which = (val_ids, "validation") if val_ids else (train_ids, "training (the stage trained on every case)")
    stage = config.train.stage
    scores = {p: {"dsc": [], "nsd": []} for p in runs}
    per_label = {p: {} for p in runs}
    changed = foreground = 0
    for case_id in cases:
        record = prepared.record(case_id)
        image = torch.from_numpy(np.array(prepared.load_array(record, f"{stage}_image"), dtype=np.float32))
        truth = np.array(prepared.load_array(record, f"{stage}_label"))
        spacing = tuple(record["grids"][stage]["geometry"]["spacing"])
        labels = {p: run.label_map(image, spacing).cpu().numpy() for p, run in runs.items()}
        either = (labels["fp32"] > 0) | (labels["int8"] > 0)
        changed += int((labels["fp32"] != labels["int8"])[either].sum())
        foreground += int(either.sum())
        for label_id, name in zip(runs["fp32"].class_ids.tolist()[1:], runs["fp32"].labels):
            if label_id == 0 or not (truth == label_id).any():
                continue
            for p, predicted in labels.items():
                dsc, nsd = dice_and_nsd(truth == label_id, predicted == label_id, spacing, NSD_TOLERANCE_MM)
                scores[p]["dsc"].append(dsc)
                scores[p]["nsd"].append(nsd)
                per_label[p].setdefault(name, []).append(dsc)
    mean = {p: {m: float(np.mean(v)) if v else None for m, v in s.items()} for p, s in scores.items()}
    if mean["fp32"]["dsc"] is None:
        raise QuantizationError(f"{checkpoint}: its {which} cases hold none of its labels: nothing to check int8 on")
    dsc_loss = mean["fp32"]["dsc"] - mean["int8"]["dsc"]
    nsd_loss = mean["fp32"]["nsd"] - mean["int8"]["nsd"]
    return {
        "cases": list(cases),
        "which": which,
        "fp32": {**mean["fp32"], "dsc_per_label": {k: float(np.mean(v)) for k, v in per_label["fp32"].items()}},
        "int8": {**mean["int8"], "dsc_per_label": {k: float(np.mean(v)) for k, v in per_label["int8"].items()}},
        "dsc_loss": dsc_loss,
        "nsd_loss": nsd_loss,
        "changed_foreground": changed / max(foreground, 1),
        "rule": f"int8 loses at most {MAX_DSC_LOSS} mean DSC and {MAX_NSD_LOSS} mean NSD ({NSD_TOLERANCE_MM:g} mm)",
        "passed": bool(dsc_loss <= MAX_DSC_LOSS and nsd_loss <= MAX_NSD_LOSS),
    }


def _versions() -> dict:
    import importlib.metadata as metadata

    return {name: metadata.version(name) for name in ("nncf", "openvino", "torch")}
