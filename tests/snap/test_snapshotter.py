"""The di3fs snapshotter and `ctr-cli load` with a real containerd and runc."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import IS_ROOT
from daemons import Containerd, Snapshotterd, have_containerd, mounts_below, namespace_cgroups, stop_device
from helpers import (ROOT, assert_one_line_error, binary, convert_tags, diff_chain, fuse_server_pids, need,
                     need_binary, run_cli)
from ocibuild import M, Layout

BUSYBOX = "/bin/busybox"


def busybox_versions() -> list[list[list[M]]]:
    """Four versions of a busybox image: /etc/version says which; v3 adds a file,
    v4 removes it again and changes a 'library'."""
    with open(BUSYBOX, "rb") as f:
        bb = f.read()
    base = [M("./", "dir"), M("bin/", "dir"), M("bin/busybox", data=bb, mode=0o755),
            M("bin/sh", "symlink", link="busybox"), M("bin/cat", "symlink", link="busybox"),
            M("bin/ls", "symlink", link="busybox"), M("bin/sleep", "symlink", link="busybox"),
            M("etc/", "dir"), M("etc/version", data=b"v1\n"), M("lib/", "dir"),
            M("lib/libdata.so", data=bytes(range(256)) * 400), M("tmp/", "dir", mode=0o1777)]
    return [
        [base],
        [base, [M("etc/version", data=b"v2\n")]],
        [base, [M("etc/version", data=b"v3\n"), M("etc/added", data=b"added in v3\n")]],
        [base, [M("etc/version", data=b"v4\n"), M("lib/libdata.so", data=bytes(range(256)) * 399 + b"x" * 256)]],
    ]


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> list[str]:  # type: ignore[no-untyped-def]
    """base cdimg of v1, then deltas 1->2, 2->3, 3->4 (the README's four-image chain)."""
    need(os.path.exists(BUSYBOX), "busybox-static is not installed")
    tmp = tmp_path_factory.mktemp("busybox")
    lay = Layout(str(tmp / "layout"))
    for n, layers in enumerate(busybox_versions(), 1):
        lay.tag(lay.image([(m, "gzip") for m in layers], config_extra={
            "config": {"Cmd": ["/bin/cat", "/etc/version"], "Env": ["PATH=/bin"]}}), f"v{n}")
    lay.save()
    return diff_chain(convert_tags(lay.path, [f"v{n}" for n in range(1, 5)], str(tmp)), str(tmp))


@pytest.fixture()
def daemons(tmp_path):  # type: ignore[no-untyped-def]
    need(IS_ROOT, "containerd, runc and FUSE mounts need root")
    missing = have_containerd()
    need(missing is None, missing or "")
    base = str(tmp_path / "d")
    os.makedirs(os.path.join(base, "run"))
    # the shipped binary when it is built (its FUSE servers are the binary re-executed)
    with running(base, binary("snapshotter")) as both:
        yield both


@contextlib.contextmanager
def running(base: str, snapshotter_binary: str | None, extra: tuple[str, ...] = (),  # type: ignore[no-untyped-def]
            cri_registries: tuple[str, ...] = ()):
    """A snapshotter (with `extra` flags) and a containerd using it (with CRI for
    `cri_registries`), under `base`; afterwards no container, daemon, FUSE server
    or mount is left."""
    snap = Snapshotterd(base, snapshotter_binary, extra)
    ctrd = Containerd(base, snap.socket, cri_registries)
    snap.start()
    ctrd.start()
    try:
        yield ctrd, snap
    finally:
        stop_device(ctrd, snap, base)


def wait_redial(ctrd: Containerd) -> None:
    """containerd redials a restarted proxy snapshotter only after its gRPC
    backoff: its first calls may fail (GC included), so wait until one works."""
    for _ in range(100):
        if ctrd.ctr("snapshots", "--snapshotter", "di3fs", "ls", check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError("containerd does not reach the restarted snapshotter")


def on_terminal(*args: str) -> tuple[int, str]:
    """ctr-cli (from source) with its stderr on a pseudo-terminal: the exit code
    and what the terminal showed."""
    import pty
    import sys
    from daemons import SRC
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "d4c", *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=slave, env=dict(os.environ, PYTHONPATH=SRC))
    os.close(slave)
    shown = b""
    try:
        while chunk := os.read(master, 1 << 16):
            shown += chunk
    except OSError:  # EIO: the program closed the terminal
        pass
    finally:
        os.close(master)
    return proc.wait(timeout=300), shown.decode(errors="replace")


def load(ctrd: Containerd, snap: Snapshotterd, name: str, path: str) -> tuple[int, str, str]:
    return run_cli("load", "--image", name, "--cdimg", path, "--address", ctrd.socket,
                   "--namespace", ctrd.namespace, "--snapshotter-root", snap.root, "-q")


def run(ctrd: Containerd, image: str, cid: str, *cmd: str) -> str:
    return ctrd.ctr("run", "--rm", "--snapshotter", "di3fs", image, cid, *cmd).stdout


def test_chain_loads_and_runs(daemons, chain) -> None:  # type: ignore[no-untyped-def]
    ctrd, snap = daemons
    for n, path in enumerate(chain, 1):
        code, _, err = load(ctrd, snap, f"d4c-bb:{n}", path)
        assert code == 0, err + snap.logs()
    for n in range(1, 5):
        assert run(ctrd, f"d4c-bb:{n}", f"c{n}-{ctrd.namespace}") == f"v{n}\n"
    out = run(ctrd, "d4c-bb:3", f"c3b-{ctrd.namespace}", "/bin/cat", "/etc/added")
    assert out == "added in v3\n"
    p = ctrd.ctr("run", "--rm", "--snapshotter", "di3fs", "d4c-bb:4", f"c4b-{ctrd.namespace}",
                 "/bin/cat", "/etc/added", check=False)
    assert p.returncode != 0  # removed again in v4
    # writes stay in the container
    out = run(ctrd, "d4c-bb:2", f"w-{ctrd.namespace}", "/bin/sh", "-c",
              "echo changed > /etc/version; cat /etc/version")
    assert out == "changed\n"
    assert run(ctrd, "d4c-bb:2", f"r-{ctrd.namespace}") == "v2\n"
    # loading again is a no-op; registry-style names work
    code, _, err = load(ctrd, snap, "d4c-bb:2", chain[1])
    assert code == 0, err
    code, _, err = load(ctrd, snap, "127.0.0.1:5000/d4c/bb:2", chain[1])
    assert code == 0, err
    assert run(ctrd, "127.0.0.1:5000/d4c/bb:2", f"reg-{ctrd.namespace}") == "v2\n"


def test_shared_mount_and_restart(daemons, chain) -> None:  # type: ignore[no-untyped-def]
    ctrd, snap = daemons
    for n, path in enumerate(chain[:2], 1):
        code, _, err = load(ctrd, snap, f"d4c-bb:{n}", path)
        assert code == 0, err
    # two long-running containers of one image
    names = [f"s{i}-{ctrd.namespace}" for i in (1, 2)]
    for name in names:
        ctrd.ctr("run", "-d", "--snapshotter", "di3fs", "d4c-bb:2", name, "/bin/sleep", "300")
    assert len(mounts_below(snap.root, "fuse.d4c")) == 2  # one per loaded image, shared by both containers
    snap.stop()
    # the containers keep reading while the snapshotter is down
    for name in names:
        out = ctrd.ctr("tasks", "exec", "--exec-id", f"e-{name}", name, "/bin/cat", "/etc/version").stdout
        assert out == "v2\n"
    snap.start()
    wait_redial(ctrd)
    assert run(ctrd, "d4c-bb:2", f"after-{ctrd.namespace}") == "v2\n"
    for name in names:
        ctrd.remove_container(name)


def test_images_rm_frees_everything(daemons, chain) -> None:  # type: ignore[no-untyped-def]
    ctrd, snap = daemons
    for n, path in enumerate(chain[:3], 1):
        code, _, err = load(ctrd, snap, f"d4c-bb:{n}", path)
        assert code == 0, err
    assert len(os.listdir(os.path.join(snap.root, "images"))) == 3
    ctrd.ctr("images", "rm", "--sync", "d4c-bb:1", "d4c-bb:2", "d4c-bb:3")
    for _ in range(100):
        left = mounts_below(snap.root)
        if not left and not os.listdir(os.path.join(snap.root, "images")) and not fuse_server_pids(snap.root):
            break
        time.sleep(0.1)
    assert left == [] and os.listdir(os.path.join(snap.root, "images")) == []
    assert fuse_server_pids(snap.root) == []
    assert ctrd.ctr("snapshots", "--snapshotter", "di3fs", "ls").stdout.strip().count("\n") == 0


def test_bad_loads_leave_nothing(daemons, chain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ctrd, snap = daemons
    # a delta without its base: the base's file is named (convert wrote it one directory down)
    code, _, err = load(ctrd, snap, "d4c-bb:2", chain[1])
    assert_one_line_error(code, err)
    assert f"load it first: ctr-cli load --image NAME:TAG --cdimg {chain[0]}" in err
    # a corrupted body: the snapshotter's check refuses it, a corrupt input (3)
    bad = str(tmp_path / "bad.cdimg")
    with open(chain[0], "rb") as f:
        data = bytearray(f.read())
    data[len(data) // 3] ^= 0xFF
    with open(bad, "wb") as f:
        f.write(data)
    code, _, err = load(ctrd, snap, "d4c-bb:bad", bad)
    assert_one_line_error(code, err, 3)
    assert err.startswith(f"ctr-cli: corrupt image {bad}: /bin/busybox: ") and "incoming" not in err
    assert err.endswith("(refused by the di3fs snapshotter)\n")
    # containerd down
    code, _, err = run_cli("load", "--image", "x:1", "--cdimg", chain[0], "--address",
                           str(tmp_path / "nope.sock"), "-q")
    assert_one_line_error(code, err)
    assert "containerd is not reachable" in err
    # nothing half-registered
    assert ctrd.ctr("images", "ls", "-q").stdout.strip() == ""
    assert ctrd.ctr("snapshots", "--snapshotter", "di3fs", "ls").stdout.strip().count("\n") == 0
    assert ctrd.ctr("leases", "ls", "-q").stdout.strip() == ""
    assert os.listdir(os.path.join(snap.root, "incoming")) == []
    # snapshotter down: containerd answers, and is not said to be unreachable
    snap.stop()
    code, _, err = load(ctrd, snap, "d4c-bb:1", chain[0])
    assert_one_line_error(code, err, 7)
    assert "the di3fs snapshotter behind it does not" in err and "containerd is not reachable" not in err
    assert ctrd.ctr("images", "ls", "-q").stdout.strip() == ""


def test_delta_before_its_base_names_the_base(daemons, chain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The error for a delta whose base is not loaded names the base by the tag
    it was loaded under (its image is still in containerd, its snapshot gone)
    and by its file next to the delta, not only by id."""
    ctrd, snap = daemons
    code, _, err = load(ctrd, snap, "d4c-bb:1", chain[0])
    assert code == 0, err
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(chain[1], alone / "delta.cdimg")
    shutil.copy(chain[0], alone / "base.cdimg")
    import json
    shown = run_cli("cdimg", "show", "--cdimg", chain[0], "--json")[1]
    ctrd.ctr("snapshots", "--snapshotter", "di3fs", "rm", json.loads(shown)["id"])
    code, _, err = load(ctrd, snap, "d4c-bb:2", str(alone / "delta.cdimg"))
    assert_one_line_error(code, err)
    assert f"load it first: ctr-cli load --image d4c-bb:1 --cdimg {alone / 'base.cdimg'}" in err, err


def test_ordinary_image_imports_and_runs(daemons, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A plain OCI image (layers unpacked by containerd) on the di3fs snapshotter."""
    from ocibuild import tar_dir
    ctrd, snap = daemons
    lay = Layout(str(tmp_path / "layout"))
    versions = busybox_versions()
    lay.tag(lay.image([(versions[1][0], "gzip"), (versions[1][1], "gzip")], config_extra={
        "config": {"Cmd": ["/bin/cat", "/etc/version"], "Env": ["PATH=/bin"]}}), "v2")
    lay.save()
    archive = str(tmp_path / "bb.tar")
    tar_dir(lay.path, archive)
    ctrd.ctr("images", "import", "--snapshotter", "di3fs", "--base-name", "d4c.test/plain", archive)
    names = ctrd.ctr("images", "ls", "-q").stdout.split()
    assert names == ["d4c.test/plain:v2"]
    assert run(ctrd, names[0], f"plain-{ctrd.namespace}") == "v2\n"
    ctrd.ctr("images", "rm", "--sync", names[0])
    for _ in range(50):
        if ctrd.ctr("snapshots", "--snapshotter", "di3fs", "ls").stdout.strip().count("\n") == 0:
            break
        time.sleep(0.1)
    assert ctrd.ctr("snapshots", "--snapshotter", "di3fs", "ls").stdout.strip().count("\n") == 0


def test_in_use_images_are_kept_and_dead_mounts_restored(daemons, chain) -> None:  # type: ignore[no-untyped-def]
    """rm --sync of an image a container uses keeps its mount until the container
    is gone; a mount whose server died is restored when the snapshotter starts."""
    ctrd, snap = daemons
    code, _, err = load(ctrd, snap, "d4c-bb:1", chain[0])
    assert code == 0, err
    name = f"busy-{ctrd.namespace}"
    ctrd.ctr("run", "-d", "--snapshotter", "di3fs", "d4c-bb:1", name, "/bin/sleep", "300")
    ctrd.ctr("images", "rm", "--sync", "d4c-bb:1")
    assert len(mounts_below(snap.root, "fuse.d4c")) == 1
    out = ctrd.ctr("tasks", "exec", "--exec-id", "e1", name, "/bin/cat", "/etc/version").stdout
    assert out == "v1\n"
    # the mount's server dies while the snapshotter is down: the next start restores it
    snap.stop()
    for pid in fuse_server_pids(snap.root):
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.3)
    snap.start()
    wait_redial(ctrd)
    assert len(mounts_below(snap.root, "fuse.d4c")) == 1 and len(fuse_server_pids(snap.root)) == 1
    ctrd.remove_container(name)
    # with its last user gone, the image's snapshot is collected by the next
    # garbage collection (forced here: deleting a lease with --sync runs one)
    for _ in range(50):
        lease = ctrd.ctr("leases", "create").stdout.split()[0]
        ctrd.ctr("leases", "delete", "--sync", lease)
        if not mounts_below(snap.root, "fuse.d4c") and not os.listdir(os.path.join(snap.root, "images")):
            break
        time.sleep(0.1)
    assert mounts_below(snap.root, "fuse.d4c") == [] and os.listdir(os.path.join(snap.root, "images")) == []


def test_dead_mount_server_is_noticed_and_remounted(daemons, chain) -> None:  # type: ignore[no-untyped-def]
    """kill -9 of an image's mount server while the snapshotter runs: the
    snapshotter notices, mounts the image again at the same path, so that new
    containers of it start within a bounded wait, and logs the containers that
    were on the dead mount (their overlay keeps it: they fail until restarted)."""
    ctrd, snap = daemons
    code, _, err = load(ctrd, snap, "d4c-bb:1", chain[0])
    assert code == 0, err
    old = f"old-{ctrd.namespace}"
    ctrd.ctr("run", "-d", "--snapshotter", "di3fs", "d4c-bb:1", old, "/bin/sleep", "300")
    [server] = fuse_server_pids(snap.root)
    os.kill(server, signal.SIGKILL)
    deadline = time.monotonic() + 20  # the watch runs every 2 s; a remount takes about a second
    for attempt in itertools.count():
        p = ctrd.ctr("run", "--rm", "--snapshotter", "di3fs", "d4c-bb:1", f"new{attempt}-{ctrd.namespace}",
                     check=False)
        if p.returncode == 0:
            break
        assert time.monotonic() < deadline, f"no new container within 20 s: {p.stderr}\n{snap.logs()}"
        time.sleep(0.5)
    assert p.stdout == "v1\n"
    [again] = fuse_server_pids(snap.root)
    assert again != server and len(mounts_below(snap.root, "fuse.d4c")) == 1  # the dead one was detached
    line = next(x for x in snap.logs().splitlines() if "lost its mount server" in x)
    assert old in line, snap.logs()
    ctrd.remove_container(old)
    # a mount that went (unmounted by hand) comes back too
    [mnt] = mounts_below(snap.root, "fuse.d4c")
    subprocess.run(["umount", "-l", mnt], check=True)
    for _ in range(100):
        if "lost its mount (unmounted)" in snap.logs():
            break
        time.sleep(0.2)
    assert mounts_below(snap.root, "fuse.d4c") == [mnt], snap.logs()
    assert run(ctrd, "d4c-bb:1", f"back-{ctrd.namespace}") == "v1\n"


def test_group_cache_reaches_every_mount(chain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """snapshotter --group-cache: every image's mount server is started with that many bytes
    of decoded groups to keep (format-2 images), and containers run on those mounts."""
    need(IS_ROOT, "containerd, runc and FUSE mounts need root")
    missing = have_containerd()
    need(missing is None, missing or "")
    base = str(tmp_path / "d")
    os.makedirs(os.path.join(base, "run"))
    with running(base, binary("snapshotter"), extra=("--group-cache", "3M")) as (ctrd, snap):
        for n, path in enumerate(chain[:2], 1):
            code, _, err = load(ctrd, snap, f"d4c-bb:{n}", path)
            assert code == 0, err
        assert run(ctrd, "d4c-bb:1", f"g1-{ctrd.namespace}") == "v1\n"
        assert run(ctrd, "d4c-bb:2", f"g2-{ctrd.namespace}") == "v2\n"
        servers = fuse_server_pids(snap.root)
        assert len(servers) == 2
        for pid in servers:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            assert args[args.index(b"--group-cache") + 1] == str(3 << 20).encode()


def test_delta_of_a_file_over_64_mib_loads_and_runs(daemons, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A valid delta whose changed file is 70 MiB (above dimg.ONE_SHOT_MAX, so its
    body is a DELTA streamed in bounded memory): the snapshotter's load check
    failed it with 'body has 0 bytes, expected ...'; now it loads and a container
    reads the rebuilt file."""
    import hashlib
    import json
    import random
    from d4c.image.reader import ONE_SHOT_MAX
    need(os.path.exists(BUSYBOX), "busybox-static is not installed")
    ctrd, snap = daemons
    big = bytearray(random.Random(7).randbytes(70 << 20))
    config = str(tmp_path / "config.json")
    with open(config, "w") as f:
        json.dump({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
                   "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sha256sum", "/big"]}}, f)
    cdimgs = []
    for version in (1, 2):
        if version == 2:
            big[30 << 20:(30 << 20) + 4096] = b"\x55" * 4096
            big += b"grown in v2\n"
        tree = tmp_path / f"v{version}"
        os.makedirs(tree / "bin")
        shutil.copy(BUSYBOX, tree / "bin" / "busybox")
        os.symlink("busybox", tree / "bin" / "sha256sum")
        (tree / "big").write_bytes(big)
        cdimgs.append(str(tmp_path / f"v{version}.cdimg"))
        code, _, err = run_cli("pack", "--in", str(tree), "--config", config, "--out", cdimgs[-1], "-q")
        assert code == 0, err
    delta = str(tmp_path / "delta.cdimg")
    code, out, err = run_cli("cdimg", "diff", "--oldCdimg", cdimgs[0], "--newCdimg", cdimgs[1], "--outCdimg", delta,
                             "--deltaEncoding", "fast", "--json", "-q")
    assert code == 0, err
    [decision] = [d for d in json.loads(out) if d["path"] == "/big"]
    assert decision["kind"] == "delta" and decision["size"] > ONE_SHOT_MAX
    # on a terminal: quiet with -q; else the hand-over and the snapshotter's check show progress
    common = ["--address", ctrd.socket, "--namespace", ctrd.namespace, "--snapshotter-root", snap.root]
    code, shown = on_terminal("load", "--image", "d4c-big:1", "--cdimg", cdimgs[0], *common, "-q")
    assert code == 0 and shown == "", shown + snap.logs()
    code, shown = on_terminal("load", "--image", "d4c-big:2", "--cdimg", delta, *common)
    assert code == 0, shown + snap.logs()
    assert "handing delta.cdimg to the snapshotter" in shown
    assert "checking delta.cdimg in the snapshotter  0 B/70.0 MiB (0%)" in shown, shown  # one body: 0 until done
    out = run(ctrd, "d4c-big:2", f"big-{ctrd.namespace}")
    assert out.split()[0] == hashlib.sha256(big).hexdigest()


def test_image_mounts_keep_setuid_for_containers_and_only_root_reaches_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The snapshotter's image mounts honour setuid bits (a container whose image
    sets user nobody runs a setuid-root program with euid 0) and serve every user, so no
    local user may reach them: `nobody` cannot enter the mount, even when the
    state directories were made world-readable before (an older version, an
    admin's mkdir) and every directory above the root is reachable."""
    need(IS_ROOT, "containerd, runc and FUSE mounts need root")
    missing = have_containerd()
    need(missing is None, missing or "")
    import json
    from privileges import NOBODY, as_nobody, mount_options, reachable_dir, setuid_tree
    setuid_tree(str(tmp_path / "tree"))
    config = str(tmp_path / "config.json")
    with open(config, "w") as f:
        json.dump({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
                   "config": {"Cmd": ["/euid"], "User": f"{NOBODY}:{NOBODY}"}}, f)
    image = str(tmp_path / "suid.cdimg")
    code, _, err = run_cli("pack", "--in", str(tmp_path / "tree"), "--config", config, "--out", image, "-q")
    assert code == 0, err
    with reachable_dir() as public:
        base = os.path.join(public, "d")
        os.makedirs(os.path.join(base, "run"))
        for sub in ("", "snapshots"):
            os.makedirs(os.path.join(base, "di3fs", sub), mode=0o755, exist_ok=True)
            os.chmod(os.path.join(base, "di3fs", sub), 0o755)
        with running(base, binary("snapshotter")) as (ctrd, snap):
            code, _, err = load(ctrd, snap, "d4c-suid:1", image)
            assert code == 0, err + snap.logs()
            [mnt] = mounts_below(snap.root, "fuse.d4c")
            assert not {"nosuid", "nodev"} & mount_options(mnt)
            for probe in (["/bin/ls", mnt], [os.path.join(mnt, "euid")]):
                p = as_nobody(*probe)
                assert p.returncode != 0 and "Permission denied" in p.stderr, (probe, p.stdout, p.stderr)
            out = ctrd.ctr("run", "--rm", "--allow-new-privs", "--snapshotter", "di3fs", "d4c-suid:1",
                           f"suid-{ctrd.namespace}").stdout  # ctr sets no_new_privs by default
            assert out == "0\n"


def test_install_snapshotter_is_idempotent(tmp_path) -> None:  # type: ignore[no-untyped-def]
    script = os.path.join(ROOT, "install_snapshotter.sh")
    config = tmp_path / "etc" / "config.toml"
    env = dict(os.environ, CONFIG=str(config), SOCKET="/run/di3fs/snapshotter.sock")
    for _ in range(2):
        subprocess.run(["sh", script], env=env, check=True, capture_output=True)
    text = config.read_text()
    assert text.count("[proxy_plugins.di3fs]") == 1 and 'address = "/run/di3fs/snapshotter.sock"' in text
    assert text.startswith("version = 2")
    # an existing config keeps its content
    config.write_text('version = 2\n[plugins]\n  x = 1\n')
    subprocess.run(["sh", script], env=env, check=True, capture_output=True)
    assert config.read_text().startswith('version = 2\n[plugins]\n  x = 1\n') and "di3fs" in config.read_text()


def test_readme_push_pull_run(daemons, chain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """push 1 and the deltas to a server, pull 1 then 4 into containerd, run 4."""
    from daemons import Server
    ctrd, snap = daemons
    srv = Server(str(tmp_path))
    srv.start()
    try:
        for i, path in enumerate(chain):
            tag = {0: "d4c-bb:1", 3: "d4c-bb:4"}.get(i)
            code, _, err = run_cli("push", "--cdimg", path, "--serverHost", srv.host, "-q",
                                   *(["--imageTag", tag] if tag else []))
            assert code == 0, err
        common = ["--host", srv.host, "--address", ctrd.socket, "--namespace", ctrd.namespace,
                  "--snapshotter-root", snap.root]
        code, out, err = run_cli("pull", "--image", "d4c-bb:1", *common, "--expectedDimgsNum", "1")
        assert code == 0, err + snap.logs()
        code, out, err = run_cli("pull", "--image", "d4c-bb:4", *common, "--expectedDimgsNum", "3")
        assert code == 0, err + snap.logs()
        downloaded = int(out.rsplit(",", 1)[1].split()[0])
        assert downloaded < sum(os.path.getsize(p) for p in chain[1:])
        assert run(ctrd, "d4c-bb:4", f"pulled-{ctrd.namespace}") == "v4\n"
    finally:
        srv.stop()


def test_offline_bundle_runs_the_flow(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`make dist`'s tarball, unpacked into a clean directory, runs convert -> diff
    -> server -> push -> pull -> load -> ctr run with no Python on PATH."""
    import tarfile
    bundle = os.environ.get("D4C_DIST", "")
    need(bool(bundle) and os.path.exists(bundle), "no d4c-*.tar.gz bundle (run `make dist`)")
    need(IS_ROOT, "containerd, runc and FUSE mounts need root")
    missing = have_containerd()
    need(missing is None, missing or "")
    need(os.path.exists(BUSYBOX), "busybox-static is not installed")
    with tarfile.open(bundle) as tf:
        tf.extractall(tmp_path / "unpacked", filter="data")
    [top] = os.listdir(tmp_path / "unpacked")
    d = str(tmp_path / "unpacked" / top)
    assert sorted(os.listdir(d)) == ["INSTALL", "ctr-cli", "d4c", "install_snapshotter.sh", "server", "snapshotter",
                                     "systemd"]
    # one shared program: the three names are links to it
    assert {os.readlink(os.path.join(d, n)) for n in ("ctr-cli", "snapshotter", "server")} == {"d4c/d4c"}
    assert "@VERSION@" not in open(os.path.join(d, "INSTALL")).read()
    # a PATH with the system tools the programs call, and no python
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("ctr", "fusermount3", "mount", "umount"):
        found = shutil.which(tool)
        assert found, tool
        os.symlink(found, bindir / tool)
    env = {"PATH": str(bindir)}

    def cli(*args: str) -> str:
        p = subprocess.run([os.path.join(d, "ctr-cli"), *args], env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        return p.stdout

    lay = Layout(str(tmp_path / "layout"))
    versions = busybox_versions()
    for n in (1, 2):
        lay.tag(lay.image([(m, "gzip") for m in versions[n - 1]], config_extra={
            "config": {"Cmd": ["/bin/cat", "/etc/version"], "Env": ["PATH=/bin"]}}), f"v{n}")
    lay.save()
    images = str(tmp_path / "images")
    for n in (1, 2):
        cli("convert", "--image", f"oci:{lay.path}:v{n}", "--output", f"{images}/v{n}", "--cdimg", "-q")
    cli("cdimg", "diff", "--oldCdimg", f"{images}/v1/image.cdimg", "--newCdimg", f"{images}/v2/image.cdimg",
        "--outCdimg", f"{images}/diff_1-2.cdimg", "-q")
    base = str(tmp_path / "d")
    os.makedirs(os.path.join(base, "run"))
    from daemons import Server
    srv = Server(base, os.path.join(d, "server"))
    with running(base, os.path.join(d, "snapshotter")) as (ctrd, snap):
        srv.start()
        try:
            cli("push", "--cdimg", f"{images}/v1/image.cdimg", "--imageTag", "bundle:1", "--serverHost", srv.host,
                "-q")
            cli("push", "--cdimg", f"{images}/diff_1-2.cdimg", "--imageTag", "bundle:2", "--serverHost", srv.host,
                "-q")
            common = ["--host", srv.host, "--address", ctrd.socket, "--namespace", ctrd.namespace,
                      "--snapshotter-root", snap.root, "-q"]
            cli("pull", "--image", "bundle:1", *common)
            cli("pull", "--image", "bundle:2", *common)
            assert run(ctrd, "bundle:2", f"bundle-{ctrd.namespace}") == "v2\n"
            # the bundle's one program serves the snapshotter's mounts with setuid and devices kept
            with open("/proc/mounts") as f:
                image_mounts = [line.split() for line in f if line.split()[1].startswith(snap.root)
                                and line.split()[2] == "fuse.d4c"]
            assert image_mounts and not any({"nosuid", "nodev"} & set(m[3].split(",")) for m in image_mounts)
            assert namespace_cgroups(ctrd.namespace)  # runc made them
        finally:
            srv.stop()
    assert not namespace_cgroups(ctrd.namespace)  # and the teardown removed them


def test_snapshotter_stops_on_a_burst_of_signals(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Ctrl-C reaches the one-file bootloader, which forwards it, and the daemon
    itself: signals come in bursts.  The daemon stops within its grace period
    every time (a handler that took a lock once deadlocked it for good).  Only
    the one-file binary reproduced that deadlock; the module never hung."""
    need(IS_ROOT, "the snapshotter needs root")
    snapshotter = need_binary("snapshotter")
    for attempt in range(12):
        base = str(tmp_path / f"s{attempt}")
        os.makedirs(os.path.join(base, "run"))
        d = Snapshotterd(base, snapshotter)
        try:
            d.start()
            assert d.proc is not None
            for _ in range(30):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(d.proc.pid, signal.SIGINT)
            try:
                d.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"the snapshotter hung after a burst of SIGINTs (attempt {attempt}):\n"
                                     f"{d.logs()}") from None
        finally:
            if d.proc is not None and d.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(d.proc.pid, signal.SIGKILL)  # the bootloader and the daemon it runs
                d.proc.wait()
        assert "stopped" in d.logs(), d.logs()
