#!/bin/sh
# Declare the di3fs proxy snapshotter in containerd's config (idempotent: a
# second run changes nothing), then restart containerd so it reads it: through
# systemd when containerd runs under it, otherwise print the exact commands that
# restart the containerd running here with that config.
#   CONFIG=/etc/containerd/config.toml SOCKET=/run/di3fs/snapshotter.sock ./install_snapshotter.sh [--no-restart]
set -eu
CONFIG="${CONFIG:-/etc/containerd/config.toml}"
SOCKET="${SOCKET:-/run/di3fs/snapshotter.sock}"
RESTART=yes
for arg in "$@"; do
    case "$arg" in
        --no-restart) RESTART=no ;;
        *) echo "install_snapshotter.sh: unknown flag $arg (flags: --no-restart)" >&2; exit 2 ;;
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
echo "added the di3fs proxy snapshotter to $CONFIG"
restart
