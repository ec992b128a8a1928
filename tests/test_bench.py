"""The benchmark scripts run (on a tiny input); their figures are measured by hand, never by tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flareseg.inference.backends import openvino_available

BENCH = Path(__file__).resolve().parents[1] / "bench"
SEMI_METHODS = (  # compare_semi.py's rows
    "supervised",
    "supervised_equal_time",
    "cps",
    "cps_uif",
    "cps_uif_half",
    "teacher_student",
    "cps_reference",
    "supervised_no_hu_shift",
)
# compare_nnunet.py's fixed last line; on --tiny without --with-nnunet the nnU-Net fields are n/a.
COMPARE_LAST_LINE = re.compile(
    r"flareseg \d+\.\d s \d+ MB \| flareseg_noise \d+\.\d s \d+ MB \| nnunet_fullres n/a s n/a MB \| "
    r"nnunet_iso2\.5 n/a s n/a MB"
)
# script -> what its output must show. bench_predict.py and bench_train.py run --tiny in bench/gpu_check.sh's dry run
# (tests/test_gpu_check.py checks their figures), so not here as well.
SCRIPTS = {
    "bench_prepare.py": "speed-up",
    "bench_resample.py": "speed-up",
    "compare_cps.py": "mean validation Dice",
    "compare_semi.py": "shifted - supervised",
    "bench_backends.py": "speed-up",
    "compare_nnunet.py": "flareseg_noise",
    "bench_read.py": "added s",
    "bench_cohort.py": "cases/hour",
    "compare_precision.py": "differs from torch fp32",
    "bench_startup.py": "start-up",
}
NEEDS_OPENVINO = {"compare_precision.py"}
# Seconds of each tiny run alone on 2 cores (compare_precision.py with the session's demo); the longest start first,
# so that the two runs at a time end together.
SECONDS = {
    "bench_backends.py": 27,
    "bench_cohort.py": 26,
    "compare_cps.py": 14,
    "compare_semi.py": 13,
    "compare_nnunet.py": 10,
    "compare_precision.py": 14,
    "bench_startup.py": 25,
    "bench_prepare.py": 6,
    "bench_resample.py": 4,
    "bench_read.py": 3,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every selected script's tiny run, two at a time: most of a run is starting Python, importing and exporting, which
    leaves the second core idle. Each run has its own folders (export cache included), so none sees another's, but
    compare_precision.py: it compares the backends on the session's smoke demo (its --tiny run would run that same
    demo first), with the export cache that the demo's prediction filled. Each run computes in one thread: two
    runs of two threads on 2 cores wait for one another (torch's OpenMP threads spin while they wait)."""
    selected = {  # the scripts whose tests run (-k bench_startup runs that one script alone)
        item.callspec.params["script"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec")
    }
    scripts = [s for s in SCRIPTS if s in selected and (openvino_available() or s not in NEEDS_OPENVINO)]
    scripts.sort(key=SECONDS.get, reverse=True)
    demo = request.getfixturevalue("smoke_demo") if "compare_precision.py" in scripts else None

    def run(script: str) -> tuple[subprocess.CompletedProcess, Path]:
        folder = tmp_path_factory.mktemp(script.removesuffix(".py"))
        command = [sys.executable, str(BENCH / script), "--tiny"]
        env = {**os.environ, "FLARESEG_CACHE_DIR": str(folder / "cache"), "OMP_NUM_THREADS": "1"}
        if script == "compare_nnunet.py":  # whatever venv this machine has: the missing-venv path, n/a for nnU-Net
            command += ["--nnunet-venv", str(folder / "no-venv"), "--work", str(folder / "work")]
        # OpenVINO's runs: bench_backends, compare_precision
        if script in ("compare_nnunet.py", "bench_startup.py"):
            command += ["--backend", "torch"]
        if script in ("bench_backends.py", "compare_cps.py", "compare_semi.py"):  # (they set torch's threads)
            command += ["--threads", "1"]
        if script == "compare_precision.py":
            command += ["--demo", str(demo.out)]
            env["FLARESEG_CACHE_DIR"] = os.environ["FLARESEG_CACHE_DIR"]  # the session's (conftest.py)
        return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env), folder

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(scripts, pool.map(run, scripts)))


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(
            script,
            marks=pytest.mark.skipif(
                script in NEEDS_OPENVINO and not openvino_available(), reason="needs the openvino extra"
            ),
        )
        for script in SCRIPTS
    ],
)
def test_benchmark_script_runs_on_a_tiny_input(runs, script):
    result, folder = runs[script]
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert len(rows) >= 2  # a header and at least one measured row
    assert SCRIPTS[script] in result.stdout
    if script == "compare_semi.py":  # every method scored, and its difference from supervised training
        for method in SEMI_METHODS:
            assert re.search(
                rf"^\| {method} \| 1 \| \d\.\d{{3}} \| \d\.\d{{3}} \| [+-]\d\.\d{{3}} \|", result.stdout, re.M
            )
    if script == "compare_nnunet.py":
        assert "bench/setup_nnunet.sh" in result.stdout  # how to create the venv
        assert COMPARE_LAST_LINE.fullmatch(result.stdout.splitlines()[-1])
        assert not (folder / "work").exists()  # nothing written for nnU-Net when it does not run
