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
    """The OpenVINO backend's ONNX exports go to a per-session folder, not the user's ~/.cache. And `auto` means
    torch in this process: it forks DataLoader workers after predicting, which crashed once OpenVINO had run in it
    (see flareseg/inference/backends.py); the OpenVINO tests run in fresh interpreters without this setting."""
    import os

    os.environ["FLARESEG_CACHE_DIR"] = str(tmp_path_factory.mktemp("flareseg-cache"))
    os.environ["FLARESEG_AUTO_BACKEND"] = "torch"
