"""install_snapshotter.sh against a real containerd that does not run under systemd:
it declares di3fs and prints the commands that restart that containerd, and those
commands work (containerd comes back with the plugin)."""

from __future__ import annotations

import os
import subprocess
import time

from conftest import IS_ROOT
from daemons import Containerd, have_containerd
from helpers import ROOT, need

SCRIPT = os.path.join(ROOT, "install_snapshotter.sh")


def containerd_without_di3fs(tmp_path, cri: bool = False) -> Containerd:  # type: ignore[no-untyped-def]
    """A private containerd (not started) whose config lacks the plugin: the script is to add it."""
    need(IS_ROOT, "containerd needs root")
    missing = have_containerd()
    need(missing is None, missing or "")
    base = str(tmp_path / "d")
    os.makedirs(os.path.join(base, "run"))
    ctrd = Containerd(base, os.path.join(base, "run", "di3fs.sock"))
    with open(ctrd.config) as f:
        plain = f.read().split("[proxy_plugins.di3fs]")[0]
    with open(ctrd.config, "w") as f:
        f.write(plain.replace('disabled_plugins = ["io.containerd.grpc.v1.cri"]', "") if cri else plain)
    return ctrd


def test_install_prints_a_restart_that_works(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ctrd = containerd_without_di3fs(tmp_path)
    base = ctrd.base
    ctrd.start()
    assert ctrd.proc is not None
    new_pid = None
    try:
        assert "di3fs" not in ctrd.ctr("plugins", "ls").stdout
        env = dict(os.environ, CONFIG=ctrd.config, SOCKET=os.path.join(base, "run", "di3fs.sock"))
        p = subprocess.run(["sh", SCRIPT], env=env, capture_output=True, text=True, timeout=60, check=True)
        lines = p.stdout.splitlines()
        assert f"containerd (pid {ctrd.proc.pid}) does not run under systemd; restart it with:" in lines, p.stdout
        command = lines[lines.index(next(x for x in lines if "restart it with" in x)) + 1].strip()
        assert command.startswith(f"kill {ctrd.proc.pid};") and ctrd.config in command
        restart = subprocess.Popen(["sh", "-c", command])
        ctrd.proc.wait(timeout=30)  # the old one is our child: reaped here, as init would
        assert restart.wait(timeout=30) == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = ctrd.ctr("plugins", "ls", check=False)
            if r.returncode == 0:
                break
            time.sleep(0.2)
        assert "di3fs" in ctrd.ctr("plugins", "ls").stdout
        new_pid = subprocess.run(["pgrep", "-f", f"containerd --config {ctrd.config}"], capture_output=True,
                                 text=True).stdout.split()
        # once declared, nothing to restart
        p = subprocess.run(["sh", SCRIPT], env=env, capture_output=True, text=True, timeout=60, check=True)
        assert "already declared" in p.stdout and "restart it" not in p.stdout
    finally:
        for pid in new_pid or []:
            subprocess.run(["kill", pid], check=False)
        ctrd.stop()


def test_install_without_a_running_containerd(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "config.toml"
    p = subprocess.run(["sh", SCRIPT], env=dict(os.environ, CONFIG=str(config)), capture_output=True, text=True,
                       timeout=60, check=True)
    assert f"no containerd with {config} is running; start it with:" in p.stdout
    assert f"containerd --config '{config}' &" in p.stdout
    p = subprocess.run(["sh", SCRIPT, "--bogus"], env=dict(os.environ, CONFIG=str(config)), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "unknown flag --bogus" in p.stderr


def run_script(config: str, *flags: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CONFIG=config, SOCKET="/run/di3fs/snapshotter.sock")
    return subprocess.run(["sh", SCRIPT, "--no-restart", *flags], env=env, capture_output=True, text=True, timeout=60)


def test_install_cri_writes_a_config_containerd_loads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """--cri makes CRI pull into di3fs with snapshot labels; idempotent; a config whose
    CRI table exists already is left alone with what to set in it; and containerd 1.6
    starts its CRI plugin from what the script wrote."""
    ctrd = containerd_without_di3fs(tmp_path, cri=True)
    first = run_script(ctrd.config, "--cri")
    assert first.returncode == 0, first.stderr
    with open(ctrd.config) as f:
        written = f.read()
    assert 'snapshotter = "di3fs"' in written and "disable_snapshot_annotations = false" in written
    again = run_script(ctrd.config, "--cri")
    assert again.returncode == 0 and "already" in again.stdout
    with open(ctrd.config) as f:
        assert f.read() == written
    ctrd.start()
    try:
        listed = ctrd.ctr("plugins", "ls").stdout
        cri = [line for line in listed.splitlines() if line.split()[:2] == ["io.containerd.grpc.v1", "cri"]]
        assert cri and cri[0].split()[-1] == "ok", listed
        assert "di3fs" in listed
    finally:
        ctrd.stop()
    other = tmp_path / "other.toml"
    other.write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n  snapshotter = "overlayfs"\n')
    p = run_script(str(other), "--cri")
    assert p.returncode == 1 and 'snapshotter = "di3fs"' in p.stderr
    assert "di3fs" not in other.read_text()  # nothing half-written
