"""The entry of every d4c program: `ctr-cli`, `snapshotter` and `server`.

The installed bundle is one program that the three names link to: the name it
was started as picks the command (one shared runtime on the device instead of
three one-file binaries that each unpack ~90 MB at every start).  Whatever the
name, a first argument SERVER_WORD makes it the FUSE server of one mount: how
`ctr-cli mount --background` and the snapshotter start their mounts."""

# absolute imports: PyInstaller runs this file as a script
import importlib
import os
import sys
from typing import Callable

from d4c.llfs.server_process import SERVER_WORD


def run(program: Callable[[], int]) -> int:
    """Run `program`'s main, or serve a mount when the first argument asks for it."""
    if sys.argv[1:2] == [SERVER_WORD]:
        from d4c.llfs.server_process import main as serve_mount
        return serve_mount(sys.argv[2:])
    return program()


PROGRAMS = {"snapshotter": "d4c.snap.daemon", "server": "d4c.server.main"}  # else ctr-cli: d4c.cli


def main() -> int:
    """The installed bundle: the program named by how this process was started.
    By name, so a one-file program that imports `run` packs only its own modules."""
    name = os.path.basename(sys.argv[0])
    module = next((m for prefix, m in PROGRAMS.items() if name.startswith(prefix)), "d4c.cli")
    return run(importlib.import_module(module).main)


if __name__ == "__main__":
    sys.exit(main())
