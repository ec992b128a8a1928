#!/usr/bin/env bash
# Create the separate virtual environment with nnU-Net v2 that bench/compare_nnunet.py runs (CPU only).
#
#   bash bench/setup_nnunet.sh [VENV_DIR]        # default ~/.cache/flareseg-bench/nnunet-venv
#
# flareseg never depends on nnU-Net; this environment is only for the side-by-side benchmark and is never the
# main one. torch==2.13.0 (the CPU wheel) goes in first and stays pinned by a constraints file while nnunetv2 is
# installed: unpinned, nnunetv2 -> timm -> torchvision pulls a newer torch with about 3 GB of CUDA libraries.
# The torchvision that pip then picks cannot load its operators against the CPU torch ("operator
# torchvision::nms does not exist"), and nnU-Net never needs it for its default PlainConvUNet networks, so it is
# uninstalled (compare_nnunet.py's trainer and predictions never import timm). PYTHON picks the interpreter
# (default: python3); extra pip options can come through the usual PIP_* variables.
set -euo pipefail

VENV_DIR="${1:-$HOME/.cache/flareseg-bench/nnunet-venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"

echo "creating $VENV_DIR with $("$PYTHON" --version 2>&1)"
"$PYTHON" -m venv "$VENV_DIR"
PIP=("$VENV_DIR/bin/python" -m pip)
"${PIP[@]}" install --upgrade pip

CONSTRAINTS="$VENV_DIR/flareseg-bench-constraints.txt"
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"

# The CPU build (a local version such as 2.13.0+cpu) when an index or find-links folder offers one.
"${PIP[@]}" install -c "$CONSTRAINTS" "torch==$TORCH_VERSION+cpu" || "${PIP[@]}" install -c "$CONSTRAINTS" "torch==$TORCH_VERSION"
"${PIP[@]}" install -c "$CONSTRAINTS" nnunetv2
"${PIP[@]}" uninstall -y torchvision || true

"$VENV_DIR/bin/python" - <<'EOF'
import importlib.metadata as md

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: F401

print(f"nnunetv2 {md.version('nnunetv2')}, torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}")
EOF
echo "nnU-Net v2 is ready in $VENV_DIR (python bench/compare_nnunet.py --nnunet-venv $VENV_DIR)"
