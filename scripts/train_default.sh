#!/usr/bin/env bash
# Retrain the default model (default_model/{infinity,vae,text_encoders}) from scratch on the CPU, then measure
# its prompt following over 100 held-out captions and redraw the sample grid (the docs' one for default_model).
#   bash scripts/train_default.sh [OUT_DIR]      (default: default_model; 49 min alone on this 2-core machine, 120 min shared; docs/training.md)
# Same seed, torch version, thread count and CPU kernel set give the same weights (another CPU: another model).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-default_model}
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=.
"$PY" -m scalekv_core.training train --out "$OUT" --seed 0 --threads 1
"$PY" -m scalekv_core.training eval --model "$OUT" -n 100 --json "$OUT/infinity/infinity_shapes_eval.json"
# the docs' grid shows the committed model; a retrain elsewhere draws its grid in its own folder
if [ "$(realpath -m "$OUT")" = "$(realpath default_model)" ]; then GRID=docs/images/default_model_samples.png; else GRID=$OUT/samples.png; fi
"$PY" -m scalekv_core.training samples --model "$OUT" --out "$GRID"
