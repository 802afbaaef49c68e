"""The di3fs containerd proxy snapshotter: core, gRPC service, daemon, and the
client side (`load`) that hands it images."""
