"""The one program of the installed bundle: `ctr-cli`, `snapshotter` and `server`
are links to it, and the name it was started as picks the command.  One shared
runtime on the device instead of three one-file binaries that each unpack ~90 MB
at every start."""

# absolute imports: PyInstaller runs this file as a script
import os
import sys


def main() -> int:
    name = os.path.basename(sys.argv[0])
    if name.startswith("snapshotter"):
        from d4c.snap.daemon import main as run
    elif name.startswith("server"):
        from d4c.server.main import main as run
    else:  # ctr-cli, and the program itself (how a snapshotter re-executes it for a mount)
        from d4c.cli import main as run
    return run()


if __name__ == "__main__":
    sys.exit(main())
