"""Fork faults: nothing flareseg starts is forked from a process that may run thread pools (OpenVINO, torch), and
OpenVINO leaves no freed signal stack behind, so predicting with OpenVINO and then training in one process is safe;
workers end with the process that started them and still see each epoch; and the one-time ONNX export is one line
before and one after, the exporter's own output at debug level."""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flareseg.atomic import process_alive
from flareseg.config import load_config
from flareseg.data.phantom import write_phantom_dataset
from flareseg.data.prepared import PreparedData
from flareseg.data.training_sets import TrainingSamples
from flareseg.engine.loaders import data_loader
from flareseg.evaluation.evaluate import evaluate_folder
from flareseg.inference.backends import openvino_available
from flareseg.inference.stage_model import StageModel
from flareseg.workers import worker_context
from tests.tiny import CPU, LABELS, LIVER_KIDNEY_SPLEEN, STAGE_MODELS, prepare_tiny, train_tiny

REPO = Path(__file__).resolve().parents[1]
needs_openvino = pytest.mark.skipif(not openvino_available(), reason="needs the openvino extra")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """Four prepared phantoms (one validation fold) and a coarse checkpoint trained on them for two steps."""
    root = tmp_path_factory.mktemp("fork")
    write_phantom_dataset(root / "raw", 4, seed=5, shape=(24, 40, 40))
    data = prepare_tiny(root / "raw", root / "data", *LIVER_KIDNEY_SPLEEN, "prepare.folds=2")
    return data, train_tiny(data, root / "coarse", "coarse", LABELS)


def _training(data: Path, out: Path, *extra: str):
    """One epoch of two steps of the tiny fine stage with 2 loader workers, validated on fold 0 (2 workers too)."""
    overrides = [f"train.data={data}", f"train.out={out}", "train.fold=0", "train.epochs=1", "train.workers=2"]
    overrides += ["train.progress=false", "train.iterations_per_epoch=2", "train.stage=fine", LABELS, *extra]
    return load_config(None, [*overrides, *STAGE_MODELS["fine"]])


def test_training_loaders_and_pools_never_fork(tiny, tmp_path, monkeypatch):
    """The reported scenario in this process: OpenVINO predictions, OpenVINO objects left for the garbage collector
    (as a predictor may leave them), then loader workers that collect garbage and a training with loaders; a forked
    worker hung in OpenVINO's destructors (or crashed), so nothing may fork."""
    from flareseg.engine.trainer import Trainer

    def no_fork():
        raise AssertionError("os.fork() called: a worker would inherit this process's thread pools")

    monkeypatch.setattr(os, "fork", no_fork)  # what multiprocessing's fork start method calls
    data, checkpoint = tiny
    if openvino_available():
        stage = StageModel(checkpoint, torch.device("cpu"), "fp32", backend="openvino")
        for _ in range(3):
            stage.label_map(torch.randint(-1000, 1000, (30, 40, 40)).float(), (2.0, 1.0, 1.0))
        garbage = [stage]
        garbage.append(garbage)  # a reference cycle: only the garbage collector frees it
        del garbage, stage
    assert worker_context().get_start_method() in ("forkserver", "spawn")
    assert [int(k) for k in data_loader(CollectingItems(), 1, 2)] == [0, 1, 2, 3]
    history = Trainer(_training(data, tmp_path / "run"), CPU).fit()  # training and validation loaders
    assert history[0]["val_dice_mean"] is not None
    write_phantom_dataset(tmp_path / "raw", 2, seed=6, shape=(24, 40, 40))
    prepare_tiny(tmp_path / "raw", tmp_path / "data", "prepare.workers=2")  # prepare's pool
    labels = data.parent / "raw" / "labelsTr"
    _, summary = evaluate_folder(labels, labels, workers=2)  # evaluate's pool
    assert summary["failures"] == {} and summary["missing_predictions"] == []


def test_workers_see_each_epoch_and_load_what_this_process_would(tiny):
    data, _ = tiny
    config = load_config(None, [LABELS, *STAGE_MODELS["fine"], f"train.data={data}"])
    prepared = PreparedData(data)
    dataset = TrainingSamples(prepared, prepared.case_ids(), config, "fine", length=4)
    epochs = []
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        images = torch.cat([batch["image"] for batch in data_loader(dataset, 2, 2)])
        assert torch.equal(images, torch.stack([dataset[k]["image"] for k in range(4)]))
        epochs.append(images)
    assert not torch.equal(epochs[0], epochs[1])  # augmentation seeds differ per epoch


class WorkerPids(torch.utils.data.Dataset):
    """Items that name the worker process that made them, slowly (importable by fork-server workers)."""

    def __len__(self) -> int:
        return 1000

    def __getitem__(self, k: int) -> int:
        time.sleep(0.2)
        return os.getpid()


KILLED_TRAINER = """
import time
from flareseg.engine.loaders import data_loader
from tests.test_faults_fork import WorkerPids
batches = iter(data_loader(WorkerPids(), 1, 2))
print(*sorted({int(next(batches)) for _ in range(6)}), flush=True)
time.sleep(600)
"""


def test_loader_workers_end_with_a_killed_process():
    # Fork-server workers are children of the fork server, which waits for them: torch's check on the parent never
    # fires, so without flareseg's watchdog the workers of a SIGKILLed trainer would wait for work forever.
    trainer = subprocess.Popen([sys.executable, "-c", KILLED_TRAINER], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in trainer.stdout.readline().split()]
        assert len(workers) == 2 and all(process_alive(pid) for pid in workers)
    finally:
        trainer.kill()
        trainer.wait()
    deadline = time.monotonic() + 20
    while any(process_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(process_alive(pid) for pid in workers)


class CollectingItems(torch.utils.data.Dataset):
    """Items whose worker first collects its garbage (importable by fork-server workers)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, k: int) -> int:
        gc.collect()
        return k


# Two stage runners destroyed in the order they were made, then a signal with a Python handler (as a forked
# worker's exit sends SIGCHLD): with a Core per runner the main thread was left on OpenVINO's freed signal stack and
# this died with SIGSEGV every time.
SIGNAL_AFTER_TWO_RUNNERS = """
import os, signal, sys
import torch
from flareseg.inference.stage_model import StageModel
first = StageModel(sys.argv[1], torch.device("cpu"), "fp32", backend="openvino")
second = StageModel(sys.argv[1], torch.device("cpu"), "fp32", backend="openvino")
del first, second
signal.signal(signal.SIGUSR1, lambda *_: print("handled", flush=True))
os.kill(os.getpid(), signal.SIGUSR1)
"""


@needs_openvino
def test_a_signal_after_two_openvino_runners_is_handled(tiny):
    command = [sys.executable, "-c", SIGNAL_AFTER_TWO_RUNNERS, str(tiny[1])]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout == "handled\n", f"exit status {run.returncode}\n{run.stderr[-3000:]}"


FIRST_EXPORT = """
import logging, sys
from pathlib import Path
import torch
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
from flareseg.inference.stage_model import StageModel
stage = StageModel(Path(sys.argv[1]), torch.device("cpu"), "fp32", backend="openvino")
stage.label_map(torch.zeros(20, 20, 20), (1.0, 1.0, 1.0))
"""


@needs_openvino
def test_a_first_export_says_two_lines(tiny, tmp_path):
    env = {**os.environ, "FLARESEG_CACHE_DIR": str(tmp_path / "cache")}  # nothing exported yet
    command = [sys.executable, "-c", FIRST_EXPORT, str(tiny[1])]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = (run.stdout + run.stderr).splitlines()
    assert len(lines) <= 2 and all(line.startswith("INFO flareseg.") for line in lines), "\n".join(lines[:20])
    assert "for OpenVINO (once, cached in" in lines[0] and "done in" in lines[-1]
    assert list((tmp_path / "cache" / "onnx").glob("*.onnx"))


def test_exporter_output_goes_to_debug_and_to_the_error_on_failure(tmp_path, monkeypatch, caplog, capsys):
    from flareseg.models import export

    pytest.importorskip("onnxscript")

    def chatty_export(*args, **kwargs):
        print("[torch.onnx] Obtain model graph ...")
        logging.getLogger("onnx_ir.passes").info("Removed 404 unused nodes")
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", chatty_export)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RuntimeError, match="unsupported operator"):
        export.export_onnx(torch.nn.Identity(), torch.zeros(1, 1, 2, 2, 2), tmp_path / "x.onnx")
    printed = capsys.readouterr()
    assert "[torch.onnx]" not in printed.out + printed.err
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name == export.__name__]
    assert len(errors) == 1 and "[torch.onnx] Obtain model graph" in errors[0] and "Removed 404" in errors[0]
    assert not (tmp_path / "x.onnx").exists()

    class Program:
        def save(self, path):
            Path(path).write_bytes(b"onnx")

    def quiet_when_it_works(*args, **kwargs):
        print("[torch.onnx] Translate the graph into ONNX ...")
        return Program()

    monkeypatch.setattr(torch.onnx, "export", quiet_when_it_works)
    caplog.clear()
    export.export_onnx(torch.nn.Identity(), torch.zeros(1, 1, 2, 2, 2), tmp_path / "x.onnx")
    printed = capsys.readouterr()
    assert "[torch.onnx]" not in printed.out + printed.err and (tmp_path / "x.onnx").read_bytes() == b"onnx"
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and r.name == export.__name__]
    assert len(debug) == 1 and "[torch.onnx] Translate the graph" in debug[0]
    assert not any(r.levelno > logging.DEBUG for r in caplog.records)
