#!/usr/bin/env bash
# Quick start: installs nats-server if missing, builds harnessgate and runs
# the whole stack (NATS with JetStream, bridge, web chat on :8080).
# Extra arguments go to `harnessgate up` (for example --config my.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/ensure-nats.sh
# Debian installs nats-server into /usr/sbin, which a normal user's PATH may lack.
export PATH="$PATH:/usr/sbin"
exec cargo run --release --locked -p harnessgate -- up "$@"
