"""int8 networks (NNCF post-training quantization for OpenVINO): the calibration set, the cached model and its
record, the accuracy check that `predict.precision: auto` relies on, refusals, and predicting in int8.

The networks are the session's smoke demo (tiny, briefly trained; its prepared folder is their calibration data)."""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nncf")
pytest.importorskip("openvino")

from flareseg.cli import main  # noqa: E402
from flareseg.data.prepared import PreparedData  # noqa: E402
from flareseg.data.training_sets import TrainingSamples  # noqa: E402
from flareseg.inference import quantize  # noqa: E402
from flareseg.inference.backends import OpenVinoRunner, classes_from_logits  # noqa: E402
from flareseg.inference.stage_model import StageModel  # noqa: E402
from flareseg.io import read_image  # noqa: E402
from flareseg.stage import TrainedStage  # noqa: E402

CPU = torch.device("cpu")
SAMPLES = 8


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache folder for the module: the ONNX exports are made once; tests that need no int8 model remove it."""
    folder = tmp_path_factory.mktemp("int8-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLARESEG_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="module")
def fine(smoke_demo) -> Path:
    return smoke_demo.out / "fine" / "checkpoint_best.pt"


@pytest.fixture(scope="module")
def quantized(fine, cache) -> tuple[Path, str]:
    """`flareseg quantize` on the fine stage, once for the module, on an ASCII terminal (LANG=C) with the log on:
    NNCF's progress bars once failed there. Its int8 model folder and the line it printed."""
    streams = {name: io.TextIOWrapper(io.BytesIO(), encoding="ascii") for name in ("stdout", "stderr")}
    logger = logging.getLogger(quantize.__name__)
    level = logger.level
    logger.setLevel(logging.INFO)
    with pytest.MonkeyPatch.context() as patch:
        for name, stream in streams.items():
            patch.setattr(sys, name, stream)
        status = main(["quantize", str(fine), "--samples", str(SAMPLES)])
    logger.setLevel(level)
    for stream in streams.values():
        stream.flush()
    assert status == 0, streams["stderr"].buffer.getvalue()
    (folder,) = (cache / "int8").iterdir()
    return folder, streams["stdout"].buffer.getvalue().decode().strip()


def no_int8_models(cache: Path) -> None:
    shutil.rmtree(cache / "int8", ignore_errors=True)


def test_the_calibration_set_is_the_training_sampler_over_the_fold_training_cases(fine, cache):
    trained = TrainedStage.load(fine)
    calibration = quantize.CalibrationSet(trained.config, None, SAMPLES)
    train_ids, _ = PreparedData(trained.config.train.data).fold(trained.config.train.fold)
    assert calibration.describe()["cases"] == train_ids and len(calibration) == SAMPLES
    first, second = list(calibration), list(calibration)  # NNCF iterates more than once: the same inputs each time
    assert len(first) == SAMPLES and all(a.shape == (1, 1, *trained.input_size) for a in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    sampler = TrainingSamples(PreparedData(trained.config.train.data), train_ids, trained.config, "fine", SAMPLES)
    assert np.array_equal(first[3][0], sampler[3]["image"].numpy())  # item 3 of epoch 0 of the training sampler


def test_quantize_command_stores_the_model_its_calibration_and_its_check(fine, cache, quantized):
    folder, line = quantized
    assert line.startswith(f"{fine}: int8 model in {folder}") and f"({SAMPLES} calibration inputs" in line
    record = json.loads((folder / quantize.RECORD).read_text())
    assert (folder / quantize.MODEL).is_file() and (folder / "model.bin").is_file()
    assert record["calibration"]["inputs"] == SAMPLES and record["output"] == "classes"
    assert record["calibration"]["prepared"] == str((fine.parents[1] / "prepared").resolve())
    check = record["check"]
    assert check["passed"] == (check["dsc_loss"] <= 0.005 and check["nsd_loss"] <= 0.01)
    assert check["dsc_loss"] == pytest.approx(check["fp32"]["dsc"] - check["int8"]["dsc"])
    assert 0.0 <= check["changed_foreground"] <= 1.0
    _, val_ids = PreparedData(fine.parents[1] / "prepared").fold(0)
    assert check["cases"] == val_ids and check["which"] == "validation"
    assert not [p for p in (cache / "int8").iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_int8_logits_track_the_fp32_network(fine, cache):
    """On an input it was not calibrated on, the int8 network's logits stay near the fp32 ones, and so do the
    classes predict takes from them. The smoke demo's networks have 4-16 channels, which quantize worse than real
    ones (the demo's trained networks: 2.5 % of foreground voxels changed, bench/compare_precision.py); measured
    here: mean |int8 - fp32| 0.15 of the logits' std, 83 % of voxels the same class; calibrated on inputs scaled by
    0.05 or 20 (a wrong normalisation) it gave 0.47 / 68 % and 0.37 / 60 %."""
    trained = TrainedStage.load(fine)
    model, size = trained.network(), trained.input_size
    calibration = quantize.CalibrationSet(trained.config, None, SAMPLES)
    quantize.quantize_network(model, fine, size, "logits", calibration)
    image = torch.from_numpy(list(quantize.CalibrationSet(trained.config, None, SAMPLES + 1))[-1])
    fp32 = OpenVinoRunner(model, fine, size, 1, "fp32", "logits")(image)
    int8 = OpenVinoRunner(model, fine, size, 1, "int8", "logits")(image)
    assert (int8 - fp32).abs().mean() < 0.25 * fp32.std()
    agree = (classes_from_logits(int8) == classes_from_logits(fp32)).float().mean()
    assert agree > 0.75, float(agree)


def test_auto_takes_int8_only_where_the_stored_check_passed(fine, quantized, tmp_path):
    folder, _ = quantized
    record = json.loads((folder / quantize.RECORD).read_text())
    try:
        quantize.store_check(folder, {"passed": True})
        assert StageModel(fine, CPU, "auto", backend="openvino", threads=1).precision == "int8"
        quantize.store_check(folder, {"passed": False})
        assert StageModel(fine, CPU, "auto", backend="openvino", threads=1).precision == "fp32"
        (folder / quantize.RECORD).write_text(json.dumps({k: v for k, v in record.items() if k != "check"}))
        assert StageModel(fine, CPU, "auto", backend="openvino", threads=1).precision == "fp32"  # not checked
        # other weights (a retrained network) have no int8 model: never this network's model or check
        quantize.store_check(folder, {"passed": True})
        state = torch.load(fine, weights_only=False)
        name = next(iter(state["model"]))
        state["model"][name] = state["model"][name] + 0.01
        torch.save(state, tmp_path / "retrained.pt")
        assert StageModel(tmp_path / "retrained.pt", CPU, "auto", backend="openvino", threads=1).precision == "fp32"
    finally:
        (folder / quantize.RECORD).write_text(json.dumps(record))


def test_a_failed_save_leaves_no_model_and_no_temporary_folder(fine, cache, monkeypatch):
    import openvino

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(openvino, "save_model", fail)
    coarse = TrainedStage.load(fine.parents[1] / "coarse" / "checkpoint_best.pt")
    network = coarse.network()
    (cache / "int8").mkdir(exist_ok=True)
    before = sorted((cache / "int8").iterdir())
    with pytest.raises(OSError, match="disk full"):
        quantize.int8_model(network, coarse.path, coarse.input_size, "classes", samples=2)
    assert not quantize.int8_folder(network, coarse.path, coarse.input_size, "classes").exists()
    assert sorted((cache / "int8").iterdir()) == before  # and no temporary folder


def test_predict_in_int8_keeps_the_input_geometry(smoke_demo, quantized, cache, tmp_path):
    from flareseg.config import load_config
    from flareseg.inference.batch import predict_folder

    demo = smoke_demo.out
    trained = TrainedStage.load(demo / "coarse" / "checkpoint_best.pt")  # the fine stage: the quantize command's
    network = trained.network()
    # what a quantization killed mid-way left: its temporary folder, named with its (now dead) process id
    ended = subprocess.Popen(["true"])
    ended.wait()
    folder = quantize.int8_folder(network, trained.path, trained.input_size, "classes")
    stale = folder.with_name(f".{folder.name}.tmp-{ended.pid}-0badf00d")
    stale.mkdir(parents=True)
    (stale / quantize.MODEL).write_text("<half")
    quantize.int8_model(network, trained.path, trained.input_size, "classes", samples=SAMPLES)
    assert not stale.exists() and quantize.read_record(folder) is not None
    config = load_config(
        None,
        [
            f"predict.coarse={demo / 'coarse' / 'checkpoint_best.pt'}",
            f"predict.fine={demo / 'fine' / 'checkpoint_best.pt'}",
            "predict.device=cpu",
            "predict.precision=int8",
        ],
    )
    images = sorted((demo / "phantoms" / "imagesTs").iterdir())[:1]
    (tmp_path / "in").mkdir()
    shutil.copy(images[0], tmp_path / "in" / images[0].name)
    summary = predict_folder(config, tmp_path / "in", tmp_path / "out", progress=False)
    assert summary.ok and len(summary.predicted) == 1
    label, geometry = read_image(tmp_path / "out" / f"{summary.predicted[0]}.nii.gz")
    _, source = read_image(images[0])
    assert geometry == source and label.max() <= 4
    settings = json.loads((tmp_path / "out" / "prediction_settings.json").read_text())
    assert settings["predict.precision"] == "int8"


def test_int8_without_a_model_or_the_data_to_make_one_is_one_line(smoke_demo, fine, cache, tmp_path, capsys):
    no_int8_models(cache)  # (last in this module: the other tests' models are gone)
    coarse = fine.parents[1] / "coarse" / "checkpoint_best.pt"
    state = torch.load(coarse, weights_only=False)  # the coarse stage (the first built) whose data has moved
    state["config"]["train"]["data"] = str(tmp_path / "gone")
    torch.save(state, tmp_path / "moved.pt")
    (tmp_path / "in").mkdir()
    image = sorted((smoke_demo.out / "phantoms" / "imagesTs").iterdir())[0]
    shutil.copy(image, tmp_path / "in" / image.name)
    int8 = ["--set", "predict.precision=int8"]
    status = main(
        [
            "predict",
            "-i",
            str(tmp_path / "in"),
            "-o",
            str(tmp_path / "out"),
            *int8,
            "--coarse",
            str(tmp_path / "moved.pt"),
            "--fine",
            str(fine),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert "no prepared data at" in err[0] and "flareseg quantize" in err[0]
    status = main(["quantize", str(tmp_path / "moved.pt"), "-q"])
    assert status == 2 and "no prepared data at" in capsys.readouterr().err
    torch_int8 = [*int8, "--set", "predict.backend=torch"]
    status = main(
        ["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out2"), *torch_int8, "--fine", str(fine)]
        + ["--coarse", str(coarse)]
    )
    assert status == 2 and "int8 runs on the OpenVINO CPU backend" in capsys.readouterr().err
