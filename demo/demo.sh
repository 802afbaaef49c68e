#!/usr/bin/env bash
# The original README's workflow with our binaries, end to end, on this machine:
# two versions of an image -> convert -> cdimg diff -> push to a server -> pull
# (into a private containerd through the di3fs snapshotter) -> ctr run.
# Needs root; `make demo` installs what it needs first.  Everything it starts
# (containerd, snapshotter, server, FUSE mounts) is stopped on exit or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD
work=$(mktemp -d /tmp/d4c-demo.XXXXXX)
pids=()
ns="d4c-demo-$$"

cleanup() {
  trap '' INT TERM  # a second Ctrl-C must not cut the cleanup short
  set +e
  if [ -S "$work/run/containerd.sock" ]; then
    for c in $(ctr -a "$work/run/containerd.sock" -n "$ns" containers ls -q 2>/dev/null); do
      ctr -a "$work/run/containerd.sock" -n "$ns" tasks kill -s KILL "$c" >/dev/null 2>&1
      ctr -a "$work/run/containerd.sock" -n "$ns" containers delete "$c" >/dev/null 2>&1
    done
  fi
  # daemons get 5 s to stop, then SIGKILL: an exit never waits on a stuck daemon
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for _ in $(seq 100); do
    alive=; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ -z "$alive" ] && break; sleep 0.05
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  # FUSE servers of the image mounts, then every mount below the work dir
  pkill -f -- "--ready-fd .*$work" 2>/dev/null
  # shims and FUSE servers exit on their own after that; anything still there after 5 s is killed
  for _ in $(seq 100); do pgrep -f -- "$work" >/dev/null || break; sleep 0.05; done
  pkill -KILL -f -- "$work" 2>/dev/null
  grep -o " $work[^ ]*" /proc/self/mountinfo | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
  # runc leaves the namespace's own cgroup in every hierarchy once its containers are gone
  for d in /sys/fs/cgroup/"$ns" /sys/fs/cgroup/*/"$ns"; do [ -d "$d" ] && rmdir "$d" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" = 0 ] || { echo "demo: run as root (containerd, FUSE and overlay mounts)"; exit 1; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
declare -A took
timed() {  # timed NAME command...
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  "$@"
  took[$name]=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
}
wait_for() { for _ in $(seq 200); do [ -e "$1" ] && return 0; sleep 0.05; done; echo "demo: $2 did not start"; exit 1; }

# Which pair: a Debian minbase with nginx at two package versions when the
# archive is reachable (D4C_DEMO_IMAGES=debian forces it), else busybox-based.
PY=${PY:-$PWD/.venv/bin/python}
images=${D4C_DEMO_IMAGES:-auto}
if [ "$images" = auto ]; then
  images=busybox
  if command -v debootstrap >/dev/null && [ -x "$PY" ] && "$PY" -c 'import urllib.request as u
u.urlopen("http://deb.debian.org/debian/dists/bookworm/Release", timeout=10).read(1)' 2>/dev/null; then
    images=debian
  fi
fi
run_cmd=()
case "$images" in
debian)
  step "two versions of a real image: Debian bookworm minbase + nginx 1.22.1-9+deb12u9 / +deb12u11 (the archive's oldest / newest when it has moved on)"
  echo "(the Debian archive is reachable: built with debootstrap the first time, a few minutes; then cached in ${D4C_IMAGE_CACHE:-bench/cache/img})"
  mapfile -t layouts < <(PYTHONPATH="$PWD/src:$PWD" "$PY" -m bench.image_bench layouts A B)
  [ "${#layouts[@]}" = 2 ] || { echo "demo: building the Debian images failed"; exit 1; }
  src1="oci:${layouts[0]}:A" src2="oci:${layouts[1]}:B"
  run_cmd=(dpkg-query -W nginx nginx-common)
  ;;
busybox)
  step "two versions of an image (busybox-static; v2 changes a file and a 'library'), built with umoci"
  echo "(not the Debian nginx pair: the Debian archive is not reachable or debootstrap is missing; D4C_DEMO_IMAGES=debian forces it)"
  umoci init --layout "$work/layout" >/dev/null
  for v in 1 2; do
    umoci new --image "$work/layout:v$v" >/dev/null
    umoci unpack --image "$work/layout:v$v" "$work/bundle$v" >/dev/null
    mkdir -p "$work/bundle$v/rootfs/bin" "$work/bundle$v/rootfs/etc" "$work/bundle$v/rootfs/lib"
    cp /bin/busybox "$work/bundle$v/rootfs/bin/"
    for a in sh ls cat echo; do ln -sf busybox "$work/bundle$v/rootfs/bin/$a"; done
    echo "hello from d4c, version $v" > "$work/bundle$v/rootfs/etc/motd"
    head -c 3000000 /bin/busybox > "$work/bundle$v/rootfs/lib/libdemo.so"
    [ "$v" = 2 ] && printf 'patched' | dd of="$work/bundle$v/rootfs/lib/libdemo.so" bs=1 seek=100000 conv=notrunc 2>/dev/null
    umoci repack --image "$work/layout:v$v" "$work/bundle$v" >/dev/null
    umoci config --image "$work/layout:v$v" --config.cmd /bin/cat --config.cmd /etc/motd >/dev/null
  done
  src1="oci:$work/layout:v1" src2="oci:$work/layout:v2"
  ;;
*) echo "demo: D4C_DEMO_IMAGES is debian, busybox or auto, not $images"; exit 2 ;;
esac

step "convert both into cdimgs"
timed "convert v1" "$BIN/ctr-cli" convert --image "$src1" --output "$work/images/v1" --cdimg -q
timed "convert v2" "$BIN/ctr-cli" convert --image "$src2" --output "$work/images/v2" --cdimg -q
step "cdimg diff v1 -> v2"
timed "cdimg diff" "$BIN/ctr-cli" cdimg diff --oldCdimg "$work/images/v1/image.cdimg" \
  --newCdimg "$work/images/v2/image.cdimg" --outCdimg "$work/images/diff_1-2.cdimg" --threadNum 2

step "a private containerd, the di3fs snapshotter and the update server"
mkdir -p "$work/run"
cat > "$work/containerd.toml" <<EOF
version = 2
root = "$work/containerd-root"
state = "$work/containerd-state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/run/containerd.sock"
[proxy_plugins.di3fs]
  type = "snapshot"
  address = "$work/run/di3fs.sock"
EOF
"$BIN/snapshotter" --address "$work/run/di3fs.sock" --root "$work/di3fs" 2>"$work/snapshotter.log" & pids+=($!)
containerd --config "$work/containerd.toml" >"$work/containerd.log" 2>&1 & pids+=($!)
"$BIN/server" --port 0 --root "$work/server" 2>"$work/server.log" & pids+=($!)  # a free port, from its log
wait_for "$work/run/di3fs.sock" snapshotter
wait_for "$work/run/containerd.sock" containerd
port=
for _ in $(seq 200); do
  port=$(sed -n 's|.*serving on http://127\.0\.0\.1:\([0-9]*\).*|\1|p;T;q' "$work/server.log" 2>/dev/null || true)
  [ -n "$port" ] && break; sleep 0.05
done
[ -n "$port" ] || { echo "demo: server did not start"; exit 1; }
echo "containerd, snapshotter and server are up (logs in $work)"

step "push the base and the delta"
timed "push v1" "$BIN/ctr-cli" push --cdimg "$work/images/v1/image.cdimg" --imageTag d4c-demo:1 --serverHost "127.0.0.1:$port"
timed "push delta" "$BIN/ctr-cli" push --cdimg "$work/images/diff_1-2.cdimg" --imageTag d4c-demo:2 --serverHost "127.0.0.1:$port"

step "pull 1, then 2: only the delta travels"
common=(--host "127.0.0.1:$port" --address "$work/run/containerd.sock" --namespace "$ns" --snapshotter-root "$work/di3fs")
timed "pull 1" "$BIN/ctr-cli" pull --image d4c-demo:1 "${common[@]}"
timed "pull 2" "$BIN/ctr-cli" pull --image d4c-demo:2 "${common[@]}"

step "ctr run the new version"
timed "ctr run" ctr -a "$work/run/containerd.sock" -n "$ns" run --rm --snapshotter di3fs d4c-demo:2 demo-run "${run_cmd[@]}"

step "sizes and times ($images pair)"
full=$(stat -c %s "$work/images/v2/image.cdimg")
delta=$(stat -c %s "$work/images/diff_1-2.cdimg")
printf '%-28s %12s\n' "full v2 image (cdimg)" "$full bytes" "delta v1 -> v2" "$delta bytes"
printf '%-28s %10.3f%%\n' "delta / full" "$(awk -v d="$delta" -v f="$full" 'BEGIN { print 100 * d / f }')"
for k in "convert v1" "convert v2" "cdimg diff" "push v1" "push delta" "pull 1" "pull 2" "ctr run"; do
  printf '%-28s %10.2f s\n' "$k" "${took[$k]}"
done
