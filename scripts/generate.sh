#!/usr/bin/env bash
# The main job from a fresh clone, through ComfyUI: set up the ComfyUI host (scripts/comfy_host.sh setup:
# ComfyUI 0.3.75 and its venv), start it headless with this pack mounted on a free port, run the example workflow
# workflows/scalekv_text_to_image.json (ScaleKV at 10%) through scripts/run_workflow.py on the embedded default
# model (default_model/), and write out/image.png and out/memory_report.json. The server is stopped on exit,
# also when something fails.
#
#   bash scripts/generate.sh [--prompt "a small yellow star at the center on a black background"] [--seed 7]
#                            [--negative-prompt TEXT] [--out DIR (default: out)]
#
# Environment: COMFY_PORT (default: a free port), SCALEKV_DEFAULT_MODEL_DIR (another folder with default_model/'s
# layout), and scripts/comfy_host.sh's COMFY_HOST_DIR / COMFY_VENV.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORKFLOW=workflows/scalekv_text_to_image.json
OUT=$ROOT/out

overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --prompt|--negative-prompt|--seed|--out)
      [ $# -ge 2 ] || { echo "generate.sh: $1 needs a value" >&2; exit 2; }
      if [ "$1" = --out ]; then case $2 in /*) OUT=$2 ;; *) OUT=$PWD/$2 ;; esac; else overrides+=("$1" "$2"); fi
      shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "generate.sh: unknown argument '$1' (accepted: --prompt, --negative-prompt, --seed, --out)" >&2; exit 2 ;;
  esac
done
[ -n "${SCALEKV_DEFAULT_MODEL_DIR:-}" ] || unset SCALEKV_DEFAULT_MODEL_DIR  # empty would register no model at all
model=${SCALEKV_DEFAULT_MODEL_DIR:-$ROOT/default_model}
case $model in /*) ;; *) model=$PWD/$model ;; esac
cd "$ROOT"

for f in infinity/infinity_shapes.safetensors vae/infinity_shapes_vae.safetensors text_encoders/t5_shapes/config.json; do
  if [ ! -e "$model/$f" ]; then
    echo "generate.sh: the embedded default model is incomplete: $model/$f is missing (see default_model/README.md;" \
         "bash scripts/train_default.sh retrains it)" >&2
    exit 1
  fi
done

bash scripts/comfy_host.sh setup
VENV=${COMFY_VENV:-${COMFY_HOST_DIR:-/tmp/scalekv-comfy}/venv}
work=$(mktemp -d /tmp/scalekv-generate-XXXXXX)
export COMFY_STATE=$work/state COMFY_MOUNT_PACK=1
export COMFY_PORT=${COMFY_PORT:-$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
[ -z "${SCALEKV_DEFAULT_MODEL_DIR:-}" ] || export SCALEKV_DEFAULT_MODEL_DIR=$model  # absolute: the server runs elsewhere
cleanup() {
  local rc=$?
  if [ "$rc" != 0 ] && [ -f "$COMFY_STATE/server.log" ]; then
    echo "generate.sh: failed; the server log ends with:" >&2
    tail -25 "$COMFY_STATE/server.log" >&2
  fi
  bash scripts/comfy_host.sh stop || true
  rm -rf "$work"
}
trap cleanup EXIT

bash scripts/comfy_host.sh start
"$VENV/bin/python" scripts/run_workflow.py "$WORKFLOW" --url "http://127.0.0.1:$COMFY_PORT" --out "$work/run" \
  ${overrides[@]+"${overrides[@]}"} > "$work/summary.json"

mkdir -p "$OUT"
"$VENV/bin/python" - "$work/summary.json" "$OUT" <<'EOF'
import json, shutil, sys
summary, out = json.load(open(sys.argv[1])), sys.argv[2]
images, reports = summary["images"], summary["memory_reports"]
if len(images) != 1 or len(reports) != 1:
    sys.exit(f"generate.sh: expected one image and one memory report, got {len(images)} and {len(reports)}")
shutil.copyfile(images[0]["path"], f"{out}/image.png")
shutil.copyfile(reports[0]["path"], f"{out}/memory_report.json")
r = json.load(open(f"{out}/memory_report.json"))
peak = r.get("measured_peak_mb")
print(f"wrote {out}/image.png and {out}/memory_report.json: {r['policy']['policy']} {r['policy']['budget']}, "
      f"KV cache {r['analytic_mb']:.3f} MB of {r['full_analytic_mb']:.3f} MB full ({100 * r['stored_ratio']:.1f}%)"
      + (f", measured peak {peak:.1f} MB" if peak is not None else ""))
EOF
