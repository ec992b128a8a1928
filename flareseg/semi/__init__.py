"""Partial labels and pseudo-labels (FLARE23): fuse a case's partial annotation with a teacher's prediction."""

from flareseg.semi.fusion import fuse_labels
from flareseg.semi.pseudo_label import (
    ANNOTATED_FILE,
    REPORT_FILE,
    PseudoLabelSummary,
    pseudo_label_folder,
    read_annotated_file,
)

__all__ = [
    "ANNOTATED_FILE",
    "REPORT_FILE",
    "PseudoLabelSummary",
    "fuse_labels",
    "pseudo_label_folder",
    "read_annotated_file",
]
