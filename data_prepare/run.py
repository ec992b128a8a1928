"""Data preparation stage: `python data_prepare/run.py [--config FILE] [--set KEY=VALUE ...]`.

Without --config it uses configs/data_prepare.yaml.
"""

import sys
from pathlib import Path

from flareseg.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("prepare", Path(__file__).resolve().parent.parent / "configs" / "data_prepare.yaml"))
