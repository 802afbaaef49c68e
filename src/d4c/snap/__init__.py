"""The di3fs containerd proxy snapshotter (issue [5/8])."""
