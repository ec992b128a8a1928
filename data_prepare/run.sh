#!/bin/sh
# Prepare arrays and the LMDB index: sh data_prepare/run.sh [-i IMAGES] [-l LABELS] [-u UNLABELED] [-o OUT] [--config FILE]
exec python "$(dirname "$0")/run.py" "$@"
