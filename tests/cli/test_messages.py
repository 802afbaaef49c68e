"""What the CLI says when a line is wrong: the flag it does not know, named with its
command; the same exit code for a missing input file whatever the command."""

from __future__ import annotations

import pytest

from helpers import ROOT, assert_one_line_error, run_cli

from d4c.errors import EXIT_NOT_FOUND, EXIT_USAGE


@pytest.mark.parametrize("line, command, flag", [
    ("cdimg diff --oldImage x", "cdimg diff", "--oldImage"),
    ("cdimg diff --oldCdimg a --newCdimg b --outCdimg c --threads=3", "cdimg diff", "--threads"),
    ("convert --image x --output y --cdimgs", "convert", "--cdimgs"),
    ("version --nope", "version", "--nope"),
    ("cdimg --bogus diff", "cdimg", "--bogus"),
])
def test_unknown_flag_is_named_with_its_command(line: str, command: str, flag: str) -> None:
    code, _, err = run_cli(*line.split())
    assert_one_line_error(code, err, EXIT_USAGE)
    assert f"ctr-cli: {command}: unknown flag {flag} " in err


def test_unknown_flag_before_the_command() -> None:
    code, _, err = run_cli("--nope", "version")
    assert_one_line_error(code, err, EXIT_USAGE)
    assert "ctr-cli: unknown flag --nope " in err


def test_known_flags_and_abbreviations_still_parse(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # an unambiguous prefix of a flag is argparse's and stays accepted; the missing file is what is wrong
    code, _, err = run_cli("cdimg", "diff", "--old", str(tmp_path / "a"), "--newCdimg", str(tmp_path / "b"),
                           "--outCdimg", str(tmp_path / "c"), "--threadNum", "-1")
    assert_one_line_error(code, err, EXIT_USAGE)
    assert "unknown flag" not in err and "--threadNum" in err


MISSING = "/nonexistent/d4c-input"


@pytest.mark.parametrize("line", [
    "unpack --cdimg {m} --out {t}/o",
    "cdimg show --cdimg {m}",
    "dimg show --dimg {m}",
    "cdimg diff --oldCdimg {m} --newCdimg {m} --outCdimg {t}/o",
    "cdimg patch --diffCdimg {m} --baseCdimg {m} --outCdimg {t}/o",
    "cdimg merge --cdimgs {m},{m} --baseCdimg {m} --outCdimg {t}/o",
    "pack --in {m} --out {t}/o.dimg",
    "pack --config {m} --dimg {m} --out {t}/o",
    "mount --cdimg {m} {t}",
    "load --image a:b --cdimg {m}",
    "push --cdimg {m} --serverHost 127.0.0.1:9",
    "util diff --old {m} --new {m} --diff {t}/o",
    "util patch --old {m} --diff {m} --new {t}/o",
    "stat diff --cdimg {m} --baseCdimg {m}",
    "convert --image {m} --output {t}/o",
    "convert --image oci:{m} --output {t}/o",
])
def test_a_missing_input_file_is_4_for_every_command(line: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli("-q", *line.format(m=MISSING, t=tmp_path).split())
    assert_one_line_error(code, err, EXIT_NOT_FOUND)
    assert MISSING in err


def _subparsers(parser):  # type: ignore[no-untyped-def]
    import argparse
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _shape(parser) -> dict:  # type: ignore[no-untyped-def,type-arg]
    """A parser's flags and, for a group, its commands' shapes."""
    sub = _subparsers(parser)
    flags = sorted(s for a in parser._actions for s in a.option_strings)
    return {"flags": flags, "commands": {n: _shape(p) for n, p in sub.choices.items()} if sub else {}}


def test_each_line_builds_the_commands_its_first_word_names() -> None:
    """A call imports only its own command's module; the parser it builds for that
    word must be the same as the full one (a command left out of the table would
    vanish from its group)."""
    from d4c.cli import MODULES_BY_WORD, build_parser
    full = _subparsers(build_parser()).choices
    assert set(full) == set(MODULES_BY_WORD)
    for word in full:
        lazy = _subparsers(build_parser(["-q", word, "--help"])).choices
        assert _shape(lazy[word]) == _shape(full[word]), word


def test_version_and_mount_servers_do_not_load_numpy() -> None:
    """numpy is ~10 MiB of each FUSE server's memory and 80 ms of every start; only
    the delta engine needs it, and a mount loads the engine at its first delta file."""
    import subprocess
    import sys
    code = ("import sys\nfrom d4c.cli import main, build_parser\n"
            "main(['-q', 'version'])\n"
            "build_parser(['mount']).parse_args(['mount', '--cdimg', 'x', '/mnt'])\n"
            "import d4c.llfs.serve, d4c.llfs.model, d4c.llfs.process, d4c.image.format\n"
            "sys.stderr.write(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'grpc'))))\n")
    import os
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stderr == "", f"loaded: {p.stderr}"


def test_pull_have_a_missing_file_is_4(tmp_path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli("-q", "pull", "--image", "a:1", "--host", "127.0.0.1:9", "--have", MISSING,
                           "--output", str(tmp_path / "o"))
    assert_one_line_error(code, err, EXIT_NOT_FOUND)
    assert MISSING in err
    code, _, err = run_cli("-q", "pull", "--image", "a:1", "--host", "127.0.0.1:9", "--have", "sha256:12",
                           "--output", str(tmp_path / "o"))
    assert_one_line_error(code, err, EXIT_USAGE)
