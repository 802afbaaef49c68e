"""Our .proto files for the containerd services d4c speaks (snapshots, content,
images, leases) and the stubs grpcio-tools generates from them (`make proto`).
Field names and numbers follow containerd's public API (v1.6): they are the
wire format; the files themselves are written here."""
