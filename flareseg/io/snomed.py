"""SNOMED CT codes of the label names, for DICOM-SEG segments (as TotalSegmentator and DCMQI code them)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SnomedCode:
    """What a segment is, in SNOMED CT (coding scheme SCT): the segmented property type and its category, with the
    laterality as a type modifier (as TotalSegmentator and DCMQI code left and right organs)."""

    code: str
    meaning: str
    category_code: str
    category_meaning: str
    modifier_code: str | None = None
    modifier_meaning: str | None = None


_ANATOMY = ("123037004", "Anatomical Structure")  # SRT T-D000A
_ALTERED = ("49755003", "Morphologically Altered Structure")  # SRT M-01000
_LEFT = ("7771000", "Left")
_RIGHT = ("24028007", "Right")


def _organ(code: str, meaning: str, side: tuple[str, str] | None = None) -> SnomedCode:
    return SnomedCode(code, meaning, *_ANATOMY, *(side or (None, None)))


# TotalSegmentator's resources/totalsegmentator_snomed_mapping.csv for the organs (and its liver_tumor for "lesion":
# FLARE23's pan-cancer lesions, without an anatomic region); pydicom's codes.SCT agree on every value.
SNOMED_CODES: dict[str, SnomedCode] = {
    "liver": _organ("10200004", "Liver"),
    "right_kidney": _organ("64033007", "Kidney", _RIGHT),
    "spleen": _organ("78961009", "Spleen"),
    "pancreas": _organ("15776009", "Pancreas"),
    "aorta": _organ("15825003", "Aorta"),
    "inferior_vena_cava": _organ("64131007", "Inferior vena cava"),
    "right_adrenal_gland": _organ("23451007", "Adrenal gland", _RIGHT),
    "left_adrenal_gland": _organ("23451007", "Adrenal gland", _LEFT),
    "gallbladder": _organ("28231008", "Gallbladder"),
    "esophagus": _organ("32849002", "Esophagus"),
    "stomach": _organ("69695003", "Stomach"),
    "duodenum": _organ("38848004", "Duodenum"),
    "left_kidney": _organ("64033007", "Kidney", _LEFT),
    "kidney": _organ("64033007", "Kidney"),  # FLARE21: both kidneys in one label
    "lesion": SnomedCode("108369006", "Neoplasm", *_ALTERED),
}
GENERIC_CODE = SnomedCode("85756007", "Tissue", "85756007", "Tissue")  # DCMQI's generic type for an unknown name


def snomed_code(name: str) -> SnomedCode:
    """The code of a label name; the generic "Tissue" code, with a warning, for a name without one."""
    code = SNOMED_CODES.get(name)
    if code is None:
        log.warning(
            "label %r has no SNOMED CT code in flareseg's table: coded as the generic 'Tissue' (85756007)", name
        )
        return GENERIC_CODE
    return code
