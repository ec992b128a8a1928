"""Inference backends: OpenVINO on the CPU gives the torch network's logits, and `auto` picks it only where valid."""

from __future__ import annotations

import os

import pytest
import torch

from flareseg.checkpoint import save_checkpoint
from flareseg.config import load_config, to_plain
from flareseg.inference.backends import (
    OpenVinoRunner,
    cache_dir,
    choose_backend,
    choose_precision,
    classes_from_logits,
    openvino_available,
)
from flareseg.inference.stage_model import StageModel
from flareseg.models import build_model

needs_openvino = pytest.mark.skipif(not openvino_available(), reason="needs the openvino extra")
CPU = torch.device("cpu")


def _checkpoint(tmp_path, name="fine"):
    config = load_config(
        None,
        [
            "data.labels=[liver, kidney, spleen]",
            "model.channels=[4,8,8,16,16]",
            "model.input_size=[32,32,32]",
            f"train.stage={name}",
        ],
    )
    torch.manual_seed(3)
    return save_checkpoint(
        tmp_path / f"{name}.pt", {"model": build_model(config).state_dict(), "config": to_plain(config)}
    )


def test_backend_choice():
    fastest = "openvino" if openvino_available() else "torch"
    assert choose_backend("auto", CPU, "auto") == fastest
    assert choose_backend("auto", CPU, "fp32") == fastest
    assert choose_backend("auto", CPU, "fp16") == "torch"  # OpenVINO's CPU plugin has no fp16 here
    assert choose_backend("auto", torch.device("cuda"), "fp16") == "torch"
    assert choose_backend("torch", CPU, "fp32") == "torch"
    with pytest.raises(ValueError, match="runs on the CPU"):
        choose_backend("openvino", torch.device("cuda"), "fp16")
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend("tensorrt", CPU, "fp32")
    with pytest.raises(ValueError, match="runs in fp32, bf16 or int8, not fp16"):
        choose_backend("openvino", CPU, "fp16")
    assert choose_backend("auto", CPU, "int8") == fastest
    with pytest.raises(ValueError, match="int8 runs on the OpenVINO CPU backend"):
        choose_backend("torch", CPU, "int8")
    with pytest.raises(ValueError, match="int8 runs on the OpenVINO CPU backend"):
        choose_backend("auto", torch.device("cuda"), "int8")


def test_precision_choice():
    assert choose_precision("auto", torch.device("cuda"), "torch") == "fp16"
    assert choose_precision("auto", CPU, "torch") == "fp32"  # torch's CPU bf16 autocast is not faster here
    for explicit in ("fp32", "bf16", "fp16"):
        assert choose_precision(explicit, CPU, "torch") == explicit


def test_training_precision_auto_is_the_one_decision():
    """The trainer's "auto" is the resolver prediction uses with the torch backend (one place decides)."""
    from flareseg.models.runtime import resolve_precision

    for device in (CPU, torch.device("cuda")):
        for choice in ("auto", "fp32", "bf16", "fp16"):
            assert resolve_precision(choice, device) == choose_precision(choice, device, "torch")
    assert resolve_precision("auto", CPU, cpu_bf16=True) == "bf16"


def test_classes_are_the_best_positive_logit():
    logits = torch.tensor([[[-1.0, 2.0, 0.5]], [[-2.0, 1.0, 3.0]]]).permute(1, 0, 2)  # [B=1, C=2, 3 voxels]
    assert classes_from_logits(logits).tolist() == [[0, 1, 2]]
    assert classes_from_logits(logits).dtype == torch.uint8


@needs_openvino
def test_openvino_logits_and_labels_match_torch(tmp_path):
    path = _checkpoint(tmp_path)
    on_torch = StageModel(path, CPU, "fp32", backend="torch")
    on_openvino = StageModel(path, CPU, "fp32", backend="openvino")
    assert on_openvino.backend == "openvino" and on_torch.backend == "torch" and on_openvino.precision == "fp32"
    model = on_torch.model
    image = torch.randn(1, 1, 32, 32, 32)
    with torch.inference_mode():
        expected = model(image)
    logits = OpenVinoRunner(model, path, (32, 32, 32), 2, "fp32", "logits")
    got = logits(image)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-3 * float(expected.abs().max()), rtol=1e-3)
    assert torch.equal(logits(image), got)  # buffers released after an inference are rebuilt for the next
    classes = OpenVinoRunner(model, path, (32, 32, 32), 2, "fp32", "classes")(image)  # argmax inside the graph
    assert classes.dtype == torch.uint8 and classes.shape == (1, 32, 32, 32)
    assert (classes == classes_from_logits(expected)).float().mean() > 0.999  # only near-ties may differ
    volume = torch.randint(-1000, 1000, (40, 50, 45)).float()
    a, b = on_torch.label_map(volume, (2.0, 1.0, 1.0)), on_openvino.label_map(volume, (2.0, 1.0, 1.0))
    assert (a == b).float().mean() > 0.999
    exports = sorted((cache_dir() / "onnx").glob("fine-*.onnx"))
    assert [p.name.split("-")[1] for p in exports] == ["classes", "logits"]  # one export per output, then reused
    StageModel(path, CPU, "fp32", backend="openvino")
    assert sorted((cache_dir() / "onnx").glob("fine-*.onnx")) == exports


@needs_openvino
def test_exports_are_keyed_by_the_network_not_the_checkpoint_file(tmp_path):
    """A copy of a checkpoint with other history (a resumed or retrained run, same weights) reuses the export;
    other weights get their own."""
    from flareseg.checkpoint import load_checkpoint, save_checkpoint

    path = _checkpoint(tmp_path)
    StageModel(path, CPU, "fp32", backend="openvino")
    state = load_checkpoint(path)
    state["history"] = [{"epoch": 99}]
    save_checkpoint(tmp_path / "copy" / path.name, state)
    exports = set((cache_dir() / "onnx").iterdir())
    StageModel(tmp_path / "copy" / path.name, CPU, "fp32", backend="openvino")
    assert set((cache_dir() / "onnx").iterdir()) == exports
    state["model"] = {
        name: tensor + 1 if tensor.is_floating_point() else tensor for name, tensor in state["model"].items()
    }
    save_checkpoint(tmp_path / "other" / path.name, state)
    StageModel(tmp_path / "other" / path.name, CPU, "fp32", backend="openvino")
    assert len(set((cache_dir() / "onnx").iterdir()) - exports) == 1


@needs_openvino
def test_openvino_bf16_labels_stay_close(tmp_path):
    """bf16 (the default where the CPU computes it natively) keeps the labels of this untrained network to within
    3 % of the voxels (measured 99.0-99.3 %); trained networks differ far less (bench/compare_precision.py)."""
    from flareseg.inference.backends import cpu_has_native_bf16

    path = _checkpoint(tmp_path)
    on_openvino = StageModel(path, CPU, "auto", backend="openvino")
    assert on_openvino.precision == ("bf16" if cpu_has_native_bf16() else "fp32")
    on_openvino = StageModel(path, CPU, "bf16", backend="openvino")
    on_torch = StageModel(path, CPU, "fp32", backend="torch")
    volume = torch.randint(-1000, 1000, (40, 50, 45)).float()
    a, b = on_torch.label_map(volume, (2.0, 1.0, 1.0)), on_openvino.label_map(volume, (2.0, 1.0, 1.0))
    assert a.shape == b.shape and b.dtype == torch.uint8
    assert (a == b).float().mean() > 0.97


@needs_openvino
def test_default_predictor_runs_openvino_on_the_cpu(tmp_path):
    """predict.backend and predict.precision at their defaults: OpenVINO (bf16 where native) for both stages, and
    the label map keeps the input's geometry."""
    from flareseg.data.phantom import make_phantom
    from flareseg.inference.backends import cpu_has_native_bf16
    from flareseg.inference.predictor import Predictor
    from flareseg.io import read_image, write_image

    phantom = make_phantom(0, shape=(30, 40, 44), spacing=(3.0, 2.0, 2.0), orientation="ras")
    image = write_image(tmp_path / "ct_0000.nii.gz", phantom.image, phantom.geometry)
    coarse, fine = _checkpoint(tmp_path, "coarse"), _checkpoint(tmp_path, "fine")
    predictor = Predictor(load_config(None, [f"predict.coarse={coarse}", f"predict.fine={fine}"]).predict)
    expected = "bf16" if cpu_has_native_bf16() else "fp32"
    assert [(s.backend, s.precision) for s in (predictor.roi, *predictor.segmenters)] == [("openvino", expected)] * 2
    predictor.predict_file(image, tmp_path / "ct.nii.gz")
    label, geometry = read_image(tmp_path / "ct.nii.gz")
    source = read_image(image)[1]  # the input as written (NIfTI stores float32)
    assert label.shape == phantom.image.shape and geometry.spacing == source.spacing
    assert geometry.origin == source.origin and set(label.flatten().tolist()) <= {0, 1, 2, 3}


@needs_openvino
def test_openvino_rejects_inputs_of_another_size_and_takes_its_threads_explicitly(tmp_path):
    stage = StageModel(_checkpoint(tmp_path), CPU, "fp32", backend="openvino", threads=1)
    with pytest.raises(ValueError, match="takes \\[32, 32, 32\\] inputs"):
        stage._forward(torch.zeros(1, 1, 16, 32, 32))
    # predict.threads reaches OpenVINO itself, whatever torch's global setting is
    assert torch.get_num_threads() != 1 or os.cpu_count() == 1
    assert int(stage._forward.compiled.get_property("INFERENCE_NUM_THREADS")) == 1
    # not pinned: two 1-thread shards on one machine pinned their threads to the same core and ran at half speed
    assert str(stage._forward.compiled.get_property("ENABLE_CPU_PINNING")).lower() == "false"
