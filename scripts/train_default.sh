#!/usr/bin/env bash
# Retrain the default model (default_model/{infinity,vae,text_encoders}) from scratch on the CPU, then measure
# its prompt following over 100 held-out captions and redraw the sample grid in the docs.
#   bash scripts/train_default.sh [OUT_DIR]      (default: default_model; 75-120 min on one core of this 2-core machine, see docs/training.md)
# Same seed, torch version and thread count give the same weights.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-default_model}
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=.
"$PY" -m scalekv_core.training train --out "$OUT" --seed 0 --threads 1
"$PY" -m scalekv_core.training eval --model "$OUT" -n 100 --json "$OUT/infinity/infinity_shapes_eval.json"
"$PY" -m scalekv_core.training samples --model "$OUT" --out docs/images/default_model_samples.png
