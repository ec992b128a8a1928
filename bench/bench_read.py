"""What checking a read costs: `read_image` against ITK alone, and the designs that were not chosen.

    python bench/bench_read.py [--image CT.nii.gz] [--dicom FOLDER] [--repeats 7]
    python bench/bench_read.py --tiny        # a seconds-long smoke run

Without --image the CT is a 512x512x200 int16 phantom at 0.8x0.8x2.5 mm written as .nii.gz (as bench_predict
makes it). Copies of it measure the other checks: a compressed .mha (Adler-32 of ITK's voxels) and a float32 .nii
(the raw NaN/Inf scan). --dicom (default: ../shared/data's 20-slice series when it is there) measures the
slice-position checks of a DICOM series.

Variants for a .nii.gz, run alternately within each repeat (so that load on the machine hits them alike), each
ending with the [z, y, x] numpy array:
- itk: sitk.ReadImage + GetArrayFromImage, no check (what reading cost before the gzip check);
- read_image: flareseg's reader (header checks, ITK, then the CRC-32 of ITK's voxels against the gzip trailer);
- temp .nii (/dev/shm or disk): Python's zlib decompresses (checking CRC and length) into an uncompressed temporary
  .nii, which ITK reads;
- thread: the full streaming check (scan_gzip) in a thread while ITK reads the .nii.gz (SimpleITK releases the
  GIL); no longer in wall time when a core is free, but twice the decompression work;
- scan then itk: the full check first, then ITK;
- scan alone: the fallback path's extra cost (scaled, big-endian or multi-member files).
Figures: wall-clock median and minimum over --repeats, and the median CPU time of this process (all its threads:
the thread variant's second decompression shows there). On a busy machine CPU time is the steadier figure.
"added" is the difference to `itk`'s medians.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from flareseg.io import read_image, write_image
from flareseg.io.gzip_check import scan_gzip, verify_gzip_voxels
from flareseg.io.nifti_check import check_nifti
from flareseg.io.stream_check import verify_compressed_voxels

SHARED_DICOM = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct_dicom_20sl" / "dicom"


def itk_read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def temp_nii_read(path: Path, folder: str) -> np.ndarray:
    """Decompress with Python's zlib (CRC and length checked at the end) to a temporary .nii; ITK reads that."""
    handle, name = tempfile.mkstemp(suffix=".nii", dir=folder)
    try:
        with gzip.open(path, "rb") as source, os.fdopen(handle, "wb") as target:
            shutil.copyfileobj(source, target, 1 << 22)
        return itk_read(Path(name))
    finally:
        os.unlink(name)


def thread_read(path: Path) -> np.ndarray:
    """ITK reads while a thread decompresses the file again to verify it."""
    header = check_nifti(path)
    errors = []

    def verify():
        try:
            scan_gzip(path, header)
        except Exception as error:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(error)

    worker = threading.Thread(target=verify)
    worker.start()
    array = itk_read(path)
    worker.join()
    if errors:
        raise errors[0]
    return array


def scan_then_itk(path: Path) -> np.ndarray:
    scan_gzip(path, check_nifti(path))
    return itk_read(path)


def measure(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[list[float], list[float]]]:
    """Wall and CPU seconds (this process, all threads) per call of each variant; the variants alternate within
    each repeat, after one warm-up round."""
    times = {name: ([], []) for name in variants}
    for round_ in range(repeats + 1):
        for name, call in variants.items():
            wall, cpu = time.perf_counter(), time.process_time()
            call()
            if round_:
                times[name][0].append(time.perf_counter() - wall)
                times[name][1].append(time.process_time() - cpu)
    return times


def table(title: str, times: dict[str, tuple[list[float], list[float]]], baseline: str | None = "itk") -> None:
    """A markdown table; "added" is the difference to `baseline`'s median wall and median CPU seconds."""
    print(f"\n{title}\n| variant | wall median s | wall min s | CPU median s | added s (wall, CPU) |")
    print("|---|---|---|---|---|")
    for name, (wall, cpu) in times.items():
        added = ""
        if baseline and name != baseline:
            base_wall, base_cpu = times[baseline]
            added = f"{statistics.median(wall) - statistics.median(base_wall):+.3f}, "
            added += f"{statistics.median(cpu) - statistics.median(base_cpu):+.3f}"
        print(f"| {name} | {statistics.median(wall):.3f} | {min(wall):.3f} | {statistics.median(cpu):.3f} | {added} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, help="a .nii.gz CT (default: a 512x512x200 int16 phantom)")
    parser.add_argument("--dicom", type=Path, help="a DICOM series folder (default: ../shared/data's, if there)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tiny", action="store_true", help="small phantom, one repeat: checks that the script runs")
    args = parser.parse_args()
    repeats = 1 if args.tiny else args.repeats
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"zlib {zlib.ZLIB_RUNTIME_VERSION} (Python); {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="flareseg-bench-read-") as tmp:
        tmp = Path(tmp)
        image = args.image
        if image is None:
            from flareseg.data.phantom import make_phantom

            shape = (24, 48, 48) if args.tiny else (200, 512, 512)
            phantom = make_phantom(0, shape=shape, spacing=(2.5, 0.8, 0.8), orientation="ras")
            image = write_image(tmp / "ct_0000.nii.gz", phantom.image, phantom.geometry)
        array, geometry = read_image(image)
        print(f"image: {image.name}, {array.shape} {array.dtype}, {image.stat().st_size / 1e6:.1f} MB compressed")

        variants = {
            "itk": lambda: itk_read(image),
            "read_image": lambda: read_image(image),
            "temp .nii on disk": lambda: temp_nii_read(image, str(tmp)),
            "thread": lambda: thread_read(image),
            "scan then itk": lambda: scan_then_itk(image),
            "scan alone": lambda: scan_gzip(image, check_nifti(image)),
        }
        if shm:
            variants["temp .nii in /dev/shm"] = lambda: temp_nii_read(image, shm)
        table(f".nii.gz, {repeats} repeats", measure(variants, repeats))
        itk_image = sitk.ReadImage(str(image))
        voxels = sitk.GetArrayViewFromImage(itk_image)  # a view: itk_image must stay alive while it is used
        steps = {
            "header check (check_nifti)": lambda: check_nifti(image),
            "CRC of ITK's voxels (verify_gzip_voxels)": lambda: verify_gzip_voxels(image, voxels, None),
        }
        table(f".nii.gz, the added steps alone, {repeats} repeats", measure(steps, repeats), None)

        mha = write_image(tmp / "ct.mha", array, geometry)  # zlib-compressed, Adler-32
        mha_image = sitk.ReadImage(str(mha))
        mha_voxels = sitk.GetArrayViewFromImage(mha_image)
        mha_variants = {
            "itk": lambda: itk_read(mha),
            "read_image": lambda: read_image(mha),
            "Adler-32 of ITK's voxels alone": lambda: verify_compressed_voxels(mha, ".mha", mha_voxels),
        }
        table(f"compressed .mha, {repeats} repeats", measure(mha_variants, repeats))

        floats = write_image(tmp / "float.nii", array.astype(np.float32), geometry)
        float_variants = {
            "itk": lambda: itk_read(floats),
            "read_image": lambda: read_image(floats),
            "NaN/Inf scan alone (check_nifti)": lambda: check_nifti(floats),
        }
        table(f"float32 .nii, {repeats} repeats", measure(float_variants, repeats))

        dicom = args.dicom or (SHARED_DICOM if SHARED_DICOM.is_dir() else None)
        if dicom is not None:
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(dicom), "")

            def itk_series() -> np.ndarray:
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(files)
                return sitk.GetArrayFromImage(reader.Execute())

            dicom_variants = {"itk": itk_series, "read_image": lambda: read_image(dicom)}
            title = f"DICOM {dicom.name} ({len(files)} files), {repeats} repeats"
            table(title, measure(dicom_variants, repeats))


if __name__ == "__main__":
    main()
