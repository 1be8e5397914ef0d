#!/usr/bin/env bash
# Installs nats-server (Debian package) when it is not on PATH.
set -euo pipefail
if command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]; then
  exit 0
fi
echo "nats-server not found: installing the Debian package nats-server" >&2
exec "$(dirname "$0")/apt-install.sh" nats-server
