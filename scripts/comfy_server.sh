# Serving a ComfyUI built by scripts/comfy_host.sh (0.3.75) or scripts/comfy_host_new.sh (0.33.0): start, check, stop.
# Sourced by both; they set COMFY (the ComfyUI folder), PY (its python), PORT, URL, STATE, HERE (this repository)
# and log(). See either script's header for the environment (COMFY_MOUNT_PACK, COMFY_MODELS, ...).

plain() { sed 's/\x1b\[[0-9;]*m//g'; }  # newer loggers write ANSI colours even into a file

start() {
  if [ -f "$STATE/server.pid" ] && kill -0 "$(cat "$STATE/server.pid")" 2>/dev/null; then
    log "already running (pid $(cat "$STATE/server.pid"), $URL)"; return 0
  fi
  [ -f "$COMFY/main.py" ] && [ -x "$PY" ] || { log "run '$0 setup' first"; return 1; }
  if curl -s -o /dev/null "$URL/"; then log "port $PORT already answers; stop that server or set COMFY_PORT"; return 1; fi
  mkdir -p "$STATE"/{user,output,temp,input}
  local t0=$SECONDS
  if [ "${COMFY_MOUNT_PACK:-0}" = 1 ]; then
    mkdir -p "$STATE/custom_nodes"
    ln -sfn "$HERE" "$STATE/custom_nodes/ComfyUI-ScaleKV"
    {
      echo "scalekv_pack:"
      echo "  custom_nodes: $STATE/custom_nodes"
      if [ -n "${COMFY_MODELS:-}" ]; then
        for key in infinity vae text_encoders scalekv; do echo "  $key: $COMFY_MODELS/$key"; done
      fi
    } > "$STATE/extra_model_paths.yaml"
    set -- --extra-model-paths-config "$STATE/extra_model_paths.yaml" "$@"
    log "mounting $HERE as custom_nodes/ComfyUI-ScaleKV${COMFY_MODELS:+ with models from $COMFY_MODELS}"
  fi
  # `cd X; cmd &` inside the subshell: $! is python's pid (with `cd X && cmd &` it would be a subshell's).
  (cd "$COMFY"; nohup "$PY" main.py --cpu --listen 127.0.0.1 --port "$PORT" --disable-auto-launch \
      --user-directory "$STATE/user" --output-directory "$STATE/output" --temp-directory "$STATE/temp" \
      --input-directory "$STATE/input" --database-url sqlite:///:memory: "$@" > "$STATE/server.log" 2>&1 &
   echo $! > "$STATE/server.pid")
  for _ in $(seq 1 240); do
    if curl -sf -o /dev/null "$URL/system_stats"; then
      log "server up on $URL after $((SECONDS - t0)) s (pid $(cat "$STATE/server.pid"), log $STATE/server.log)"
      return 0
    fi
    if ! kill -0 "$(cat "$STATE/server.pid")" 2>/dev/null; then
      log "server exited:"; plain < "$STATE/server.log" | tail -40 >&2; rm -f "$STATE/server.pid"; return 1
    fi
    sleep 0.5
  done
  log "no answer from $URL within 120 s"; plain < "$STATE/server.log" | tail -40 >&2; return 1
}

check() {
  local html
  html=$(curl -sf "$URL/") || true  # (not piped into grep -q: with pipefail, curl's SIGPIPE would fail the check)
  case "$html" in
    *"<title>ComfyUI</title>"*) log "GET / -> the ComfyUI frontend" ;;
    *) log "GET / did not return the ComfyUI frontend"; return 1 ;;
  esac
  curl -sf "$URL/object_info" | "$PY" -c '
import json, sys
info = json.load(sys.stdin)
ours = ", ".join(sorted(k for k in info if k.startswith(("Infinity", "ScaleKV")))) or "not loaded"
print(f"GET /object_info: {len(info)} node types; this pack: {ours}")'
  curl -sf "$URL/system_stats" | "$PY" -c '
import json, sys
s = json.load(sys.stdin)["system"]
print("ComfyUI", s["comfyui_version"], "| torch", s["pytorch_version"], "| frontend required",
      s.get("required_frontend_version"))'
  if grep -q "IMPORT FAILED" "$STATE/server.log"; then
    log "modules that did not import (optional comfy_extras whose extra deps are not installed):"
    plain < "$STATE/server.log" | grep "IMPORT FAILED" >&2 || true
  fi
}

stop() {
  [ -f "$STATE/server.pid" ] || return 0
  local pid
  pid=$(cat "$STATE/server.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
    log "stopped pid $pid"
  fi
  rm -f "$STATE/server.pid"
}

