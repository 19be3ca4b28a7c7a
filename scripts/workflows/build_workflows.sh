#!/usr/bin/env bash
# Regenerates the example workflows (workflows/*.json), their thumbnails (workflows/*.jpg) and their screenshots
# after a run (docs/images/workflow_*.jpg) in the real
# frontend: a headless ComfyUI 0.3.75 (frontend 1.32.9, scripts/comfy_host.sh) with this pack mounted, on a free
# port with its own state folder, and build_workflows.mjs in headless Chromium. The server is stopped on exit.
#
#   bash scripts/workflows/build_workflows.sh
#
# The graphs only name the model files; when default_model/ has no trained files yet, tiny stand-ins under the
# same names (tests/data/infinity-tiny) fill the loader's menus. Needs node, /usr/bin/chromium and playwright-core
# (in .browser/ or /tmp/pw; scripts/setup_browser.sh installs both when present).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"

work=$(mktemp -d /tmp/scalekv-workflows-XXXXXX)
export COMFY_STATE=$work/state COMFY_MOUNT_PACK=1
export COMFY_PORT=${COMFY_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
# the calibration workflow's run writes its budget file into the host's models/scalekv: not left behind
budget_files="${COMFY_HOST_DIR:-/tmp/scalekv-comfy}/ComfyUI/models/scalekv/scalekv_budget_256x256_10pct"
cleanup() { bash scripts/comfy_host.sh stop || true; rm -rf "$work" "$budget_files.json" "$budget_files.asi.json"; }
trap cleanup EXIT

if [ ! -f default_model/infinity/infinity_shapes.safetensors ]; then
  tiny=$ROOT/tests/data/infinity-tiny
  mkdir -p "$work"/default_model/{infinity,vae,text_encoders}
  ln -s "$tiny/infinity_tiny.safetensors" "$work/default_model/infinity/infinity_shapes.safetensors"
  ln -s "$tiny/vae_tiny.safetensors" "$work/default_model/vae/infinity_shapes_vae.safetensors"
  ln -s "$tiny/t5_tiny" "$work/default_model/text_encoders/t5_shapes"
  export SCALEKV_DEFAULT_MODEL_DIR=$work/default_model
  echo "[build_workflows] default_model/ has no trained files: tiny stand-ins fill the menus" >&2
fi
if [ ! -d .browser/node_modules/playwright-core ] && [ ! -d /tmp/pw/node_modules/playwright-core ] \
   && [ -z "${PLAYWRIGHT_DIR:-}" ] && [ -f scripts/setup_browser.sh ]; then
  bash scripts/setup_browser.sh
fi

bash scripts/comfy_host.sh setup
bash scripts/comfy_host.sh start
node scripts/workflows/build_workflows.mjs --url "http://127.0.0.1:$COMFY_PORT" --out "$ROOT/workflows"
# docs/images: each workflow after a run on the embedded model, as the template browser opens it (classic canvas)
PLAYWRIGHT_CORE_DIR=${PLAYWRIGHT_CORE_DIR:-$ROOT/.browser/node_modules} \
  node tests/browser/workflow_check.mjs --url "http://127.0.0.1:$COMFY_PORT" --out "$work/shots" --modes classic >/dev/null
"${COMFY_VENV:-${COMFY_HOST_DIR:-/tmp/scalekv-comfy}/venv}/bin/python" - "$work/shots" "$ROOT/docs/images" <<'PY'
import pathlib, sys
from PIL import Image
shots, docs = map(pathlib.Path, sys.argv[1:])
for shot in sorted(shots.glob("classic_*.png")):
    image = Image.open(shot).convert("RGB")
    image = image.resize((1260, round(image.height * 1260 / image.width)), Image.LANCZOS)
    name = shot.stem.removeprefix("classic_")
    image.save(docs / f"workflow_{name}.jpg", quality=80, optimize=True)
    print(f"wrote docs/images/workflow_{name}.jpg")
PY
