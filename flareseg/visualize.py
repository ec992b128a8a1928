"""Overlay pictures: axial and coronal slices of a CT with each label's contour in its own colour."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from flareseg.atomic import atomic_write
from flareseg.io import Geometry, to_canonical

DISPLAY_WINDOW = (-160.0, 240.0)  # soft-tissue window for the picture


def check_picture_path(path: str | os.PathLike) -> Path:
    """`path` when a picture can be written there (a file name with a picture suffix such as .png); else an error
    with a one-line reason, raised before any work so that a wrong -o costs nothing."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(path)
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; give a picture file name such as {path / 'overlay.png'}")
    if path.suffix.lower().lstrip(".") not in formats:
        others = ", ".join(f".{name}" for name in formats if name != "png")
        raise ValueError(f"{path}: not a picture file name; use .png (or {others})")
    return path


def overlay_png(
    image: np.ndarray,
    geometry: Geometry,
    label: np.ndarray,
    path: str | os.PathLike,
    truth: np.ndarray | None = None,
    names: list[str] | None = None,
) -> Path:
    """Write a PNG: axial and coronal slices through the labels' centre, contours of `label` (and of `truth`,
    dashed, when given). Arrays are [z, y, x] on `geometry`; the picture is shown in canonical orientation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = check_picture_path(path)
    image_c, canonical, plan = to_canonical(image, geometry)
    label_c = plan.apply(label)
    truth_c = plan.apply(truth) if truth is not None else None
    reference = label_c if label_c.any() or truth_c is None else truth_c
    centre = (
        np.argwhere(reference > 0).mean(0).round().astype(int) if reference.any() else np.array(reference.shape) // 2
    )
    dz, dy, dx = canonical.spacing
    views = [
        ("axial", image_c[centre[0]], label_c[centre[0]], None if truth_c is None else truth_c[centre[0]], dy / dx),
        (
            "coronal",
            image_c[:, centre[1]][::-1],
            label_c[:, centre[1]][::-1],
            None if truth_c is None else truth_c[:, centre[1]][::-1],
            dz / dx,
        ),
    ]
    values = sorted(
        set(np.unique(label_c).tolist()) | (set(np.unique(truth_c).tolist()) if truth_c is not None else set())
    )
    values = [v for v in values if v != 0]
    colours = plt.get_cmap("tab20", max(len(values), 1))
    figure, axes = plt.subplots(1, 2, figsize=(11, 5.5), dpi=100)
    for axis, (title, picture, predicted, reference_slice, aspect) in zip(axes, views):
        axis.imshow(np.clip(picture, *DISPLAY_WINDOW), cmap="gray", aspect=aspect, interpolation="nearest")
        for index, value in enumerate(values):
            colour = colours(index)
            if (predicted == value).any():
                axis.contour(predicted == value, levels=[0.5], colors=[colour], linewidths=1.2)
            if reference_slice is not None and (reference_slice == value).any():
                axis.contour(reference_slice == value, levels=[0.5], colors=[colour], linewidths=1.0, linestyles="--")
        axis.set_title(title)
        axis.axis("off")
    handles = [plt.Line2D([], [], color=colours(i), label=_name(v, names)) for i, v in enumerate(values)]
    if handles:
        figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8, frameon=False)
    if truth is not None:
        figure.suptitle("prediction (solid) and ground truth (dashed)")
    try:
        return atomic_write(path, lambda tmp: figure.savefig(tmp, bbox_inches="tight"))
    finally:
        plt.close(figure)


def _name(value: int, names: list[str] | None) -> str:
    return names[value - 1] if names and value <= len(names) else f"label {value}"
