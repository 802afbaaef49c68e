"""The delta engine: bytes and files in, deltas out (no images)."""

# The link a delta is made for, in Mbit/s (delta.CM_DECODE_NS): here so the command line shows it
# without loading the engine (a mount server or `version` never imports numpy)
DEFAULT_LINK_MBIT = 5.0
