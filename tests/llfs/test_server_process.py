"""The mount server's command line (both ends) and what a mount server imports."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import ROOT

from d4c.errors import UsageError
from d4c.llfs.server_process import SERVER_WORD, command_line, parse_line


def test_parse_line_reads_what_command_line_writes(tmp_path) -> None:
    line = command_line(["base.cdimg", "delta.cdimg"], "mnt", 7, cache_dir=str(tmp_path), cache_size=12345,
                        workers=3, debug=True, verified_bodies=True, suid_dev=True)
    assert line[0] == SERVER_WORD
    args = parse_line(line[1:])
    assert (args.debug, args.verified_bodies, args.suid_dev) == (True, True, True)
    assert (args.cache_dir, args.cache_size, args.workers, args.ready_fd) == (str(tmp_path), 12345, 3, 7)
    assert args.mountpoint == os.path.abspath("mnt")
    assert args.images == [os.path.abspath("base.cdimg"), os.path.abspath("delta.cdimg")]


def test_parse_line_defaults() -> None:
    args = parse_line(command_line(["a.dimg"], "/m", 4)[1:])
    assert (args.debug, args.verified_bodies, args.suid_dev, args.cache_dir, args.workers) == \
        (False, False, False, None, None)
    assert args.cache_size == 2 << 30


@pytest.mark.parametrize("argv", [
    [], ["--ready-fd", "3", "/m"],                  # no image
    ["/m", "a.dimg"],                                 # no ready pipe
    ["--ready-fd", "x", "/m", "a.dimg"],              # not a number
    ["--ready-fd"],                                   # value missing
    ["--bogus", "--ready-fd", "3", "/m", "a.dimg"],   # not a flag command_line writes
])
def test_parse_line_refuses_other_lines(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_line(argv)


def test_bad_line_is_one_line_and_exit_2() -> None:
    p = subprocess.run([sys.executable, "-m", "d4c", SERVER_WORD, "--ready-fd", "3"], capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src")), timeout=60)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


# Modules that held memory of every idle mount server (measured: argparse with its
# formatter's shutil, gettext and locale ~1.5 MiB; tempfile with shutil and random ~1 MiB;
# dataclasses with inspect, ast and dis ~1.2 MiB).  A mount server must not import them.
HEAVY = ("argparse", "shutil", "gettext", "locale", "tempfile", "random", "dataclasses", "inspect", "ast")


def test_mount_server_imports_nothing_heavy() -> None:
    code = ("import sys\n"
            "from d4c.llfs import server_process, serve, ops, model, streams, cache, threads, mounts\n"
            "from d4c.image import reader, stack\n"
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src")))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == []


READ_EVERYTHING = """
import importlib, sys
from d4c.llfs import server_process, serve, ops, mounts
from d4c.llfs.model import ImageFS, Options
from d4c.image.stack import open_stack
from d4c.image.tree import EntryType
for name in server_process.LOADED_LATER:
    importlib.import_module(name)
importlib.import_module("d4c.accel").check()

class BundleGone:
    def find_spec(self, name, path=None, target=None):
        raise ImportError("the bundle is gone: " + name)

sys.meta_path.insert(0, BundleGone())
fs = ImageFS(open_stack(sys.argv[2:]), Options(sys.argv[1], 1 << 30))  # hashing every read
todo, read = [1], 0
while todo:
    ino = todo.pop()
    offset = 0
    while page := fs.readdir(ino, offset):
        for _, attrs, offset in page:
            entry = fs.entry(attrs.ino)
            if entry.type == EntryType.DIR:
                todo.append(attrs.ino)
            elif entry.type == EntryType.FILE:
                fh = fs.open(attrs.ino)
                read += len(fs.read(fh, 0, entry.size + 1))
                fs.release(fh)
print(read)
"""


def test_a_one_file_servers_reads_need_no_import_after_ready(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A one-file binary's mount server outlives the bundle it was unpacked from:
    after `ready` every read (rebuilt files, hashing) must run on modules loaded
    already (LOADED_LATER).  A clean-clone CI run of the one-file binary got EIO."""
    p = subprocess.run([sys.executable, "-c", READ_EVERYTHING, str(tmp_path / "cache"), *stack],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src")))
    assert p.returncode == 0, p.stderr
    assert int(p.stdout) > 0
