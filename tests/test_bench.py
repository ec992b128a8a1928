"""The benchmark scripts run (on a tiny input); their figures are measured by hand, never by tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize(
    ("script", "marker"),
    [
        ("bench_prepare.py", "speed-up"),
        ("bench_resample.py", "speed-up"),
        ("bench_train.py", "samples/s"),
        ("bench_predict.py", "peak RSS"),
    ],
)
def test_benchmark_script_runs_on_a_tiny_input(script, marker):
    command = [sys.executable, str(BENCH / script), "--tiny"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert len(rows) >= 2  # a header and at least one measured row
    assert marker in result.stdout
