"""containerd.types messages (Mount, Descriptor)."""
