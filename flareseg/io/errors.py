"""The error every reader raises for an unusable input: one line naming the file and the reason."""

from __future__ import annotations

import os


class ImageReadError(ValueError):
    """An input image that cannot be used; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
