#!/usr/bin/env bash
# The run command (README): installs what is missing, builds, and brings the fabric up here,
# with a small demo VM (a Debian kernel and a busybox initramfs) whose disk is the demo volume.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. scripts/env.sh
cargo build --locked -p continuum
guest=$(./scripts/guest-image.sh)
exec "$CARGO_TARGET_DIR/debug/continuum" up --demo-vm-kernel "$guest/vmlinuz" --demo-vm-initrd "$guest/initrd.img" "$@"
