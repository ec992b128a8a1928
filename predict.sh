#!/bin/sh
# Inference: sh predict.sh INPUT_DIR OUTPUT_DIR [CONFIG] [--set KEY=VALUE ...]
# Every <case>_0000.nii.gz (or .nii/.nrrd/.mha, or DICOM series folder) in INPUT_DIR -> OUTPUT_DIR/<case>.nii.gz.
here=$(dirname "$0")
if [ $# -lt 2 ]; then
    echo "usage: sh predict.sh INPUT_DIR OUTPUT_DIR [CONFIG] [--set KEY=VALUE ...]" >&2
    exit 2
fi
input="$1"; output="$2"; shift 2
config="$here/configs/predict.yaml"
case "$1" in ""|-*) ;; *) config="$1"; shift ;; esac
exec flareseg predict -i "$input" -o "$output" --config "$config" "$@"
