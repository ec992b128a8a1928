"""Fine stage training: `python fine_seg/run.py [--config FILE] [--set KEY=VALUE ...]` (or under torchrun).

Without --config it uses configs/fine.yaml of this repository.
"""

import sys
from pathlib import Path

from flareseg.cli import main

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "fine.yaml"

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--config" not in args:
        args = ["--config", str(DEFAULT_CONFIG), *args]
    sys.exit(main(["train", *args]))
