#!/usr/bin/env bash
# Runs every test: installs nats-server if missing (tests start their own
# servers on random ports) and Chromium (the chat page's tests drive it
# headless), then the whole workspace's tests.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/ensure-nats.sh
./scripts/ensure-chromium.sh
export PATH="$PATH:/usr/sbin"
if cargo nextest --version >/dev/null 2>&1; then
  exec cargo nextest run --workspace --locked --no-fail-fast "$@"
else
  exec cargo test --workspace --locked --no-fail-fast "$@"
fi
