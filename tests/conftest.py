"""Shared fixtures: real CT from ../shared/data (skipped cleanly when absent) and tiny synthetic volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flareseg.io import Geometry

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ABDOMEN_IMAGE = SHARED_DATA / "ct_abdomen_30sl" / "case_0000.nii.gz"
ABDOMEN_LABEL = SHARED_DATA / "ct_abdomen_30sl" / "case_label.nii.gz"
DICOM_SERIES = SHARED_DATA / "ct_dicom_20sl" / "dicom"
DICOM_LABEL = SHARED_DATA / "ct_dicom_20sl" / "label.nii.gz"


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """Coarse and fine checkpoints (liver, kidney, spleen) trained for a few steps: enough to run, not to be
    accurate. One pair for the session: every module that predicts with them shares their OpenVINO export."""
    from flareseg.data.phantom import write_phantom_dataset
    from tests.tiny import LABELS, LIVER_KIDNEY_SPLEEN, prepare_tiny, train_tiny

    root = tmp_path_factory.mktemp("models")
    write_phantom_dataset(root / "raw", 3, seed=2, shape=(32, 48, 48))
    data = prepare_tiny(root / "raw", root / "data", *LIVER_KIDNEY_SPLEEN, "prepare.folds=1")
    return train_tiny(data, root / "coarse", "coarse", LABELS), train_tiny(data, root / "fine", "fine", LABELS)


@pytest.fixture(scope="session")
def smoke_demo(tmp_path_factory):
    """`flareseg demo` at its smoke settings, run once for the session: tests/test_demo.py checks it, and
    tests/test_bench.py hands it to bench/compare_precision.py (whose --tiny run would run this same demo again)."""
    from flareseg.demo import SMOKE_SETTINGS, run_demo

    out = tmp_path_factory.mktemp("demo") / "run"
    return run_demo(out, minutes=0.0, device="cpu", settings=SMOKE_SETTINGS, progress=False)


@pytest.fixture
def shared_data() -> Path:
    if not ABDOMEN_IMAGE.is_file() or not DICOM_SERIES.is_dir():
        pytest.skip("../shared/data is not present (a fresh clone has no shared data)")
    return SHARED_DATA


def oblique_direction(degrees: float = 17.0, axis: tuple[float, float, float] = (0.3, 0.5, 0.8)) -> np.ndarray:
    """A rotation matrix (Rodrigues) for oblique test geometries."""
    k = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


@pytest.fixture
def small_volume() -> tuple[np.ndarray, Geometry]:
    """A seeded int16 volume with an odd shape and an oblique, non-trivial geometry."""
    rng = np.random.default_rng(7)
    array = rng.integers(-1000, 1500, size=(11, 14, 17), dtype=np.int16)
    direction = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=np.float64) @ oblique_direction()
    geometry = Geometry(spacing=(2.5, 0.7, 0.8), origin=(-12.5, 30.25, 101.0), direction=direction, shape=array.shape)
    return array, geometry


@pytest.fixture(autouse=True, scope="session")
def _private_export_cache(tmp_path_factory):
    """The OpenVINO backend's ONNX exports go to a per-session folder, not the user's ~/.cache."""
    import os

    os.environ["FLARESEG_CACHE_DIR"] = str(tmp_path_factory.mktemp("flareseg-cache"))
