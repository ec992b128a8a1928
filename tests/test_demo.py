"""`flareseg demo` end to end at tiny sizes: the report says what the evaluation files say, predictions keep the
test images' geometry, timing.csv and the overlays are there; a rerun reuses the data; foreign folders are refused."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from flareseg import cli
from flareseg.cli_parser import build_parser
from flareseg.demo import ORGANS, SMOKE_SETTINGS, DemoError, DemoSettings, run_demo
from flareseg.io import read_image

TINY = SMOKE_SETTINGS  # seconds per phase (the real defaults are exercised by `flareseg demo` itself)


@pytest.fixture(scope="module")
def demo(smoke_demo):
    """run_demo(out, minutes=0.0, device="cpu", settings=TINY, progress=False), once for the session (conftest.py)."""
    return smoke_demo


def _report_table(report: str) -> dict[str, tuple[float, float]]:
    """{organ or "mean": (DSC, NSD)} from the report's score table."""
    rows = re.findall(r"^\| \**(\w+)\** \| \**([0-9.]+)\** \| \**([0-9.]+)\** \|", report, flags=re.MULTILINE)
    return {name: (float(dsc), float(nsd)) for name, dsc, nsd in rows if name in (*ORGANS, "mean")}


def test_report_table_is_the_evaluation(demo):
    out = demo.out
    with open(out / "evaluation" / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    cases = sorted(path.name.removesuffix("_0000.nii.gz") for path in (out / "phantoms" / "imagesTs").iterdir())
    assert sorted({row["case"] for row in rows}) == cases and len(cases) == TINY.test_cases
    expected = {}
    for organ in ORGANS:
        values = [row for row in rows if row["organ"] == organ]
        assert len(values) == len(cases)
        expected[organ] = tuple(sum(float(row[key]) for row in values) / len(values) for key in ("dsc", "nsd"))
    expected["mean"] = tuple(sum(expected[o][k] for o in ORGANS) / len(ORGANS) for k in (0, 1))

    table = _report_table((out / "report.md").read_text())
    assert set(table) == set(expected)
    assert all(table[name] == pytest.approx(expected[name], abs=5e-5) for name in expected), (table, expected)
    summary = json.loads((out / "evaluation" / "scores.json").read_text())
    assert summary["mean"]["dsc"] == pytest.approx(expected["mean"][0]) == demo.mean_dsc
    assert f"mean DSC {demo.mean_dsc:.4f}" in (out / "report.md").read_text()


def test_the_sites_share_training_and_held_out_cases_and_the_report_scores_each(demo):
    out = demo.out
    site_of = json.loads((out / "phantoms" / "sites.json").read_text())
    split = {
        part: sorted(path.name.removesuffix("_0000.nii.gz") for path in (out / "phantoms" / f"images{part}").iterdir())
        for part in ("Tr", "Ts")
    }
    assert len(TINY.sites) == 2 and (TINY.train_cases, TINY.test_cases) == (5, 2)
    for part, counts in (("Tr", [3, 2]), ("Ts", [1, 1])):  # in turn: the first site takes the odd case
        assert [sum(site_of[case] == site for case in split[part]) for site in TINY.sites] == counts
        assert all(case.startswith(f"{site_of[case]}_") for case in split[part])

    with open(out / "evaluation" / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    report = (out / "report.md").read_text()
    table = dict(re.findall(r"^\| (\w+) \| [^|]+ \| 1 \| ([0-9.]+) \| [0-9.]+ \|$", report, flags=re.MULTILINE))
    assert sorted(table) == sorted(TINY.sites)
    for site, shown in table.items():
        expected = np.mean([float(row["dsc"]) for row in rows if site_of[row["case"]] == site])
        assert float(shown) == pytest.approx(expected, abs=5e-5)


@pytest.mark.parametrize(
    "sites, message",
    [((), "one or more"), (("portal_venous", "portal_venous"), "different"), (("portal_venus",), "did you mean")],
)
def test_settings_refuse_no_repeated_or_unknown_sites(sites, message):
    with pytest.raises(DemoError, match=message):
        DemoSettings(sites=sites)


def test_predictions_keep_the_test_images_geometry(demo):
    images = sorted((demo.out / "phantoms" / "imagesTs").iterdir())
    assert len(images) == TINY.test_cases
    for image in images:
        case = image.name.removesuffix("_0000.nii.gz")
        _, geometry = read_image(image)
        label, written = read_image(demo.out / "predictions" / f"{case}.nii.gz")
        assert written == geometry and label.dtype.name == "uint8"
        assert set(label.ravel().tolist()) <= {0, 1, 2, 3, 4}  # liver, kidney, spleen, pancreas


def test_the_ready_predict_config_segments_other_images_as_the_demo_did(demo, tmp_path):
    """README: `sh predict.sh INPUT_DIR OUTPUT_DIR DIR/predict.yaml` uses the demo's networks on your own images."""
    config = demo.out / "predict.yaml"
    assert f"sh predict.sh INPUT_DIR OUTPUT_DIR {config}" in (demo.out / "report.md").read_text()
    mine = tmp_path / "my_cts"
    mine.mkdir()
    image = sorted((demo.out / "phantoms" / "imagesTs").iterdir())[0]
    (mine / "patient_0000.nii.gz").symlink_to(image)
    assert cli.main(["predict", "-i", str(mine), "-o", str(tmp_path / "out"), "--config", str(config), "-q"]) == 0
    label, _ = read_image(tmp_path / "out" / "patient.nii.gz")
    expected, _ = read_image(demo.out / "predictions" / image.name.replace("_0000", ""))
    assert np.array_equal(label, expected) and label.any()


def test_timing_overlays_curves_and_phases(demo):
    out = demo.out
    with open(out / "predictions" / "timing.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    cases = sorted(path.name.removesuffix(".nii.gz") for path in (out / "phantoms" / "labelsTs").iterdir())
    assert sorted(row["case"] for row in rows) == cases
    assert all(row["status"] == "ok" and float(row["seconds"]) > 0 and float(row["peak_rss_mb"]) > 0 for row in rows)
    assert all((out / "overlays" / f"{case}.png").stat().st_size > 1000 for case in cases)
    report = (out / "report.md").read_text()
    assert all(f"](overlays/{case}.png)" in report for case in cases)
    for stage in ("coarse", "fine"):
        assert (out / stage / "training_curve.png").stat().st_size > 1000
        assert f"]({stage}/training_curve.png)" in report
    assert list(demo.phases) == ["phantoms", "plan", "prepare", "coarse", "fine", "predict", "evaluate"]
    assert all(f"| {phase} | {seconds:.1f} |" in report for phase, seconds in demo.phases.items())


def test_rerun_reuses_phantoms_and_prepared_data(demo, capsys):
    stamp = (demo.out / "phantoms" / "imagesTr" / "portal_venous_000_0000.nii.gz").stat().st_mtime_ns
    again = run_demo(demo.out, minutes=0.0, device="cpu", settings=TINY, progress=False)
    printed = capsys.readouterr().out
    assert "phantoms: already there, reused" in printed and "prepare: already prepared, reused" in printed
    assert "plan: already planned, reused" in printed
    assert (demo.out / "phantoms" / "imagesTr" / "portal_venous_000_0000.nii.gz").stat().st_mtime_ns == stamp
    assert _report_table((demo.out / "report.md").read_text())["mean"][0] == pytest.approx(again.mean_dsc, abs=5e-5)


def test_cli_refuses_a_folder_that_is_not_a_demo(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("not a demo")
    assert cli.main(["demo", "--out", str(tmp_path), "--minutes", "1"]) == 2
    assert "not a flareseg demo folder" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mine.txt"]


def test_cli_passes_its_options(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("flareseg.demo.run_demo", lambda *args, **kwargs: calls.append((args, kwargs)))
    assert cli.main(["demo", "--out", str(tmp_path / "d"), "--minutes", "2.5", "--device", "cpu", "-q"]) == 0
    assert calls == [((Path(tmp_path / "d"), 2.5), {"device": "cpu", "progress": False})]
    assert build_parser().parse_args(["demo"]).out == Path("flareseg_demo")


def test_the_demo_trains_on_the_grids_flareseg_plan_chose(demo):
    from flareseg.config import load_config
    from flareseg.data.prepared import PreparedData

    settings = PreparedData(demo.out / "prepared").settings
    for stage, cap in (("coarse", TINY.coarse_size**3), ("fine", TINY.fine_size**3)):
        planned = load_config(demo.out / "plan" / f"{stage}.yaml")
        size = planned.model.input_size
        assert tuple(settings.grids[stage].size) == tuple(size) and np.prod(size) <= cap
        assert list(planned.model.channels) == list(getattr(TINY, f"{stage}_channels"))
    checkpoint = load_config(demo.out / "plan" / "data_prepare.yaml")
    assert checkpoint.data.hu_window == load_config(demo.out / "plan" / "fine.yaml").data.hu_window
    assert "# the smallest organ" in (demo.out / "plan" / "data_prepare.yaml").read_text()
