"""Argument parsing that every d4c program shares: one-line errors that name
the command and the flag, sizes with units."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from .errors import UsageError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but usage errors are D4CErrors (one line, exit code 2), and a
    flag the command does not know is named with its command, before anything
    else is said of the line (`ctr-cli cdimg diff: unknown flag --oldImage`)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self._where()}{message} (see --help)")

    def _where(self) -> str:
        words = self.prog.split(" ", 1)
        return f"{words[1]}: " if len(words) > 1 else ""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        words = list(sys.argv[1:] if args is None else args)
        if self._subparsers is not None:  # a group: its flags are those before the command word
            self._refuse_unknown(words[:next((i for i, w in enumerate(words) if not w.startswith("-")), len(words))])
            return super().parse_known_args(words, namespace)
        try:
            parsed, extras = super().parse_known_args(words, namespace)
        except UsageError:
            self._refuse_unknown(words)
            raise
        self._refuse_unknown(extras)
        return parsed, extras

    def _refuse_unknown(self, words: list[str]) -> None:
        known = list(self._option_string_actions)
        for word in words:
            if word == "--":
                return
            if not word.startswith("-") or word == "-" or self._negative_number_matcher.match(word):
                continue
            flag = word.split("=", 1)[0]
            if flag in known or (flag.startswith("--") and any(k.startswith(flag) for k in known)):
                continue
            raise UsageError(f"{self._where()}unknown flag {flag} (see --help)")


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().rstrip("ib").rstrip("b")
    try:
        if t and t[-1] in units:
            value = int(float(t[:-1]) * units[t[-1]])
        else:
            value = int(t)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G)") from None
    if not 0 < value < (1 << 62):
        raise argparse.ArgumentTypeError(f"size out of range: {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def link_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < 1e6:
        raise argparse.ArgumentTypeError(f"{text} is not a link rate in Mbit/s (0 or more)")
    return value
