#!/usr/bin/env bash
# The test command (README): installs what is missing, builds once, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. scripts/env.sh
export CONTINUUM_SIM_SEEDS="${CONTINUUM_SIM_SEEDS:-300}"
cargo build --locked --workspace --all-targets
cargo test --locked --workspace --all-targets -- --test-threads=2
