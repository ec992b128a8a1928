"""flareseg plan: the fingerprint against direct numpy figures, the decisions on datasets that differ, the config
folder it writes, and a planned config that prepares, trains and predicts end to end."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from flareseg.cli import main
from flareseg.config import load_config
from flareseg.data.cases import CaseFiles
from flareseg.data.phantom import make_phantom, phantom_case_seed
from flareseg.data.prepare import prepare_dataset
from flareseg.data.prepared import PreparedData
from flareseg.io import read_image, to_canonical, write_image
from flareseg.planning import plan_dataset
from flareseg.planning.decide import MIN_ORGAN_VOXELS, StageNetwork, make_plan
from flareseg.planning.fingerprint import Fingerprint, case_fingerprint, fingerprint_dataset
from flareseg.planning.network_memory import NetworkMemory

FLARE21 = {1: 1, 2: 2, 13: 2, 3: 3, 4: 4}  # FLARE22 ids -> liver, kidney (both sides), spleen, pancreas
FLARE21_NAMES = ["liver", "kidney", "spleen", "pancreas"]
TINY_NETWORKS = {  # small networks: the plan's decisions do not depend on the layers, only on their memory
    "coarse": {"channels": [4, 8, 8, 16]},
    "fine": {"channels": [4, 8, 8, 16, 16]},
}
REFERENCE_MEMORY = {  # measured for the FLARE21 pair (network_memory), fixed here so the rules are tested alone
    "coarse": StageNetwork({"channels": [8, 16, 32, 64, 128]}, NetworkMemory(595.0, 2_676_480)),
    "fine": StageNetwork({"channels": [16, 32, 64, 128, 256]}, NetworkMemory(1000.0, 9_366_016)),
}


def write_cases(
    root: Path, count: int, label_map: dict[int, int] | None = None, seed: int = 0, prefix: str = "case", **options
) -> Path:
    """`count` phantoms as images/<prefix><k>_0000.nii.gz and labels/<prefix><k>.nii.gz, labels renumbered by
    `label_map`."""
    table = np.arange(256, dtype=np.uint8)
    if label_map is not None:
        table[:] = 0
        for source, target in label_map.items():
            table[source] = target
    for index in range(count):
        phantom = make_phantom(phantom_case_seed(seed, index), **options)
        write_image(root / "images" / f"{prefix}{index:02d}_0000.nii.gz", phantom.image, phantom.geometry)
        write_image(root / "labels" / f"{prefix}{index:02d}.nii.gz", table[phantom.label], phantom.geometry)
    return root


@pytest.fixture(scope="module")
def flare21_cases(tmp_path_factory) -> Path:
    return write_cases(tmp_path_factory.mktemp("flare21"), 4, FLARE21, shape=(32, 72, 72))


def test_case_fingerprint_matches_numpy(flare21_cases):
    image_path = flare21_cases / "images" / "case01_0000.nii.gz"
    label_path = flare21_cases / "labels" / "case01.nii.gz"
    record, sample = case_fingerprint(CaseFiles("case01", image_path, label_path))
    image, geometry = read_image(image_path)
    label, _ = read_image(label_path)
    image, canonical, plan = to_canonical(image, geometry)
    label = plan.apply(label)
    spacing = np.array(canonical.spacing)
    assert record["spacing"] == list(canonical.spacing) and record["shape"] == list(canonical.shape)
    assert record["extent_mm"] == pytest.approx(list(spacing * canonical.shape), abs=0.01)
    assert len(record["orientation"]) == 3
    present = sorted(int(k) for k in record["labels"])
    assert present == sorted(set(np.unique(label).tolist()) - {0})
    for key, stats in record["labels"].items():
        mask = label == int(key)
        assert stats["voxels"] == int(mask.sum())
        assert stats["volume_ml"] == pytest.approx(mask.sum() * spacing.prod() / 1000, rel=1e-3)
        where = np.nonzero(mask)
        extent = [(where[a].max() + 1 - where[a].min()) * spacing[a] for a in range(3)]
        assert stats["extent_mm"] == pytest.approx(extent, abs=0.01)
        from scipy import ndimage

        _, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
        assert stats["components"] == count
        assert stats["component_ml"][0] <= stats["volume_ml"] + 1e-3
    # both kidneys in one label: two parts
    assert record["labels"]["2"]["components"] == 2
    where = np.nonzero(label)
    room = [[where[a].min() * spacing[a], (label.shape[a] - where[a].max() - 1) * spacing[a]] for a in range(3)]
    assert np.allclose(record["room_mm"], room, atol=0.01)
    foreground = image[label > 0]
    assert sample.size == min(foreground.size, 10_000)
    assert set(np.unique(sample).tolist()) <= set(np.unique(foreground).astype(np.float32).tolist())


def fingerprint_of(cases: list[dict], names: dict[int, str], hu=(-100.0, 250.0)) -> Fingerprint:
    intensity = {"p00_5": hu[0], "p99_5": hu[1], "mean": 80.0, "std": 60.0, "median": 90.0, "samples": 1000}
    return Fingerprint(cases, intensity, names)


def synthetic_case(spacing, extent_mm, organs: dict[int, tuple[float, list[float]]], box_mm) -> dict:
    """A fingerprint record: organs {id: (volume_ml, component_ml)}."""
    shape = [round(e / s) for e, s in zip(extent_mm, spacing)]
    labels = {
        str(k): {
            "voxels": 1,
            "volume_ml": volume,
            "extent_mm": [10, 10, 10],
            "components": len(parts),
            "component_ml": parts,
        }
        for k, (volume, parts) in organs.items()
    }
    return {
        "case": "c",
        "labeled": True,
        "spacing": list(spacing),
        "shape": shape,
        "orientation": "LPS",
        "extent_mm": list(extent_mm),
        "labels": labels,
        "labels_box_mm": list(box_mm),
        "room_mm": [[50, 50]] * 3,
    }


ABDOMEN = {1: (1500.0, [1500.0]), 2: (300.0, [150.0, 150.0]), 3: (200.0, [200.0]), 4: (60.0, [60.0])}
NAMES = {1: "liver", 2: "kidney", 3: "spleen", 4: "pancreas"}


def plan_of(cases, gpu_memory_gb=24.0):
    return make_plan(fingerprint_of(cases, NAMES), REFERENCE_MEMORY["coarse"], REFERENCE_MEMORY["fine"], gpu_memory_gb)


@pytest.mark.parametrize("in_plane", [0.6, 1.0])
def test_in_plane_spacing_sets_the_target_and_the_fine_grid_holds_the_box(in_plane):
    cases = [synthetic_case((2.5, in_plane, in_plane), (400, 400, 400), ABDOMEN, (200, 180, 240)) for _ in range(5)]
    plan = plan_of(cases, gpu_memory_gb=80.0)
    assert plan.value("plan.target_spacing") == [2.5, in_plane, in_plane]
    size = plan.value("prepare.grids.fine.size")
    margin = plan.value("prepare.grids.fine.margin_mm")
    box = np.array([200, 180, 240]) + 2 * margin
    # the box of all labels + margin fits the grid at the target spacing: no organ voxel is lost to resizing
    assert all(n * s >= b - 1e-6 for n, s, b in zip(size, [2.5, in_plane, in_plane], box))
    assert all(n % 16 == 0 for n in size)


@pytest.mark.parametrize(
    "spacing", [(5.0, 0.6, 0.6), (1.0, 1.0, 1.0)], ids=["in-plane 0.6 mm, 5 mm slices", "in-plane 1.0 mm, 1 mm slices"]
)
def test_phantoms_at_native_spacing_get_grids_that_hold_every_organ(spacing, tmp_path):
    """One full-resolution phantom (22 M and 40 M voxels) fingerprinted from its files; what its grids hold is
    counted on its own label map with numpy."""
    phantom = make_phantom(phantom_case_seed(5, 0), spacing=spacing, orientation="identity")
    table = np.zeros(256, dtype=np.uint8)
    for source, target in FLARE21.items():
        table[source] = target
    label = table[phantom.label]
    write_image(tmp_path / "case_0000.nii", phantom.image, phantom.geometry)
    write_image(tmp_path / "case.nii", label, phantom.geometry)
    fingerprint = fingerprint_dataset(
        [CaseFiles("case", tmp_path / "case_0000.nii", tmp_path / "case.nii")],
        {k + 1: name for k, name in enumerate(FLARE21_NAMES)},
        workers=1,
    )
    plan = make_plan(fingerprint, REFERENCE_MEMORY["coarse"], REFERENCE_MEMORY["fine"], 80.0)
    assert plan.value("plan.target_spacing") == list(spacing)
    extent = np.array(label.shape) * np.array(spacing)  # identity direction: array axes are z, y, x
    # coarse: one resize of the whole volume, where every organ keeps MIN_ORGAN_VOXELS voxels
    coarse_voxel_mm3 = math.prod(extent / np.array(plan.value("prepare.grids.coarse.size")))
    voxels = np.bincount(label.ravel(), minlength=len(FLARE21_NAMES) + 1)[1:]
    assert (voxels > 0).all()
    assert (voxels * math.prod(spacing) / coarse_voxel_mm3 >= MIN_ORGAN_VOXELS).all(), voxels
    # fine: the box of all labels + the margin on each side fits the grid at (at most) the data's spacing
    where = np.nonzero(label)
    box = np.array([(where[a].max() + 1 - where[a].min()) * spacing[a] for a in range(3)])
    box += 2 * plan.value("prepare.grids.fine.margin_mm")
    fine_spacing = box / np.array(plan.value("prepare.grids.fine.size"))
    assert (fine_spacing <= np.array(spacing) + 1e-6).all(), fine_spacing


def test_memory_budget_coarsens_the_finest_axes_first():
    cases = [synthetic_case((2.5, 0.6, 0.6), (400, 400, 400), ABDOMEN, (200, 180, 240)) for _ in range(5)]
    roomy, tight = plan_of(cases, 80.0), plan_of(cases, 8.0)
    assert math.prod(tight.value("prepare.grids.fine.size")) < math.prod(roomy.value("prepare.grids.fine.size"))
    fine = REFERENCE_MEMORY["fine"].memory
    assert fine.gigabytes(math.prod(tight.value("prepare.grids.fine.size")), 2) <= 8.0
    # the slices (2.5 mm) stay as they are until the in-plane axes are coarsened to them
    assert tight.value("prepare.grids.fine.size")[0] == roomy.value("prepare.grids.fine.size")[0]


@pytest.mark.parametrize("slices, expected_z", [(1.0, 1.0), (5.0, 3.0)])
def test_thick_slices_take_the_tenth_percentile(slices, expected_z):
    spacings = [(slices, 0.8, 0.8)] * 8 + [(3.0, 0.8, 0.8)] * 2  # two thinner series among 5 mm ones
    cases = [synthetic_case(s, (300, 400, 400), ABDOMEN, (200, 180, 240)) for s in spacings]
    target = plan_of(cases).value("plan.target_spacing")
    # 1 mm: isotropic enough, the median; 5 mm: over 3x the in-plane 0.8 mm, the 10th percentile (3 mm)
    assert target[0] == pytest.approx(expected_z if slices == 5.0 else 1.0)


def test_coarse_grid_keeps_the_smallest_organ_above_the_stated_voxels():
    cases = [synthetic_case((2.5, 0.8, 0.8), (400, 400, 400), ABDOMEN, (200, 180, 240)) for _ in range(5)]
    plan = plan_of(cases)
    size = np.array(plan.value("prepare.grids.coarse.size"))
    voxel_mm3 = np.prod(np.array([400, 400, 400]) / size)
    assert 60.0 * 1000 / voxel_mm3 >= MIN_ORGAN_VOXELS  # the pancreas, 60 ml
    assert 60.0 * 1000 / voxel_mm3 < 8 * MIN_ORGAN_VOXELS  # and not much finer than it needs


def test_whole_body_fields_of_view_are_tiled_at_a_fixed_spacing():
    abdomen = [synthetic_case((2.5, 0.8, 0.8), (400, 400, 400), ABDOMEN, (200, 180, 240)) for _ in range(6)]
    whole_body = [synthetic_case((2.5, 0.8, 0.8), (1800, 500, 500), ABDOMEN, (200, 180, 240)) for _ in range(4)]
    plan = plan_of(abdomen + whole_body)
    keys = [decision.key for decision in plan.decisions]
    assert "prepare.grids.coarse.spacing" in keys and "prepare.grids.coarse.size" not in keys
    patch = plan.value("coarse.model.input_size")
    assert REFERENCE_MEMORY["coarse"].memory.gigabytes(math.prod(patch), 2) <= 24.0
    assert all(n % 16 == 0 for n in patch)
    assert "prepare.grids.coarse.size" in [d.key for d in plan_of(abdomen).decisions]  # abdomen alone: one resize


def test_component_rules_follow_the_labels():
    lesions = {**ABDOMEN, 5: (20.0, [6.0, 5.0, 4.0, 3.0, 2.0])}
    cases = [synthetic_case((2.5, 0.8, 0.8), (400, 400, 400), lesions, (200, 180, 240)) for _ in range(3)]
    plan = make_plan(
        fingerprint_of(cases, {**NAMES, 5: "lesion"}), REFERENCE_MEMORY["coarse"], REFERENCE_MEMORY["fine"], 24.0
    )
    assert plan.value("predict.keep_components_per_label") == {2: 2, 5: 0}  # merged kidneys; lesions keep all
    minimum = plan.value("predict.postprocess.fine.min_volume_mm3_per_label")
    assert minimum[2] == pytest.approx(75_000.0) and minimum[4] == pytest.approx(30_000.0)


def test_split_kidneys_keep_one_component_each(tmp_path):
    split = write_cases(tmp_path, 2, {1: 1, 2: 2, 13: 3, 3: 4}, shape=(32, 72, 72))
    result = plan_dataset(
        tmp_path / "plan",
        images=split / "images",
        labels=split / "labels",
        networks=TINY_NETWORKS,
        workers=1,
        label_names=["liver", "kidney_right", "kidney_left", "spleen"],
    )
    assert result.plan.value("predict.keep_components_per_label") is None


def test_plan_writes_configs_that_load_with_every_decision(flare21_cases, tmp_path):
    out = tmp_path / "configs"
    status = main(
        [
            "plan",
            "-i",
            str(flare21_cases / "images"),
            "-l",
            str(flare21_cases / "labels"),
            "-o",
            str(out),
            "--label-names",
            ",".join(FLARE21_NAMES),
            "--gpu-memory-gb",
            "12",
            "-w",
            "2",
        ]
    )
    assert status == 0
    fingerprint = json.loads((out / "fingerprint.json").read_text())
    assert len(fingerprint["cases"]) == 4 and fingerprint["intensity"]["samples"] > 0
    prepare = load_config(out / "data_prepare.yaml")
    coarse, fine, predict = (load_config(out / f"{name}.yaml") for name in ("coarse", "fine", "predict"))
    assert prepare.data.labels == FLARE21_NAMES and coarse.data.hu_window == prepare.data.hu_window
    assert prepare.prepare.images == (flare21_cases / "images").resolve()
    assert coarse.model.input_size == prepare.prepare.grids["coarse"].size
    assert fine.model.input_size == prepare.prepare.grids["fine"].size
    assert coarse.train.data == fine.train.data == prepare.prepare.out
    assert predict.predict.fine == fine.train.out / "checkpoint_best.pt"
    assert predict.predict.keep_components_per_label == {2: 2}  # both kidneys in one label
    assert predict.predict.margin_mm == prepare.prepare.grids["fine"].margin_mm
    text = (out / "data_prepare.yaml").read_text()
    assert "# foreground HU 0.5th / 99.5th percentiles" in text and "smallest organ (pancreas" in text


def test_layout_copies_give_the_same_plan(flare21_cases, tmp_path):
    nnunet, msd = tmp_path / "Dataset001_Abdomen", tmp_path / "Task01_Abdomen"
    training = []
    for image in sorted((flare21_cases / "images").iterdir()):
        case = image.name.replace("_0000.nii.gz", "")
        for root, name in ((nnunet, image.name), (msd, f"{case}.nii.gz")):
            (root / "imagesTr").mkdir(parents=True, exist_ok=True)
            (root / "labelsTr").mkdir(parents=True, exist_ok=True)
            shutil.copy(image, root / "imagesTr" / name)
            shutil.copy(flare21_cases / "labels" / f"{case}.nii.gz", root / "labelsTr" / f"{case}.nii.gz")
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    labels = {"background": 0, **{name: k + 1 for k, name in enumerate(FLARE21_NAMES)}}
    (nnunet / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 4, "file_ending": ".nii.gz"})
    )
    (msd / "dataset.json").write_text(
        json.dumps(
            {
                "modality": {"0": "CT"},
                "labels": {str(v): k for k, v in labels.items()},
                "training": training,
                "test": [],
            }
        )
    )
    plans = [
        plan_dataset(tmp_path / f"plan_{root.name}", dataset=root, networks=TINY_NETWORKS, workers=1).plan
        for root in (nnunet, msd)
    ]
    assert plans[0].label_names == plans[1].label_names == {k + 1: n for k, n in enumerate(FLARE21_NAMES)}
    assert [(d.key, d.value) for d in plans[0].decisions] == [(d.key, d.value) for d in plans[1].decisions]
    assert load_config(tmp_path / "plan_Task01_Abdomen" / "data_prepare.yaml").prepare.dataset == msd.resolve()
    # `prepare -d` takes the root in place of the folders the shipped config names
    shipped = Path(__file__).resolve().parents[1] / "configs" / "data_prepare.yaml"
    grids = ["--set", "prepare.grids.coarse.size=[16,16,16]", "--set", "prepare.grids.fine.size=[16,16,16]"]
    labels = ["--set", f"data.labels=[{','.join(FLARE21_NAMES)}]"]
    status = main(
        ["prepare", "--config", str(shipped), "-d", str(msd), "-o", str(tmp_path / "prepared"), "-q", *grids, *labels]
    )
    assert status == 0 and PreparedData(tmp_path / "prepared").labeled_ids() == ["case00", "case01", "case02", "case03"]


def test_a_planned_config_prepares_trains_and_predicts(flare21_cases, tmp_path):
    out = tmp_path / "configs"
    plan_dataset(
        out,
        images=flare21_cases / "images",
        labels=flare21_cases / "labels",
        label_names=FLARE21_NAMES,
        networks=TINY_NETWORKS,
        gpu_memory_gb=12.0,
        workers=1,
    )
    row = prepare_train_and_predict(out, flare21_cases, "case00", tmp_path)
    assert row["coarse_passes"] == 1  # one resize of the whole volume: one network pass


def test_whole_body_fields_of_view_plan_a_tiled_coarse_stage_that_runs_end_to_end(tmp_path):
    """Three abdominal phantoms (~265 mm of z) and two whole-body-sized ones (896 mm): the plan keeps the coarse
    spacing and tiles it; prepare, training and prediction take that config as they are."""
    cases = write_cases(tmp_path / "cases", 3, FLARE21, shape=(32, 72, 72))
    write_cases(cases, 2, FLARE21, seed=1, prefix="body", shape=(112, 72, 72), spacing=(8.0, 5.5, 5.5))
    out = tmp_path / "configs"
    # 1.02 GB holds a 24^3 patch of the tiny coarse network at batch 2: a whole-body volume needs several
    result = plan_dataset(
        out,
        images=cases / "images",
        labels=cases / "labels",
        label_names=FLARE21_NAMES,
        networks=TINY_NETWORKS,
        gpu_memory_gb=1.02,
        workers=1,
    )
    keys = [decision.key for decision in result.plan.decisions]
    assert "prepare.grids.coarse.spacing" in keys and "prepare.grids.coarse.size" not in keys
    patch = result.plan.value("coarse.model.input_size")
    spacing = result.plan.value("prepare.grids.coarse.spacing")
    row = prepare_train_and_predict(out, cases, "body00", tmp_path)
    whole_body = np.array([112 * 8.0, 72 * 5.5, 72 * 5.5]) / np.array(spacing)
    windows = math.prod(math.ceil(n / p) for n, p in zip(whole_body, patch))
    assert row["coarse_passes"] >= windows > 1  # the whole-body volume was tiled, not resized into one patch


def prepare_train_and_predict(configs: Path, cases: Path, case_id: str, tmp_path: Path) -> dict:
    """Prepare the planned config's cases (every organ of every case must survive on both grids), train each stage
    one step, predict `case_id` with the planned predict.yaml; returns its timing row."""
    from flareseg.engine.trainer import Trainer
    from flareseg.inference.batch import predict_folder
    from tests.tiny import CPU

    prepared = prepare_dataset(load_config(configs / "data_prepare.yaml"), progress=False)
    cases_in = sorted(path.name.replace(".nii.gz", "") for path in (cases / "labels").iterdir())
    assert prepared.ok and len(prepared.prepared) == len(cases_in)
    data = PreparedData(load_config(configs / "coarse.yaml").train.data)
    assert data.labeled_ids() == cases_in
    for labeled in cases_in:  # every organ of every case survives on both planned grids
        record = data.record(labeled)
        source = set(np.unique(read_image(cases / "labels" / f"{labeled}.nii.gz")[0]).tolist()) - {0}
        for grid in ("coarse", "fine"):
            assert set(np.unique(data.load_array(record, f"{grid}_label")).tolist()) - {0} == source, (labeled, grid)
    quick = [
        "train.epochs=1",
        "train.iterations_per_epoch=1",
        "train.workers=0",
        "train.progress=false",
        "train.fold=-1",
        "train.batch_size=1",
    ]
    for stage in ("coarse", "fine"):
        Trainer(load_config(configs / f"{stage}.yaml", quick), CPU).fit()
    predict = load_config(
        configs / "predict.yaml",
        [
            f"predict.coarse={configs / 'work/coarse/checkpoint_latest.pt'}",
            f"predict.fine={configs / 'work/fine/checkpoint_latest.pt'}",
            "predict.device=cpu",
            "predict.backend=torch",
        ],
    )
    source = tmp_path / "one"
    source.mkdir()
    shutil.copy(cases / "images" / f"{case_id}_0000.nii.gz", source)
    summary = predict_folder(predict, source, tmp_path / "predicted", progress=False)
    assert summary.ok and summary.predicted == [case_id]
    label, geometry = read_image(tmp_path / "predicted" / f"{case_id}.nii.gz")
    _, source_geometry = read_image(source / f"{case_id}_0000.nii.gz")
    assert geometry == source_geometry and label.max() <= len(FLARE21_NAMES)
    (row,) = summary.rows
    return row


def test_per_label_minimum_volumes_drop_small_parts_of_their_label_only():
    from flareseg.inference.postprocess import keep_components

    labels = np.zeros((10, 30, 30), dtype=np.uint8)
    labels[1:4, 1:10, 1:10] = 2  # 243 voxels
    labels[1:4, 20:24, 20:24] = 2  # 48 voxels
    labels[6:9, 1:10, 1:10] = 3
    labels[6:9, 20:24, 20:24] = 3
    kept = keep_components(labels.copy(), (1.0, 1.0, 1.0), 10.0, keep=2, min_volume_per_label={2: 100.0})
    assert (kept[1:4, 20:24, 20:24] == 0).all()  # label 2's 48 mm3 part is under its 100 mm3
    assert (kept[6:9, 20:24, 20:24] == 3).all()  # label 3 keeps the 10 mm3 rule
    assert (kept[1:4, 1:10, 1:10] == 2).all()
