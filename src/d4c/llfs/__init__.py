"""Read-only FUSE file system over an image stack (one server process per mount)."""
