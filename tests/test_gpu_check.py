"""bench/gpu_check.sh's CPU dry run (so that the GPU machine never runs it first): every step reports its figures
(bench/bench_cores.py --tiny included, for 1 and 2 cores), and a failing step loses none of the others' figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ["gpu_tests", "predict", "train", "ddp", "cores"]


def _gpu_check(out: Path, *options: str) -> tuple[subprocess.CompletedProcess, dict]:
    command = ["bash", str(REPO / "bench" / "gpu_check.sh"), str(out), "--cpu-dry-run", *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two checks at once on 2 cores: one thread each, as test_bench
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=REPO, env=env)
    report_file = out / "gpu_check.json"
    assert report_file.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads(report_file.read_text())


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def checks(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, dict, Path]]:
    """The whole dry run, and one with a step made to fail, at once: most of each is starting Python processes."""
    runs = {
        "dry run": (),
        "failing step": ("--only", "gpu_tests,predict", "--fail", "gpu_tests"),
    }
    folders = {name: tmp_path_factory.mktemp(name.replace(" ", "-")) for name in runs}
    with ThreadPoolExecutor(2) as pool:
        done = pool.map(lambda name: (*_gpu_check(folders[name], *runs[name]), folders[name]), runs)
        return dict(zip(runs, done))


def test_the_dry_run_reports_every_step_with_its_figures(checks):
    result, report, out = checks["dry run"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert report["mode"] == "cpu-dry-run" and report["setup"]["status"] == "ok"
    assert report["versions"]["torch"] and report["versions"]["flareseg"] and report["versions"]["gpu"] is None
    steps = report["steps"]
    assert list(steps) == STEPS
    assert all(_positive(steps[name]["seconds"]) for name in STEPS)
    assert all((out / f"{name}.log").is_file() for name in ["setup", *STEPS])
    assert 0 < report["seconds"] < report["budget_s"]

    tests = steps["gpu_tests"]  # no CUDA: the tests marked gpu skip themselves
    assert tests["status"] == "skipped" and tests["error"] is None
    assert tests["figures"]["skipped"] >= 1 and tests["figures"]["passed"] == 0
    assert tests["figures"]["failures"] == tests["figures"]["errors"] == 0
    assert all(steps[name]["status"] == "ok" and steps[name]["error"] is None for name in STEPS[1:])

    predict = steps["predict"]["figures"]
    assert _positive(predict["seconds"]) and _positive(predict["process_peak_rss_mb"])
    assert predict["device"] == "cpu" and predict["peak_gpu_mb"] is None  # GPU memory only on CUDA
    train = steps["train"]["figures"]
    assert train["batch_size"] == 1 and sorted(train["stages"]) == ["coarse", "fine"]
    for row in train["stages"].values():
        assert _positive(row["loader_samples_per_s"]) and _positive(row["training_samples_per_s"])
        assert _positive(row["planned_gb"]) and row["gpu_used_gb"] is None
    ddp = steps["ddp"]["figures"]
    assert ddp["probe"]["backend"] == "gloo" and ddp["probe"]["world_size"] == 1
    assert ddp["training"]["processes"] == 1 and math.isfinite(ddp["training"]["train_loss"])

    cores = steps["cores"]["figures"]
    assert cores["complete"] and sorted(cores["results"]) == ["1", "2"]
    for modes in cores["results"].values():
        assert sorted(modes) == ["processes", "threads"]
        assert all(_positive(mode["cases_per_hour"]) and _positive(mode["speedup"]) for mode in modes.values())
    assert cores["results"]["1"]["threads"]["speedup"] == 1.0
    shards = [run for run in cores["runs"] if run["cores"] == 2 and run["mode"] == "processes"]
    assert len(shards) == 1 and len(shards[0]["processes"]) == 2  # two processes at once, one thread each
    assert all(process["threads"] == 1 and process["cases"] == 1 for process in shards[0]["processes"])


def test_a_failing_step_is_reported_and_the_other_steps_keep_their_figures(checks):
    result, report, _ = checks["failing step"]
    assert result.returncode == 1
    steps = report["steps"]
    assert list(steps) == STEPS
    failed = steps["gpu_tests"]
    assert failed["status"] == "failed" and "gpu-check-forced-failure" in failed["error"]
    assert steps["predict"]["status"] == "ok" and _positive(steps["predict"]["figures"]["seconds"])
    assert all(steps[name]["status"] == "skipped" for name in ("train", "ddp", "cores"))
    assert "failed or out of time: gpu_tests" in result.stdout
