"""Read-only FUSE filesystem over an image stack (issue [4/8])."""
