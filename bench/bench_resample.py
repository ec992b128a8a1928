"""Resampling speed of the shared preprocessing functions on a 512x512x200 phantom (CPU, torch threads as set).

    python bench/bench_resample.py [--repeats 5] [--tiny]

Compares, in one run: image 512x512x200 -> 160^3 (flareseg trilinear, corner-aligned) against SimpleITK linear on
the same grid; label map -> 160^3 per label (flareseg: each label inside its own bounding box) against the
full-volume per-label reference (each label's whole mask interpolated) and against nearest neighbour.
Prints the median seconds of each and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from flareseg.data.phantom import make_phantom
from flareseg.data.resample import resampled_geometry, resize_image, resize_label
from flareseg.io import to_sitk


def _median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _full_volume_per_label(label: torch.Tensor, size) -> torch.Tensor:
    out = torch.zeros(size, dtype=label.dtype)
    for value in torch.unique(label).tolist():
        if value:
            mask = F.interpolate((label == value).float()[None, None], size=size, mode="trilinear", align_corners=True)
            out[mask[0, 0] > 0.5] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="a small volume, 1 repeat: checks that the script runs")
    args = parser.parse_args()
    shape, size = ((200, 512, 512), (160, 160, 160)) if not args.tiny else ((24, 48, 48), (16, 16, 16))
    repeats = 1 if args.tiny else args.repeats
    phantom = make_phantom(0, shape=shape, orientation="identity")
    image, label = torch.from_numpy(phantom.image), torch.from_numpy(phantom.label)
    reference_image = to_sitk(phantom.image, phantom.geometry)
    target = to_sitk(np.zeros(size, np.int16), resampled_geometry(phantom.geometry, size))

    def sitk_linear():
        return sitk.Resample(reference_image, target, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)

    rows = {
        "image, flareseg trilinear": _median_seconds(lambda: resize_image(image, size), repeats),
        "image, SimpleITK linear": _median_seconds(sitk_linear, repeats),
        "labels, flareseg per label (box)": _median_seconds(lambda: resize_label(label, size, "per_label"), repeats),
        "labels, full-volume per label": _median_seconds(lambda: _full_volume_per_label(label, size), repeats),
        "labels, nearest": _median_seconds(lambda: resize_label(label, size, "nearest"), repeats),
    }
    grids = f"{shape[2]}x{shape[1]}x{shape[0]} -> {size[2]}x{size[1]}x{size[0]}"
    print(f"{grids}, torch threads {torch.get_num_threads()}, median of {repeats}")
    print("| operation | seconds |\n|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.3f} |")
    full, ours = rows["labels, full-volume per label"], rows["labels, flareseg per label (box)"]
    print(f"\nper-label speed-up over the full-volume reference (same run): {full / ours:.1f}x")


if __name__ == "__main__":
    main()
