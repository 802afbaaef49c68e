# absolute import: PyInstaller runs this file as a script
import sys

from d4c.entry import placeholder

if __name__ == "__main__":
    sys.exit(placeholder("server", "[7/8]"))
