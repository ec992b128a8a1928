"""How near `flareseg plan` lands to the FLARE21 reference pipeline on FLARE21-like phantoms.

    python bench/plan_flare21.py [--cases 10] [--gpu-memory-gb 24]

Phantoms at their natural resolution (in-plane 0.6-1.0 mm, slices 1-5 mm, random orientation), labels as FLARE21
has them (liver, kidney with both sides in one label, spleen, pancreas), planned with the FLARE21 network pair;
printed beside configs/flare21/ (coarse 160^3, fine 192^3 with a 20 mm margin, the merged kidney keeping two parts).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from flareseg.data.phantom import make_phantom, phantom_case_seed
from flareseg.io import write_image
from flareseg.planning import plan_dataset

FLARE21 = {1: 1, 2: 2, 13: 2, 3: 3, 4: 4}  # FLARE22 numbering -> FLARE21's four labels (both kidneys in one)
REFERENCE = {  # configs/flare21/
    "prepare.grids.coarse.size": [160, 160, 160],
    "prepare.grids.fine.size": [192, 192, 192],
    "prepare.grids.fine.margin_mm": 20,
    "predict.keep_components_per_label": {2: 2},
    "data.hu_window": [-325, 325],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--gpu-memory-gb", type=float, default=24.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flareseg-plan-") as tmp:
        root = Path(tmp)
        table = np.zeros(256, dtype=np.uint8)
        for source, target in FLARE21.items():
            table[source] = target
        for index in range(args.cases):
            phantom = make_phantom(phantom_case_seed(0, index))
            write_image(root / "images" / f"case{index:03d}_0000.nii.gz", phantom.image, phantom.geometry)
            write_image(root / "labels" / f"case{index:03d}.nii.gz", table[phantom.label], phantom.geometry)
        start = time.perf_counter()
        result = plan_dataset(
            root / "plan",
            images=root / "images",
            labels=root / "labels",
            label_names=["liver", "kidney", "spleen", "pancreas"],
            gpu_memory_gb=args.gpu_memory_gb,
        )
        seconds = time.perf_counter() - start
    print(f"{args.cases} FLARE21-like phantoms, planned in {seconds:.1f} s for {args.gpu_memory_gb:g} GB")
    print("| decision | plan | FLARE21 reference |")
    print("|---|---|---|")
    for decision in result.plan.decisions:
        reference = REFERENCE.get(decision.key, "")
        print(f"| `{decision.key}` | {decision.value} | {reference} |")
    print()
    for decision in result.plan.decisions:
        print(f"{decision.key}: {decision.why}", file=sys.stderr)


if __name__ == "__main__":
    main()
