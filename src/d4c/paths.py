"""Where things live by default (one place, so client and daemons agree)."""

CONTAINERD_ADDRESS = "/run/containerd/containerd.sock"
CONTAINERD_NAMESPACE = "default"
SNAPSHOTTER_ADDRESS = "/run/di3fs/snapshotter.sock"
SNAPSHOTTER_ROOT = "/var/lib/di3fs"
SNAPSHOTTER_NAME = "di3fs"
