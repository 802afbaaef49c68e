"""What the CLI says when a line is wrong: the flag it does not know, named with its
command; the same exit code for a missing input file whatever the command."""

from __future__ import annotations

import pytest

from helpers import assert_one_line_error, run_cli

from d4c.errors import EXIT_NOT_FOUND, EXIT_USAGE


@pytest.mark.parametrize("line, command, flag", [
    ("cdimg diff --oldImage x", "cdimg diff", "--oldImage"),
    ("cdimg diff --oldCdimg a --newCdimg b --outCdimg c --threads=3", "cdimg diff", "--threads"),
    ("convert --image x --output y --cdimgs", "convert", "--cdimgs"),
    ("version --nope", "version", "--nope"),
])
def test_unknown_flag_is_named_with_its_command(line: str, command: str, flag: str) -> None:
    code, _, err = run_cli(*line.split())
    assert_one_line_error(code, err, EXIT_USAGE)
    assert f"ctr-cli: {command}: unknown flag {flag} " in err


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
    "push --cdimg {m} --host 127.0.0.1:9",
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
