"""Coarse stage training: `python coarse_seg/run.py [--config FILE] [--set KEY=VALUE ...]`.

Without --config it uses configs/coarse.yaml.
"""

import sys
from pathlib import Path

from flareseg.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("train", Path(__file__).resolve().parent.parent / "configs" / "coarse.yaml"))
