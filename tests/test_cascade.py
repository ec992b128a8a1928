"""The FLARE23 cascade: label groups, fixed-spacing stages (patches in training, sliding windows in inference) and
a predictor that runs any chain of stages (ROI -> organs -> lesions) from one predict config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from flareseg.config import ConfigError, load_config
from flareseg.data.patches import patch_box, sliding_window, take_patch, tile_starts
from flareseg.data.phantom import write_phantom_dataset
from flareseg.data.prepared import PreparedData
from flareseg.data.training_sets import TrainingSamples, ValidationSamples
from flareseg.inference.predictor import Predictor
from flareseg.io import Geometry, read_image
from tests.tiny import prepare_tiny, train_tiny

# liver, merged kidneys, spleen and lesions as ids 1..4
CASCADE_LABELS = ["data.labels=[liver, kidney, spleen, lesion]", "prepare.label_map={1: 1, 2: 2, 13: 2, 3: 3, 14: 4}"]
# the FLARE23 stages by name: a ROI on the whole volume, organs and lesions in label boxes at a fixed spacing
NAMED_GRIDS = (
    "prepare.grids={roi: {region: volume, size: [24, 24, 24]}, organs: {region: labels, spacing: [6, 6, 6]},"
    " lesion: {region: labels, spacing: [6, 6, 6], margin_mm: 10}}"
)


# ---------------------------------------------------------------- patches and sliding windows
def test_tile_starts_cover_the_axis_with_the_requested_overlap():
    for length, size, overlap in ((100, 32, 0.25), (33, 32, 0.5), (32, 32, 0.25), (250, 64, 0.0)):
        starts = tile_starts(length, size, overlap)
        covered = np.zeros(length, bool)
        for start in starts:
            assert 0 <= start <= length - size
            covered[start : start + size] = True
        assert covered.all()
        if len(starts) > 1:  # neighbours share at least the requested overlap (up to rounding)
            assert max(b - a for a, b in zip(starts, starts[1:])) <= size * (1 - overlap) + 1
    assert len(tile_starts(100, 32, 0.5)) > len(tile_starts(100, 32, 0.0))


def test_sliding_window_of_a_pointwise_model_reproduces_its_input():
    """A 1x1x1 identity convolution: every blended tile agrees, so the result is the input, padding removed."""
    model = nn.Conv3d(1, 1, 1, bias=False)
    nn.init.ones_(model.weight)
    image = torch.randn(1, 1, 23, 41, 50)
    with torch.no_grad():
        out = sliding_window(model, image, (16, 16, 16), 0.25, fill=-5.0)
    assert out.shape == image.shape
    torch.testing.assert_close(out, image, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # smaller than one tile: padded, one pass, cropped back
        small = torch.randn(1, 1, 7, 9, 11)
        torch.testing.assert_close(sliding_window(model, small, (16, 16, 16), 0.25, fill=0.0), small)


def test_foreground_patches_contain_the_rare_class():
    classes = torch.zeros(60, 80, 80, dtype=torch.uint8)
    classes[10:50, 10:70, 10:70] = 1  # a large organ
    classes[55:57, 75:77, 2:4] = 2  # a tiny lesion near a corner
    hits = {1: 0, 2: 0}
    for seed in range(40):
        lo, hi = patch_box(tuple(classes.shape), (16, 16, 16), classes, 1.0, torch.Generator().manual_seed(seed))
        patch = take_patch(classes, lo, hi, 0)
        assert patch.shape == (16, 16, 16)
        for value in hits:
            hits[value] += int((patch == value).any())
    assert hits[2] >= 12, hits  # class-balanced: the lesion is the centre about half the time


def test_patches_pad_arrays_smaller_than_the_patch():
    volume = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(4, 5, 6)
    lo, hi = patch_box(volume.shape, (8, 8, 8), torch.zeros(4, 5, 6), 0.0, torch.Generator().manual_seed(0))
    patch = take_patch(volume, lo, hi, -1.0)
    assert patch.shape == (8, 8, 8)
    assert (patch == -1).sum() == 8**3 - volume.numel()
    assert torch.equal(patch[patch >= 0].sort().values, volume.flatten())


# ---------------------------------------------------------------- label groups
def test_label_groups_set_the_classes_and_are_checked():
    config = load_config(None, [*CASCADE_LABELS, "train.label_groups=[[1, 2, 3]]"])
    assert config.num_classes == 1 and config.class_names == ["liver+kidney+spleen"]
    config = load_config(None, [*CASCADE_LABELS, "train.label_groups=[[4]]"])
    assert config.class_label_groups == [[4]] and config.class_names == ["lesion"]
    with pytest.raises(ConfigError, match="label_groups"):
        load_config(None, [*CASCADE_LABELS, "train.label_groups=[[5]]"])
    with pytest.raises(ConfigError, match="label_groups"):
        load_config(None, [*CASCADE_LABELS, "train.label_groups=[[1], [2]]", "model.num_classes=3"])


@pytest.fixture(scope="module")
def cascade_data(tmp_path_factory):
    """Phantoms with lesions (one annotating no lesions), prepared on the named grids roi, organs and lesion."""
    root = tmp_path_factory.mktemp("cascade")
    raw = root / "raw"
    write_phantom_dataset(raw, 3, seed=5, shape=(40, 72, 72), lesions=True, orientation="identity")
    (raw / "labelsTr" / "annotated.json").write_text('{"phantom_002": [1, 2, 3]}')  # no lesion annotation
    data = prepare_tiny(raw, root / "data", *CASCADE_LABELS, NAMED_GRIDS)
    return raw, data


def test_training_items_follow_the_label_groups_and_the_patch_size(cascade_data):
    _, data = cascade_data
    config = load_config(
        None,
        [
            *CASCADE_LABELS,
            NAMED_GRIDS,
            "train.label_groups=[[4]]",
            "model.input_size=[16,16,16]",
            "train.foreground_patch_p=1.0",
        ],
    )
    samples = TrainingSamples(PreparedData(data), ["phantom_000", "phantom_002"], config, "lesion", length=6)
    lesion_found = False
    for k in range(6):
        item = samples[k]
        assert item["image"].shape == (1, 16, 16, 16)
        assert set(item["label"].unique().tolist()) <= {0, 1}
        assert item["annotated"].tolist() == [item["case_id"] != "phantom_002"]  # no lesion annotation: masked
        lesion_found |= bool((item["label"] == 1).any())
    assert lesion_found
    stored = ValidationSamples(PreparedData(data), ["phantom_000"], config, "lesion")[0]
    assert stored["image"].shape[1:] != (16, 16, 16)  # fixed spacing: validation sees the whole stored crop
    roi = load_config(None, [*CASCADE_LABELS, NAMED_GRIDS, "train.label_groups=[[1, 2, 3]]"])
    item = TrainingSamples(PreparedData(data), ["phantom_000"], roi, "roi")[0]
    assert set(item["label"].unique().tolist()) == {0, 1}


# ---------------------------------------------------------------- the chain predictor
class _FixedStage:
    """A stand-in stage returning a fixed label map on its grid (to test the chain's own logic)."""

    def __init__(self, labels: np.ndarray, groups, names, name="fixed", region="volume"):
        self.labels_on_grid, self.groups, self.label_names, self.labels = labels, groups, names, names
        self.path, self.name, self.region = Path(name), name, region
        self.seen: list[tuple] = []

    def label_map(self, volume, spacing, regions=False):
        self.seen.append(tuple(volume.shape))
        return torch.from_numpy(self.labels_on_grid.copy())


def test_chain_crops_to_the_roi_and_later_stages_overwrite(monkeypatch):
    names = ["liver", "kidney", "spleen", "lesion"]
    roi = np.zeros((10, 10, 10), np.uint8)
    roi[2:6, 3:7, 4:8] = 1
    roi[9, 9, 9] = 1  # a speck: a merged ROI keeps every component above the volume floor, this one is below
    organs = np.zeros((8, 8, 8), np.uint8)
    organs[1:7, 1:7, 1:7] = 1
    lesion = np.zeros((8, 8, 8), np.uint8)
    lesion[3:5, 3:5, 3:5] = 4  # a few voxels: lesions keep every component ({4: 0})
    stages = {
        "roi": _FixedStage(roi, [[1, 2, 3]], names, "roi"),
        "organs": _FixedStage(organs, [[1], [2], [3]], names, "organs", "labels"),
        "lesion": _FixedStage(lesion, [[4]], names, "lesion", "labels"),
    }
    monkeypatch.setattr("flareseg.inference.predictor.StageModel", lambda path, *a: stages[Path(path).name])
    config = load_config(
        None,
        [
            "predict.stages=[roi, organs, lesion]",
            "predict.margin_mm=0",
            "predict.coarse_min_volume_mm3=10",
            "predict.postprocess={lesion: {keep_components_per_label: {4: 0}}}",
        ],
    )
    predictor = Predictor(config.predict)
    assert predictor.steps.all == ("read", "roi", "box", "organs", "lesion", "postprocess", "write")
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), (19, 19, 19))
    out = predictor.predict_array(np.zeros((19, 19, 19), np.int16), geometry)
    # the ROI box [2:6, 3:7, 4:8] on the 10^3 grid is [4:11, 6:13, 8:15] on the 19^3 grid (corner-aligned)
    assert stages["organs"].seen == [(7, 7, 7)] and stages["lesion"].seen == [(7, 7, 7)]
    assert out[:4].max() == 0 and out[11:].max() == 0  # nothing outside the box
    assert set(np.unique(out).tolist()) == {0, 1, 4}
    assert (out == 4).sum() >= 1  # the lesion overwrote the organ and survived the component filter


def _chain(monkeypatch, stages: dict, *overrides: str) -> Predictor:
    monkeypatch.setattr("flareseg.inference.predictor.StageModel", lambda path, *a: stages[Path(path).name])
    return Predictor(load_config(None, [f"predict.stages=[{', '.join(stages)}]", *overrides]).predict)


def test_each_stage_filters_components_by_its_own_rule(monkeypatch):
    """predict.postprocess.<stage> overrides the shorthand for that stage only: two organ stages see the same
    map, one keeps both liver components, the other (the shorthand: keep 1) only the larger."""
    names = ["liver"]
    roi = np.ones((4, 4, 4), np.uint8)
    two_livers = np.zeros((12, 12, 12), np.uint8)
    two_livers[0:5, 0:5, 0:5] = 1  # 125 voxels
    two_livers[8:11, 8:11, 8:11] = 1  # 27 voxels
    stages = {
        "roi": _FixedStage(roi, [[1]], names, "roi"),
        "both": _FixedStage(two_livers, [[1]], names, "both", "labels"),
        "one": _FixedStage(two_livers, [[1]], names, "one", "labels"),
    }
    predictor = _chain(
        monkeypatch, stages, "predict.fine_min_volume_mm3=0", "predict.postprocess.both={keep_components: 2}"
    )
    assert predictor.rules[stages["both"]].keep_components == 2 and predictor.rules[stages["one"]].keep_components == 1
    assert predictor.rules[stages["roi"]].min_volume_mm3 == 1000.0  # the ROI stage: coarse_min_volume_mm3
    kept = {}
    for name in ("both", "one"):
        labels = two_livers.copy()
        predictor._filter(labels, (1.0, 1.0, 1.0), stages[name])
        kept[name] = int(labels.sum())
    assert kept == {"both": 152, "one": 125}


def test_a_chain_is_checked_against_its_stage_names_and_regions(monkeypatch):
    names = ["liver"]
    volume, box = np.ones((4, 4, 4), np.uint8), np.ones((4, 4, 4), np.uint8)
    organs = _FixedStage(box, [[1]], names, "organs", "labels")
    with pytest.raises(ValueError, match="first stage of a chain finds the region of interest in the whole volume"):
        _chain(monkeypatch, {"organs": organs, "roi": _FixedStage(volume, [[1]], names, "roi")})
    stages = {"roi": _FixedStage(volume, [[1]], names, "roi"), "organs": organs}
    with pytest.raises(ValueError, match="predict.postprocess names the stages lesion, but this chain's stages are"):
        _chain(monkeypatch, stages, "predict.postprocess.lesion={keep_components: 2}")
    # a name that comes twice gets its own timing column
    twice = {"roi": stages["roi"], "a": _FixedStage(box, [[1]], names, "organs", "labels"), "b": organs}
    assert _chain(monkeypatch, twice).steps.all == ("read", "roi", "box", "organs", "organs_2", "postprocess", "write")


def test_one_stage_chain_segments_the_whole_volume(monkeypatch):
    whole = np.ones((5, 5, 5), np.uint8)
    stage = _FixedStage(whole, [[1]], ["lesion"])
    monkeypatch.setattr("flareseg.inference.predictor.StageModel", lambda path, *a: stage)
    predictor = Predictor(load_config(None, ["predict.stages=[only]"]).predict)
    geometry = Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), (9, 12, 12))
    out = predictor.predict_array(np.zeros((9, 12, 12), np.int16), geometry)
    assert stage.seen == [(9, 12, 12)] and (out == 1).all()


def test_roi_organ_lesion_cascade_predicts_end_to_end(cascade_data, tmp_path):
    """Real checkpoints of each kind: a binary ROI (fixed size), organs and lesions (fixed spacing, tiled)."""
    raw, data = cascade_data
    roi = train_tiny(data, tmp_path / "roi", "roi", *CASCADE_LABELS, "train.label_groups=[[1, 2, 3]]", network="coarse")
    organs = train_tiny(
        data, tmp_path / "organs", "organs", *CASCADE_LABELS, "train.label_groups=[[1], [2], [3]]", network="fine"
    )
    lesion = train_tiny(
        data, tmp_path / "lesion", "lesion", *CASCADE_LABELS, "train.label_groups=[[4], [1, 2, 3]]", network="fine"
    )
    stages = [
        f"predict.stages=[{roi}, {organs}, {lesion}]",
        "predict.postprocess={lesion: {keep_components_per_label: {4: 0}}}",
    ]
    # the chain's mechanics, in PyTorch: OpenVINO's outputs of both kinds are checked against it in test_backends.py
    config = load_config(None, [*stages, "predict.backend=torch"])
    predictor = Predictor(config.predict)
    assert predictor.roi.groups == [[1, 2, 3]]
    assert [stage.class_ids.tolist() for stage in predictor.segmenters] == [
        [0, 1, 2, 3],
        [0, 4, 0],
    ]  # the organ region is context only
    assert predictor.segmenters[0].spacing == (6.0, 6.0, 6.0)
    image_path = raw / "imagesTr" / "phantom_000_0000.nii.gz"
    timings = predictor.predict_file(image_path, tmp_path / "out.nii.gz")
    label, geometry = read_image(tmp_path / "out.nii.gz")
    _, source = read_image(image_path)
    assert geometry == source and label.shape == source.shape
    assert set(np.unique(label).tolist()) <= {0, 1, 2, 3, 4}
    assert (
        set(timings.steps)
        == set(predictor.steps.all)
        == {"read", "roi", "box", "organs", "lesion", "postprocess", "write"}
    )
