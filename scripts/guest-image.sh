#!/usr/bin/env bash
# Builds the tiny test guest used by the VM tests: a Debian kernel and a busybox initramfs
# whose /init loads the virtio modules (in dependency order), runs the action given on the
# kernel command line, prints CONTINUUM-GUEST-DONE and powers off.
#
#   continuum.act=write:WORD  writes "MARKER:WORD" at sector 2048 of /dev/vda (fsync)
#   continuum.act=read        prints "READ MARKER:..." from sector 2048 of /dev/vda
#   continuum.act=readwrite:WORD  both: prints what is there, then writes "MARKER:WORD"
#   continuum.act=writeloop:N writes block i ("BLOCK:i") at sector 4096+i for i = 1..N, 0.1 s
#                             apart (prints "W i" every 10, "IOERR i" if a write fails), then
#                             drops the page cache, reads them all back: "VERIFIED bad=0|1"
#   continuum.hold            after the action, stays up (prints HOLDING) instead of powering off
#   ip=ADDR::GW:MASK::eth0:off  configures the virtio NIC (what `continuum agent` passes for a
#                             VM with --nic); prints "NET eth0 ADDR"
#   continuum.ping=IP         after the network is up, pings IP until it answers (up to 120 s):
#                             "PING OK IP" or "PING FAILED IP"
#
# Usage: scripts/guest-image.sh [OUT_DIR]   (default /var/cache/continuum-guest; cached)
set -euo pipefail
out=${1:-/var/cache/continuum-guest}
# Bump when /init below changes: a cached image of another version is rebuilt.
version=4
cached() { [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ] && [ "$(cat "$out/version" 2>/dev/null)" = "$version" ]; }
if cached; then echo "$out"; exit 0; fi
# Tests running at once build it once: the others wait for the lock and find it cached.
mkdir -p "$(dirname "$out")"
exec 9>"$out.lock"
flock 9
if cached; then echo "$out"; exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' | sort -V | tail -1)
[ -n "$pkg" ] || { echo "no linux-image-6.1.0-*-amd64 package in apt's lists (apt-get update?)" >&2; exit 1; }
apt-get download "$pkg" busybox-static >/dev/null 2>&1 || apt-get download "$pkg" busybox-static
dpkg-deb -x linux-image-*.deb k
dpkg-deb -x busybox-static_*.deb bb
kver=$(ls k/lib/modules)
mkdir -p root/bin root/proc root/sys root/dev root/lib/modules
cp bb/bin/busybox root/bin/busybox
for m in drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_modern_dev \
         drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci drivers/block/virtio_blk \
         drivers/net/virtio_net; do
  f="k/lib/modules/$kver/kernel/$m.ko"
  if [ -f "$f" ]; then cp "$f" root/lib/modules/; elif [ -f "$f.xz" ]; then xz -dc "$f.xz" > "root/lib/modules/$(basename "$m").ko"; fi
done
# net_failover and failover are virtio_net's dependencies.
for m in net/core/failover drivers/net/net_failover; do
  f="k/lib/modules/$kver/kernel/$m.ko"; [ -f "$f" ] && cp "$f" root/lib/modules/
done
cat > root/init <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk failover net_failover virtio_net; do
  [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko 2>/dev/null
done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
ipconf=$(sed -n 's/.*[[:space:]]ip=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$ipconf" ]; then
  addr=$(echo "$ipconf" | cut -d: -f1); gw=$(echo "$ipconf" | cut -d: -f3)
  mask=$(echo "$ipconf" | cut -d: -f4); dev=$(echo "$ipconf" | cut -d: -f6)
  i=0; while [ ! -e /sys/class/net/${dev:-eth0} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  ifconfig lo up
  ifconfig "${dev:-eth0}" "$addr" netmask "$mask" up && route add default gw "$gw" \
    && echo "NET ${dev:-eth0} $addr" || echo "NET FAILED"
fi
peer=$(sed -n 's/.*continuum\.ping=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$peer" ]; then
  i=0; ok=0
  while [ $i -lt 120 ]; do
    if ping -c 1 -W 1 "$peer" >/dev/null 2>&1; then ok=1; break; fi
    i=$((i+1))
  done
  [ $ok = 1 ] && echo "PING OK $peer" || echo "PING FAILED $peer"
fi
act=$(sed -n 's/.*continuum\.act=\([^ ]*\).*/\1/p' /proc/cmdline)
case "$act" in
  write:*) w=${act#write:}
           printf 'MARKER:%s\n' "$w" | dd of=/dev/vda bs=512 seek=2048 conv=fsync,sync 2>/dev/null
           sync; echo "WROTE MARKER:$w" ;;
  writeloop:*) n=${act#writeloop:}; i=1
           while [ $i -le $n ]; do
             printf 'BLOCK:%08d\n' $i | dd of=/dev/vda bs=512 seek=$((4096+i)) conv=fsync,sync 2>/dev/null || echo "IOERR $i"
             [ $((i % 10)) = 0 ] && echo "W $i"
             i=$((i+1)); sleep 0.1
           done
           sync; echo 3 > /proc/sys/vm/drop_caches
           bad=0; j=1
           while [ $j -le $n ]; do
             got=$(dd if=/dev/vda bs=512 skip=$((4096+j)) count=1 2>/dev/null | head -n 1)
             [ "$got" = "$(printf 'BLOCK:%08d' $j)" ] || { echo "BAD $j: $got"; bad=1; }
             j=$((j+1))
           done
           echo "VERIFIED bad=$bad" ;;
  read)    echo "READ $(dd if=/dev/vda bs=512 skip=2048 count=1 2>/dev/null | head -n 1)" ;;
  readwrite:*) w=${act#readwrite:}
           echo "READ $(dd if=/dev/vda bs=512 skip=2048 count=1 2>/dev/null | head -n 1)"
           printf 'MARKER:%s\n' "$w" | dd of=/dev/vda bs=512 seek=2048 conv=fsync,sync 2>/dev/null
           sync; echo "WROTE MARKER:$w" ;;
  *)       echo "no continuum.act on the command line" ;;
esac
[ -b /dev/vda ] || echo "NO DISK /dev/vda"
if grep -q continuum.hold /proc/cmdline; then
  echo HOLDING
  while true; do sleep 1; done
fi
echo CONTINUUM-GUEST-DONE
poweroff -f
INIT
chmod +x root/init
mkdir -p "$out"
(cd root && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initrd.img.tmp"
cp "k/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
mv "$out/initrd.img.tmp" "$out/initrd.img"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "$version" > "$out/version"
echo "$out"
