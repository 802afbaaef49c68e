"""ctr-cli stat diff / stat compare: what a delta spends its bytes on."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import UsageError
from ..progress import human_bytes
from ._common import print_json, print_table


def register(sub, groups, common) -> None:  # type: ignore[no-untyped-def]
    stat = sub.add_parser("stat", parents=[common], help="statistics of deltas")
    ss = stat.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    ss.required = True
    p = ss.add_parser("diff", parents=[common], help="where a delta's bytes go: by decision kind, top files")
    p.add_argument("--cdimg", "--dimg", dest="delta", required=True, metavar="FILE", help="the delta")
    p.add_argument("--baseCdimg", "--baseDimg", dest="bases", action="append", required=True, metavar="FILE",
                   help="the image it applies to (repeat, lowest first, for a chain)")
    p.add_argument("--top", type=int, default=10, metavar="N", help="list the N largest stored files (default 10)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the kinds and top files (needs matplotlib)")
    p.set_defaults(func=run_diff)
    p = ss.add_parser("compare", parents=[common], help="two deltas of the same update, file by file",
                      description="Compares two deltas between the same two images (e.g. --mode file-diff "
                      "against binary-diff): stored bytes per file and in total.")
    p.add_argument("--fileDimg", required=True, metavar="FILE", help="the first delta (e.g. file-diff)")
    p.add_argument("--binaryDimg", required=True, metavar="FILE", help="the second delta (e.g. binary-diff)")
    p.add_argument("--baseCdimg", "--baseDimg", dest="bases", action="append", required=True, metavar="FILE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_compare)


def _decisions(delta: str, bases: list[str]) -> tuple[Any, list[Any]]:
    from ..image.stack import close_all, open_stack
    from ..image.deltas import decisions
    stack = open_stack(bases[1:] + [delta], bases[0])
    try:
        top = stack[-1]
        return top.info, decisions(top.entries, top.parent)
    finally:
        close_all(stack)


def run_diff(args: argparse.Namespace) -> int:
    from .diff_cmd import decision_rows
    info, decs = _decisions(args.delta, args.bases)
    if info.parent_id is None:
        raise UsageError(f"{args.delta} is a full image, not a delta")
    stored = [d for d in decs if d.stored]
    top = sorted(stored, key=lambda d: (-d.stored, d.path))[:max(args.top, 0)]
    body = sum(d.stored for d in decs)
    file_size = info.dimg_offset + info.dimg_size
    doc = {"delta": args.delta, "fileSize": file_size, "bodySize": info.body_size,
           "headerSize": info.header_csize, "otherSize": file_size - info.body_size - info.header_csize,
           "contentSize": sum(d.size for d in decs),
           "kinds": {row[0]: {"files": int(row[1])} for row in decision_rows(decs)},
           "top": [vars(d) for d in top]}
    for d in decs:
        k = doc["kinds"][d.kind]
        k["contentSize"] = k.get("contentSize", 0) + d.size
        k["storedSize"] = k.get("storedSize", 0) + d.stored
    if args.plot:
        _plot(doc, args.plot)
    if args.json:
        print_json(doc)
        return 0
    print_table(decision_rows(decs), ("files", "count", "content", "stored"))
    print()
    print_table([("tree and storage tables", human_bytes(info.header_csize)),
                 ("file bodies and deltas", human_bytes(body)),
                 ("preambles and config", human_bytes(doc["otherSize"])),
                 ("whole delta", human_bytes(file_size))])
    if top:
        print()
        print_table([(d.path, d.kind, human_bytes(d.size), human_bytes(d.stored),
                      f"{100.0 * d.stored / max(d.size, 1):.1f}%") for d in top],
                    ("largest stored files", "kind", "size", "stored", "stored/size"))
    return 0


def run_compare(args: argparse.Namespace) -> int:
    info_a, a = _decisions(args.fileDimg, args.bases)
    info_b, b = _decisions(args.binaryDimg, args.bases)
    if (info_a.image_id, info_a.parent_id) != (info_b.image_id, info_b.parent_id):
        raise UsageError("compare: the two deltas are not of the same update (different ids)")
    by_path = {d.path: d for d in b}
    rows = []
    for d in a:
        other = by_path[d.path]
        if d.stored or other.stored:
            rows.append({"path": d.path, "size": d.size, "kindA": d.kind, "storedA": d.stored,
                         "kindB": other.kind, "storedB": other.stored})
    rows.sort(key=lambda r: (r["storedB"] - r["storedA"], r["path"]))
    totals = {"fileSizeA": info_a.dimg_offset + info_a.dimg_size, "fileSizeB": info_b.dimg_offset + info_b.dimg_size}
    if args.json:
        print_json({"files": rows, **totals})
        return 0
    print_table([(r["path"], human_bytes(r["size"]), f"{r['kindA']} {human_bytes(r['storedA'])}",
                  f"{r['kindB']} {human_bytes(r['storedB'])}") for r in rows],
                ("file", "size", args.fileDimg, args.binaryDimg))
    print(f"\nwhole deltas: {human_bytes(totals['fileSizeA'])} vs {human_bytes(totals['fileSizeB'])} "
          f"({100.0 * totals['fileSizeB'] / max(totals['fileSizeA'], 1):.1f}%)")
    return 0


def _plot(doc: dict[str, Any], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib (pip install matplotlib); tables and --json do not") from None
    from ..fsutil import atomic_output
    fig, (k, t) = plt.subplots(1, 2, figsize=(11, 4))
    kinds = list(doc["kinds"])
    k.bar(kinds, [doc["kinds"][n]["storedSize"] / 1024 for n in kinds], color="#2a7")
    k.set_ylabel("stored KiB")
    k.set_title("by decision")
    top = doc["top"]
    t.barh([d["path"][-40:] for d in top][::-1], [d["stored"] / 1024 for d in top][::-1], color="#27a")
    t.set_xlabel("stored KiB")
    t.set_title("largest stored files")
    fig.tight_layout()
    with atomic_output(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
