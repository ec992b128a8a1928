"""A picture of the phantom sites: one axial slice of one phantom per site, beside a slice of a real CT.

    python bench/show_sites.py [--seed 3] [--out docs/phantom_sites.png]

Each phantom is made at its site's realistic spacing and field of view (identity orientation: the patient's right
on the picture's left, anterior at the top), all panels at the same scale in mm, window W400/L40. The slice is the
one through the most kidney (both kidneys, about the renal hila); for a site with metal, the slice through the most
metal. The real CT is ../shared/data/ct_abdomen_30sl (read where it is, at run time; the panel is left out when it
is absent), its slice chosen the same way from its label.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flareseg.atomic import atomic_write  # noqa: E402
from flareseg.data.phantom import SITES, make_phantom  # noqa: E402
from flareseg.io import read_image, to_canonical  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REAL_CT = REPO.parent / "shared" / "data" / "ct_abdomen_30sl"
WINDOW = (40 - 200, 40 + 200)  # W400 / L40
KIDNEYS = (2, 13)
HALF_WIDTH_MM = 230  # every panel shows x in [-230, 230] mm, y in [-175, 175] mm around the image centre


def kidney_slice(label: np.ndarray) -> int:
    return int(np.argmax(np.isin(label, KIDNEYS).sum(axis=(1, 2))))


def panel(axis, image: np.ndarray, spacing: tuple[float, float, float], index: int, title: str) -> None:
    """Slice `index` of a canonical [z, y, x] image, drawn in mm around the image centre."""
    height, width = image.shape[1] * spacing[1], image.shape[2] * spacing[2]
    extent = (-width / 2, width / 2, height / 2, -height / 2)
    axis.imshow(np.clip(image[index], *WINDOW), cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], extent=extent)
    axis.set_xlim(-HALF_WIDTH_MM, HALF_WIDTH_MM)
    axis.set_ylim(HALF_WIDTH_MM * 0.76, -HALF_WIDTH_MM * 0.76)
    axis.set_facecolor("black")  # beyond a small field of view
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_title(title, fontsize=9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=3, help="the patient (the same seed for every site)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "phantom_sites.png")
    args = parser.parse_args()

    panels = []
    for name, site in SITES.items():
        start = time.perf_counter()
        phantom = make_phantom(args.seed, site=name, orientation="identity")
        seconds = time.perf_counter() - start
        metal = (phantom.image > 2500).sum(axis=(1, 2))
        index = int(np.argmax(metal)) if site.metal else kidney_slice(phantom.label)
        spacing = phantom.geometry.spacing
        title = (
            f"{name}\n{site.phase.replace('_', '-')}, {site.kernel} kernel, {spacing[2]:.2f} mm x {spacing[0]:.1f} mm"
        )
        panels.append((phantom.image, spacing, index, title))
        print(f"{name}: {phantom.image.shape} voxels, spacing {tuple(round(s, 2) for s in spacing)}, {seconds:.1f} s")
    if (REAL_CT / "case_0000.nii.gz").exists():
        image, geometry = read_image(REAL_CT / "case_0000.nii.gz")
        label, _ = read_image(REAL_CT / "case_label.nii.gz")
        image, canonical, plan = to_canonical(image, geometry)
        index = kidney_slice(plan.apply(label))
        title = f"real CT (TotalSegmentator test case)\n{canonical.spacing[2]:g} mm x {canonical.spacing[0]:g} mm"
        panels.append((image, canonical.spacing, index, title))
    else:
        print(f"no real CT at {REAL_CT}: its panel is left out")

    columns = 4
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.0 * columns, 3.6 * rows), dpi=80)
    for axis in axes.ravel()[len(panels) :]:
        axis.axis("off")
    for axis, (image, spacing, index, title) in zip(axes.ravel(), panels):
        panel(axis, image, spacing, index, title)
    figure.suptitle(f"phantom sites (seed {args.seed}: the same patient at every site), W400/L40", fontsize=10)
    figure.tight_layout()
    try:
        atomic_write(args.out, lambda tmp: figure.savefig(tmp, facecolor="white"))
    finally:
        plt.close(figure)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
