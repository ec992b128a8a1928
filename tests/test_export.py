"""Export and summary: the exported models give the PyTorch model's output; summary reports real figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flareseg.checkpoint import save_checkpoint
from flareseg.cli import main
from flareseg.config import load_config, to_plain
from flareseg.models import build_model
from flareseg.models.export import export_torchscript

SMALL = ["model.channels=[4,8,8,16,16]", "model.num_classes=3", "model.input_size=[32,40,36]"]


# EfficientSegNet's TorchScript export: test_export_command_loads_weights_and_writes_both_formats
@pytest.mark.parametrize("name", ["base_unet", "small_unet"])
def test_torchscript_export_gives_the_same_output(tmp_path, name):
    channels = "model.channels=[8,16,16,32]" if name == "small_unet" else SMALL[0]
    config = load_config(None, [*SMALL, channels, f"model.name={name}"])
    model = build_model(config).eval()
    x = torch.randn(1, 1, 32, 40, 36)
    path = export_torchscript(model, x, tmp_path / "model.pt")
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
        other = torch.randn(1, 1, 32, 40, 36)  # traced, not memorised: a new input gives the new output
        assert torch.allclose(loaded(other), model(other), atol=1e-5)


def test_export_command_loads_weights_and_writes_both_formats(tmp_path, capsys):
    """Also the ONNX export's test (export_onnx through the command): its output on an input other than the one it
    was exported with (the command's own random example) is the model's."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    config = load_config(None, SMALL)
    trained = build_model(config)
    torch.save({"model": trained.state_dict(), "epoch": 3}, tmp_path / "checkpoint.pt")
    args = ["export", "-o", str(tmp_path / "out"), "--weights", str(tmp_path / "checkpoint.pt")]
    assert main([*args, *[a for s in SMALL for a in ("--set", s)]]) == 0
    x = torch.randn(1, 1, 32, 40, 36)
    with torch.no_grad():
        expected = trained.eval()(x)
    scripted = torch.jit.load(str(tmp_path / "out" / "efficient_segnet.pt"))
    assert torch.allclose(scripted(x), expected, atol=1e-5)
    session = ort.InferenceSession(str(tmp_path / "out" / "efficient_segnet.onnx"), providers=["CPUExecutionProvider"])
    assert np.allclose(session.run(None, {"image": x.numpy()})[0], expected.numpy(), atol=1e-4)
    assert load_config(tmp_path / "out" / "config.yaml").model.channels == [4, 8, 8, 16, 16]


def test_export_refuses_weights_of_another_network_in_one_line(tmp_path, capsys):
    other = build_model(load_config(None, [*SMALL, "model.num_classes=5"]))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    args = ["export", "-o", str(tmp_path / "out"), "--weights", str(tmp_path / "other.pt")]
    assert main([*args, *[a for s in SMALL for a in ("--set", s)]]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and f"'--weights': checkpoint {tmp_path / 'other.pt'} does not fit this network" in err[0]
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    assert main(["export", "-o", str(tmp_path / "out"), "--weights", str(tmp_path / "notes.txt")]) == 2
    assert "is not a PyTorch checkpoint" in capsys.readouterr().err


def test_export_of_a_trained_checkpoint_follows_its_own_config(tmp_path):
    """A flareseg checkpoint is exported as the stage it is (flareseg.stage.TrainedStage): its network, input size
    and config, whatever the command line's config says."""
    config = load_config(None, SMALL)  # not the defaults the command line would build: 16..256 wide, 192^3
    trained = build_model(config)
    save_checkpoint(tmp_path / "stage.pt", {"model": trained.state_dict(), "config": to_plain(config)})
    assert (
        main(
            ["export", "-o", str(tmp_path / "out"), "--weights", str(tmp_path / "stage.pt"), "--format", "torchscript"]
        )
        == 0
    )
    x = torch.randn(1, 1, 32, 40, 36)
    with torch.no_grad():
        expected = trained.eval()(x)
    assert torch.allclose(torch.jit.load(str(tmp_path / "out" / "efficient_segnet.pt"))(x), expected, atol=1e-5)
    assert list(load_config(tmp_path / "out" / "config.yaml").model.input_size) == [32, 40, 36]


def test_summary_reports_parameters_cost_time_and_memory(capsys):
    assert (
        main(
            [
                "summary",
                "--device",
                "cpu",
                "--repeats",
                "2",
                "--set",
                "model.num_classes=4",
                "--set",
                "model.input_size=[32,32,32]",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    fields = dict(line.split(None, 1) for line in out.splitlines() if line.strip() and not line.startswith(" "))
    assert "9,366,016" in out  # EfficientSegNet at 4 classes, whatever the input size
    macs = float(out.split("multiply-adds")[1].split("x 2^30")[0])
    assert macs == pytest.approx(333.1 * (32 / 192) ** 3, rel=0.03)  # cost scales with the voxel count
    seconds = float(out.split("forward time")[1].split(" s ")[0])
    memory = float(out.split("peak memory")[1].split(" MB")[0])
    assert 0 < seconds < 60 and memory > 10 and "model" in fields
