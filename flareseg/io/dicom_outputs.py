"""DICOM outputs for a predicted label map: DICOM-SEG (highdicom) and RTSTRUCT (rt-utils), as TotalSegmentator offers.

The label map is on the grid `flareseg.io.read_image(series_folder)` returns; `flareseg.io.dicom_series` matches
each array slice to its source file by position and generates UIDs for a series that lacks them (the report says
so); `flareseg.io.snomed` codes the segments. rt-utils reads the series from a folder itself, so it is given a
temporary copy of the series with those UIDs.

highdicom, pydicom and rt-utils (the `dicom` extra) are imported when a function needs them, so `import flareseg`
does not load them.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flareseg.atomic import atomic_path
from flareseg.io.dicom_series import (
    EXTRA_HINT,
    DicomExtraMissing,
    SourceSeries,
    load_series,
    series_for_rt_utils,
    write_series_with_uids,
)
from flareseg.io.geometry import Geometry
from flareseg.io.snomed import SNOMED_CODES, snomed_code

log = logging.getLogger(__name__)

GENERATED_UIDS_MESSAGE = "the source series had no valid UIDs: the output references generated ones (not the originals)"


@dataclass(frozen=True)
class DicomOutputReport:
    """What a DICOM output holds. `path` is None when the label map held no label (nothing is written)."""

    path: Path | None
    segments: tuple[str, ...]
    generated_uids: bool
    message: str


def write_dicom_seg(
    label: np.ndarray,
    series_folder: str | os.PathLike,
    out_path: str | os.PathLike,
    label_names: Sequence[str],
    *,
    geometry: Geometry | None = None,
) -> DicomOutputReport:
    """Write `label` ([z, y, x], on the grid read_image(series_folder) returns) as a BINARY DICOM-SEG that
    references the series' images: one segment per label id present (id i is label_names[i - 1]).

    `geometry`: the Geometry read_image returned for the folder, if at hand (else the series is read again).
    """
    hd, codes = _import_highdicom()
    label = np.asarray(label)
    series = load_series(label, series_folder, label_names, geometry)
    if not series.ids:
        return _nothing_written("DICOM-SEG", out_path, series)
    segment_of = np.zeros(max(series.ids) + 1, dtype=np.uint16 if len(series.ids) > 255 else np.uint8)
    segment_of[list(series.ids)] = np.arange(1, len(series.ids) + 1)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="flareseg", family=codes.DCM.ArtificialIntelligence, version=_version()
    )
    descriptions = [
        _segment_description(hd, number, label_names[i - 1], algorithm) for number, i in enumerate(series.ids, 1)
    ]
    with _quiet("highdicom", logging.WARNING):
        seg = hd.seg.Segmentation(
            source_images=[series.datasets[j] for j in series.file_of_slice],
            pixel_array=segment_of[label],
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=_output_series_number(series),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="flareseg",
            manufacturer_model_name="flareseg",
            software_versions=_version(),
            device_serial_number="none",
            series_description="flareseg segmentation",
            content_label="FLARESEG",
        )
        with atomic_path(out_path) as tmp:
            seg.save_as(tmp)
    return _report("DICOM-SEG", out_path, series, label_names)


def write_rtstruct(
    label: np.ndarray,
    series_folder: str | os.PathLike,
    out_path: str | os.PathLike,
    label_names: Sequence[str],
    *,
    geometry: Geometry | None = None,
) -> DicomOutputReport:
    """Write `label` ([z, y, x], on the grid read_image(series_folder) returns) as an RTSTRUCT of closed planar
    contours (rt-utils): one ROI per label id present, named label_names[id - 1].

    Contours are polygons through the centres of each region's border pixels; see tests/test_dicom_outputs.py
    for what survives the round trip. `geometry` as for write_dicom_seg.
    """
    builder = _import_rt_utils()
    label = np.asarray(label)
    series = load_series(label, series_folder, label_names, geometry)
    spacing = [float(v) for v in series.datasets[0].PixelSpacing]
    if abs(spacing[0] - spacing[1]) > 1e-6 * max(spacing):
        # rt-utils scales column indices by PixelSpacing[0] (the row spacing): contours would be misplaced
        raise ValueError(
            f"{series.folder}: its pixels are not square (PixelSpacing {spacing[0]:g}\\{spacing[1]:g}); rt-utils "
            "would place RTSTRUCT contours wrongly: write a DICOM-SEG instead"
        )
    if not series.ids:
        return _nothing_written("RTSTRUCT", out_path, series)
    slice_of_file = np.argsort(series.file_of_slice)
    with tempfile.TemporaryDirectory(prefix="flareseg-rtstruct-") as tmp:
        series_for_rt_utils(series, Path(tmp))
        with _quiet("pydicom", logging.ERROR):  # rt-utils sets FileDataset.is_little_endian, deprecated in pydicom 3
            rtstruct = builder.create_new(dicom_series_path=tmp)
        file_of_uid = {ds.SOPInstanceUID: j for j, ds in enumerate(series.datasets)}
        rt_files = [file_of_uid.get(ds.SOPInstanceUID) for ds in rtstruct.series_data]
        if len(rt_files) != len(series.files) or None in rt_files:
            raise ValueError(
                f"{series.folder}: rt-utils read {len(rt_files)} of the series' {len(series.files)} files (it skips "
                "files whose pixel data pydicom cannot decode, e.g. JPEG-LS without pylibjpeg)"
            )
        slices = slice_of_file[rt_files]  # rt-utils' slice i (ascending along the normal) is array slice slices[i]
        rtstruct.set_series_description("flareseg segmentation")
        for i in series.ids:
            mask = np.moveaxis(label[slices] == i, 0, -1)  # [rows, columns, slices] in rt-utils' order
            rtstruct.add_roi(mask=mask, name=label_names[i - 1], roi_generation_algorithm="AUTOMATIC")
        with atomic_path(out_path) as tmp_out, _quiet("pydicom", logging.ERROR):
            rtstruct.ds.save_as(tmp_out)
    return _report("RTSTRUCT", out_path, series, label_names)


@contextmanager
def _quiet(name: str, level: int) -> Iterator[None]:
    """Keep highdicom's INFO lines and pydicom's deprecation notes about rt-utils' code out of flareseg's output."""
    logger = logging.getLogger(name)
    saved = logger.level
    try:
        logger.setLevel(level)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(saved)


def _segment_description(hd, number: int, name: str, algorithm):
    """A highdicom SegmentDescription coded in SNOMED CT, laterality as a property type modifier."""
    code = snomed_code(name)
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=name,
        segmented_property_category=hd.sr.CodedConcept(code.category_code, "SCT", code.category_meaning),
        segmented_property_type=hd.sr.CodedConcept(code.code, "SCT", code.meaning),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    if code.modifier_code is not None:
        modifier = hd.sr.CodedConcept(code.modifier_code, "SCT", code.modifier_meaning)
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
    return description


def _output_series_number(series: SourceSeries) -> int:
    number = series.datasets[0].get("SeriesNumber")
    return int(number) + 1000 if number not in (None, "") else 1000


def _report(
    kind: str, out_path: str | os.PathLike, series: SourceSeries, label_names: Sequence[str]
) -> DicomOutputReport:
    names = tuple(label_names[i - 1] for i in series.ids)
    message = f"{out_path}: {kind} with {len(names)} segment(s) of {series.folder}"
    if series.generated:
        message = f"{out_path}: {GENERATED_UIDS_MESSAGE}: {', '.join(series.generated)}"
        log.warning("%s", message)
    return DicomOutputReport(Path(out_path), names, bool(series.generated), message)


def _nothing_written(kind: str, out_path: str | os.PathLike, series: SourceSeries) -> DicomOutputReport:
    message = f"{out_path}: the label map holds no label: no {kind} written"
    log.warning("%s", message)
    return DicomOutputReport(None, (), bool(series.generated), message)


def _version() -> str:
    from flareseg import __version__

    return __version__


def _import_highdicom():
    try:
        import highdicom
        import pydicom  # noqa: F401 - highdicom's own dependency, named for the message
        from pydicom.sr.codedict import codes
    except ImportError as error:
        raise DicomExtraMissing(f"DICOM-SEG output needs the dicom extra: {EXTRA_HINT} ({error})") from error
    return highdicom, codes


def _import_rt_utils():
    try:
        import pydicom  # noqa: F401
        from rt_utils import RTStructBuilder
    except ImportError as error:
        raise DicomExtraMissing(f"RTSTRUCT output needs the dicom extra: {EXTRA_HINT} ({error})") from error
    return RTStructBuilder


__all__ = [
    "GENERATED_UIDS_MESSAGE",
    "SNOMED_CODES",
    "DicomExtraMissing",
    "DicomOutputReport",
    "snomed_code",
    "write_dicom_seg",
    "write_rtstruct",
    "write_series_with_uids",
]
