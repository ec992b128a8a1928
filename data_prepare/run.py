"""Data preparation stage: `python data_prepare/run.py [flareseg prepare options]`.

Without --config it uses configs/data_prepare.yaml of this repository.
"""

import sys
from pathlib import Path

from flareseg.cli import main

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "data_prepare.yaml"

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--config" not in args:
        args = ["--config", str(DEFAULT_CONFIG), *args]
    sys.exit(main(["prepare", *args]))
