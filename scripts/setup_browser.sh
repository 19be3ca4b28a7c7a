#!/usr/bin/env bash
# What the real-browser test (tests/comfy/test_comfy_browser.py) needs: Chromium and playwright-core. Idempotent:
# a second run finds both and installs nothing.
#
#   bash scripts/setup_browser.sh
#
# Chromium comes from the system's packages (Debian/Ubuntu `chromium`, apt-get as root or through sudo), unless
# $CHROMIUM or /usr/bin/chromium already runs. playwright-core (the library only: it drives that Chromium and never
# downloads a browser of its own) goes into .browser/node_modules, outside web/ so ComfyUI never serves it.
# Environment: CHROMIUM=/usr/bin/chromium, PLAYWRIGHT_CORE_VERSION=1.65.1.
set -euo pipefail
cd "$(dirname "$0")/.."

CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
VERSION=${PLAYWRIGHT_CORE_VERSION:-1.65.1}
DIR=.browser

log() { printf '[setup_browser] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else log "need root to run: $*"; return 1
  fi
}

apt_install() {
  command -v apt-get >/dev/null 2>&1 || { log "no apt-get here: install $* yourself"; return 1; }
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if [ -x "$CHROMIUM" ] && "$CHROMIUM" --version >/dev/null 2>&1; then
  log "chromium: $("$CHROMIUM" --version 2>/dev/null)"
else
  log "installing chromium (apt)"
  apt_install chromium
  "$CHROMIUM" --version >/dev/null || { log "chromium still not runnable at $CHROMIUM"; exit 1; }
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  log "installing nodejs and npm (apt)"
  apt_install nodejs npm
fi

installed=$(node -p "try { require('./$DIR/node_modules/playwright-core/package.json').version } catch { '' }" 2>/dev/null || true)
if [ "$installed" = "$VERSION" ]; then
  log "playwright-core $VERSION in $DIR/node_modules"
else
  log "installing playwright-core $VERSION into $DIR/"
  mkdir -p "$DIR"
  [ -f "$DIR/package.json" ] || printf '{"name": "scalekv-browser-test", "private": true}\n' > "$DIR/package.json"
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$DIR" --no-audit --no-fund --loglevel=error \
    "playwright-core@$VERSION"
fi
