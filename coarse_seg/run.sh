#!/bin/sh
# Coarse stage training: sh coarse_seg/run.sh [CONFIG] [--set KEY=VALUE ...] (PYTHON, NPROC_PER_NODE, NNODES,
# NODE_RANK, MASTER_ADDR, MASTER_PORT as scripts/train_stage.sh says). exec keeps this shell's process id.
here=$(dirname "$0")
exec sh "$here/../scripts/train_stage.sh" "$0" "$here/../configs/coarse.yaml" "$here/run.py" "$@"
