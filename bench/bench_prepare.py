"""Preprocessing throughput: cases/minute of `flareseg prepare` on realistic phantoms, and where the time goes.

    python bench/bench_prepare.py                 # 512x512x200 phantoms, 1 and 2 workers, 3 repeats
    python bench/bench_prepare.py --tiny          # a seconds-long smoke run (used by the tests)

Phantom generation is not timed. Each repeat prepares every case afresh (overwrite) into the same folder; the
figure per worker count is the median over repeats. The breakdown is the median over repeats of the mean
seconds per case spent in each step inside the workers (read, resample, write, describe).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from flareseg.config import load_config
from flareseg.data.phantom import write_phantom_dataset
from flareseg.data.prepare import prepare_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=6, help="phantom cases (default 6)")
    parser.add_argument("--shape", type=int, nargs=3, default=(200, 512, 512), metavar=("Z", "Y", "X"))
    parser.add_argument("--workers", type=int, nargs="+", default=(1, 2))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="2 small cases, 1 repeat: checks that the script runs")
    args = parser.parse_args()
    if args.tiny:
        args.cases, args.shape, args.repeats = 2, (24, 48, 48), 1

    with tempfile.TemporaryDirectory(prefix="flareseg-bench-") as tmp:
        raw, out = Path(tmp) / "raw", Path(tmp) / "out"
        start = time.perf_counter()
        write_phantom_dataset(raw, args.cases, seed=0, shape=tuple(args.shape), orientation="ras")
        print(
            f"{args.cases} phantoms of {args.shape[2]}x{args.shape[1]}x{args.shape[0]} voxels written in "
            f"{time.perf_counter() - start:.1f} s (not timed below)"
        )
        sizes = (
            [] if not args.tiny else ["prepare.grids.coarse.size=[16, 16, 16]", "prepare.grids.fine.size=[16, 16, 16]"]
        )
        rows = []
        for workers in args.workers:
            rates, steps = [], {}
            for _ in range(args.repeats):
                config = load_config(
                    None,
                    [
                        f"prepare.images={raw / 'imagesTr'}",
                        f"prepare.labels={raw / 'labelsTr'}",
                        f"prepare.out={out}",
                        f"prepare.workers={workers}",
                        "prepare.overwrite=true",
                        *sizes,
                    ],
                )
                summary = prepare_dataset(config, progress=False)
                if not summary.ok or len(summary.prepared) != args.cases:
                    raise SystemExit(f"prepare failed: {summary.failed}")
                rates.append(60.0 * args.cases / summary.seconds)
                for step, seconds in summary.timings.items():
                    steps.setdefault(step, []).append(seconds / args.cases)
            rows.append(
                (
                    workers,
                    statistics.median(rates),
                    min(rates),
                    max(rates),
                    {step: statistics.median(values) for step, values in steps.items()},
                )
            )

    print()
    print(
        "| workers | cases/min (median) | min..max | read s/case | resample s/case | write s/case | describe s/case |"
    )
    print("|---|---|---|---|---|---|---|")
    for workers, median, low, high, steps in rows:
        print(
            f"| {workers} | {median:.1f} | {low:.1f}..{high:.1f} | {steps.get('read', 0):.2f} | "
            f"{steps.get('resample', 0):.2f} | {steps.get('write', 0):.2f} | {steps.get('describe', 0):.2f} |"
        )
    if len(rows) > 1:
        print(f"\nspeed-up {rows[-1][0]} vs {rows[0][0]} workers (same run): {rows[-1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
