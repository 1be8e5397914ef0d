#!/usr/bin/env bash
# Installs Chromium (Debian package) when no browser is found: the chat
# page's tests drive it headless. CHROMIUM_BIN names another browser.
set -euo pipefail
if [ -n "${CHROMIUM_BIN:-}" ] || command -v chromium >/dev/null 2>&1 \
  || command -v chromium-browser >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1; then
  exit 0
fi
echo "chromium not found: installing the Debian package chromium (for the chat page's browser tests)" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium >/dev/null
