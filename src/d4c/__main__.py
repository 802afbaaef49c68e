# absolute imports: PyInstaller runs this file as a script
import sys

from d4c.multicall import run


def main() -> int:
    from d4c.cli import main as program  # not imported by a mount's server process
    return program()


if __name__ == "__main__":
    sys.exit(run(main))
