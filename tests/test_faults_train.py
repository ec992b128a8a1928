"""Training faults, each reproduced: trainers outliving their launcher and racing a rerun, leftovers of killed
writes, unusable checkpoints with tracebacks instead of reasons, a network input that is not the prepared grid, and
stage scripts that needed torchrun on PATH."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flareseg.atomic import is_temporary, process_alive
from flareseg.checkpoint import (
    LATEST,
    CheckpointError,
    load_checkpoint,
    load_pretrained,
    save_checkpoint,
)
from flareseg.cli import main
from flareseg.config import load_config, save_config
from flareseg.data.phantom import write_phantom_dataset
from flareseg.engine.run import train
from flareseg.engine.trainer import Trainer, _check_input_size
from flareseg.locks import LOCK_FILE, FolderLock
from flareseg.models import build_model
from flareseg.stage import TrainedStage
from tests.tiny import CPU, LABELS, LIVER_KIDNEY_SPLEEN, STAGE_MODELS, prepare_tiny

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults_train")
    write_phantom_dataset(root / "raw", 2, seed=5, shape=(32, 48, 48), orientation="identity")
    return prepare_tiny(root / "raw", root / "data", *LIVER_KIDNEY_SPLEEN)


def _settings(data: Path, out: Path, *extra: str) -> list[str]:
    """A tiny coarse run: one step of one 24^3 case per epoch, no validation."""
    return [
        LABELS,
        f"train.data={data}",
        f"train.out={out}",
        "train.stage=coarse",
        "train.fold=-1",
        "train.epochs=1",
        "train.iterations_per_epoch=1",
        "train.batch_size=1",
        "train.workers=0",
        "train.progress=false",
        "model.dropout=0",
        *STAGE_MODELS["coarse"],
        *extra,
    ]


def _flags(settings: list[str]) -> list[str]:
    return [f"--set={setting}" for setting in settings]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> tuple[Path, Path]:
    """A run folder after one tiny epoch (what a resume reads), and the temporary that a killed write had left in
    it before (a checkpoint cut short by SIGKILL)."""
    out = tmp_path_factory.mktemp("trained")
    stale = out / f".checkpoint_latest.pt.tmp-{_dead_pid()}-0123abcd.pt"
    stale.write_bytes(b"\0" * 100_000)
    train(load_config(None, _settings(data, out)))
    return out, stale


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (an unreaped zombie, whose parent died before it, counts as gone)."""
    try:
        return process_alive(pid) and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _lock_holder(folder: Path, process: subprocess.Popen, timeout: float) -> int:
    """The process id recorded in `folder`'s lock once some process holds it (while `process` runs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            return json.loads((folder / LOCK_FILE).read_text())["pid"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.2)
    raise AssertionError(f"no process took the lock of {folder} (launcher exit status {process.poll()})")


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- 6: a launcher's death takes its trainer with it; one trainer per run folder --------------------------------


def test_sigkill_of_torchrun_ends_its_trainer_and_a_second_run_is_refused(data, tmp_path, capsys):
    """torchrun starts its worker in a session of its own; SIGKILLed, it cannot stop it. The trainer must die with
    it (before: it trained on, and a resumed run raced it on the same checkpoint)."""
    out = tmp_path / "run"
    settings = _settings(data, out, "train.epochs=100000", "train.time_budget_minutes=3")  # runs until killed
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=1",
            f"--master_port={_free_port()}",
            str(REPO / "coarse_seg" / "run.py"),
            *_flags(settings),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    trainer = None
    try:
        trainer = _lock_holder(out, launcher, timeout=120)
        assert trainer != launcher.pid and _running(trainer)
        # a second training on the same folder refuses at once, in one line naming the first
        assert main(["train", *_flags(settings)]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and f"is in use by process {trainer} " in error, error
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 15
        while _running(trainer) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(trainer), "the trainer outlived its SIGKILLed launcher"
        with FolderLock(out, "training"):  # the kernel released the dead trainer's lock
            pass
    finally:
        launcher.kill()
        launcher.wait()
        if trainer is not None and _running(trainer):
            os.kill(trainer, signal.SIGKILL)


def test_every_rank_stops_when_rank_0_cannot_take_the_run_folder(data, tmp_path):
    """Two ranks of one job without an agent between them (as on two nodes): rank 1 must not wait in a collective
    for a rank 0 that refused to start."""
    out = tmp_path / "run"
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    command = [sys.executable, "-m", "flareseg", "train", "--device=cpu", *_flags(_settings(data, out))]
    with FolderLock(out, "training"):
        ranks = [
            subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": "0"}, stderr=subprocess.PIPE, text=True)
            for r in (0, 1)
        ]
        try:
            errors = [rank.communicate(timeout=120)[1] for rank in ranks]
        finally:
            for rank in ranks:
                rank.kill()
    assert [rank.returncode for rank in ranks] == [2, 2], errors
    assert f"is in use by process {os.getpid()} " in errors[0], errors[0]
    assert "rank 0 could not take the run folder" in errors[1], errors[1]
    assert "Traceback" not in errors[0] + errors[1]


# --- 9 and SIGTERM: no leftovers of killed writes --------------------------------------------------------------


def test_a_run_removes_the_temporaries_that_killed_writers_left(trained):
    out, stale = trained
    assert not stale.exists() and (out / LATEST).is_file()
    assert not [path.name for path in out.iterdir() if is_temporary(path)]


_SAVE_SLOWLY = """
import sys, time, torch
from flareseg.cli import main

def save_slowly(obj, f, *args, **kwargs):  # the first bytes of a checkpoint, then a long wait: killed mid-write
    open(f, "wb").write(b"PK partial")
    print("writing", f, flush=True)
    time.sleep(120)

torch.save = save_slowly
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_sigterm_during_a_checkpoint_write_leaves_no_temporary(data, tmp_path):
    """SIGTERM (what torchrun and schedulers send) ended Python on the spot: the temporary stayed."""
    out = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-c", _SAVE_SLOWLY, *_flags(_settings(data, out, "train.epochs=2"))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline()
        assert line.startswith("writing "), child.stderr.read() if child.poll() is not None else line
        temporary = Path(line.split(maxsplit=1)[1].strip())
        assert temporary.is_file() and is_temporary(temporary)
        child.send_signal(signal.SIGTERM)
        _, error = child.communicate(timeout=60)
    finally:
        child.kill()
        child.wait()
    assert not temporary.exists() and not (out / LATEST).exists(), "the killed write left its temporary"
    assert child.returncode == 128 + signal.SIGTERM, error
    assert "stopped by SIGTERM" in error and "Traceback" not in error
    with FolderLock(out, "training"):
        pass


# --- 11: unusable checkpoints are one line naming the file and the reason --------------------------------------


def _damaged(kind: str, folder: Path, good: Path) -> Path:
    path = folder / f"{kind}.pt"
    content = good.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(content[: len(content) // 2])
    elif kind == "text":
        path.write_text("model: not a checkpoint\n")
    elif kind == "gzip":  # e.g. an image given where a checkpoint belongs
        path.write_bytes(b"\x1f\x8b\x08\x00" + content[:64])
    elif kind == "objects":
        torch.save({"model": {}, "where": Path("/somewhere")}, path)  # a Path: not allowed by weights_only
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "folder":
        path.mkdir()
    return path


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("empty", "is empty (0 bytes)"),
        ("truncated", "is truncated"),
        ("text", "is not a PyTorch checkpoint"),
        ("gzip", "is not a PyTorch checkpoint"),
        ("objects", "holds Python objects besides tensors and plain types"),
        ("tensor", "holds a Tensor, not a checkpoint"),
        ("folder", "is a folder, not a checkpoint file"),
    ],
)
def test_unusable_checkpoint_files_are_one_line_errors(trained, tmp_path, kind, reason):
    path = _damaged(kind, tmp_path, trained[0] / LATEST)
    model = build_model(load_config(None, [LABELS]))
    loaders = {
        "'predict.coarse': checkpoint": lambda: TrainedStage.load(path, "'predict.coarse': checkpoint"),
        "'train.pretrained': checkpoint": lambda: load_pretrained(model, path),
        "checkpoint": lambda: load_checkpoint(path),
    }
    for what, load in loaders.items():
        with pytest.raises(CheckpointError) as caught:
            load()
        message = str(caught.value)
        assert message.startswith(f"{what} {path} ") and reason in message and "\n" not in message, message


@pytest.mark.parametrize(
    ("weights_of", "differs"),
    [
        (["model.name=small_unet", "model.channels=[4,8,8,16]"], "tensors missing"),  # another architecture
        (["data.labels=[liver, kidney]", *STAGE_MODELS["coarse"]], "1 tensors of another shape (e.g. head.weight"),
    ],
)
def test_a_trained_stage_rejects_weights_that_are_not_of_its_config(trained, tmp_path, weights_of, differs):
    """The predictor and distillation's teacher build the network of the checkpoint's config and load its weights:
    weights of another network failed there with a traceback listing every tensor."""
    state = load_checkpoint(trained[0] / LATEST)
    state["model"] = build_model(load_config(None, [LABELS, *weights_of])).state_dict()
    path = save_checkpoint(tmp_path / "mixed.pt", state)
    with pytest.raises(CheckpointError) as caught:
        TrainedStage.load(path)
    message = str(caught.value)
    assert f"{path} (model.name base_unet) does not fit this network" in message and differs in message, message


def test_pretrained_weights_of_another_architecture_are_refused(trained, tmp_path):
    other = build_model(load_config(None, [LABELS, "model.name=small_unet", "model.channels=[4,8,8,16]"]))
    with pytest.raises(CheckpointError, match=r"fits only 1 of the \d+ tensors of this network: it is another"):
        load_pretrained(other, trained[0] / LATEST)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("model.channels=[4,8,16,16]", "model.channels [4, 8, 8, 16] there, [4, 8, 16, 16] here"),
        ("data.labels=[liver, kidney]", "data.labels ['liver', 'kidney', 'spleen'] there, ['liver', 'kidney'] here"),
        ("train.optimizer=sgd", "was trained with train.optimizer=adam, this run asks for sgd"),
    ],
)
def test_resuming_another_network_or_optimizer_names_what_differs(data, trained, tmp_path, change, named):
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    with pytest.raises(CheckpointError) as caught:
        Trainer(load_config(None, _settings(data, out, "train.epochs=2", change)), CPU)
    message = str(caught.value)
    assert message.startswith(f"'train.resume': {out / LATEST} ") and named in message, message
    assert "use a new train.out, or set train.resume=false" in message


def test_resuming_after_prepare_moved_the_folds_cases_is_refused(data, trained, tmp_path):
    """A rerun of prepare that drops a case deals the folds anew; a resumed run would then train and validate on
    other cases than it started with (validating, and keeping the best checkpoint, on cases it trained on)."""
    raw = tmp_path / "raw"
    for folder, name in (("imagesTr", "phantom_000_0000.nii.gz"), ("labelsTr", "phantom_000.nii.gz")):
        (raw / folder).mkdir(parents=True)
        (raw / folder / name).symlink_to(data.parent / "raw" / folder / name)
    moved = tmp_path / "data"
    shutil.copytree(data, moved)
    prepare_tiny(raw, moved, *LIVER_KIDNEY_SPLEEN)  # phantom_001 left the inputs: removed from the index
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    with pytest.raises(CheckpointError) as caught:
        Trainer(load_config(None, _settings(moved, out, "train.epochs=2")), CPU)
    message = str(caught.value)
    assert "was trained on another split" in message and "train: 0 added (none), 1 removed (phantom_001)" in message
    Trainer(load_config(None, _settings(data, out, "train.epochs=2")), CPU)  # the same cases: resumes


def test_a_damaged_latest_checkpoint_is_one_line_with_the_way_out(data, trained, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    content = (out / LATEST).read_bytes()
    (out / LATEST).write_bytes(content[:1000])
    assert main(["train", *_flags(_settings(data, out, "train.epochs=2"))]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert f"'train.resume': checkpoint {out / LATEST} is truncated" in error and "train.resume=false" in error


def test_resuming_with_fp16_a_run_that_had_none_starts_a_fresh_loss_scaler(data, trained, tmp_path):
    """A run without fp16 (a CPU run) saved an empty scaler state, which an enabled GradScaler refused to load."""
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    assert load_checkpoint(out / LATEST)["scaler"] == {}
    trainer = Trainer(load_config(None, _settings(data, out, "train.epochs=2", "train.precision=fp16")), CPU)
    assert trainer.epoch == 1 and trainer.scaler.is_enabled()


# --- 14: a fixed-size stage trains at the prepared size --------------------------------------------------------


def test_a_fixed_size_stage_needs_the_prepared_input_size(data, tmp_path, capsys):
    """model.input_size 160^3 on a 32^3 index trained silently at 160^3 (9.5 GB); here 32^3 on a 24^3 coarse grid."""
    out = tmp_path / "run"
    assert main(["train", *_flags(_settings(data, out, "model.input_size=[32,32,32]"))]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert "'model.input_size' is [32,32,32]" in error and "fixed size [24,24,24] (prepare.grids.coarse.size)" in error
    assert "set model.input_size=[24,24,24]" in error and not (out / LATEST).exists()


def test_a_fixed_spacing_stage_takes_any_patch_size(tmp_path):
    config = load_config(
        None, ["prepare.grids.fine.size=null", "prepare.grids.fine.spacing=[2,2,2]", "model.input_size=[16,24,8]"]
    )
    _check_input_size(config, tmp_path)  # patches of the resampled volume: any size is fine


# --- 16: the stage scripts run with the interpreter that has flareseg, torchrun on PATH or not ----------------


def _without_torchrun() -> str:
    path = "/usr/bin:/bin"
    assert shutil.which("torchrun", path=path) is None
    return path


def test_stage_scripts_run_without_torchrun_on_path(data, tmp_path):
    raw = data.parent / "raw"
    prepare = tmp_path / "prepare.yaml"
    prepare.write_text(
        f"data:\n  labels: [liver, kidney, spleen]\nprepare:\n  images: {raw / 'imagesTr'}\n"
        f"  labels: {raw / 'labelsTr'}\n  out: {tmp_path / 'data'}\n  label_map: {{1: 1, 2: 2, 13: 2, 3: 3}}\n"
        "  grids:\n    coarse: {region: volume, size: [24, 24, 24]}\n    fine: {region: labels, size: [32, 32, 32]}\n"
    )
    env = {"PATH": _without_torchrun(), "PYTHON": sys.executable, "HOME": os.environ.get("HOME", "/tmp")}
    env["OMP_NUM_THREADS"] = "1"
    decoded = {"encoding": "utf-8", "errors": "replace"}  # progress bars print UTF-8 whatever the locale says
    result = subprocess.run(
        ["sh", str(REPO / "data_prepare" / "run.sh"), str(prepare)], env=env, capture_output=True, **decoded
    )
    assert result.returncode == 0 and (tmp_path / "data").is_dir(), result.stderr[-2000:]

    # a tiny config file (every key) as the first argument, as the README shows
    config = save_config(load_config(None, _settings(tmp_path / "data", tmp_path / "run", "train.epochs=5")), tmp_path)
    result = subprocess.run(
        ["sh", str(REPO / "coarse_seg" / "run.sh"), str(config), "--set", "train.epochs=1"],
        env=env,
        capture_output=True,
        timeout=300,
        **decoded,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in history] == [0] and (tmp_path / "run" / LATEST).is_file()


@pytest.mark.parametrize("script", ["coarse_seg/run.sh", "fine_seg/run.sh", "data_prepare/run.sh"])
def test_an_interpreter_without_flareseg_is_named_in_one_line(tmp_path, script):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'flareseg'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {"PATH": _without_torchrun(), "PYTHON": str(fake)}
    result = subprocess.run(["sh", str(REPO / script)], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"'{fake}' cannot import flareseg; set PYTHON" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU this machine does not have")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_training_on_a_missing_gpu_is_an_error_not_a_cpu_run(data, tmp_path, capsys, device):
    """`cuda:1` used to fall back silently to the CPU in training (prediction refused it): both now resolve devices
    in one place."""
    argv = ["train", "--device", device, "--set", f"train.data={data}", "--set", f"train.out={tmp_path}"]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and f"device '{device}' was asked for, but torch sees no CUDA GPU" in err[0], err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_training_devices_resolve_as_prediction_devices():
    from flareseg.engine.distributed import setup_distributed

    assert setup_distributed("cpu").device == torch.device("cpu")
    assert setup_distributed("auto").device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert load_config(None, []).train.device == "auto"
    with pytest.raises(ValueError, match="training runs on cpu, cuda or cuda:N"):
        setup_distributed("meta")
