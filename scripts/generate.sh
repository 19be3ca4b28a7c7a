#!/usr/bin/env bash
# The main job from a fresh clone: set up .venv and generate an image with the command-line generator
# on the tiny reference model shipped in tests/data (real weights go in the same flags), with ScaleKV at 10%,
# writing out/image.png, out/memory_report.json and the per-scale arrays in out/dump/.
#   scripts/generate.sh [extra generate flags, e.g. --prompt "..." --seed 3]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh .venv 2.13.0
M=tests/data/infinity-tiny
.venv/bin/python -m scalekv_core generate \
  --transformer "$M/infinity_tiny.safetensors" --vae "$M/vae_tiny.safetensors" --text-encoder "$M/t5_tiny" \
  --prompt "a red apple on a wooden table" --seed 0 --cfg 3 --tau 0.5 --width 256 --height 256 \
  --kv-policy scalekv --budget 10% --memory-report out/memory_report.json \
  --out out/image.png --dump out/dump "$@"
