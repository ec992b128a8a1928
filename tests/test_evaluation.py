"""flareseg.evaluation: surface Dice equal to DeepMind's surface-distance, the FLARE rules, folders and the CLI."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from flareseg.cli import main
from flareseg.evaluation import (
    compute_surface_distances,
    dice,
    dice_and_nsd,
    evaluate_folder,
    get_preset,
    nsd,
    score_case,
    surface_dice,
    surfel_area_table,
)
from flareseg.io import Geometry, read_image, write_image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ABDOMEN_LABEL = SHARED_DATA / "ct_abdomen_30sl" / "case_label.nii.gz"
DICOM_LABEL = SHARED_DATA / "ct_dicom_20sl" / "label.nii.gz"
FLARE22_TOLERANCES = (5, 3, 3, 5, 2, 2, 2, 2, 2, 3, 5, 7, 3)


@pytest.fixture(scope="module")
def reference():
    """DeepMind's surface-distance package (pip install surface-distance)."""
    return pytest.importorskip("surface_distance")


def _reference_surface_dice(reference, gt, pred, spacing, tolerance):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it uses the deprecated scipy.ndimage.filters namespace
        distances = reference.compute_surface_distances(gt, pred, list(spacing))
        return float(reference.compute_surface_dice_at_tolerance(distances, tolerance))


def _official_flare22(reference, gt_zyx, pred_zyx, spacing_zyx):
    """The official FLARE22 evaluation loop on the NIfTI axis order (x, y, z), slices on the last axis."""
    gt, seg, spacing = gt_zyx.transpose(2, 1, 0), pred_zyx.transpose(2, 1, 0), spacing_zyx[::-1]
    results = []
    for i in range(1, 14):
        if np.sum(gt == i) == 0 and np.sum(seg == i) == 0:
            dsc, nsd_i = 1, 1
        elif np.sum(gt == i) == 0 and np.sum(seg == i) > 0:
            dsc, nsd_i = 0, 0
        else:
            if i in (5, 6, 10):
                z = np.where(gt == i)[2]
                organ_gt, organ_seg = gt[:, :, z.min() : z.max()] == i, seg[:, :, z.min() : z.max()] == i
            else:
                organ_gt, organ_seg = gt == i, seg == i
            dsc = 2 * (organ_gt & organ_seg).sum() / (organ_gt.sum() + organ_seg.sum())
            tolerance = FLARE22_TOLERANCES[i - 1]
            nsd_i = 0 if dsc < 0.2 else _reference_surface_dice(reference, organ_gt, organ_seg, spacing, tolerance)
        results.append((round(dsc, 4), round(nsd_i, 4)))
    return results


def _ball(shape, centre, radius, spacing=(1.0, 1.0, 1.0)):
    grid = np.indices(shape, dtype=np.float64)
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing)) <= radius**2


def _box(shape, start, stop):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(start, stop))] = True
    return mask


def _blobs(rng, shape, sigma=1.5, threshold=0.55):
    return ndimage.gaussian_filter(rng.random(shape), sigma) > threshold


def _shift(mask, offset):
    """`mask` moved by `offset` voxels, filled with False (no wrap-around)."""
    out = np.zeros_like(mask)
    src = tuple(slice(max(0, -o), n - max(0, o)) for o, n in zip(offset, mask.shape))
    dst = tuple(slice(max(0, o), n - max(0, -o)) for o, n in zip(offset, mask.shape))
    out[dst] = mask[src]
    return out


def _synthetic_pairs():
    rng = np.random.default_rng(0)
    shape = (24, 28, 30)
    sphere = _ball(shape, (12, 14, 15), 7)
    pairs = {
        "spheres": (sphere, _ball(shape, (13, 14, 16), 6.5), (1.0, 1.0, 1.0)),
        "spheres anisotropic": (sphere, _ball(shape, (12, 15, 14), 7.5), (3.0, 0.7, 0.9)),
        "cubes": (_box(shape, (4, 5, 6), (15, 20, 22)), _box(shape, (5, 5, 4), (17, 19, 22)), (2.5, 0.8, 0.8)),
        "cube in sphere": (sphere, _box(shape, (8, 10, 11), (16, 18, 19)), (1.5, 1.2, 0.6)),
        "touching the array border": (
            _box(shape, (0, 0, 0), (10, 28, 9)),
            _box(shape, (0, 1, 0), (12, 28, 11)),
            (2, 1, 1),
        ),
        "one voxel each": (_box(shape, (5, 5, 5), (6, 6, 6)), _box(shape, (5, 6, 7), (6, 7, 8)), (1.0, 0.9, 1.1)),
        "one voxel, same place": (_box(shape, (5, 5, 5), (6, 6, 6)), _box(shape, (5, 5, 5), (6, 6, 6)), (3, 1, 1)),
        "one voxel vs sphere": (_box(shape, (12, 14, 15), (13, 15, 16)), sphere, (1.0, 1.0, 1.0)),
    }
    for i in range(6):
        spacing = tuple(rng.uniform(0.4, 4.0, 3))
        pairs[f"random blobs {i}"] = (_blobs(rng, shape), _blobs(rng, shape), spacing)
    return pairs


SYNTHETIC = _synthetic_pairs()


def test_surfel_area_table_matches_reference_for_all_codes(reference):
    from surface_distance import lookup_tables

    # Our code sets bit 4a + 2b + c for the block corner (a, b, c); the reference sets bit 7 - (4a + 2b + c).
    reversed_bits = [int(f"{code:08b}"[::-1], 2) for code in range(256)]
    rng = np.random.default_rng(1)
    for spacing in [(1.0, 1.0, 1.0), (3.0, 0.8, 0.8), *rng.uniform(0.2, 6.0, (8, 3))]:
        expected = lookup_tables.create_table_neighbour_code_to_surface_area(spacing)[reversed_bits]
        np.testing.assert_allclose(surfel_area_table(spacing), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_surface_dice_equals_reference_on_synthetic_masks(reference, name):
    gt, pred, spacing = SYNTHETIC[name]
    for tolerance in (0.0, 0.5, 1.0, 2.0, 3.0, 7.0):
        expected = _reference_surface_dice(reference, gt, pred, spacing, tolerance)
        assert surface_dice(gt, pred, spacing, tolerance) == pytest.approx(expected, abs=1e-6), tolerance


def test_surface_distances_and_areas_equal_reference(reference):
    gt, pred, spacing = SYNTHETIC["random blobs 0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = reference.compute_surface_distances(gt, pred, list(spacing))
    ours = compute_surface_distances(gt, pred, spacing)
    for distances, areas, key in (
        (ours.distances_gt_to_pred, ours.areas_gt, "gt"),
        (ours.distances_pred_to_gt, ours.areas_pred, "pred"),
    ):
        order = np.lexsort((areas, distances))  # the reference sorts by (distance, area)
        other = "pred" if key == "gt" else "gt"
        np.testing.assert_allclose(distances[order], expected[f"distances_{key}_to_{other}"], atol=1e-9)
        np.testing.assert_allclose(areas[order], expected[f"surfel_areas_{key}"], atol=1e-9)


@pytest.fixture
def abdomen_label() -> tuple[np.ndarray, Geometry]:
    if not ABDOMEN_LABEL.is_file():
        pytest.skip("../shared/data is not present (a fresh clone has no shared data)")
    return read_image(ABDOMEN_LABEL)


@pytest.fixture
def dicom_label() -> tuple[np.ndarray, Geometry]:
    if not DICOM_LABEL.is_file():
        pytest.skip("../shared/data is not present (a fresh clone has no shared data)")
    return read_image(DICOM_LABEL)


def test_surface_dice_equals_reference_on_real_labels(reference, abdomen_label):
    labels, geometry = abdomen_label
    present = [i for i in range(1, 14) if (labels == i).any()]
    assert len(present) >= 10
    for i in present:
        gt = labels == i
        for pred in (ndimage.binary_erosion(gt), _shift(gt, (1, 0, 0)), _shift(gt, (0, -1, 1))):
            for tolerance in (1.0, FLARE22_TOLERANCES[i - 1], 3.0):
                expected = _reference_surface_dice(reference, gt, pred, geometry.spacing, tolerance)
                assert surface_dice(gt, pred, geometry.spacing, tolerance) == pytest.approx(expected, abs=1e-6)


def test_surface_dice_equals_reference_on_a_512_grid(reference, dicom_label):
    labels, geometry = dicom_label
    for i in (1, 5):  # liver, aorta
        gt = labels == i
        assert gt.any()
        pred = _shift(ndimage.binary_dilation(gt), (0, 2, -1))
        expected = _reference_surface_dice(reference, gt, pred, geometry.spacing, 2.0)
        assert surface_dice(gt, pred, geometry.spacing, 2.0) == pytest.approx(expected, abs=1e-6)


def test_score_case_equals_the_official_loop_on_real_labels(reference, abdomen_label):
    """The whole FLARE22 protocol, run the official way on (x, y, z) arrays, against ours on [z, y, x] arrays."""
    labels, geometry = abdomen_label
    rng = np.random.default_rng(2)
    pred = _shift(labels, (1, 0, -1))
    pred[ndimage.binary_erosion(labels == 1, iterations=2) != (labels == 1)] = 0  # thin the liver
    pred[labels == 4] = 0  # miss the pancreas
    pred[(labels == 0) & (rng.random(labels.shape) < 0.001)] = 9  # scattered false gallbladder voxels
    pred[labels == 5] = 5  # the aorta right, whatever the shift did
    expected = _official_flare22(reference, labels, pred, geometry.spacing)
    ours = score_case(labels, pred, geometry.spacing, "flare22", case="abdomen")
    assert [(s.dsc, s.nsd) for s in ours] == [(float(d), float(n)) for d, n in expected]
    assert len({(s.dsc, s.nsd) for s in ours}) > 5  # the perturbations give varied scores


def test_empty_mask_rules():
    empty = np.zeros((6, 7, 8), dtype=bool)
    full = _box(empty.shape, (1, 1, 1), (4, 5, 6))
    spacing = (2.0, 1.0, 1.0)
    assert dice_and_nsd(empty, empty, spacing, 2.0) == (1.0, 1.0)
    assert dice(empty, empty) == 1.0 and nsd(empty, empty, spacing, 2.0) == 1.0
    assert dice_and_nsd(empty, full, spacing, 2.0) == (0.0, 0.0)  # a false positive structure
    assert dice_and_nsd(full, empty, spacing, 2.0) == (0.0, 0.0)  # a missed structure
    assert dice_and_nsd(full, full, spacing, 2.0) == (1.0, 1.0)
    assert np.isnan(surface_dice(empty, empty, spacing, 2.0))  # without the FLARE rules it is undefined


def test_nsd_is_zero_below_dice_0_2():
    gt = _box((20, 20, 30), (2, 2, 2), (12, 12, 12))
    pred = _shift(gt, (0, 0, 9))  # 10x10x10 cubes sharing one 10x10 slab: Dice 0.1
    assert dice(gt, pred) == pytest.approx(0.1)
    assert surface_dice(gt, pred, (1.0, 1.0, 1.0), 100.0) == 1.0  # the surfaces would count as matching
    assert nsd(gt, pred, (1.0, 1.0, 1.0), 100.0) == 0.0
    assert nsd(gt, _shift(gt, (0, 0, 8)), (1.0, 1.0, 1.0), 100.0) == 1.0  # Dice 0.2 is enough


def _tube(shape, label, z_range):
    labels = np.zeros(shape, dtype=np.uint8)
    labels[z_range[0] : z_range[1], 3:6, 4:7] = label
    return labels


@pytest.mark.parametrize("label", [5, 6, 10])
def test_vessels_and_esophagus_are_compared_on_the_ground_truth_slices_only(label):
    shape, spacing = (12, 10, 11), (2.0, 1.0, 1.0)
    gt = _tube(shape, label, (3, 8))  # slices 3..7: compared on [3, 7)
    longer = _tube(shape, label, (0, 12))  # the prediction runs past both ends of the annotation
    short_at_the_top = _tube(shape, label, (3, 7))  # misses the ground truth's last slice, which is not compared
    for pred in (longer, short_at_the_top):
        score = next(s for s in score_case(gt, pred, spacing) if s.label == label)
        assert (score.dsc, score.nsd) == (1.0, 1.0)
    missing_first = _tube(shape, label, (4, 8))  # the first slice is compared
    score = next(s for s in score_case(gt, missing_first, spacing) if s.label == label)
    assert score.dsc == round(2 * 3 / (4 + 3), 4)
    # Other organs are compared on every slice.
    liver = next(s for s in score_case(_tube(shape, 1, (3, 8)), _tube(shape, 1, (0, 12)), spacing) if s.label == 1)
    assert liver.dsc == round(2 * 5 / (5 + 12), 4)


def test_the_slice_rule_leaves_other_structures_alone():
    gt = _tube((12, 10, 11), 5, (3, 8))
    gt[0:2, 7:9, 7:9] = 1  # liver on slices outside the aorta's range
    scores = {s.label: s for s in score_case(gt, gt.copy(), (1.0, 1.0, 1.0))}
    assert (scores[1].dsc, scores[5].dsc, scores[2].dsc) == (1.0, 1.0, 1.0)
    assert all(s.nsd == 1.0 for s in scores.values())


def test_values_are_rounded_to_4_decimals():
    gt = _box((8, 8, 8), (2, 2, 2), (5, 5, 5))  # 27 voxels
    pred = _box((8, 8, 8), (2, 2, 3), (5, 5, 6))  # 27 voxels, 18 shared: Dice 2/3
    spacing = (0.7, 0.9, 5.3)  # the shift is 5.3 mm, past the liver's 5 mm tolerance
    raw_dsc, raw_nsd = dice_and_nsd(gt, pred, spacing, 5.0)
    score = score_case(gt.astype(np.uint8), pred.astype(np.uint8), spacing)[0]
    assert raw_dsc == pytest.approx(2 / 3) and score.dsc == 0.6667
    assert score.nsd == float(np.round(raw_nsd, 4)) and score.nsd != raw_nsd


def test_flare21_preset_merges_the_kidneys():
    gt = np.zeros((10, 12, 20), dtype=np.uint8)
    gt[2:8, 3:9, 2:7] = 2  # right kidney
    gt[2:8, 3:9, 12:17] = 13  # left kidney
    gt[1:4, 1:3, 8:11] = 1
    flare21_style = np.where(gt == 13, 2, gt).astype(np.uint8)  # one kidney label, as FLARE21 data has
    scores = {s.organ: s for s in score_case(gt, flare21_style, (1.0, 1.0, 1.0), "flare21")}
    assert list(scores) == ["liver", "kidney", "spleen", "pancreas"]
    assert (scores["kidney"].dsc, scores["kidney"].nsd) == (1.0, 1.0)
    assert scores["liver"].dsc == 1.0 and scores["spleen"].dsc == 1.0  # absent in both
    flare22 = {s.label: s for s in score_case(gt, flare21_style, (1.0, 1.0, 1.0), "flare22")}
    assert flare22[2].dsc < 1.0 and flare22[13].dsc == 0.0
    assert all(t.tolerance_mm == 1.0 for t in get_preset("flare21").targets)


def test_unknown_preset_suggests_a_name():
    with pytest.raises(ValueError, match="did you mean 'flare22'"):
        get_preset("flare-22")


def test_presets_follow_the_protocol():
    flare22 = get_preset("flare22")
    assert [t.label for t in flare22.targets] == list(range(1, 14))
    assert [t.tolerance_mm for t in flare22.targets] == list(FLARE22_TOLERANCES)
    assert {t.label for t in flare22.targets if t.gt_slices_only} == {5, 6, 10}
    assert [(t.label, t.tolerance_mm, t.lesion) for t in get_preset("flare23").lesions] == [(14, 2.0, True)]
    assert [t.label for t in get_preset("lesion").targets] == [14]


def _label_map(seed: int, shape=(10, 14, 16)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[2:8, 2:7, 2:8] = 1
    labels[3:7, 8:12, 9:14] = 5
    labels[rng.integers(2, 8), 9:11, 3:5] = 14
    return labels


@pytest.fixture
def folders(tmp_path):
    geometry = Geometry(spacing=(2.0, 0.8, 0.8), origin=(0, 0, 0), direction=np.eye(3), shape=(10, 14, 16))
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    for case, seed in (("case_a", 0), ("case_b", 1), ("case_c", 2)):
        write_image(gt_dir / f"{case}.nii.gz", _label_map(seed), geometry)
    pred_a = _label_map(0)
    pred_a[pred_a == 1] = 0
    pred_a[2:8, 2:7, 3:8] = 1  # one column short
    write_image(pred_dir / "case_a.nii.gz", pred_a, geometry)
    # case_b has no prediction; case_c's is on another grid; case_x has no ground truth
    write_image(pred_dir / "case_c.nii.gz", _label_map(2)[:, :, :15], geometry.with_shape((10, 14, 15)))
    write_image(pred_dir / "case_x.nii.gz", _label_map(3), geometry)
    return gt_dir, pred_dir


def test_evaluate_folder_end_to_end(folders, tmp_path):
    gt_dir, pred_dir = folders
    out = tmp_path / "results" / "scores.csv"
    scores, summary = evaluate_folder(gt_dir, pred_dir, preset="flare23", workers=2, out=out)

    assert sorted({s.case for s in scores}) == ["case_a", "case_b"]
    by_key = {(s.case, s.label): s for s in scores}
    assert by_key["case_a", 1].dsc == round(2 * 150 / (180 + 150), 4)
    assert by_key["case_a", 5].dsc == 1.0 and by_key["case_a", 2].dsc == 1.0
    assert (by_key["case_b", 1].dsc, by_key["case_b", 1].nsd) == (0.0, 0.0)  # missing -> empty prediction
    assert by_key["case_b", 3].dsc == 1.0  # absent from both
    assert summary["missing_predictions"] == ["case_b"]
    assert summary["unmatched_predictions"] == ["case_x"]
    assert list(summary["failures"]) == ["case_c"]
    message = summary["failures"]["case_c"]
    assert str(pred_dir / "case_c.nii.gz") in message and str(gt_dir / "case_c.nii.gz") in message
    assert summary["cases"] == 2
    liver = summary["organs"]["liver"]
    assert liver["dsc"] == pytest.approx((by_key["case_a", 1].dsc + 0.0) / 2) and liver["cases"] == 2
    organ_means = [entry["dsc"] for entry in summary["organs"].values()]
    assert len(organ_means) == 13 and summary["mean"]["dsc"] == pytest.approx(np.mean(organ_means))
    assert summary["lesion"]["label"] == 14 and summary["lesion"]["cases"] == 2
    assert summary["lesion"]["dsc"] == pytest.approx((1.0 + 0.0) / 2)

    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["case", "label", "organ", "dsc", "nsd"]
    assert len(rows) == 2 * 14
    assert rows[0] == {
        "case": "case_a",
        "label": "1",
        "organ": "liver",
        "dsc": f"{by_key['case_a', 1].dsc:.4f}",
        "nsd": f"{by_key['case_a', 1].nsd:.4f}",
    }
    assert json.loads(out.with_suffix(".json").read_text()) == summary
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary files left

    serial, _ = evaluate_folder(gt_dir, pred_dir, preset="flare23", workers=1)
    assert serial == scores


def test_evaluate_folder_rejects_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError):
        evaluate_folder(tmp_path / "nowhere", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no label maps"):
        evaluate_folder(tmp_path / "empty", tmp_path)


def test_cli_evaluate_writes_csv_and_json_and_fails_on_a_bad_case(folders, tmp_path, capsys):
    gt_dir, pred_dir = folders
    out = tmp_path / "cli" / "scores.csv"
    args = ["evaluate", "--gt", str(gt_dir), "--pred", str(pred_dir), "--out", str(out), "--workers", "1"]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "case_c" in captured.err and "liver" in captured.out and "mean" in captured.out
    assert out.is_file() and out.with_suffix(".json").is_file()

    (pred_dir / "case_c.nii.gz").unlink()
    assert main(args) == 0  # case_c now counts as a missing prediction, which is scored, not failed
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["cases"] == 3 and summary["failures"] == {}
    assert summary["missing_predictions"] == ["case_b", "case_c"]
