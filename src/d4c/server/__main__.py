# absolute import: PyInstaller runs this file as a script
import sys

from d4c.server.main import main

if __name__ == "__main__":
    sys.exit(main())
