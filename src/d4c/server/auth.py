"""Bearer tokens for the update server (`--auth-tokens FILE`, docs/API.md).

The file has one token per line, after its scope: `push TOKEN` may upload and
tag (and read); `read TOKEN` may read.  With no `read` line, reads stay open to
anyone who reaches the server.  The file is read again when it changes, so a
token is added or revoked without a restart.  Tokens are compared in constant
time and never logged."""

from __future__ import annotations

import hmac
import logging
import os
import threading

from ..errors import UsageError

log = logging.getLogger("d4c.server")
SCOPES = ("push", "read")
MIN_TOKEN = 16


class Tokens:
    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._seen: object = None  # what the last look found (a stamp, or the error): each is read and told once
        self._tokens: dict[str, list[bytes]] = {}
        self._load(first=True)

    def _load(self, first: bool = False) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._seen:
                return
            self._seen = stamp
            with open(self.path, encoding="utf-8") as f:
                lines = f.read(1 << 20).splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            if first:
                raise UsageError(f"--auth-tokens {self.path}: {exc}") from None
            if str(exc) != self._seen:
                self._seen = str(exc)
                log.warning("--auth-tokens %s: not read again (%s): the tokens read before stay", self.path, exc)
            return
        tokens: dict[str, list[bytes]] = {s: [] for s in SCOPES}
        for number, line in enumerate(lines, 1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            if len(words) != 2 or words[0] not in SCOPES or len(words[1]) < MIN_TOKEN:
                message = f"--auth-tokens {self.path}, line {number}: expected `push|read TOKEN` (at least " \
                          f"{MIN_TOKEN} characters)"
                if first:
                    raise UsageError(message)
                log.warning("%s: the file is not taken; the tokens read before stay", message)
                return
            tokens[words[0]].append(words[1].encode())
        if not tokens["push"] and first:
            raise UsageError(f"--auth-tokens {self.path}: no `push` token (nobody could upload)")
        self._tokens = tokens

    def _matches(self, presented: bytes, scope: str) -> bool:
        # every token compared, in constant time each: the answer's timing says nothing about which
        found = False
        for token in self._tokens[scope]:
            found |= hmac.compare_digest(presented, token)
        return found

    def check(self, authorization: str | None, scope: str) -> int:
        """0 when the request may go on; else the HTTP status to refuse it with
        (401: no or an unknown token; 403: a read token that tries to push)."""
        with self._lock:
            self._load()
            if scope == "read" and not self._tokens["read"]:
                return 0
            kind, _, value = (authorization or "").partition(" ")
            if kind.lower() != "bearer" or not value.strip():
                return 401
            presented = value.strip().encode()
            if self._matches(presented, "push"):
                return 0
            if self._matches(presented, "read"):
                return 0 if scope == "read" else 403
            return 401
