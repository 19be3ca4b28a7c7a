#!/usr/bin/env bash
# Create or update a virtual environment with the engine's dependencies (idempotent).
#   scripts/setup_env.sh [VENV_DIR=.venv] [TORCH_VERSION=2.13.0]
# torch 2.13.0 is the CPU build; 2.14.1 is the CUDA build (it runs on CPU too).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
TORCH=${2:-2.13.0}
PY=${PYTHON:-python3}
log() { printf '[setup_env %s] %s\n' "$VENV" "$*" >&2; }
pipq() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither a file" >&2); }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
have=$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
if [ "$have" != "$TORCH" ]; then
  log "installing torch==$TORCH (found: ${have:-none})"
  pipq install "torch==$TORCH"
fi
if ! "$VENV/bin/python" -c 'import transformers, sentencepiece, safetensors, PIL, numpy, pytest' 2>/dev/null \
   || [ requirements-dev.txt -nt "$VENV/.deps-stamp" ]; then
  log "installing requirements-dev.txt"
  pipq install -r requirements-dev.txt
  touch "$VENV/.deps-stamp"
fi
"$VENV/bin/python" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")' >&2
