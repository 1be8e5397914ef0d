#!/usr/bin/env bash
# Installs Chromium (Debian package) when no browser is found: the chat
# page's tests drive it headless. CHROMIUM_BIN names another browser.
set -euo pipefail
if [ -n "${CHROMIUM_BIN:-}" ]; then
  exit 0
fi
for browser in chromium chromium-browser google-chrome; do
  if command -v "$browser" >/dev/null 2>&1; then exit 0; fi
done
echo "chromium not found: installing the Debian package chromium (for the chat page's browser tests)" >&2
exec "$(dirname "$0")/apt-install.sh" chromium
