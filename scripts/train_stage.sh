#!/bin/sh
# Train one stage, as coarse_seg/run.sh and fine_seg/run.sh do:
#   sh scripts/train_stage.sh SCRIPT DEFAULT_CONFIG RUN_PY [CONFIG] [--set KEY=VALUE ...]
# PYTHON names the interpreter that has flareseg (default python3), e.g. PYTHON=.venv/bin/python: the virtual
# environment need not be activated. One command from a laptop to a cluster: torchrun reads from the environment
#   NPROC_PER_NODE (processes per node, default 1), NNODES (default 1), NODE_RANK (default 0),
#   MASTER_ADDR (default 127.0.0.1), MASTER_PORT (default 29500).
script=$1 config=$2 run=$3
shift 3
python=${PYTHON:-python3}
case "$1" in ""|-*) ;; *) config="$1"; shift ;; esac
if ! "$python" -c "import flareseg" 2>/dev/null; then
    echo "$script: '$python' cannot import flareseg; set PYTHON to the Python that has it (e.g. PYTHON=.venv/bin/python)" >&2
    exit 2
fi
if [ "${NPROC_PER_NODE:-1}" = 1 ] && [ "${NNODES:-1}" = 1 ]; then
    # one process: no launcher between this shell and the trainer (signals reach it, errors stay one line)
    exec "$python" "$run" --config "$config" "$@"
fi
export FLARESEG_LAUNCHER_PID=$$  # exec keeps this process id: the trainers die with torchrun
exec "$python" -m torch.distributed.run --nproc_per_node="${NPROC_PER_NODE:-1}" --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
    "$run" --config "$config" "$@"
