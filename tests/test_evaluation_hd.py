"""HD95 and HD: equal to DeepMind's surface-distance, the empty-mask rules, one surface pass, std in the summary, CLI.

The reference is DeepMind's surface-distance package (Apache-2.0, a test dependency: pip install surface-distance):
HD95 = compute_robust_hausdorff(compute_surface_distances(gt, pred, spacing_mm), 95), HD the same at 100.
"""

from __future__ import annotations

import csv
import json
import math
import warnings

import numpy as np
import pytest
import surface_distance as reference
from scipy import ndimage

import flareseg.evaluation.metrics as metrics_module
from flareseg.cli import main
from flareseg.evaluation import (
    Score,
    check_metrics,
    compute_surface_distances,
    evaluate_folder,
    format_summary,
    hausdorff,
    robust_hausdorff,
    score_case,
    structure_metrics,
    summarize,
)
from flareseg.io import Geometry, read_image, write_image

ALL = ("dsc", "nsd", "hd95", "hd")


def _reference_hd(gt, pred, spacing, percent):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it uses the deprecated scipy.ndimage.filters namespace
        distances = reference.compute_surface_distances(gt, pred, [float(s) for s in spacing])
        return float(reference.compute_robust_hausdorff(distances, percent))


def _blobs(rng, shape, sigma=1.5, threshold=0.55):
    return ndimage.gaussian_filter(rng.random(shape), sigma) > threshold


def _box(shape, start, stop):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(start, stop))] = True
    return mask


def _cases():
    """(gt, pred, spacing): random blobs at random anisotropic spacings, and a few shapes with many tied distances."""
    rng = np.random.default_rng(7)
    shape = (18, 22, 24)
    cases = {}
    for i in range(5):
        spacing = tuple(rng.uniform(0.4, 4.0, 3))
        cases[f"random blobs {i}"] = (_blobs(rng, shape), _blobs(rng, shape), spacing)
    blob = _blobs(rng, shape, sigma=2.5, threshold=0.5)
    cases["blob and its erosion"] = (blob, ndimage.binary_erosion(blob), (3.0, 0.7, 0.9))
    cases["blob and a far blob (Dice < 0.2)"] = (
        _box(shape, (1, 1, 1), (6, 8, 8)),
        _box(shape, (10, 12, 14), (17, 20, 22)),
        (2.5, 0.8, 0.6),
    )
    cases["boxes, tied distances"] = (
        _box(shape, (2, 3, 4), (12, 15, 16)),
        _box(shape, (4, 3, 2), (13, 18, 16)),
        (2, 1, 1),
    )
    return cases


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_hd95_and_hd_equal_the_reference(name):
    gt, pred, spacing = CASES[name]
    expected95, expected100 = (_reference_hd(gt, pred, spacing, p) for p in (95, 100))
    assert hausdorff(gt, pred, spacing, 95) == pytest.approx(expected95, abs=1e-3)
    assert hausdorff(gt, pred, spacing, 100) == pytest.approx(expected100, abs=1e-3)
    values = structure_metrics(gt, pred, spacing, 2.0, ALL)
    assert values["hd95"] == pytest.approx(expected95, abs=1e-3)
    assert values["hd"] == pytest.approx(expected100, abs=1e-3)
    # the other direction too (HD is symmetric, the two one-sided percentiles are not)
    assert hausdorff(pred, gt, spacing, 95) == pytest.approx(_reference_hd(pred, gt, spacing, 95), abs=1e-3)


def test_hd95_is_an_area_weighted_percentile_not_the_maximum():
    differ = [
        name
        for name, (gt, pred, spacing) in CASES.items()
        if hausdorff(gt, pred, spacing, 95) < hausdorff(gt, pred, spacing, 100) - 1e-3
    ]
    assert len(differ) >= 4  # a wrong percent (or the maximum for both) is caught by the reference comparison
    # Other percentiles follow the reference too: the cumulative area, not the surfel count, picks the distance.
    gt, pred, spacing = CASES["random blobs 0"]
    distances = compute_surface_distances(gt, pred, spacing)
    for percent in (0, 10, 50, 90, 99):
        assert robust_hausdorff(distances, percent) == pytest.approx(
            _reference_hd(gt, pred, spacing, percent), abs=1e-3
        )


def test_hd_of_a_shifted_box_by_hand():
    gt = _box((12, 10, 10), (2, 2, 2), (7, 8, 8))
    pred = _box((12, 10, 10), (4, 2, 2), (9, 8, 8))  # 2 slices further along axis 0, at 3 mm a slice
    assert hausdorff(gt, pred, (3.0, 1.0, 1.0), 100) == pytest.approx(6.0)
    assert hausdorff(gt, gt, (3.0, 1.0, 1.0), 95) == 0.0


@pytest.fixture
def np_inf(monkeypatch):
    """surface-distance 0.1 writes np.Inf for an empty surface, which numpy 2 no longer has."""
    monkeypatch.setattr(np, "Inf", np.inf, raising=False)


def test_empty_mask_rules(np_inf):
    empty = np.zeros((6, 7, 8), dtype=bool)
    full = _box(empty.shape, (1, 1, 1), (4, 5, 6))
    spacing = (2.0, 1.0, 1.0)
    # both empty: a perfect answer, as DSC = NSD = 1 (the reference would say inf)
    assert structure_metrics(empty, empty, spacing, 2.0, ALL) == {"dsc": 1.0, "nsd": 1.0, "hd95": 0.0, "hd": 0.0}
    assert hausdorff(empty, empty, spacing) == 0.0
    assert math.isinf(_reference_hd(empty, empty, spacing, 95))
    # one empty: undefined, NaN (the reference says inf); DSC and NSD 0
    for gt, pred in ((full, empty), (empty, full)):
        values = structure_metrics(gt, pred, spacing, 2.0, ALL)
        assert (values["dsc"], values["nsd"]) == (0.0, 0.0)
        assert math.isnan(values["hd95"]) and math.isnan(values["hd"])
        assert math.isnan(hausdorff(gt, pred, spacing, 95))
        assert math.isinf(_reference_hd(gt, pred, spacing, 95))
        # without the rules, on the raw distances, ours is the reference's inf
        assert math.isinf(robust_hausdorff(compute_surface_distances(gt, pred, spacing), 95))
    assert math.isinf(robust_hausdorff(compute_surface_distances(empty, empty, spacing), 100))


def test_score_case_hd_rules_and_slice_rule():
    shape, spacing = (12, 10, 11), (2.0, 1.0, 1.0)
    gt = np.zeros(shape, dtype=np.uint8)
    pred = np.zeros(shape, dtype=np.uint8)
    gt[3:8, 3:6, 4:7] = 5  # aorta: compared on slices [3, 7) only
    pred[0:12, 3:6, 4:7] = 5  # runs past both ends: identical on the compared slices
    gt[1:3, 7:9, 7:9] = 3  # spleen, missed
    pred[9:11, 7:9, 7:9] = 4  # pancreas, a false positive
    gt[1:4, 0:3, 0:3] = 1
    pred[2:5, 0:3, 0:3] = 1  # liver one slice (2 mm) off
    scores = {s.label: s for s in score_case(gt, pred, spacing, metrics=ALL)}
    assert (scores[5].dsc, scores[5].nsd, scores[5].hd95, scores[5].hd) == (1.0, 1.0, 0.0, 0.0)
    assert (scores[2].hd95, scores[2].hd) == (0.0, 0.0)  # absent from both
    for label in (3, 4):
        assert scores[label].dsc == 0.0 and math.isnan(scores[label].hd95) and math.isnan(scores[label].hd)
    assert scores[1].hd == pytest.approx(_reference_hd(gt == 1, pred == 1, spacing, 100), abs=1e-3)
    assert scores[1].hd == pytest.approx(2.0)
    # default metrics: no HD computed, fields None
    default = score_case(gt, pred, spacing)[0]
    assert default.hd95 is None and default.hd is None and default.dsc == scores[1].dsc


def test_surfaces_are_computed_once_for_nsd_and_both_hds(monkeypatch):
    calls = []
    original = metrics_module.compute_surface_distances

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(metrics_module, "compute_surface_distances", counting)
    gt, pred, spacing = CASES["random blobs 1"]
    structure_metrics(gt, pred, spacing, 2.0, ALL)
    assert len(calls) == 1
    far_gt, far_pred, spacing = CASES["blob and a far blob (Dice < 0.2)"]
    assert structure_metrics(far_gt, far_pred, spacing, 2.0, ("dsc", "nsd")) == {"dsc": 0.0, "nsd": 0.0}
    assert len(calls) == 1  # Dice < 0.2 and no HD asked: the surfaces are not compared (FLARE rule)
    values = structure_metrics(far_gt, far_pred, spacing, 2.0, ALL)
    assert values["nsd"] == 0.0 and values["hd95"] > 10 and len(calls) == 2  # HD is still measured


def test_check_metrics():
    assert check_metrics(["hd", "dsc", "hd95", "dsc"]) == ("dsc", "hd95", "hd")  # the CSV's order, no repeats
    with pytest.raises(ValueError, match="did you mean 'hd95'"):
        check_metrics(["hd96"])
    with pytest.raises(ValueError, match="no metric"):
        check_metrics([])


def _score(case, label, organ, dsc, hd95):
    return Score(case, label, organ, dsc, None, hd95, None)


def test_summary_mean_std_and_undefined_counts():
    scores = [
        _score("a", 1, "liver", 0.9, 3.0),
        _score("b", 1, "liver", 0.7, 5.0),
        _score("c", 1, "liver", 0.0, math.nan),  # missed: HD undefined
        _score("a", 2, "right kidney", 0.8, 1.0),
        _score("b", 2, "right kidney", 0.6, 2.0),
        _score("c", 2, "right kidney", 1.0, 0.0),
    ]
    summary = summarize(scores, "flare22", ("dsc", "hd95"))
    liver = summary["organs"]["liver"]
    assert liver["dsc"] == pytest.approx(np.mean([0.9, 0.7, 0.0]))
    assert liver["dsc_std"] == pytest.approx(np.std([0.9, 0.7, 0.0], ddof=1))
    assert liver["hd95"] == pytest.approx(4.0) and liver["hd95_std"] == pytest.approx(np.std([3.0, 5.0], ddof=1))
    assert liver["hd95_undefined"] == 1 and liver["cases"] == 3
    assert summary["organs"]["right kidney"]["hd95_undefined"] == 0
    assert "nsd" not in liver and "dsc_undefined" not in liver
    spleen = summary["organs"]["spleen"]  # no scores at all
    assert spleen["dsc"] is None and spleen["dsc_std"] is None and spleen["cases"] == 0
    mean = summary["mean"]
    assert mean["dsc"] == pytest.approx(np.mean([liver["dsc"], summary["organs"]["right kidney"]["dsc"]]))
    per_case_dsc = [np.mean([0.9, 0.8]), np.mean([0.7, 0.6]), np.mean([0.0, 1.0])]
    assert mean["dsc_std"] == pytest.approx(np.std(per_case_dsc, ddof=1))
    per_case_hd95 = [np.mean([3.0, 1.0]), np.mean([5.0, 2.0]), 0.0]  # case c: the kidney's HD only
    assert mean["hd95_std"] == pytest.approx(np.std(per_case_hd95, ddof=1))
    assert summary["metrics"] == ["dsc", "hd95"]
    json.dumps(summary, allow_nan=False)  # valid JSON: no NaN or inf anywhere
    table = format_summary(summary)
    assert "HD95 mm" in table and "std" in table and "liver 1" in table
    assert f"{liver['dsc_std']:.4f}" in table and f"{liver['hd95_std']:.4f}" in table
    one_case = summarize(scores[:1], "flare22", ("dsc",))
    assert one_case["organs"]["liver"]["dsc"] == 0.9 and one_case["organs"]["liver"]["dsc_std"] is None


@pytest.fixture
def folders(tmp_path):
    shape = (10, 14, 16)
    geometry = Geometry(spacing=(2.0, 0.8, 0.7), origin=(0, 0, 0), direction=np.eye(3), shape=shape)
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    rng = np.random.default_rng(3)
    for case in ("case_a", "case_b"):
        gt = np.zeros(shape, dtype=np.uint8)
        gt[2:8, 2:7, 2:8] = 1
        gt[3:7, 8:12, 9:14] = 3
        pred = gt.copy()
        pred[pred == 3] = 0 if case == "case_a" else 3  # case_a misses the spleen
        pred[_blobs(rng, shape, 1.0, 0.62) & (gt == 0)] = 1  # scattered false liver voxels
        pred[1:3, 1:3, 12:15] = 4 if case == "case_b" else 0  # case_b: a false-positive pancreas
        write_image(gt_dir / f"{case}.nii.gz", gt, geometry)
        write_image(pred_dir / f"{case}.nii.gz", pred, geometry)
    return gt_dir, pred_dir


def test_cli_writes_hd_columns_and_the_summary(folders, tmp_path, capsys):
    gt_dir, pred_dir = folders
    out = tmp_path / "hd" / "scores.csv"
    args = ["evaluate", "--gt", str(gt_dir), "--pred", str(pred_dir), "--out", str(out), "--workers", "1"]
    assert main([*args, "--metrics", "dsc", "nsd", "hd95", "hd"]) == 0
    table = capsys.readouterr().out
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["case", "label", "organ", "dsc", "nsd", "hd95", "hd"]
    assert len(rows) == 2 * 13
    by_key = {(row["case"], int(row["label"])): row for row in rows}
    for case in ("case_a", "case_b"):
        gt, geometry = read_image(gt_dir / f"{case}.nii.gz")
        pred, _ = read_image(pred_dir / f"{case}.nii.gz")
        for metric, percent in (("hd95", 95), ("hd", 100)):
            expected = _reference_hd(gt == 1, pred == 1, geometry.spacing, percent)
            assert expected > 1.0
            assert float(by_key[case, 1][metric]) == pytest.approx(expected, abs=1e-3)
        assert (by_key[case, 2]["hd95"], by_key[case, 2]["hd"]) == ("0.0000", "0.0000")  # absent from both
    assert (by_key["case_a", 3]["hd95"], by_key["case_a", 3]["hd"], by_key["case_a", 3]["dsc"]) == ("", "", "0.0000")
    assert (by_key["case_b", 4]["hd95"], by_key["case_b", 4]["hd"]) == ("", "")
    assert by_key["case_b", 3]["hd"] == "0.0000"

    summary = json.loads(out.with_suffix(".json").read_text())
    liver = summary["organs"]["liver"]
    liver_hd95 = [float(by_key[case, 1]["hd95"]) for case in ("case_a", "case_b")]
    assert liver["hd95"] == pytest.approx(np.mean(liver_hd95), abs=1e-6)
    assert liver["hd95_std"] == pytest.approx(np.std(liver_hd95, ddof=1), abs=1e-6)
    liver_dsc = [float(by_key[case, 1]["dsc"]) for case in ("case_a", "case_b")]
    assert liver["dsc_std"] == pytest.approx(np.std(liver_dsc, ddof=1), abs=1e-6) and liver["dsc_std"] > 0
    for key in ("nsd", "nsd_std", "hd", "hd_std", "hd_undefined", "hd95_undefined"):
        assert key in liver
    spleen = summary["organs"]["spleen"]
    assert (spleen["hd_undefined"], spleen["hd"], spleen["hd_std"]) == (1, 0.0, None)
    assert summary["organs"]["pancreas"]["hd95_undefined"] == 1
    assert summary["metrics"] == ["dsc", "nsd", "hd95", "hd"]
    assert "HD95 mm" in table and "HD mm" in table and "spleen 1" in table and "pancreas 1" in table

    # the default is today's CSV, with the std added to the summary
    assert main(args) == 0
    with open(out, newline="") as handle:
        assert next(csv.reader(handle)) == ["case", "label", "organ", "dsc", "nsd"]
    summary = json.loads(out.with_suffix(".json").read_text())
    assert "hd95" not in summary["organs"]["liver"] and summary["organs"]["liver"]["dsc_std"] == liver["dsc_std"]


def test_cli_rejects_an_unknown_metric(folders, tmp_path, capsys):
    gt_dir, pred_dir = folders
    args = ["evaluate", "--gt", str(gt_dir), "--pred", str(pred_dir), "--out", str(tmp_path / "s.csv")]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--metrics", "hd99"])
    assert exit_info.value.code == 2 and "hd99" in capsys.readouterr().err


def test_evaluate_folder_hd_in_worker_processes(folders):
    gt_dir, pred_dir = folders
    serial, _ = evaluate_folder(gt_dir, pred_dir, workers=1, metrics=["hd95"])
    parallel, summary = evaluate_folder(gt_dir, pred_dir, workers=2, metrics=["hd95"])
    key = [(s.case, s.label, s.dsc, s.nsd, s.hd) for s in serial]
    assert key == [(s.case, s.label, s.dsc, s.nsd, s.hd) for s in parallel]
    assert all(s.dsc is None and s.hd is None for s in serial)  # only what was asked
    np.testing.assert_array_equal([s.hd95 for s in serial], [s.hd95 for s in parallel])  # NaN in the same places
    assert summary["metrics"] == ["hd95"] and set(summary["mean"]) == {"hd95", "hd95_std"}
