"""pack -> unpack gives back the same tree, attribute by attribute."""

from __future__ import annotations

import os

from conftest import IS_ROOT
from helpers import diff_trees, make_tree, need_root, run_cli, snapshot_tree

from d4c.image.reader import Image
from d4c.image.tree import EntryType


def test_roundtrip_every_entry_type(tmp_path) -> None:  # type: ignore[no-untyped-def]
    need_root()
    src = str(tmp_path / "src")
    make_tree(src)
    code, _, err = run_cli("pack", "--in", src, "--out", str(tmp_path / "x.dimg"), "--threadNum", "3")
    assert code == 0, err
    with Image(str(tmp_path / "x.dimg")) as image:
        types = {e.type for e in image.entries}
    assert types == set(EntryType), f"tree lacks types: {set(EntryType) - types}"
    code, _, err = run_cli("unpack", "--dimg", str(tmp_path / "x.dimg"), "--out", str(tmp_path / "out"))
    assert code == 0, err
    problems = diff_trees(snapshot_tree(src), snapshot_tree(str(tmp_path / "out")))
    assert not problems, "\n".join(problems)


def test_roundtrip_as_any_user(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Without devices/owners the round trip holds for any user."""
    src = str(tmp_path / "src")
    make_tree(src, devices=False)
    code, _, err = run_cli("pack", "--in", src, "--out", str(tmp_path / "x.dimg"))
    assert code == 0, err
    code, _, err = run_cli("unpack", "--dimg", str(tmp_path / "x.dimg"), "--out", str(tmp_path / "out"))
    assert code == 0, err
    a, b = snapshot_tree(src), snapshot_tree(str(tmp_path / "out"))
    if not IS_ROOT:
        for snap in (a, b):
            for info in snap.values():
                info.pop("uid"), info.pop("gid")
    problems = diff_trees(a, b)
    assert not problems, "\n".join(problems)


def test_cdimg_roundtrip_and_pack_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = str(tmp_path / "src")
    make_tree(src, devices=False)
    config = tmp_path / "config.json"
    config.write_text('{"os": "linux", "architecture": "amd64", "config": {"Cmd": ["sh"]}, '
                      '"rootfs": {"type": "layers", "diff_ids": []}}')
    code, out1, err = run_cli("pack", "--in", src, "--out", str(tmp_path / "x.dimg"))
    assert code == 0, err
    code, out2, err = run_cli("pack", "--config", str(config), "--dimg", str(tmp_path / "x.dimg"),
                              "--out", str(tmp_path / "x.cdimg"))
    assert code == 0, err
    code, out3, err = run_cli("pack", "--in", src, "--config", str(config), "--out", str(tmp_path / "y.cdimg"))
    assert code == 0, err
    assert out1 == out2 == out3
    with open(tmp_path / "x.cdimg", "rb") as a, open(tmp_path / "y.cdimg", "rb") as b:
        assert a.read() == b.read()
    with Image(str(tmp_path / "x.cdimg")) as image:
        assert image.info.config["rootfs"]["diff_ids"] == [out1.strip()]
        assert image.info.config["config"]["Cmd"] == ["sh"]
    code, _, err = run_cli("unpack", "--cdimg", str(tmp_path / "x.cdimg"), "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert os.path.isfile(tmp_path / "out" / "dir" / "file.txt")
    code, shown, err = run_cli("cdimg", "show", "--cdimg", str(tmp_path / "x.cdimg"), "--json", "--entries")
    assert code == 0, err
    import json
    doc = json.loads(shown)
    assert doc["id"] == out1.strip() and doc["kind"] == "cdimg"
    paths = {e["path"] for e in doc["entryList"]}
    assert "/dir/sub/up" in paths and "/fifo" in paths
