"""Where things live by default (one place, so client and daemons agree)."""

import os

# as ctr reads them, so `ctr` and `ctr-cli` reach the same containerd
CONTAINERD_ADDRESS = os.environ.get("CONTAINERD_ADDRESS") or "/run/containerd/containerd.sock"
CONTAINERD_NAMESPACE = os.environ.get("CONTAINERD_NAMESPACE") or "default"
SNAPSHOTTER_ADDRESS = "/run/di3fs/snapshotter.sock"
SNAPSHOTTER_ROOT = "/var/lib/di3fs"
SNAPSHOTTER_NAME = "di3fs"
