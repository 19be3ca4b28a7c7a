#!/usr/bin/env bash
# The whole test suite from a fresh clone: builds the environments it needs, then runs every test.
#   1. .venv with torch 2.13.0 (CPU): every test.
#   2. .venv-torch2.14 with torch 2.14.1: the parity tests again, plus a check that both torch versions
#      decode the reference cases within 1.4e-5 of each other.
#   3. a real ComfyUI 0.3.75 with its own venv (scripts/comfy_host.sh, installed as users install it: ComfyUI's
#      requirements.txt, the pack's, pytest): the node tests in tests/comfy; then the browser tests again on the
#      newest frontend from the registry (comfyui-frontend-package, SCALEKV_FRONTEND_VERSION, --front-end-root).
#   4. the same ComfyUI as a server with the pack mounted, driven over loopback from .venv (hypothesis is a test
#      dependency of the engine venv, not of ComfyUI's): fuzz, soak and interrupt tests in tests/server.
# Extra arguments go to the first pytest run. SCALEKV_SKIP_TORCH_MATRIX=1 skips step 2, SCALEKV_SKIP_COMFY=1 steps
# 3 and 4.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=out/test
rm -rf "$OUT" && mkdir -p "$OUT"
bash scripts/setup_env.sh .venv 2.13.0
SCALEKV_PARITY_DUMP="$OUT/torch-2.13.0" .venv/bin/python -m pytest tests "$@"
if [ "${SCALEKV_SKIP_TORCH_MATRIX:-0}" != 1 ]; then
  bash scripts/setup_env.sh .venv-torch2.14 2.14.1
  SCALEKV_PARITY_DUMP="$OUT/torch-2.14.1" SCALEKV_COMPARE_WITH="$OUT/torch-2.13.0" \
    .venv-torch2.14/bin/python -m pytest tests/test_parity.py -rA -q
fi
if [ "${SCALEKV_SKIP_COMFY:-0}" != 1 ]; then
  export COMFY_HOST_DIR=${COMFY_HOST_DIR:-/tmp/scalekv-comfy}
  export COMFY_VENV=${COMFY_VENV:-$COMFY_HOST_DIR/venv}
  bash scripts/comfy_host.sh setup
  bash scripts/setup_browser.sh  # chromium + playwright-core for tests/comfy/test_comfy_browser.py
  SCALEKV_COMFYUI="$COMFY_HOST_DIR/ComfyUI" "$COMFY_VENV/bin/python" -m pytest tests/comfy -q
  # the browser tests again on the newest frontend from the registry, served with --front-end-root (downloaded,
  # never installed into ComfyUI's venv)
  FRONTEND_VERSION=${SCALEKV_FRONTEND_VERSION:-1.58.1}
  frontend=$OUT/frontend-$FRONTEND_VERSION
  "$COMFY_VENV/bin/python" -m pip download -q --no-deps -d "$frontend" "comfyui-frontend-package==$FRONTEND_VERSION"
  "$COMFY_VENV/bin/python" -m zipfile -e "$frontend"/comfyui_frontend_package-*.whl "$frontend/unpacked"
  SCALEKV_FRONT_END_ROOT="$PWD/$frontend/unpacked/comfyui_frontend_package/static" \
    SCALEKV_COMFYUI="$COMFY_HOST_DIR/ComfyUI" "$COMFY_VENV/bin/python" -m pytest -q \
    tests/comfy/test_comfy_browser.py tests/comfy/test_comfy_workflow_browser.py
  SCALEKV_SERVER_TESTS=1 SCALEKV_COMFYUI="$COMFY_HOST_DIR/ComfyUI" SCALEKV_COMFY_PYTHON="$COMFY_VENV/bin/python" \
    .venv/bin/python -m pytest tests/server -q
fi
