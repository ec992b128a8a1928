#!/bin/sh
# Fine stage training: sh fine_seg/run.sh [CONFIG] [--set KEY=VALUE ...]
# One command from a laptop to a cluster: torchrun reads from the environment
#   NPROC_PER_NODE (processes per node, default 1), NNODES (default 1), NODE_RANK (default 0),
#   MASTER_ADDR (default 127.0.0.1), MASTER_PORT (default 29500).
here=$(dirname "$0")
config="$here/../configs/fine.yaml"
case "$1" in ""|-*) ;; *) config="$1"; shift ;; esac
exec torchrun --nproc_per_node="${NPROC_PER_NODE:-1}" --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
    "$here/run.py" --config "$config" "$@"
