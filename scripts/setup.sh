#!/usr/bin/env bash
# Installs the system packages Continuum builds and tests with (Debian 12). Idempotent.
set -euo pipefail
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
need=()
for pkg in protobuf-compiler clang libclang-dev etcd-server etcd-client iproute2 util-linux libisal-dev \
           libnbd-bin python3-libnbd fio nbdkit openssl cpio nftables \
           wireguard-go wireguard-tools iperf3 iputils-ping curl; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
updated=""
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  $SUDO apt-get update -qq; updated=1
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
# QEMU: qemu-system-x86 must come with the qemu-utils of the same release. The machine may have
# a newer backported qemu-utils preinstalled, which blocks qemu-system-x86; install both at the
# system package's version in one command.
if ! command -v qemu-system-x86_64 >/dev/null; then
  [ -n "$updated" ] || $SUDO apt-get update -qq
  ver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
  echo "installing: qemu-system-x86 qemu-utils $ver"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends --allow-downgrades \
    "qemu-system-x86=$ver" "qemu-utils=$ver"
fi
