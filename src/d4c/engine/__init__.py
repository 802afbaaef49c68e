"""The delta engine: bytes and files in, deltas out (no images)."""

# The engine's defaults live here, so the command line and the image layer read them without
# loading the engine (numpy): a mount server, `version` or `cdimg merge` never import it.
DEFAULT_LINK_MBIT = 5.0  # the link a delta is made for, in Mbit/s (delta.CM_DECODE_NS)
DEFAULT_LEVEL = 15  # the delta's add/insert stream level
DEFAULT_MEMORY_LIMIT = 2 << 30  # fixed, so output never depends on the machine
