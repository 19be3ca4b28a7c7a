#!/usr/bin/env bash
# A real, headless ComfyUI of the current series (checked with 0.33.0), built from a local git snapshot of
# ComfyUI, for running this pack's node tests on what users run today. Sibling of scripts/comfy_host.sh
# (0.3.75, what CI installs): same verbs and environment style, its own folder and port, so both can run at once.
#
#   COMFY_SRC=/work/.mirror/yzkee+ComfyUI/repo bash scripts/comfy_host_new.sh setup
#   bash scripts/comfy_host_new.sh start [ARGS..]  # serve it in the background (ARGS go to main.py), wait for it
#   bash scripts/comfy_host_new.sh check           # GET /, /object_info and /system_stats of the running server
#   bash scripts/comfy_host_new.sh stop            # stop the server `start` launched (by its pid file)
#
# Node tests on it:
#   SCALEKV_COMFYUI=/tmp/scalekv-comfy-new/ComfyUI /tmp/scalekv-comfy-new/venv/bin/python -m pytest tests/comfy -q -x
#
# `setup` exports the tree at COMFY_REF from COMFY_SRC (a bare git dir is fine). A partial mirror may lack a few
# large blobs (the 0.33.0 snapshot lacks two tokenizer files that only two text encoders read), which makes
# `git archive` fail; the export then goes file by file and lists what it skipped in ComfyUI/.missing_files.
# `setup` is idempotent: a second run checks the exported commit and the installed set and installs nothing.
#
# torch: the CUDA build torch==2.14.1 + torchvision==0.29.1 from this machine's local wheels (they run with --cpu);
# every later pip call is constrained to the installed torch versions, so nothing can pull another torch build.
# torchaudio 2.11.0 (PyPI's last, no declared torch pin, stable-ABI extension) is needed: 0.33's comfy/sd.py
# imports it unconditionally. Besides torch, only what main.py imports on its way to a listening server, the
# frontend, comfy-kitchen and comfy-aimdo its requirements.txt pins, and the pack's engine/test pins
# (requirements-dev.txt: transformers, sentencepiece, protobuf, safetensors, numpy, pillow, pytest), as on 0.3.75.
#
# With COMFY_MOUNT_PACK=1, `start` loads this repository as a custom node pack without copying it (a symlink in
# $COMFY_STATE/custom_nodes named by a generated --extra-model-paths-config yaml, which also points the model
# folders at COMFY_MODELS if set: its infinity/, vae/, text_encoders/, scalekv/).
#
# Environment (defaults):
#   COMFY_SRC=                            (setup) git dir of a ComfyUI clone or mirror, or a plain source tree
#   COMFY_REF=HEAD                        commit/tag to export from a git COMFY_SRC
#   COMFY_HOST_DIR=/tmp/scalekv-comfy-new ComfyUI lands in $COMFY_HOST_DIR/ComfyUI
#   COMFY_VENV=$COMFY_HOST_DIR/venv       its Python environment (outside the repository)
#   COMFY_TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
#   COMFY_TORCHAUDIO=2.11.0
#   COMFY_PORT=8198                       `start` listens on 127.0.0.1 only
#   COMFY_STATE=$COMFY_HOST_DIR/state     user/output/temp/input folders, server.log, server.pid
#   COMFY_MOUNT_PACK=0                    1: `start` loads this pack (see above)
#   COMFY_MODELS=                         with COMFY_MOUNT_PACK=1: a models folder for the pack's files
#   PYTHON=python3                        the interpreter that makes the venv
set -euo pipefail

HOST_DIR=${COMFY_HOST_DIR:-/tmp/scalekv-comfy-new}
VENV=${COMFY_VENV:-$HOST_DIR/venv}
SRC=${COMFY_SRC:-}
REF=${COMFY_REF:-HEAD}
TORCH_SPEC=${COMFY_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
TORCHAUDIO=${COMFY_TORCHAUDIO:-2.11.0}
PORT=${COMFY_PORT:-8198}
STATE=${COMFY_STATE:-$HOST_DIR/state}
BASE_PY=${PYTHON:-python3}
COMFY=$HOST_DIR/ComfyUI
PY=$VENV/bin/python
URL=http://127.0.0.1:$PORT
HERE=$(cd "$(dirname "$0")/.." && pwd)

log() { printf '[comfy_host_new %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
pipq() {  # quiet pip; drop the harmless notes about this machine's local wheel folders
  "$PY" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither a file" >&2)
}

# Imported by main.py before it listens (each one fails the start when missing), besides torch*, the frontend,
# comfy-kitchen and comfy-aimdo, whose exact pins come from the snapshot's requirements.txt.
COMFY_DEPS=(numpy einops 'transformers>=4.50.3' 'tokenizers>=0.13.3' 'safetensors>=0.4.2' 'aiohttp>=3.11.8'
            'yarl>=1.18.0' pyyaml Pillow scipy tqdm psutil torchsde 'av>=16.0.0' 'SQLAlchemy>=2.0.0' requests filelock)
PINNED=(comfyui-frontend-package comfy-kitchen comfy-aimdo)

src_commit() {  # the commit to export, or "plain-dir" for a source tree
  if [ -f "$SRC/main.py" ]; then echo plain-dir; else git -C "$SRC" rev-parse --verify "$REF^{commit}"; fi
}

export_blobs() {  # $1 commit, $2 destination: one file at a time, skipping blobs the mirror does not have
  local commit=$1 dst=$2 meta path mode type sha
  : > "$dst/.missing_files"
  while IFS=$'\t' read -r -d '' meta path; do
    read -r mode type sha <<< "$meta"
    [ "$type" = blob ] || continue
    mkdir -p "$dst/$(dirname "$path")"
    if [ "$mode" = 120000 ]; then
      ln -s "$(git -C "$SRC" cat-file blob "$sha")" "$dst/$path"
    elif git -C "$SRC" cat-file blob "$sha" > "$dst/$path" 2>/dev/null; then
      if [ "$mode" = 100755 ]; then chmod +x "$dst/$path"; fi
    else
      rm -f "$dst/$path"
      echo "$path" >> "$dst/.missing_files"
    fi
  done < <(git -C "$SRC" ls-tree -r -z "$commit")
}

export_comfyui() {
  local want have
  if [ -z "$SRC" ]; then
    [ -f "$COMFY/main.py" ] && return 0
    log "set COMFY_SRC to a ComfyUI git dir (e.g. /work/.mirror/yzkee+ComfyUI/repo) or source tree"; return 1
  fi
  want=$(src_commit)
  have=$(cat "$COMFY/.comfy_src_commit" 2>/dev/null || true)
  if [ -f "$COMFY/main.py" ] && [ "$want" = "$have" ] && [ "$want" != plain-dir ]; then return 0; fi
  local tmp=$HOST_DIR/_export
  rm -rf "$tmp" && mkdir -p "$tmp"
  log "exporting ComfyUI $REF ($want) from $SRC"
  if [ "$want" = plain-dir ]; then
    (cd "$SRC" && tar --exclude=.git -cf - .) | tar -xf - -C "$tmp"
  elif ! git -C "$SRC" archive "$want" 2>/dev/null | tar -xf - -C "$tmp" 2>/dev/null; then
    log "git archive failed (blobs absent from the mirror?); exporting file by file"
    find "$tmp" -mindepth 1 -delete
    export_blobs "$want" "$tmp"
    if [ -s "$tmp/.missing_files" ]; then log "absent from the mirror, skipped: $(tr '\n' ' ' < "$tmp/.missing_files")"; fi
  fi
  [ -f "$tmp/main.py" ] || { log "no main.py in the export of $SRC at $REF"; return 1; }
  echo "$want" > "$tmp/.comfy_src_commit"
  rm -rf "$COMFY" && mv "$tmp" "$COMFY"  # only a complete tree gets the final name
  log "ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFY/comfyui_version.py") in $COMFY ($(du -sh "$COMFY" | cut -f1))"
}

deps_stamp() {  # everything install_deps depends on; a change redoes it
  printf '%s\n' "$TORCH_SPEC" "$TORCHAUDIO" "${COMFY_DEPS[@]}" | cat - "$COMFY/requirements.txt" "$HERE/requirements-dev.txt" \
    | sha256sum | cut -c1-16
}

install_deps() {
  local want_torch have_torch
  want_torch=$(sed -n 's/.*torch==\([^ ]*\).*/\1/p' <<< "$TORCH_SPEC")
  have_torch=$("$PY" -c 'import importlib.metadata as m; print(m.version("torch").split("+")[0])' 2>/dev/null || true)
  if [ "$have_torch" != "$want_torch" ]; then
    log "installing $TORCH_SPEC (local CUDA wheels that run on CPU; found: ${have_torch:-none})"
    # shellcheck disable=SC2086
    pipq install $TORCH_SPEC
  fi
  if ! "$PY" -m pip show -q torchaudio >/dev/null 2>&1; then
    log "installing torchaudio==$TORCHAUDIO without deps (0.33's comfy/sd.py imports it at startup)"
    pipq install --no-deps "torchaudio==$TORCHAUDIO"
  fi
  # Freeze torch* at what is installed: requirements-style bare `torch` lines can then never swap the build.
  "$PY" -c 'import importlib.metadata as m
for n in ("torch", "torchvision", "torchaudio"): print(f"{n}=={m.version(n)}")' > "$HOST_DIR/constraints.txt"
  local pins=() name line
  for name in "${PINNED[@]}"; do
    line=$(grep -E "^$name==" "$COMFY/requirements.txt" || true)
    pins+=("${line:-$name}")
  done
  log "installing ComfyUI's startup imports, ${pins[*]}, and requirements-dev.txt"
  pipq install -c "$HOST_DIR/constraints.txt" -r "$HERE/requirements-dev.txt" "${COMFY_DEPS[@]}" "${pins[@]}"
}

setup() {
  local t0=$SECONDS stamp
  mkdir -p "$HOST_DIR"
  export_comfyui
  if [ ! -x "$PY" ]; then
    log "creating the venv $VENV with $("$BASE_PY" --version)"
    "$BASE_PY" -m venv "$VENV"
  fi
  stamp=$VENV/.scalekv-comfy-new-setup
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(deps_stamp)" ] && "$PY" -c \
      'import torch, torchvision, torchaudio, comfy_kitchen, comfy_aimdo, comfyui_frontend_package, sqlalchemy, av, pytest, sentencepiece' \
      2>/dev/null; then
    log "already set up ($((SECONDS - t0)) s): ComfyUI in $COMFY, python $PY"
    return 0
  fi
  rm -f "$stamp"
  install_deps
  # Fail here rather than at server start.
  "$PY" -c 'import torch, torchvision, torchaudio, comfy_kitchen, comfy_aimdo, comfyui_frontend_package, sqlalchemy, av, pytest
import importlib.metadata as m
print("comfy host venv:", ", ".join(f"{n} {m.version(n)}" for n in ("torch", "torchvision", "torchaudio",
      "comfyui-frontend-package", "transformers")))' >&2
  deps_stamp > "$stamp"
  log "setup done in $((SECONDS - t0)) s: ComfyUI in $COMFY ($(du -sh "$COMFY" | cut -f1)), venv $VENV ($(du -sh "$VENV" | cut -f1))"
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
