"""Dataset layouts read as they are: nnU-Net v2 raw, the Medical Segmentation Decathlon and FLARE give the same
cases; prepare.dataset prepares them; what flareseg cannot segment, or a malformed dataset.json, is refused in one
line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flareseg.config import ConfigError, load_config
from flareseg.data.cases import InputFolderError
from flareseg.data.index import CaseIndex
from flareseg.data.layouts import read_dataset
from flareseg.data.prepare import prepare_dataset
from flareseg.io import Geometry, read_image, write_image

SHAPE = (10, 20, 20)
GEOMETRY = Geometry(spacing=(3.0, 1.5, 1.5), origin=(-10.0, 5.0, 2.0), direction=np.eye(3), shape=SHAPE)
CASES = ["liver_0", "liver_1", "liver_2"]
NNUNET_LABELS = {"background": 0, "liver": 1, "tumour": 2}
MSD_LABELS = {"0": "background", "1": "liver", "2": "tumour"}
TINY = ["prepare.grids.coarse.size=[8, 12, 12]", "prepare.grids.fine.size=[8, 12, 12]", "prepare.workers=1"]


def _volumes(case_id: str, tumour: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """A seeded int16 image and a label map with a liver block and a tumour inside it, different per case."""
    k = CASES.index(case_id)
    image = np.random.default_rng(k).integers(-300, 300, size=SHAPE).astype(np.int16)
    label = np.zeros(SHAPE, np.uint8)
    label[2 : 7 + k, 3:15, 4 : 14 + k] = 1
    label[4:6, 6 : 9 + k, 7:10] = tumour
    return image, label


def _junk(folder: Path, name: str) -> None:
    """A macOS resource fork, as the Decathlon archives ship beside every file: not an image at all."""
    (folder / name).write_bytes(b"\x00\x05\x16\x07 Mac OS X resource fork")


def _write_json(root: Path, data: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(data))


def _nnunet(root: Path, labels: dict | None = None, channels: dict | None = None, **extra) -> Path:
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for case_id in CASES:
        image, label = _volumes(case_id)
        write_image(root / "imagesTr" / f"{case_id}_0000.nii.gz", image, GEOMETRY)
        write_image(root / "labelsTr" / f"{case_id}.nii.gz", label, GEOMETRY)
    _junk(root / "imagesTr", "._liver_0_0000.nii.gz")
    data = {
        "channel_names": channels or {"0": "CT"},
        "labels": labels or NNUNET_LABELS,
        "numTraining": len(CASES),
        "file_ending": ".nii.gz",
        **extra,
    }
    _write_json(root, data)
    return root


def _msd(root: Path, labels: dict | None = None, modality: dict | None = None, tumour: int = 2, extra=()) -> Path:
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    training = []
    for case_id in CASES:
        image, label = _volumes(case_id, tumour)
        write_image(root / "imagesTr" / f"{case_id}.nii.gz", image, GEOMETRY)
        write_image(root / "labelsTr" / f"{case_id}.nii.gz", label, GEOMETRY)
        _junk(root / "imagesTr", f"._{case_id}.nii.gz")
        _junk(root / "labelsTr", f"._{case_id}.nii.gz")
        training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    data = {
        "name": "Liver",
        "tensorImageSize": "3D",
        "modality": modality or {"0": "CT"},
        "labels": labels or MSD_LABELS,
        "numTraining": len(training) + len(extra),
        "training": [*training, *extra],
        "test": [],
    }
    _write_json(root, data)
    return root


def _arrays(layout) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {case.case_id: (read_image(case.image)[0], read_image(case.label)[0]) for case in layout.discovery.cases}


def test_nnunet_msd_and_flare_copies_give_the_same_cases(tmp_path):
    nnunet, msd = read_dataset(_nnunet(tmp_path / "nnunet")), read_dataset(_msd(tmp_path / "msd"))
    assert (nnunet.kind, msd.kind) == ("nnunet", "msd")
    assert nnunet.root == tmp_path / "nnunet" and msd.root == tmp_path / "msd"
    assert [case.case_id for case in nnunet.discovery.cases] == CASES
    assert [case.case_id for case in msd.discovery.cases] == CASES
    assert nnunet.discovery.problems == [] and msd.discovery.problems == []
    assert nnunet.label_names == msd.label_names == {1: "liver", 2: "tumour"}
    assert msd.discovery.cases[0].image == tmp_path / "msd" / "imagesTr" / "liver_0.nii.gz"
    a, b = _arrays(nnunet), _arrays(msd)
    for case_id in CASES:
        expected_image, expected_label = _volumes(case_id)
        for arrays in (a, b):
            assert np.array_equal(arrays[case_id][0], expected_image)
            assert np.array_equal(arrays[case_id][1], expected_label)
    # FLARE: the nnU-Net folders without dataset.json.
    (tmp_path / "nnunet" / "dataset.json").unlink()
    flare = read_dataset(tmp_path / "nnunet")
    assert flare.kind == "flare" and flare.label_names is None
    assert [case.case_id for case in flare.discovery.cases] == CASES and flare.discovery.problems == []


def test_prepare_reads_an_msd_dataset_with_unlabeled_cases_beside_it(tmp_path):
    # Names are compared ignoring case, spaces, hyphens and underscores: "Liver" is data.labels' liver.
    root = _msd(tmp_path / "msd", labels={"0": "background", "1": "Liver", "2": "tumour"})
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    write_image(unlabeled / "extra_0000.nii.gz", _volumes("liver_1")[0], GEOMETRY)
    out = tmp_path / "prepared"
    settings = [f"prepare.dataset={root}", f"prepare.unlabeled={unlabeled}", f"prepare.out={out}"]
    summary = prepare_dataset(load_config(None, [*settings, "data.labels=[liver, tumour]", *TINY]), progress=False)
    assert summary.ok and sorted(summary.prepared) == ["extra", *CASES]
    index = CaseIndex(out / "index.lmdb")
    assert index.case_ids() == ["extra", *CASES]
    for case_id in CASES:
        record = index.get(case_id)
        assert record["labeled"] and record["label_file"] == str(root / "labelsTr" / f"{case_id}.nii.gz")
        assert record["labels_present"] == [1, 2]
        assert set(np.unique(np.load(index.array_path(record, "fine_label")))) == {0, 1, 2}
    assert not index.get("extra")["labeled"]


def test_non_contiguous_ids_are_kept_and_need_a_label_map(tmp_path):
    labels = {"0": "background", "1": "liver", "5": "tumour"}
    root = _msd(tmp_path / "msd", labels=labels, tumour=5)
    assert read_dataset(root).label_names == {1: "liver", 5: "tumour"}
    out = tmp_path / "prepared"
    settings = [
        f"prepare.dataset={root}",
        f"prepare.out={out}",
        "data.labels=[liver, tumour]",
        *TINY,
        "prepare.folds=1",
    ]
    with pytest.raises(ConfigError, match=r"prepare\.label_map: \{1: 1, 5: 2\}"):
        prepare_dataset(load_config(None, settings), progress=False)
    assert not out.exists()  # refused before anything is written
    summary = prepare_dataset(load_config(None, [*settings, "prepare.label_map={1: 1, 5: 2}"]), progress=False)
    assert summary.ok and sorted(summary.prepared) == CASES
    index = CaseIndex(out / "index.lmdb")
    record = index.get("liver_0")
    assert record["labels_present"] == [1, 2]
    assert set(np.unique(np.load(index.array_path(record, "fine_label")))) == {0, 1, 2}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.labels=[liver, kidney]"],
            r"names the labels \{1: liver, 2: tumour\} but data\.labels is \[liver, kidney\]; "
            r"set data\.labels: \[liver, tumour\] or prepare\.label_map",
        ),
        (["data.labels=[liver]"], r"set data\.labels: \[liver, tumour\]"),
        (
            ["data.labels=[liver, tumour]", "prepare.label_map={1: 1}"],
            r"prepare\.label_map makes \[liver\], but data\.labels is \[liver, tumour\]",
        ),
    ],
)
def test_labels_other_than_data_labels_are_refused(tmp_path, overrides, message):
    root = _msd(tmp_path / "msd")
    out = tmp_path / "prepared"
    config = load_config(None, [f"prepare.dataset={root}", f"prepare.out={out}", *TINY, *overrides])
    with pytest.raises(ConfigError, match=message):
        prepare_dataset(config, progress=False)
    assert not out.exists()


def test_a_missing_training_file_is_a_problem_not_a_crash(tmp_path):
    extra = [
        {"image": "./imagesTr/liver_9.nii.gz", "label": "./labelsTr/liver_9.nii.gz"},
        {"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/missing.nii.gz"},
    ]
    root = _msd(tmp_path / "msd", extra=extra)
    found = read_dataset(root).discovery
    assert [case.case_id for case in found.cases] == ["liver_1", "liver_2"]
    problems = dict(found.invalid)
    assert sorted(problems) == ["liver_0", "liver_9"]
    assert problems["liver_9"].startswith(f"{root / 'imagesTr' / 'liver_9.nii.gz'}: no such file")
    assert "listed 2 times" in problems["liver_0"]
    # prepare reports the missing case as failed and prepares the others
    root = _msd(tmp_path / "msd2", extra=extra[:1])
    settings = [f"prepare.dataset={root}", f"prepare.out={tmp_path / 'out'}", "data.labels=[liver, tumour]"]
    summary = prepare_dataset(load_config(None, [*settings, *TINY, "prepare.folds=1"]), progress=False)
    assert sorted(summary.prepared) == CASES and [case_id for case_id, _ in summary.failed] == ["liver_9"]


@pytest.mark.parametrize(
    ("layout", "kwargs", "message"),
    [
        (_nnunet, {"channels": {"0": "CT", "1": "CT"}}, r"'channel_names' lists 2 channel entries .*single-channel CT"),
        (_nnunet, {"channels": {"0": "T2"}}, r"'channel_names' names \"T2\", not CT"),
        (_msd, {"modality": {"0": "FLAIR", "1": "T1w"}}, r"'modality' lists 2 modality .*4-D images cannot"),
        (_msd, {"modality": {"0": "MRI"}}, r"'modality' names \"MRI\", not CT"),
        (
            _nnunet,
            {"labels": {"background": 0, "kidney": [1, 2], "tumour": 2}, "regions_class_order": [1, 2]},
            r"label 'kidney' is the region \[1, 2\] \(region-based training\)",
        ),
        (_nnunet, {"labels": {"background": 0, "liver": 1, "ignore": 2}}, r"label 'ignore' \(id 2\) marks unannotated"),
        (_nnunet, {"labels": {"background": 0, "liver": 1, "tumour": 1}}, r"'liver' and 'tumour' share the id 1"),
        (_msd, {"labels": {"0": "background", "one": "liver"}}, r"'labels' key 'one' is not a label id"),
    ],
)
def test_what_flareseg_cannot_segment_is_refused_naming_dataset_json(tmp_path, layout, kwargs, message):
    root = layout(tmp_path / "data", **kwargs)
    with pytest.raises(ConfigError, match=message) as error:
        read_dataset(root)
    assert str(error.value).startswith(f"{root / 'dataset.json'}: ") and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1}}', r"missing key 'file_ending'"),
        ('{"channel_names": {"0": "CT"}, "labels": {"a": 1}, "file_ending": ".png"}', r"file_ending '\.png' is not"),
        ('{"modality": {"0": "CT"}, "labels": {"1": "a"}}', r"missing key 'training'"),
        ('{"modality": {"0": "CT"}, "labels": {"1": "a"}, "training": ["x.nii.gz"]}', r"training\[0\] must be"),
        ('{"channel_names": {"0": "CT"}, "labels": [1, 2]}', r"'labels' must be a mapping of label name to id"),
        ('{"name": "x"}', r"neither an nnU-Net v2 dataset\.json .* nor a Medical Segmentation Decathlon"),
        ('{"channel_names": ', r"not valid JSON"),
        ("[1, 2]", r"expected a JSON object, got list"),
    ],
)
def test_a_malformed_dataset_json_says_what_is_wrong(tmp_path, text, message):
    (tmp_path / "dataset.json").write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_dataset(tmp_path)


def test_a_folder_without_a_layout_is_refused(tmp_path):
    with pytest.raises(InputFolderError, match=r"not a dataset folder: no dataset\.json"):
        read_dataset(tmp_path)
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(InputFolderError, match=r"pass its parent folder"):
        read_dataset(tmp_path / "imagesTr")
    with pytest.raises(InputFolderError, match=r"no labelsTr folder"):
        read_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no such folder"):
        read_dataset(tmp_path / "missing")


def test_nnunet_file_ending_and_dataset_key(tmp_path):
    root = _nnunet(tmp_path / "nnunet")
    write_image(root / "imagesTr" / "other_0000.mha", _volumes("liver_0")[0], GEOMETRY)
    write_image(root / "labelsTr" / "other.mha", _volumes("liver_0")[1], GEOMETRY)
    found = read_dataset(root).discovery
    assert [case.case_id for case in found.cases] == CASES
    assert [case_id for case_id, _ in found.invalid] == ["other"] and "not a .nii.gz file" in found.invalid[0][1]
    # A `dataset` key lists the files instead of imagesTr (paths relative to the root).
    listed = {"a": {"images": ["imagesTr/liver_2_0000.nii.gz"], "label": "labelsTr/liver_2.nii.gz"}}
    data = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**data, "dataset": listed}))
    found = read_dataset(root).discovery
    assert [(case.case_id, case.label) for case in found.cases] == [("a", root / "labelsTr" / "liver_2.nii.gz")]


def test_prepare_dataset_replaces_images_and_labels(tmp_path):
    with pytest.raises(ConfigError, match=r"'prepare\.dataset' replaces .* set 'prepare\.images' to null"):
        load_config(None, [f"prepare.dataset={tmp_path}", f"prepare.images={tmp_path}"])
    with pytest.raises(ConfigError, match=r"set 'prepare\.images' and 'prepare\.labels' to null"):
        load_config(None, [f"prepare.dataset={tmp_path}", f"prepare.images={tmp_path}", f"prepare.labels={tmp_path}"])
    config = load_config(None, [f"prepare.dataset={tmp_path}", f"prepare.out={tmp_path / 'out'}"])
    config.prepare.labels = tmp_path  # set after loading: prepare_dataset checks again
    with pytest.raises(ConfigError, match=r"set 'prepare\.labels' to null"):
        prepare_dataset(config, progress=False)
    assert not (tmp_path / "out").exists()


def test_the_dataset_key_loads_like_other_paths_and_typos_are_named(tmp_path):
    (tmp_path / "prepare.yaml").write_text("prepare:\n  dataset: Dataset001_Liver\n")
    assert load_config(tmp_path / "prepare.yaml").prepare.dataset == tmp_path / "Dataset001_Liver"
    with pytest.raises(ConfigError, match=r"unknown config key 'prepare\.datset'; did you mean 'prepare\.dataset'\?"):
        load_config(None, ["prepare.datset=x"])
    (tmp_path / "typo.yaml").write_text("prepare:\n  imagess: x\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'prepare\.imagess'; did you mean 'prepare\.images'\?"):
        load_config(tmp_path / "typo.yaml")
