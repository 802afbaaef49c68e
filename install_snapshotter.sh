#!/bin/sh
# Declare the di3fs proxy snapshotter in containerd's config (idempotent: a
# second run changes nothing).  Restart containerd afterwards.
#   CONFIG=/etc/containerd/config.toml SOCKET=/run/di3fs/snapshotter.sock ./install_snapshotter.sh
set -eu
CONFIG="${CONFIG:-/etc/containerd/config.toml}"
SOCKET="${SOCKET:-/run/di3fs/snapshotter.sock}"

mkdir -p "$(dirname "$CONFIG")"
if [ -f "$CONFIG" ] && grep -Eq '^[[:space:]]*\[proxy_plugins\.(di3fs|"di3fs")\]' "$CONFIG"; then
    echo "di3fs is already declared in $CONFIG"
    exit 0
fi
if [ ! -s "$CONFIG" ]; then
    printf 'version = 2\n' > "$CONFIG"
fi
tmp="$CONFIG.d4c-tmp.$$"
cp "$CONFIG" "$tmp"
printf '\n[proxy_plugins.di3fs]\n  type = "snapshot"\n  address = "%s"\n' "$SOCKET" >> "$tmp"
mv "$tmp" "$CONFIG"
echo "added the di3fs proxy snapshotter to $CONFIG; restart containerd (e.g. systemctl restart containerd)"
