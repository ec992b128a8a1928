#!/bin/sh
# Prepare arrays and the LMDB index: sh data_prepare/run.sh [CONFIG] [-i IMAGES] [-l LABELS] [-u UNLABELED] [-o OUT]
# PYTHON names the interpreter that has flareseg (default python3), e.g. PYTHON=.venv/bin/python.
here=$(dirname "$0")
python=${PYTHON:-python3}
case "$1" in ""|-*) ;; *) config="$1"; shift; set -- --config "$config" "$@" ;; esac
if ! "$python" -c "import flareseg" 2>/dev/null; then
    echo "$0: '$python' cannot import flareseg; set PYTHON to the Python that has it (e.g. PYTHON=.venv/bin/python)" >&2
    exit 2
fi
exec "$python" "$here/run.py" "$@"
