"""Builds the Cython kernels d4c._patch, d4c._chunker, d4c._tables, d4c._deflate and d4c._x86 (metadata is in pyproject.toml)."""

import sys

from setuptools import Extension, setup

NO_CYTHON_COMMANDS = {"clean", "egg_info", "--help", "--version"}

ext_modules = [
    Extension("d4c._patch", ["src/d4c/_patch.pyx"], extra_compile_args=["-O3", "-Wall"]),
    Extension("d4c._chunker", ["src/d4c/_chunker.pyx"], extra_compile_args=["-O3", "-Wall"]),
    Extension("d4c._tables", ["src/d4c/_tables.pyx"], extra_compile_args=["-O3", "-Wall"]),
    Extension("d4c._deflate", ["src/d4c/_deflate.pyx"], extra_compile_args=["-O3", "-Wall"]),
    Extension("d4c._x86", ["src/d4c/_x86.pyx"], extra_compile_args=["-O3", "-Wall"]),
]

if not NO_CYTHON_COMMANDS.intersection(sys.argv[1:]):
    try:
        from Cython.Build import cythonize
    except ImportError:
        sys.exit("d4c needs Cython to build its kernels: run `make deps` (or pip install -r requirements.txt)")
    ext_modules = cythonize(ext_modules, compiler_directives={"language_level": "3"},
                            build_dir="build/cython", quiet=True)

setup(ext_modules=ext_modules)
