"""Partial labels and unlabeled cases: pseudo-label fusion (FLARE23) and reliable unlabeled-image filtering."""

from flareseg.data.cases import ANNOTATED_FILE, read_annotated_file
from flareseg.semi.fusion import fuse_labels
from flareseg.semi.pseudo_label import REPORT_FILE, PseudoLabelSummary, pseudo_label_folder

__all__ = [
    "ANNOTATED_FILE",
    "REPORT_FILE",
    "PseudoLabelSummary",
    "fuse_labels",
    "pseudo_label_folder",
    "read_annotated_file",
]
