"""The benchmark scripts run (on a tiny input); their figures are measured by hand, never by tests."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from flareseg.inference.backends import openvino_available

BENCH = Path(__file__).resolve().parents[1] / "bench"
# compare_nnunet.py's fixed last line; on --tiny without --with-nnunet the nnU-Net fields are n/a.
COMPARE_LAST_LINE = re.compile(
    r"flareseg \d+\.\d s \d+ MB \| nnunet_fullres n/a s n/a MB \| nnunet_iso2\.5 n/a s n/a MB"
)


@pytest.mark.parametrize(
    ("script", "marker"),
    [
        ("bench_prepare.py", "speed-up"),
        ("bench_resample.py", "speed-up"),
        ("bench_train.py", "samples/s"),
        ("bench_predict.py", "peak RSS"),
        ("compare_cps.py", "mean validation Dice"),
        ("bench_backends.py", "speed-up"),
        ("compare_nnunet.py", "flareseg"),
        pytest.param(
            "compare_precision.py",
            "differs from torch fp32",
            marks=pytest.mark.skipif(not openvino_available(), reason="needs the openvino extra"),
        ),
    ],
)
def test_benchmark_script_runs_on_a_tiny_input(script, marker, tmp_path):
    command = [sys.executable, str(BENCH / script), "--tiny"]
    if script == "compare_nnunet.py":  # whatever venv this machine has: the missing-venv path, n/a for nnU-Net
        command += ["--nnunet-venv", str(tmp_path / "no-venv"), "--work", str(tmp_path / "work")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert len(rows) >= 2  # a header and at least one measured row
    assert marker in result.stdout
    if script == "compare_nnunet.py":
        assert "bench/setup_nnunet.sh" in result.stdout  # how to create the venv
        assert COMPARE_LAST_LINE.fullmatch(result.stdout.splitlines()[-1])
        assert not (tmp_path / "work").exists()  # nothing written for nnU-Net when it does not run
