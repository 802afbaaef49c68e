#!/bin/sh
# Declare the di3fs proxy snapshotter in containerd's config (idempotent: a
# second run changes nothing), then restart containerd so it reads it: through
# systemd when containerd runs under it, otherwise print the exact commands that
# restart the containerd running here with that config.
# With --cri, also make containerd's CRI plugin (Kubernetes, k3s) pull into di3fs with
# the snapshot labels a remote snapshotter needs, so updates come as d4c deltas from
# the registry (README, "Pulls by containerd and Kubernetes").
#   CONFIG=/etc/containerd/config.toml SOCKET=/run/di3fs/snapshotter.sock ./install_snapshotter.sh [--cri] [--no-restart]
set -eu
CONFIG="${CONFIG:-/etc/containerd/config.toml}"
SOCKET="${SOCKET:-/run/di3fs/snapshotter.sock}"
RESTART=yes
CRI=no
for arg in "$@"; do
    case "$arg" in
        --no-restart) RESTART=no ;;
        --cri) CRI=yes ;;
        *) echo "install_snapshotter.sh: unknown flag $arg (flags: --cri, --no-restart)" >&2; exit 2 ;;
    esac
done

# the config file process $1 (a containerd) reads: its --config/-c, else the default
config_of() {
    tr '\0' '\n' < "/proc/$1/cmdline" | {
        config=/etc/containerd/config.toml next=""
        while IFS= read -r word; do
            if [ -n "$next" ]; then config=$word next=""; continue; fi
            case "$word" in
                --config|-c) next=yes ;;
                --config=*) config=${word#--config=} ;;
            esac
        done
        readlink -f "$config" 2>/dev/null || echo "$config"
    }
}

# the pid of a running containerd that reads $CONFIG
containerd_pid() {
    want=$(readlink -f "$CONFIG" 2>/dev/null || echo "$CONFIG")
    for dir in /proc/[0-9]*; do
        [ "$(basename "$(readlink "$dir/exe" 2>/dev/null || true)")" = containerd ] || continue
        if [ "$(config_of "${dir#/proc/}" 2>/dev/null)" = "$want" ]; then
            echo "${dir#/proc/}"
            return 0
        fi
    done
    return 1
}

# the command line of process $1, each word shell-quoted
quoted_cmdline() {
    tr '\0' '\n' < "/proc/$1/cmdline" | while IFS= read -r word; do
        printf "'%s' " "$(printf '%s' "$word" | sed "s/'/'\\\\''/g")"
    done
}

restart() {
    if [ "$RESTART" = no ]; then
        echo "restart containerd to load it (--no-restart given)"
        return 0
    fi
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1 \
            && systemctl cat containerd >/dev/null 2>&1; then  # its unit, running or stopped
        echo "restarting containerd (systemctl restart containerd)"
        systemctl restart containerd
        return 0
    fi
    if pid=$(containerd_pid); then
        log=$(readlink "/proc/$pid/fd/2" 2>/dev/null || true)  # containerd logs to stderr
        [ -f "$log" ] || log=$(readlink "/proc/$pid/fd/1" 2>/dev/null || true)
        [ -f "$log" ] || log=/dev/null
        echo "containerd (pid $pid) does not run under systemd; restart it with:"
        echo "  kill $pid; while kill -0 $pid 2>/dev/null; do sleep 0.2; done; nohup $(quoted_cmdline "$pid")>>'$log' 2>&1 &"
    else
        echo "no containerd with $CONFIG is running; start it with:"
        if [ "$CONFIG" = /etc/containerd/config.toml ]; then
            echo "  containerd &"
        else
            echo "  containerd --config '$CONFIG' &"
        fi
    fi
}

mkdir -p "$(dirname "$CONFIG")"
if [ ! -s "$CONFIG" ]; then
    printf 'version = 2\n' > "$CONFIG"
fi
changed=no
tmp="$CONFIG.d4c-tmp.$$"
cp "$CONFIG" "$tmp"
trap 'rm -f "$tmp"' EXIT
# containerd 2.x reads version 3 configs, where the CRI image settings have their own plugin
version=$(sed -n 's/^[[:space:]]*version[[:space:]]*=[[:space:]]*\([0-9]*\).*/\1/p' "$CONFIG" | head -n 1)
if grep -Eq '^[[:space:]]*\[proxy_plugins\.(di3fs|"di3fs")\]' "$CONFIG"; then
    echo "di3fs is already declared in $CONFIG"
else
    printf '\n[proxy_plugins.di3fs]\n  type = "snapshot"\n  address = "%s"\n' "$SOCKET" >> "$tmp"
    if [ "$version" = 3 ]; then  # 2.1+ pulls through the transfer service: it passes the labels when asked
        printf '  [proxy_plugins.di3fs.exports]\n    enable_remote_snapshot_annotations = "true"\n' >> "$tmp"
    fi
    echo "added the di3fs proxy snapshotter to $CONFIG"
    changed=yes
fi
if [ "$CRI" = yes ]; then
    if [ "$version" = 3 ]; then
        table='plugins."io.containerd.cri.v1.images"'
    else
        table='plugins."io.containerd.grpc.v1.cri".containerd'
    fi
    pattern=$(printf '%s' "$table" | sed 's/[].[]/\\&/g')
    if grep -Eq "^[[:space:]]*\\[$pattern\\]" "$CONFIG"; then
        if grep -Eq '^[[:space:]]*snapshotter[[:space:]]*=[[:space:]]*"di3fs"' "$CONFIG" \
                && grep -Eq '^[[:space:]]*disable_snapshot_annotations[[:space:]]*=[[:space:]]*false' "$CONFIG"; then
            echo "the CRI plugin already pulls into di3fs in $CONFIG"
        else
            echo "install_snapshotter.sh: $CONFIG has a [$table] table already; set in it:" >&2
            echo '  snapshotter = "di3fs"' >&2
            echo '  disable_snapshot_annotations = false' >&2
            exit 1
        fi
    else
        printf '\n[%s]\n  snapshotter = "di3fs"\n  disable_snapshot_annotations = false\n' "$table" >> "$tmp"
        echo "made the CRI plugin pull into di3fs with snapshot labels in $CONFIG"
        changed=yes
    fi
fi
if [ "$changed" = no ]; then
    exit 0
fi
mv "$tmp" "$CONFIG"
trap - EXIT
restart
