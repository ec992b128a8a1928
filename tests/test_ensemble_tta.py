"""Fold ensembles and mirror test-time augmentation: a stage of several checkpoints averages their sigmoid
probabilities, predict.tta: mirror averages the 8 flips, and both give the decision computed here directly from
the networks (torch and OpenVINO); members of different stages are refused; the predictor's output geometry and
its pass counts."""

from __future__ import annotations

import csv
import itertools
import json

import numpy as np
import pytest
import torch

from flareseg.checkpoint import save_checkpoint
from flareseg.cli import main
from flareseg.config import ConfigError, load_config, to_plain
from flareseg.data.intensity import window_and_zscore
from flareseg.data.patches import sliding_window, tile_starts
from flareseg.data.phantom import make_phantom
from flareseg.data.resample import resize_image
from flareseg.inference.backends import openvino_available
from flareseg.inference.predictor import Predictor, checkpoint_files, stage_checkpoints
from flareseg.inference.stage_model import StageModel
from flareseg.io import write_image
from flareseg.models import build_model

needs_openvino = pytest.mark.skipif(not openvino_available(), reason="needs the openvino extra")
CPU = torch.device("cpu")
SIZE = 16  # network input, voxels per axis
TINY = ["model.name=base_unet", "model.channels=[4,8,8,16]", f"model.input_size=[{SIZE},{SIZE},{SIZE}]"]
FLIPPED = ["train.augment.flip_p=0.5", "train.augment.flip_axes=[0,1,2]"]  # trained with all three mirror axes
# the tensor dims ([1, C, z, y, x]) each of mirror TTA's 8 passes flips, for networks trained with all three
MIRROR_FLIPS = [axes for n in range(4) for axes in itertools.combinations((2, 3, 4), n)]
SPACING_GRID = (
    "prepare.grids={coarse: {region: volume, size: [16, 16, 16]}, fine: {region: labels, spacing: [2, 2, 2]}}"
)


def _checkpoint(folder, name="fine", seed=0, *overrides: str):
    """A random (untrained) tiny network of stage `name` with 3 classes, its weights drawn from `seed`."""
    config = load_config(
        None, ["data.labels=[liver, kidney, spleen]", *TINY, *FLIPPED, f"train.stage={name}", *overrides]
    )
    torch.manual_seed(seed)
    model = build_model(config)
    path = folder / f"{name}_{seed}.pt"
    return save_checkpoint(path, {"model": model.state_dict(), "config": to_plain(config)})


def _image(stage: StageModel, volume: torch.Tensor, spacing) -> torch.Tensor:
    """The normalised [1, 1, z, y, x] input `label_map` gives the networks."""
    grid = stage.grid_size(volume.shape, spacing)
    return window_and_zscore(resize_image(volume, grid), stage.window)[None, None]


def _expected(logit_sets: list[torch.Tensor], margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The decision on the mean sigmoid probability (float64) of `logit_sets`, and the voxels within `margin` of a
    tie or of 0.5, where float rounding (or another backend) may decide either way."""
    mean = torch.stack([torch.sigmoid(logits.double()) for logits in logit_sets]).mean(0)[0]
    top = mean.topk(2, dim=0).values
    best, index = mean.max(dim=0)
    classes = ((index + 1) * (best > 0.5)).to(torch.uint8)
    near = ((best - 0.5).abs() < margin) | ((top[0] - top[1]) < margin)
    return classes, near


def _assert_decides(got: torch.Tensor, expected: torch.Tensor, near: torch.Tensor, near_share: float = 0.01) -> None:
    assert got.shape == expected.shape and got.dtype == torch.uint8
    assert torch.equal(got[~near], expected[~near])
    assert near.float().mean() < near_share
    assert len(expected.unique()) >= 3  # a map where the decision matters, not one or two constant classes


def _torch_logits(model, image: torch.Tensor, flips=((),)) -> list[torch.Tensor]:
    """The network's logits on each flip of `image`, flipped back."""
    out = []
    with torch.inference_mode():
        for axes in flips:
            logits = model(image.flip(axes) if axes else image).float()
            out.append(logits.flip(axes) if axes else logits)
    return out


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny networks run fastest on one thread (and far faster on a busy machine); the global setting is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ensemble")
    return {
        "a": _checkpoint(folder, "fine", 4),  # seeds whose networks give background and all three classes
        "b": _checkpoint(folder, "fine", 6),
        "coarse_a": _checkpoint(folder, "coarse", 2),
        "coarse_b": _checkpoint(folder, "coarse", 3),
        "tiled_a": _checkpoint(folder, "fine", 5, SPACING_GRID),
        "tiled_b": _checkpoint(folder, "fine", 7, SPACING_GRID),
    }


VOLUME = torch.randint(-400, 400, (SIZE, SIZE, SIZE), generator=torch.Generator().manual_seed(9)).float()


def test_mirror_tta_flips_only_the_axes_the_networks_learned(models, tmp_path):
    assert len(StageModel(models["a"], CPU, "fp32", backend="torch", tta="mirror").flips) == 8
    two_axes = _checkpoint(tmp_path, "fine", 4, "train.augment.flip_axes=[0,1]")  # z and y: not x (left-right)
    stage = StageModel(two_axes, CPU, "fp32", backend="torch", tta="mirror")
    assert sorted(stage.flips) == [(), (2,), (2, 3), (3,)]
    ensemble = StageModel([models["a"], two_axes], CPU, "fp32", backend="torch", tta="mirror")
    assert sorted(ensemble.flips) == sorted(stage.flips) and ensemble.passes_per_window == 2 * 4  # the common axes
    unflipped = _checkpoint(tmp_path / "plain", "fine", 4, "train.augment.flip_p=0")
    with pytest.raises(ValueError, match="trained without flips") as error:  # it never saw mirrored anatomy
        StageModel(unflipped, CPU, "fp32", backend="torch", tta="mirror")
    assert str(unflipped) in str(error.value)
    assert StageModel(unflipped, CPU, "fp32", backend="torch").flips == ((),)  # without TTA it runs as trained


def test_an_ensemble_of_one_model_is_that_model(models):
    alone = StageModel(models["a"], CPU, "fp32", backend="torch")
    listed = StageModel([models["a"]], CPU, "fp32", backend="torch")
    twice = StageModel([models["a"], models["a"]], CPU, "fp32", backend="torch")  # the averaging path
    reference = alone.label_map(VOLUME, (1.0, 1.0, 1.0))
    assert alone.fast and listed.fast and not twice.fast  # the class output inside the runner for one model
    assert torch.equal(listed.label_map(VOLUME, (1.0, 1.0, 1.0)), reference)
    assert torch.equal(twice.label_map(VOLUME, (1.0, 1.0, 1.0)), reference)
    assert (alone.passes, listed.passes, twice.passes) == (1, 1, 2)
    assert len(reference.unique()) == 4  # background and the three classes


def test_an_ensemble_of_two_models_decides_on_their_mean_probability(models):
    stage = StageModel([models["a"], models["b"]], CPU, "fp32", backend="torch")
    image = _image(stage, VOLUME, (1.0, 1.0, 1.0))
    logits = [_torch_logits(model, image)[0] for model in stage.models]
    expected, near = _expected(logits, 1e-5)
    got = stage.label_map(VOLUME, (1.0, 1.0, 1.0))
    _assert_decides(got, expected, near)
    assert stage.passes == 2
    for single in logits:  # the average is neither member: a test that would notice one member alone
        alone, _ = _expected([single], 1e-5)
        assert (alone != expected).sum() > 20


def test_mirror_tta_averages_the_eight_flips(models):
    stage = StageModel(models["a"], CPU, "fp32", backend="torch", tta="mirror")
    image = _image(stage, VOLUME, (1.0, 1.0, 1.0))
    flips = [axes for n in range(4) for axes in itertools.combinations((2, 3, 4), n)]
    expected, near = _expected(_torch_logits(stage.model, image, flips), 1e-5)
    got = stage.label_map(VOLUME, (1.0, 1.0, 1.0))
    _assert_decides(got, expected, near)
    assert stage.passes == 8 and not stage.fast
    plain, _ = _expected(_torch_logits(stage.model, image), 1e-5)
    assert (plain != expected).sum() > 20  # the flips change the decision: the average is not one pass


def test_mirror_tta_of_an_ensemble_on_sliding_windows(models):
    """A fixed-spacing stage: every (member, flip) pass is a whole sliding-window prediction of the grid, flipped
    back; the probabilities are averaged over members x flips."""
    stage = StageModel([models["tiled_a"], models["tiled_b"]], CPU, "fp32", backend="torch", tta="mirror")
    volume = torch.randint(-400, 400, (18, 20, 16), generator=torch.Generator().manual_seed(4)).float()
    spacing = (2.0, 2.0, 2.0)  # the stage's spacing: no resampling
    image = _image(stage, volume, spacing)
    assert image.shape[2:] == volume.shape
    sets = []
    for model in stage.models:
        for axes in MIRROR_FLIPS:
            with torch.inference_mode():
                flipped = image.flip(axes) if axes else image
                logits = sliding_window(model, flipped, (SIZE,) * 3, 0.25, float(image.min()))
            sets.append(logits.flip(axes) if axes else logits)
    expected, near = _expected(sets, 1e-5)
    got = stage.label_map(volume, spacing)
    _assert_decides(got, expected, near)
    windows = np.prod([len(tile_starts(n, SIZE, 0.25)) for n in volume.shape])
    assert windows > 1 and stage.passes == 2 * 8 * windows


def test_members_of_different_stages_are_refused(models, tmp_path):
    others = {
        "stage name": _checkpoint(tmp_path, "coarse", 0),
        "input size": _checkpoint(tmp_path / "size", "fine", 0, "model.input_size=[24,24,24]"),
        "HU window": _checkpoint(tmp_path / "hu", "fine", 0, "data.hu_window=[-100, 200]"),
        "classes": _checkpoint(tmp_path / "groups", "fine", 0, "train.label_groups=[[1], [2, 3]]"),
        "grid": models["tiled_a"],
    }
    for what, other in others.items():
        with pytest.raises(ValueError, match=what) as error:
            StageModel([models["a"], other], CPU, "fp32", backend="torch")
        assert str(models["a"]) in str(error.value) and str(other) in str(error.value)
    with pytest.raises(ValueError, match="label names"):
        renamed = _checkpoint(tmp_path / "names", "fine", 0)
        state = torch.load(renamed, weights_only=False)
        state["config"]["data"]["labels"] = ["liver", "kidney", "pancreas"]
        save_checkpoint(renamed, state)
        StageModel([models["a"], renamed], CPU, "fp32", backend="torch")
    with pytest.raises(ValueError, match="predict.tta must be one of"):
        StageModel(models["a"], CPU, "fp32", backend="torch", tta="flip")


@needs_openvino
def test_openvino_ensemble_with_mirror_tta_matches_the_torch_networks(models):
    """OpenVINO (fp32) runs each member's logits export; the decision agrees with the one computed from the torch
    networks except within 1e-3 of a tie (OpenVINO's logits agree with torch's to about 1e-3)."""
    stage = StageModel([models["a"], models["b"]], CPU, "fp32", backend="openvino", threads=1, tta="mirror")
    assert stage.backend == "openvino" and [f.output for f in stage._forwards] == ["logits", "logits"]
    image = _image(stage, VOLUME, (1.0, 1.0, 1.0))
    sets = [logits for model in stage.models for logits in _torch_logits(model, image, MIRROR_FLIPS)]
    expected, near = _expected(sets, 1e-3)
    got = stage.label_map(VOLUME, (1.0, 1.0, 1.0))
    _assert_decides(got, expected, near, near_share=0.05)
    assert stage.passes == 16


def test_the_predictor_keeps_the_geometry_and_counts_passes(models, tmp_path):
    from flareseg.data.phantom import make_phantom
    from flareseg.io import read_image, write_image

    phantom = make_phantom(1, shape=(20, 30, 28), orientation="oblique")
    image = write_image(tmp_path / "ct_0000.nii.gz", phantom.image, phantom.geometry)
    config = load_config(
        None,
        [
            f"predict.coarse=[{models['coarse_a']}, {models['coarse_b']}]",
            f"predict.fine=[{models['a']}, {models['b']}]",
            "predict.tta=mirror",
            "predict.backend=torch",
            "predict.coarse_min_volume_mm3=0",
        ],
    )
    predictor = Predictor(config.predict)
    assert predictor.steps.stages == ("coarse", "fine")
    assert [len(stage.models) for stage in (predictor.roi, *predictor.segmenters)] == [2, 2]
    timings = predictor.predict_file(image, tmp_path / "ct.nii.gz")
    label, geometry = read_image(tmp_path / "ct.nii.gz")
    source = read_image(image)[1]
    assert label.shape == phantom.image.shape and geometry.spacing == pytest.approx(source.spacing)
    assert geometry.origin == pytest.approx(source.origin, abs=1e-4)
    assert geometry.direction == pytest.approx(source.direction, abs=1e-6)
    assert set(np.unique(label).tolist()) <= {0, 1, 2, 3}
    assert timings.passes.get("coarse") == 16
    assert timings.passes.get("fine") in (16, None)  # None: the coarse stage found nothing (no box)


def test_checkpoint_lists_from_yaml_and_set(models, tmp_path):
    (tmp_path / "cfg").mkdir()
    yaml_file = tmp_path / "cfg" / "predict.yaml"
    yaml_file.write_text("predict:\n  stages: [roi.pt, [organs_0.pt, organs_1.pt]]\n  tta: mirror\n")
    settings = load_config(yaml_file).predict
    folder = tmp_path / "cfg"  # relative paths in a YAML file are relative to it
    assert settings.stages == [folder / "roi.pt", [folder / "organs_0.pt", folder / "organs_1.pt"]]
    assert settings.tta == "mirror"
    assert checkpoint_files(settings) == [folder / "roi.pt", folder / "organs_0.pt", folder / "organs_1.pt"]
    settings = load_config(None, ["predict.coarse=[a.pt]", "predict.fine=[f0.pt, f1.pt]"]).predict
    assert stage_checkpoints(settings) == [settings.coarse[0], settings.fine]  # a list of one is its checkpoint
    assert load_config(None, []).predict.tta == "none"
    with pytest.raises(ConfigError, match="'predict.fine' lists no checkpoint"):
        load_config(None, ["predict.fine=[]"])
    with pytest.raises(ConfigError, match="'predict.tta' must be one of"):
        load_config(None, ["predict.tta=flips"])


def test_predict_folder_with_ensembles_and_mirror_tta(tmp_path):
    coarse = [_checkpoint(tmp_path, "coarse", seed) for seed in (2, 3)]
    fine = [_checkpoint(tmp_path, "fine", seed) for seed in (4, 6)]
    phantom = make_phantom(1, shape=(20, 30, 28))
    write_image(tmp_path / "in" / "case_0000.nii.gz", phantom.image, phantom.geometry)
    common = ["predict", "-i", str(tmp_path / "in"), "-q", "--set", "predict.backend=torch"]
    common += ["--set", "predict.coarse_min_volume_mm3=0", "--set", "predict.fine_min_volume_mm3=0"]
    out = tmp_path / "out"
    args = [*common, "-o", str(out), "--coarse", *map(str, coarse), "--fine", *map(str, fine), "--tta", "mirror"]
    assert main(args) == 0
    rows = list(csv.DictReader(open(out / "timing.csv")))
    assert rows[0]["coarse_passes"] == "16" and rows[0]["fine_passes"] in ("16", "0")
    settings = json.loads((out / "prediction_settings.json").read_text())
    assert settings["predict.tta"] == "mirror" and settings["predict.coarse"] == [str(p) for p in coarse]
    assert [row[0] for row in settings["checkpoint files"]] == [str(p.resolve()) for p in (*coarse, *fine)]
    # another tta, or another member list, is refused in that folder (not mixed into its predictions)
    assert main([*args[:-2], "--tta", "none"]) != 0
    assert main([*args[: args.index("--fine") + 2], "--tta", "mirror"]) != 0
    # one checkpoint per flag is the plain value (a folder predicted before keeps resuming), --stages A,B a group
    single = tmp_path / "single"
    assert main([*common, "-o", str(single), "--coarse", str(coarse[0]), "--fine", str(fine[0])]) == 0
    assert json.loads((single / "prediction_settings.json").read_text())["predict.coarse"] == str(coarse[0])
    assert list(csv.DictReader(open(single / "timing.csv")))[0]["coarse_passes"] == "1"
    chain = tmp_path / "chain"
    assert main([*common, "-o", str(chain), "--stages", f"{coarse[0]},{coarse[1]}", str(fine[0])]) == 0
    row = list(csv.DictReader(open(chain / "timing.csv")))[0]
    assert row["coarse_passes"] == "2" and row["fine_passes"] in ("1", "0")
