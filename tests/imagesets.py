"""Four versions of one image with every change kind between them (for the
image-delta, llfs and binary tests; conftest builds them once per session)."""

from __future__ import annotations

import gzip
import io
import random
import zipfile

from ocibuild import M


def noise(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def edit(data: bytes, seed: int, changes: int = 6) -> bytes:
    """A few byte changes and one insertion: what a rebuilt binary looks like."""
    rnd = random.Random(seed)
    b = bytearray(data)
    for _ in range(changes):
        b[rnd.randrange(len(b))] ^= 0x5A
    at = rnd.randrange(len(b))
    return bytes(b[:at]) + b"inserted-" + bytes(b[at:])


# an ELF header for x86-64: format 2 stores such bodies x86-converted (bodies.is_x86_program)
ELF_X86_64 = b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x03\x00\x3e\x00" + bytes(44)


def program(code: bytes) -> bytes:
    """An x86-64 program (a header, then `code`): what most of an image's bytes are."""
    return ELF_X86_64 + code


def words(n: int, seed: int) -> bytes:
    """Text that compresses like a changelog or source file."""
    rnd = random.Random(seed)
    vocab = [b"fix", b"update", b"security", b"release", b"upstream", b"the", b"of", b"to", b"build", b"\n"]
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(vocab) + b" " + str(rnd.randrange(1000)).encode() + b" "
    return bytes(out[:n])


def gz(data: bytes) -> bytes:
    """As Python's gzip writes it (zlib level 9): a stream d4c re-creates."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=buf, mtime=0) as f:
        f.write(data)
    return buf.getvalue()


def jar(classes: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in classes.items():
            z.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
    return buf.getvalue()


CHANGELOG = words(60_000, 40)
CLASSES = {f"org/app/C{i}.class": words(4000 + 300 * i, 50 + i) for i in range(10)}
TOOL = program(noise(96_000, 1))
LIBFOO = noise(80_000, 2)
MOVED = noise(40_000, 3)
DUP = noise(20_000, 4)
NEWFILE = noise(12_000, 5)
# over bodies.FRAME_CHUNK: stored as several zstd frames (in the base, and new in a delta)
BIG = program(noise(200_000, 6) * 12)
BIG_NEW = noise(150_000, 7) * 10
STATUS = "".join(f"Package: pkg{i}\nStatus: install ok installed\nVersion: 1.{i}\n\n"
                 for i in range(600)).encode()

BASE = [
    M("./", "dir", mtime=1000),
    M("etc/", "dir"), M("etc/status", data=STATUS), M("etc/conf", data=b"conf=1\n"),
    M("bin/", "dir"), M("bin/tool", data=TOOL, mode=0o755), M("bin/hl", "hardlink", link="bin/tool"),
    M("lib/", "dir"), M("lib/libfoo.so.1.2", data=LIBFOO), M("lib/libbig.so", data=BIG),
    M("data/", "dir"), M("data/moved", data=MOVED),
    M("share/", "dir"), M("share/dup", data=DUP),
    M("typechg_file", data=b"a file that becomes a directory"),
    M("typechg_dir/", "dir"), M("typechg_dir/child", data=b"child"),
    M("meta", data=b"same content, new metadata", mode=0o644, mtime=1000),
    M("removed", data=b"removed by a whiteout"),
    M("gone_dir/", "dir"), M("gone_dir/x", data=b"x"),
    M("opq/", "dir"), M("opq/a", data=b"a"), M("opq/b", data=b"b"),
    M("link", "symlink", link="bin/tool"),
    M("empty", data=b""),
    M("bin/hello", data=b"#!/bin/sh\necho hello from the image\n", mode=0o755),
    M("bin/su-tool", data=b"setuid", mode=0o4755),
    M("dev/", "dir"), M("dev/null", "char", mode=0o666, dev=(1, 3)), M("fifo", "fifo"),
    M("noted", data=b"with an xattr", pax={"SCHILY.xattr.user.note": "hi"}),
    M("share/changelog.gz", data=gz(CHANGELOG)), M("lib/app.jar", data=jar(CLASSES)),
]
UPDATE2 = [
    M("etc/status", data=STATUS.replace(b"Version: 1.17\n", b"Version: 1.17+deb12u1\n")
      + b"Package: added\nStatus: install ok installed\n\n"),
    M("bin/tool", data=edit(TOOL, 10), mode=0o755),
    M("share/dup2", data=DUP),  # content already in the base
    M("bin/.wh.hl"), M("bin/hl", "hardlink", link="share/dup2"),  # hard-link group changed
    M("lib/.wh.libfoo.so.1.2"), M("lib/libfoo.so.1.3", data=edit(LIBFOO, 11)),  # renamed + changed
    M("data/.wh.moved"), M("newdir/", "dir"), M("newdir/moved", data=MOVED),  # moved
    M(".wh.typechg_file"), M("typechg_file/", "dir"), M("typechg_file/inner", data=b"inner"),
    M(".wh.typechg_dir"), M("typechg_dir", "symlink", link="etc"),
    M("meta", data=b"same content, new metadata", mode=0o600, mtime=2000),  # metadata only
    M(".wh.removed"), M(".wh.gone_dir"),
    M("opq/", "dir"), M("opq/.wh..wh..opq"), M("opq/c", data=b"c"),
    M("newfile", data=NEWFILE),
    M("share/changelog.gz", data=gz(words(700, 41) + CHANGELOG)),  # compressed files: their content changed
    M("lib/app.jar", data=jar({**CLASSES, "org/app/C3.class": edit(CLASSES["org/app/C3.class"], 52)})),
]
UPDATE3 = [
    M("bin/tool", data=edit(edit(TOOL, 10), 20), mode=0o755),
    M("etc/status", data=STATUS.replace(b"Version: 1.300\n", b"Version: 1.300+b1\n")),
    M("newfile", data=edit(NEWFILE, 21)),  # a file the base never had, changed again
    M(".wh.newdir"),
    M("lib/libnew.so", data=BIG_NEW),
]
UPDATE4 = [
    M("bin/tool", data=edit(edit(edit(TOOL, 10), 20), 30), mode=0o755),
    M("lib/libfoo.so.1.3", data=edit(edit(LIBFOO, 11), 31)),
    M("data/", "dir"), M("data/moved", data=MOVED),  # back where it was
    M("share/changelog.gz", data=gz(words(500, 42) + words(700, 41) + CHANGELOG)),
]
VERSIONS = [[BASE], [BASE, UPDATE2], [BASE, UPDATE2, UPDATE3], [BASE, UPDATE2, UPDATE3, UPDATE4]]
