#!/usr/bin/env bash
# The run command (README): installs what is missing, builds, and brings the fabric up here.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. scripts/env.sh
cargo build --locked -p continuum
exec "$CARGO_TARGET_DIR/debug/continuum" up "$@"
