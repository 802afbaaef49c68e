#!/usr/bin/env bash
# A walk through what d4c does today: build a small image, convert it, look inside,
# unpack it and run a program from it.  Needs root (make installs umoci/busybox).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/d4c-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "build an OCI image (busybox-static, two layers) with umoci"
umoci init --layout "$work/layout" >/dev/null
umoci new --image "$work/layout:v1" >/dev/null
umoci unpack --image "$work/layout:v1" "$work/bundle" >/dev/null
mkdir -p "$work/bundle/rootfs/bin" "$work/bundle/rootfs/etc"
cp /bin/busybox "$work/bundle/rootfs/bin/"
for a in sh ls cat echo; do ln -s busybox "$work/bundle/rootfs/bin/$a"; done
echo "hello from d4c" > "$work/bundle/rootfs/etc/motd"
umoci repack --image "$work/layout:v1" "$work/bundle" >/dev/null
umoci config --image "$work/layout:v1" --config.cmd /bin/sh >/dev/null

step "convert it into a single-file cdimg"
./ctr-cli convert --image "oci:$work/layout:v1" --output "$work/images/v1" --cdimg
ls -l "$work/images/v1"

step "what the cdimg holds"
./ctr-cli cdimg show --cdimg "$work/images/v1/image.cdimg"

step "unpack it and run a program from it"
./ctr-cli unpack --cdimg "$work/images/v1/image.cdimg" --out "$work/rootfs"
chroot "$work/rootfs" /bin/cat /etc/motd
echo
echo "(deltas, FUSE mounts, the snapshotter and the server arrive with issues [2/8]..[7/8])"
