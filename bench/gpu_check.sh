#!/bin/sh
# The GPU machine's check, one call of at most 8 minutes: bash bench/gpu_check.sh OUT_DIR [--cpu-dry-run]
# (--only STEP[,STEP] and --fail STEP as bench/gpu_check.py says). Writes OUT_DIR/gpu_check.json and one log per
# step; the exit status is 1 when a step failed or ran out of time. PYTHON names the interpreter (default python3).
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
