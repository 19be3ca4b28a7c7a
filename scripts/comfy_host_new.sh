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
# The venv gets what a user's ComfyUI has, so the tests see what users see: ComfyUI's own requirements.txt, this
# pack's requirements.txt and the test runner (pytest; the browser tests' playwright-core is an npm package,
# scripts/setup_browser.sh), at the newest versions the registry serves, and nothing else (no protobuf, no
# engine pins from requirements-dev.txt). Only torch* is held: torch==2.14.1 + torchvision==0.29.1, the CUDA builds
# from this machine's local wheels (they run with --cpu), and torchaudio 2.11.0 --no-deps (no declared torch pin,
# stable-ABI extension; 0.33's comfy/sd.py imports it unconditionally). Every later pip call is constrained to the
# installed torch* versions, so requirements.txt's bare torch lines can never swap a build.
# A venv that `setup` filled from another package set (its stamp differs) is deleted and rebuilt, so nothing from
# the old set stays behind.
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

# Besides ComfyUI's and the pack's requirements.txt: the test runner. No pins: the newest the registry serves.
TEST_DEPS=(pytest)

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

requirement_lines() {  # the requirement lines of the files given, without comments and blank lines
  sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$@" | grep -v '^$' || true
}

deps_stamp() {  # everything install_deps depends on; a change rebuilds the venv
  { printf '%s\n' "$TORCH_SPEC" "$TORCHAUDIO" "${TEST_DEPS[@]}"
    requirement_lines "$COMFY/requirements.txt" "$HERE/requirements.txt"; } | sha256sum | cut -c1-16
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
  log "installing ComfyUI's requirements.txt, the pack's requirements.txt, and ${TEST_DEPS[*]}" \
      "(held: $(paste -sd ' ' "$HOST_DIR/constraints.txt"))"
  pipq install -c "$HOST_DIR/constraints.txt" -r "$COMFY/requirements.txt" -r "$HERE/requirements.txt" "${TEST_DEPS[@]}"
}

setup() {
  local t0=$SECONDS stamp=$VENV/.scalekv-comfy-new-setup
  mkdir -p "$HOST_DIR"
  export_comfyui
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" != "$(deps_stamp)" ]; then
    log "$VENV was set up from another package set: deleting it, to rebuild it with only the current one"
    rm -rf "$VENV"
  fi
  if [ ! -x "$PY" ]; then
    log "creating the venv $VENV with $("$BASE_PY" --version)"
    "$BASE_PY" -m venv "$VENV"
  fi
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(deps_stamp)" ] && "$PY" -c \
      'import torch, torchvision, torchaudio, comfy_kitchen, comfy_aimdo, comfyui_frontend_package, sqlalchemy, av, pytest, sentencepiece, transformers' \
      2>/dev/null; then
    log "already set up ($((SECONDS - t0)) s): ComfyUI in $COMFY, python $PY"
    return 0
  fi
  rm -f "$stamp"
  install_deps
  # Fail here rather than at server start.
  "$PY" -c 'import torch, torchvision, torchaudio, comfy_kitchen, comfy_aimdo, comfyui_frontend_package, sqlalchemy, av, pytest
import importlib.metadata as m
def v(n):
    try: return m.version(n)
    except m.PackageNotFoundError: return "absent"
print("comfy host venv:", ", ".join(f"{n} {v(n)}" for n in ("torch", "torchvision", "torchaudio",
      "comfyui-frontend-package", "transformers", "tokenizers", "sentencepiece", "protobuf", "pytest")))' >&2
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
