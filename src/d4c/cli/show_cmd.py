"""ctr-cli dimg show / cdimg show: what an image holds."""

from __future__ import annotations

import argparse
import stat
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from ..image.reader import Image
from ..image.format import format_id
from ..image.stack import close_all, open_stack
from ..image.deltas import decisions
from ..errors import UsageError
from ..progress import human_bytes
from ..image.tree import S_IFMT_OF, Entry, EntryType, Storage, printable
from ._common import print_json, print_table

if TYPE_CHECKING:
    from ..image.signing import TrustedKeys


def register(sub, groups, common) -> None:  # type: ignore[no-untyped-def]
    for kind in ("dimg", "cdimg"):
        p = groups[kind].add_parser("show", parents=[common], help=f"describe a {kind}")
        p.add_argument(f"--{kind}", dest="path", required=True, metavar="FILE", help="the image")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--entries", action="store_true", help="also list every entry")
        p.add_argument(f"--base{kind[0].upper() + kind[1:]}", dest="bases", action="append", metavar="FILE",
                       help="for a delta: the image it applies to (repeat, lowest first, for a chain); "
                       "without it only the delta's ids and sizes are shown")
        if kind == "cdimg":
            from ._common import add_trust
            add_trust(p)
        p.set_defaults(func=run, kind=kind)


def summary(image: Image) -> dict[str, Any]:
    info = image.info
    out: dict[str, Any] = {
        "path": image.path,
        "kind": info.kind,
        "formatVersion": info.version,
        "id": format_id(info.image_id),
        "parentId": format_id(info.parent_id) if info.parent_id else None,
        "bodySize": info.body_size,
        "headerSize": info.header_csize,
        "fileSize": info.dimg_offset + info.dimg_size,
    }
    readable = not image.is_delta or image.parent is not None
    if readable:
        counts = Counter(e.type.name.lower() for e in image.entries)
        files = [e for e in image.entries if e.type == EntryType.FILE]
        out.update(entries=dict(sorted(counts.items())), contentSize=sum(e.size for e in files),
                   distinctBodies=len({e.digest for e in files if e.size}))
    if image.is_delta and readable:
        kinds: dict[str, dict[str, int]] = {}
        for d in decisions(image.entries, image.parent):
            k = kinds.setdefault(d.kind, {"files": 0, "contentSize": 0, "storedSize": 0})
            k["files"] += 1
            k["contentSize"] += d.size
            k["storedSize"] += d.stored
        out["decisions"] = kinds
    if info.config is not None:
        c = info.config
        cc = c.get("config") if isinstance(c.get("config"), dict) else {}
        out["config"] = {
            "digest": format_id(info.config_digest or b""),
            "platform": "/".join(str(x) for x in (c.get("os"), c.get("architecture"), c.get("variant")) if x),
            "entrypoint": cc.get("Entrypoint"),
            "cmd": cc.get("Cmd"),
            "env": cc.get("Env"),
            "workingDir": cc.get("WorkingDir"),
            "user": cc.get("User"),
        }
    return out


def entry_json(e: Entry, image: Image) -> dict[str, Any]:
    d: dict[str, Any] = {"path": e.display(), "type": e.type.name.lower(), "mode": oct(e.mode),
                         "uid": e.uid, "gid": e.gid, "mtimeNs": e.mtime_ns}
    if e.xattrs:
        d["xattrs"] = {printable(k): v.hex() for k, v in e.xattrs.items()}
    if e.type == EntryType.FILE:
        d.update(size=e.size, digest=format_id(e.digest or b""), storage=e.storage.name.lower(),
                 storedSize=e.body_length if e.storage == Storage.FRAME else sum(s.length for s in e.delta_steps))
        if e.storage == Storage.DELTA and image.parent is not None:
            d.update(deltaSource=image.parent.entries[e.delta_source].display(), deltaSteps=len(e.delta_steps))
    elif e.type == EntryType.SYMLINK:
        d["target"] = printable(e.target)
    elif e.type == EntryType.HARDLINK:
        d["linkTo"] = image.entries[e.link].display()
    elif e.type in (EntryType.CHARDEV, EntryType.BLOCKDEV):
        d["rdev"] = list(e.rdev)
    return d


def signature_summary(path: str, trust: "TrustedKeys | None") -> dict[str, Any] | None:
    """FILE.sig's signers and statement; with `trust` checked first (refused: Untrusted)."""
    import os
    from ..image.signing import SIG_SUFFIX, check_file, read_envelope, signer_ids, unverified_statement
    sig_path = path + SIG_SUFFIX
    if trust is None and not os.path.exists(sig_path):
        return None
    envelope = read_envelope(sig_path)
    out: dict[str, Any] = {"file": sig_path, "signers": signer_ids(envelope, sig_path), "verifiedBy": None}
    if trust is not None:
        verified = check_file(path, envelope, trust, source=sig_path)
        out.update(verifiedBy=verified.key_id, exactArtifact=verified.exact)
    stmt = unverified_statement(envelope, sig_path)
    out["statement"] = {"image": stmt.image, "base": stmt.base, "artifact": stmt.artifact, "size": stmt.size,
                        "imageFormat": stmt.image_format, "manifest": stmt.manifest}
    return out


def run(args: argparse.Namespace) -> int:
    from ._common import trusted_keys
    bases = args.bases or []
    signature = signature_summary(args.path, trusted_keys(args)) if args.kind == "cdimg" else None
    stack = open_stack(bases[1:] + [args.path], bases[0] if bases else None)
    try:
        image = stack[-1]
        if args.kind == "cdimg" and image.info.kind != "cdimg":
            raise UsageError(f"{args.path} is a dimg; use `dimg show`")
        readable = not image.is_delta or image.parent is not None
        if args.entries and not readable:
            image.entries  # raises: which base is needed
        s = summary(image)
        if args.kind == "cdimg":
            s["signature"] = signature
        if args.json:
            if args.entries:
                s["entryList"] = [entry_json(e, image) for e in image.entries]
            print_json(s)
            return 0
        rows = [("kind", s["kind"] + (" (delta)" if image.is_delta else "")),
                ("format version", str(s["formatVersion"])), ("id", s["id"]),
                ("parent", s["parentId"] or "-")]
        if readable:
            rows += [("entries", ", ".join(f"{n} {k}" for k, n in s["entries"].items())),
                     ("content", human_bytes(s["contentSize"]))]
        rows += [("stored bodies", human_bytes(s["bodySize"]) +
                  (f" ({s['distinctBodies']} distinct)" if readable and not image.is_delta else "")),
                 ("header", human_bytes(s["headerSize"])), ("file", human_bytes(s["fileSize"]))]
        if "config" in s:
            c = s["config"]
            rows += [("config", c["digest"]), ("platform", c["platform"] or "-"),
                     ("entrypoint", str(c["entrypoint"])), ("cmd", str(c["cmd"]))]
        if args.kind == "cdimg":
            rows.append(("signature", _signature_line(signature)))
        print_table(rows)
        if "decisions" in s:
            print()
            print_table([(k, str(v["files"]), human_bytes(v["contentSize"]), human_bytes(v["storedSize"]))
                         for k, v in s["decisions"].items()], ("files", "count", "content", "stored"))
        elif image.is_delta:
            print(f"(a delta: give its base with --base{args.kind[0].upper() + args.kind[1:]} "
                  "to list its files and decisions)")
        if args.entries:
            print()
            for e in image.entries:
                print(_ls_line(e, image))
    finally:
        close_all(stack)
    return 0


def _signature_line(sig: dict[str, Any] | None) -> str:
    if sig is None:
        return "none (no FILE.sig beside it)"
    if sig["verifiedBy"]:
        how = "" if sig["exactArtifact"] else ", for the image it gives (not this file's digest)"
        return f"verified: signed by {sig['verifiedBy']}{how}"
    return f"signed by {', '.join(sig['signers']) or 'no key'} (not checked: give --trust)"


def _ls_line(e: Entry, image: Image) -> str:
    t = e.type if e.type != EntryType.HARDLINK else image.entries[e.link].type
    mode = stat.filemode(S_IFMT_OF[t] | e.mode)
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.mtime_ns // 1_000_000_000))
    size = str(e.size) if t == EntryType.FILE else (f"{e.rdev[0]},{e.rdev[1]}" if e.rdev != (0, 0) else "0")
    tail = ""
    if e.type == EntryType.FILE and image.is_delta:
        tail = f"  [{e.storage.name.lower()}"
        if e.storage == Storage.DELTA and image.parent is not None:
            tail += f" from {image.parent.entries[e.delta_source].display()}"
        tail += "]"
    if e.type == EntryType.SYMLINK:
        tail = " -> " + printable(e.target)
    elif e.type == EntryType.HARDLINK:
        tail = " link to " + image.entries[e.link].display()
    return f"{mode} {e.uid:>5} {e.gid:>5} {size:>10} {when} {e.display()}{tail}"
