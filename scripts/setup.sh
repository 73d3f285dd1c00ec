#!/usr/bin/env bash
# Installs the system packages Continuum builds and tests with (Debian 12). Idempotent.
set -euo pipefail
need=()
for pkg in protobuf-compiler clang libclang-dev etcd-server etcd-client iproute2 util-linux libisal-dev; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
