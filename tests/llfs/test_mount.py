"""llfs through a real FUSE mount: trees, damage, overlays, stale and hung servers, memory."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import time

import pytest

from conftest import IS_ROOT
from helpers import (ROOT, as_format, assert_one_line_error, diff_trees, fuse_server_pids, need, run_cli,
                     snapshot_tree)

from d4c.llfs import model as llfs_model
from d4c.image.stack import open_stack
from d4c.image.tree import Entry, Storage

SRC = os.path.join(ROOT, "src")


def fuse_ok() -> None:
    need(IS_ROOT, "mounting needs root (allow_other, device nodes)")
    need(os.path.exists("/dev/fuse"), "/dev/fuse is missing")


def mount(top: str, mnt: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run([sys.executable, "-m", "d4c", "mount", "--background", "--cdimg", top, *extra, mnt],
                          capture_output=True, text=True, env=env, timeout=60)


class Mounted:
    def __init__(self, top: str, mnt: str, *extra: str) -> None:
        self.mnt = mnt
        os.makedirs(mnt, exist_ok=True)
        p = mount(top, mnt, *extra)
        assert p.returncode == 0, p.stderr
        assert os.path.ismount(mnt)

    def __enter__(self) -> str:
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        if os.path.ismount(self.mnt):
            code, _, err = run_cli("umount", self.mnt)
            if code:
                subprocess.run(["fusermount3", "-u", "-z", self.mnt])
        for _ in range(50):
            if not os.path.ismount(self.mnt):
                break
            time.sleep(0.1)
        assert not os.path.ismount(self.mnt)


@pytest.mark.parametrize("extra", [[], ["--verified-bodies"]])
def test_mounted_tree_equals_unpack(stack, images, tmp_path, extra) -> None:  # type: ignore[no-untyped-def]
    fuse_ok()
    code, _, err = run_cli("unpack", "--cdimg", images[3], "--out", str(tmp_path / "want"))
    assert code == 0, err
    with Mounted(stack[-1], str(tmp_path / "mnt"), *extra) as mnt:
        got = snapshot_tree(mnt)
        assert diff_trees(got, snapshot_tree(str(tmp_path / "want"))) == []
        st = os.stat(os.path.join(mnt, "bin/tool"))
        assert st.st_nlink == 1 and os.stat(mnt).st_ino == 1
        with pytest.raises(OSError) as info:
            open(os.path.join(mnt, "bin/tool"), "wb")
        assert info.value.errno in (errno.EROFS, errno.EACCES)


def test_a_mount_servers_fuse_workers_share_one_cpu(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The FUSE workers of a real mount server keep to one CPU (threads.pin_fuse_workers),
    the one its process id picks, while reads are served."""
    fuse_ok()
    cpus = sorted(os.sched_getaffinity(0))
    need(len(cpus) >= 2, "needs 2 CPUs: pinning to one of them is what is tested")
    with Mounted(stack[-1], str(tmp_path / "mnt")) as mnt:
        assert snapshot_tree(mnt)  # every file read: the workers have served
        [server] = fuse_server_pids(mnt)
        allowed = []
        for tid in os.listdir(f"/proc/{server}/task"):
            with open(f"/proc/{server}/task/{tid}/status") as f:
                line = next(x for x in f if x.startswith("Cpus_allowed_list:"))
            allowed.append(line.split(":", 1)[1].strip())
        pinned = allowed.count(str(cpus[server % len(cpus)]))
        assert pinned >= 30, allowed  # llfuse's 30 workers (and the main thread that started them)


def stored_body(stack: list[str], path: bytes) -> tuple[str, int, int, Entry]:
    """Where the stack stores the body of `path`: (image, file offset, length, stored entry)."""
    imgs = open_stack(stack)
    try:
        image, stored = imgs[-1].resolve(imgs[-1].lookup(path))
        stored = image.holder(stored)
        return image.path, image.info.body_offset + stored.body_offset, stored.body_length, stored
    finally:
        for i in imgs:
            i.close()


def damaged_copy(stack: list[str], folder: str, damage: dict[str, list[int]]) -> str:
    """The stack's images copied into `folder`, with the bytes at the given
    offsets of the given images inverted; returns the copy of the top image."""
    os.makedirs(folder)
    for p in stack:
        with open(p, "rb") as f:
            data = bytearray(f.read())
        for at in damage.get(p, []):
            data[at] ^= 0xFF
        with open(os.path.join(folder, os.path.basename(p)), "wb") as f:
            f.write(data)
    return os.path.join(folder, os.path.basename(stack[-1]))


def test_corrupt_body_is_eio_and_mount_survives(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fuse_ok()
    # damage the payload of bin/tool's delta in the top image (header intact)
    imgs = open_stack(stack)
    try:
        top = imgs[-1]
        e = next(x for x in top.entries if x.path == b"bin/tool")
        assert e.storage == Storage.DELTA
        where = top.info.body_offset + e.delta_steps[0].offset + e.delta_steps[0].length // 2
    finally:
        for i in imgs:
            i.close()
    top_copy = damaged_copy(stack, str(tmp_path / "images"), {stack[-1]: [where]})
    log = str(tmp_path / "fs.log")
    with Mounted(top_copy, str(tmp_path / "mnt"), "--log", log) as mnt:
        with pytest.raises(OSError) as info:
            with open(os.path.join(mnt, "bin/tool"), "rb") as f:
                f.read()
        assert info.value.errno == errno.EIO
        with open(os.path.join(mnt, "etc/conf"), "rb") as f:  # the rest is still served
            assert f.read() == b"conf=1\n"
        assert os.path.ismount(mnt)
    with open(log) as f:
        assert "bin/tool" in f.read()


@pytest.mark.parametrize("extra", [[], ["--verified-bodies"]])
def test_damaged_frames_are_eio(stack, tmp_path, extra) -> None:  # type: ignore[no-untyped-def]
    """A damaged frame of a large unchanged file is EIO, never a short file (the
    kernel's readahead may meet the error first), and so is a file rebuilt from
    a damaged delta.  --verified-bodies (how di3fs mounts: it checked every body
    at load) skips the second sha256 pass over unchanged files, not zstd's frame
    checksums."""
    fuse_ok()
    holder, start, length, big = stored_body(stack, b"lib/libbig.so")
    assert big.storage == Storage.FRAME and big.size > (2 << 20)  # several frames, read ahead
    frame_at = start + length * 3 // 4
    imgs = open_stack(stack)
    try:
        tool = next(x for x in imgs[-1].entries if x.path == b"bin/tool")
        delta_at = imgs[-1].info.body_offset + tool.delta_steps[0].offset + tool.delta_steps[0].length // 2
    finally:
        for i in imgs:
            i.close()
    damage: dict[str, list[int]] = {holder: [frame_at]}
    damage.setdefault(stack[-1], []).append(delta_at)
    top_copy = damaged_copy(stack, str(tmp_path / "images"), damage)
    with Mounted(top_copy, str(tmp_path / "mnt"), *extra) as mnt:
        for name in ("lib/libbig.so", "bin/tool"):
            with pytest.raises(OSError) as info:
                with open(os.path.join(mnt, name), "rb") as f:
                    f.read()
            assert info.value.errno == errno.EIO, name
        with open(os.path.join(mnt, "etc/conf"), "rb") as f:
            assert f.read() == b"conf=1\n"


def test_umount_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli("umount", str(tmp_path))
    assert_one_line_error(code, err, 2)


@pytest.mark.parametrize("workers", ["0", "-2", "many"])
def test_mount_refuses_bad_worker_counts(stack, tmp_path, workers) -> None:  # type: ignore[no-untyped-def]
    """Refused before mounting: llfuse raised on them after the mount was up (a
    traceback, and a dead mount left behind; --background even exited 0)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for background in ([], ["--background"]):
        code, _, err = run_cli("mount", *background, "--workers", workers, "--cdimg", stack[-1], str(mnt))
        assert_one_line_error(code, err, 2)
        assert "--workers" in err and not os.path.ismount(mnt)


def test_overlay_on_the_mount(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The mount as an overlay lower layer: writes and copy-ups land in the upper
    dir, the lower never changes, programs run and setuid bits are kept."""
    fuse_ok()
    with Mounted(stack[-1], str(tmp_path / "mnt"), "--allow-suid-dev") as mnt:
        before = snapshot_tree(mnt)
        upper, work, merged = (str(tmp_path / n) for n in ("upper", "work", "merged"))
        for d in (upper, work, merged):
            os.makedirs(d)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={mnt},upperdir={upper},workdir={work}", merged], check=True)
        try:
            with open(os.path.join(merged, "etc/conf"), "rb") as f:
                assert f.read() == b"conf=1\n"
            with open(os.path.join(merged, "written"), "w") as f:
                f.write("a new file")
            with open(os.path.join(merged, "etc/conf"), "ab") as f:  # copy-up of a lower file
                f.write(b"more=2\n")
            os.unlink(os.path.join(merged, "empty"))  # a whiteout in the upper dir
            assert os.path.exists(os.path.join(upper, "written"))
            with open(os.path.join(upper, "etc/conf"), "rb") as f:
                assert f.read() == b"conf=1\nmore=2\n"
            out = subprocess.run([os.path.join(merged, "bin/hello")], capture_output=True, text=True, check=True)
            assert out.stdout == "hello from the image\n"
            assert os.stat(os.path.join(merged, "bin/su-tool")).st_mode & 0o7777 == 0o4755
            assert os.stat(os.path.join(merged, "dev/null")).st_rdev == os.makedev(1, 3)
            assert os.getxattr(os.path.join(merged, "noted"), "user.note") == b"hi"
        finally:
            subprocess.run(["umount", merged], check=True)
        assert snapshot_tree(mnt) == before  # the lower never changed
        with open("/proc/self/mountinfo") as f:
            line = next(x for x in f if f" {os.path.abspath(mnt)} " in x)
        assert "nosuid" not in line.split(" - ")[0] and "nodev" not in line.split(" - ")[0]


def test_stale_mount_is_cleaned(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fuse_ok()
    from d4c.llfs.mounts import fstype_at
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    for cleaner in ("umount", "mount"):
        p = mount(stack[-1], mnt)
        assert p.returncode == 0, p.stderr
        os.kill(fuse_server_pids(mnt)[0], 9)
        for _ in range(50):
            try:
                os.stat(mnt)
            except OSError as exc:
                assert exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
                break
            time.sleep(0.1)
        assert fstype_at(mnt) == "fuse.d4c"  # stale: still in the mount table
        if cleaner == "umount":
            code, _, err = run_cli("umount", mnt)
            assert code == 0, err
            assert fstype_at(mnt) is None
        else:
            p = mount(stack[-1], mnt)  # the next mount clears it first
            assert p.returncode == 0, p.stderr
            with open(os.path.join(mnt, "etc/conf"), "rb") as f:
                assert f.read() == b"conf=1\n"
            code, _, err = run_cli("umount", mnt)
            assert code == 0, err
    assert fstype_at(mnt) is None


def vmhwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1])


def test_random_read_of_a_huge_file_keeps_memory_bounded(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A read near the end of a file over ONE_SHOT_MAX, through a real mount:
    the server streams the body to its cache instead of holding it (twice)."""
    fuse_ok()
    from helpers import convert_tags
    from ocibuild import Layout, M
    line = b"a line of a large log file, compressible " * 24 + b"\n"
    huge = line * ((llfs_model.ONE_SHOT_MAX + (16 << 20)) // len(line))
    lay = Layout(str(tmp_path / "layout"))
    lay.tag(lay.image([([M("./", "dir"), M("huge.log", data=huge)], "gzip")]), "v1")
    lay.save()
    [top] = convert_tags(lay.path, ["v1"], str(tmp_path))
    with Mounted(top, str(tmp_path / "mnt"), "--cache-dir", str(tmp_path / "cache")) as mnt:
        [server] = fuse_server_pids(mnt)
        before = vmhwm_kib(server)
        with open(os.path.join(mnt, "huge.log"), "rb", buffering=0) as f:
            f.seek(len(huge) - 5000)
            assert f.read(5000) == huge[-5000:]
        grown = vmhwm_kib(server) - before
        assert grown < 48 << 10, f"the server grew by {grown} KiB reading a {len(huge) >> 20} MiB file"
        assert os.path.getsize(tmp_path / "cache" / hashlib.sha256(huge).hexdigest()) == len(huge)


def test_large_directory_through_a_mount(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A directory of several readdir batches lists whole, once each, in the
    image's (sorted) order."""
    fuse_ok()
    from helpers import convert_tags
    from ocibuild import Layout, M
    names = [f"f{i:05d}" for i in range(3 * llfs_model.READDIR_BATCH + 7)]
    lay = Layout(str(tmp_path / "layout"))
    lay.tag(lay.image([([M("./", "dir"), M("d/", "dir")] + [M(f"d/{n}", data=n.encode()) for n in names],
                        "gzip")]), "v1")
    lay.save()
    [top] = convert_tags(lay.path, ["v1"], str(tmp_path))
    with Mounted(top, str(tmp_path / "mnt")) as mnt:
        with os.scandir(os.path.join(mnt, "d")) as it:
            assert [e.name for e in it] == names
        with open(os.path.join(mnt, "d", names[-1]), "rb") as f:
            assert f.read() == names[-1].encode()


def test_hung_server_mount(stack, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A server that is alive but does not answer (stopped here) hung `umount` and
    the next `mount` on its path in their first statfs.  `umount` detaches it;
    `mount` refuses with one line (the server may only be busy), then mounts
    once it is gone."""
    fuse_ok()
    import signal
    from d4c.llfs import mounts
    monkeypatch.setattr(mounts, "ANSWER_WITHIN", 0.5)
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    p = mount(stack[-1], mnt)
    assert p.returncode == 0, p.stderr
    [server] = fuse_server_pids(mnt)
    os.kill(server, signal.SIGSTOP)
    try:
        assert mounts.server_state(mnt) == mounts.SILENT and not mounts.is_stale(mnt)
        code, _, err = run_cli("mount", "--background", "--cdimg", stack[-1], mnt)
        assert_one_line_error(code, err, 2)
        assert "does not answer" in err
        code, _, err = run_cli("umount", mnt)
        assert code == 0, err
        assert mounts.fstype_at(mnt) is None
        p = mount(stack[-1], mnt)
        assert p.returncode == 0, p.stderr
        with open(os.path.join(mnt, "etc/conf"), "rb") as f:
            assert f.read() == b"conf=1\n"
        assert mounts.server_state(mnt) == mounts.LIVE
        code, _, err = run_cli("umount", mnt)
        assert code == 0, err
    finally:
        os.kill(server, signal.SIGKILL)  # also ends the statfs calls left waiting on it


def test_umount_through_a_symlink(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fuse_ok()
    from d4c.llfs.mounts import fstype_at
    os.makedirs(tmp_path / "mnt")
    os.symlink("mnt", tmp_path / "link")
    p = mount(stack[-1], str(tmp_path / "link"))
    assert p.returncode == 0, p.stderr
    assert fstype_at(str(tmp_path / "link")) == "fuse.d4c"
    code, _, err = run_cli("umount", str(tmp_path / "link"))
    assert code == 0, err
    assert fstype_at(str(tmp_path / "mnt")) is None


def test_mount_is_nosuid_nodev_unless_asked(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`ctr-cli mount` as root served every local user (allow_other) with the
    image's setuid bits and devices: `nobody` ran a setuid-root program from it
    with euid 0.  Now nosuid,nodev by default; --allow-suid-dev keeps them."""
    fuse_ok()
    from privileges import NOBODY, as_nobody, mount_options, reachable_dir, setuid_tree
    setuid_tree(str(tmp_path / "tree"))
    image = str(tmp_path / "suid.dimg")
    code, _, err = run_cli("pack", "--in", str(tmp_path / "tree"), "--out", image, "-q")
    assert code == 0, err
    with reachable_dir() as public:
        for extra, euid in (([], NOBODY), (["--allow-suid-dev"], 0)):
            with Mounted(image, os.path.join(public, "mnt"), *extra) as mnt:
                p = as_nobody(os.path.join(mnt, "euid"))
                assert p.returncode == 0, p.stderr
                assert int(p.stdout) == euid
                assert {"nosuid", "nodev"} <= mount_options(mnt) if not extra else \
                    not {"nosuid", "nodev"} & mount_options(mnt)
                assert "ro" in mount_options(mnt)
                if extra:
                    with open(os.path.join(mnt, "null"), "rb") as f:
                        assert f.read() == b""
                else:
                    with pytest.raises(PermissionError):
                        open(os.path.join(mnt, "null"), "rb")


@pytest.mark.parametrize("background", [True, False])
def test_corrupt_image_at_mount_exits_3(stack, tmp_path, background) -> None:  # type: ignore[no-untyped-def]
    """A damaged header (past the preamble that resolving the stack reads) is a
    corrupt input, exit 3 as the README says; with --background it came back
    from the server process as 'mount ... failed', exit 5."""
    fuse_ok()
    from d4c.image.format import DIMG_PREAMBLE, read_info
    fd = os.open(stack[-1], os.O_RDONLY)
    try:
        header_at = read_info(fd, stack[-1]).dimg_offset + DIMG_PREAMBLE.size
    finally:
        os.close(fd)
    bad = damaged_copy(stack, str(tmp_path / "bad"), {stack[-1]: [header_at + 10]})
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    env = dict(os.environ, PYTHONPATH=SRC)
    p = subprocess.run([sys.executable, "-m", "d4c", "mount", *(["--background"] if background else []),
                        "--cdimg", bad, mnt], capture_output=True, text=True, env=env, timeout=60)
    assert_one_line_error(p.returncode, p.stderr, 3)
    assert "corrupt image" in p.stderr and not os.path.ismount(mnt)


def test_format_2_through_a_mount(images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A grouped image mounts to its tree, as format 1 does; a damaged group frame is EIO
    for the files in it past the damage, and the others (a large file's own frames) are still served."""
    fuse_ok()
    v2 = as_format(images[3], str(tmp_path / "v2.cdimg"), str(tmp_path), 2)
    code, _, err = run_cli("unpack", "--cdimg", images[3], "--out", str(tmp_path / "want"))
    assert code == 0, err
    v1 = as_format(images[3], str(tmp_path / "v1.cdimg"), str(tmp_path), 1)
    with Mounted(v1, str(tmp_path / "mnt1")) as mnt:
        assert diff_trees(snapshot_tree(mnt), snapshot_tree(str(tmp_path / "want"))) == []
    with Mounted(v2, str(tmp_path / "mnt"), "--group-cache", "1M") as mnt:  # below a group: decoded per read
        assert diff_trees(snapshot_tree(mnt), snapshot_tree(str(tmp_path / "want"))) == []
    imgs = open_stack([v2])
    try:
        image = imgs[0]
        group = image.groups[0]
        in_it = [e.path for e in image.entries if e.storage == Storage.GROUPED and e.group == 0 and e.size]
        framed = [e.path for e in image.entries if e.storage == Storage.FRAME]
        where = image.info.body_offset + group.offset + group.csize // 2
    finally:
        for i in imgs:
            i.close()
    assert in_it and framed
    damaged = damaged_copy([v2], str(tmp_path / "damaged"), {v2: [where]})
    with Mounted(damaged, str(tmp_path / "mnt2")) as mnt:
        # the group decodes only as far as a read needs: a file before the damage may be served
        # (checked against its digest), the others are EIO
        failed = 0
        for path in in_it:
            try:
                with open(os.path.join(mnt, os.fsdecode(path)), "rb") as f, \
                        open(os.path.join(str(tmp_path / "want"), os.fsdecode(path)), "rb") as g:
                    assert f.read() == g.read(), path
            except OSError as exc:
                assert exc.errno == errno.EIO, path
                failed += 1
        assert failed >= 1
        for path in framed:
            with open(os.path.join(mnt, os.fsdecode(path)), "rb") as f, \
                    open(os.path.join(str(tmp_path / "want"), os.fsdecode(path)), "rb") as g:
                assert f.read() == g.read()


def test_a_dictionary_image_through_a_mount(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Group frames coded against a dictionary (more than 1 MiB of small files) mount to
    their tree; a damaged dictionary is EIO for every grouped file and nothing else."""
    fuse_ok()
    src = str(tmp_path / "src")
    os.makedirs(src)
    shared = hashlib.sha256(b"seed").hexdigest().encode() * 800  # 51 KB
    for i in range(30):
        with open(os.path.join(src, f"note{i:02}.txt"), "wb") as f:
            f.write(shared[:i * 997] + b"note %d" % i + shared[i * 997:])
    with open(os.path.join(src, "large"), "wb") as f:
        f.write(os.urandom(3 << 20))
    image = str(tmp_path / "d.dimg")
    code, _, err = run_cli("pack", "--in", src, "--out", image, "--format", "2", "-q")
    assert code == 0, err
    imgs = open_stack([image])
    try:
        (img,) = imgs
        assert img.info.group_dict and img.groups.dictionary is not None
        where = img.info.body_offset + img.groups.dictionary.offset + img.groups.dictionary.csize // 2
    finally:
        for i in imgs:
            i.close()
    with Mounted(image, str(tmp_path / "mnt"), "--group-cache", "1M") as mnt:
        assert diff_trees(snapshot_tree(mnt), snapshot_tree(src)) == []
    damaged = damaged_copy([image], str(tmp_path / "damaged"), {image: [where]})
    with Mounted(damaged, str(tmp_path / "mnt2")) as mnt:
        for i in range(30):
            with pytest.raises(OSError) as info:
                with open(os.path.join(mnt, f"note{i:02}.txt"), "rb") as f:
                    f.read()
            assert info.value.errno == errno.EIO
        with open(os.path.join(mnt, "large"), "rb") as f, open(os.path.join(src, "large"), "rb") as g:
            assert f.read() == g.read()
