"""ckptd's command line. Quiet on success, --json for scripts, progress on a terminal,
one line and a non-zero exit for mistakes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import CkptdError, CorruptStore, TargetGone, UserError
from .kernel.abi import PAGE_SIZE
from .progress import Progress, human_bytes
from .store import SnapshotMeta, Store, default_store_path
from .store import reader as store_reader
from .store.views import snapshot_summary

log = logging.getLogger("ckptd")

EXIT_PROBLEMS = 1  # verify found problems
EXIT_TARGET_GONE = 3
EXIT_CORRUPT = 4
EXIT_INTERNAL = 70

DESCRIPTION = """\
ckptd takes incremental memory snapshots of running Linux processes without their
cooperation. The first snapshot of a process is full; later ones store only the pages
written since (tracked by the kernel with async userfaultfd write-protect and
PAGEMAP_SCAN), compressed with zstd. Any snapshot can be restored byte for byte.
"""

EPILOG = """\
examples:
  ckptd snapshot 1234                 take a snapshot of PID 1234, print its id
  ckptd watch 1234 --interval 5       a snapshot every 5 s until Ctrl-C
  ckptd list                          every snapshot in the store
  ckptd show 1234-1-3                 restore metadata: where each page lives
  ckptd materialize 1234-1-3 -o out/  memory of each mapping as files + index.json
  ckptd verify                        check every checksum and chain link
  ckptd serve                         the service (systemd runs it: systemd/ckptd.service)
  ckptd register 1234 --interval 30   have the service snapshot PID 1234 every 30 s

When a service is running, snapshot, list, materialize and verify go through it unless
--store DIR is given. Otherwise the store is --store DIR, else $CKPTD_STORE, else
/var/lib/ckptd (root) or ~/.local/state/ckptd. Snapshot ids are PID-CHAIN-SEQ: a new
chain starts when the process execs. docs/ in the source tree describes the store
format, the kernel side, the service and its socket protocol.
"""


def _store_arg(p: argparse.ArgumentParser, service: bool = True) -> None:
    default = "$CKPTD_STORE, /var/lib/ckptd as root, else ~/.local/state/ckptd"
    p.add_argument("--store", type=Path, metavar="DIR",
                   help=f"work on this store directly (default: ask the running service, "
                        f"else {default})" if service else f"store directory (default: "
                        f"{default})")
    if service:
        p.add_argument("--socket", type=Path, metavar="PATH",
                       help="the service's control socket (default: $CKPTD_SOCKET, else "
                            "/run/ckptd/ckptd.sock)")


def _service(args: argparse.Namespace) -> Any:
    """A client of the running service, unless a store was named (flag or $CKPTD_STORE)
    or no service answers: then the command works on the store directly."""
    if args.store is not None or os.environ.get("CKPTD_STORE"):
        return None
    try:
        from .service.client import try_service
    except ImportError:
        return None
    return try_service(args.socket)


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def _pid(text: str) -> int:
    try:
        pid = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a PID (a positive integer)") \
            from None
    if pid <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a PID (a positive integer)")
    return pid


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return v


def _size(text: str) -> int:
    """Bytes, with an optional K/M/G suffix (powers of 1024)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in "KMG" else t
    try:
        v = int(float(num) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 64M, 1G)") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return v


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckptd", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ckptd {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("CKPTD_LOG_LEVEL", "warning"),
                        choices=["debug", "info", "warning", "error"],
                        help="what to log on stderr (default: warning)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = add("snapshot", "take one snapshot of a process",
            "Take one snapshot of PID. The first snapshot of a process is full; later ones\n"
            "store only the pages written since the previous one. Prints the snapshot id.\n"
            "The process is frozen (all threads, via ptrace) only while changed pages are\n"
            "found and copied; compression and fsync happen after it runs again.")
    p.add_argument("pid", type=_pid, metavar="PID")
    _tracker_args(p)
    _store_arg(p)
    _json_arg(p)
    p.set_defaults(func=cmd_snapshot)

    p = add("watch", "take snapshots periodically in the foreground",
            "Take a snapshot of PID every --interval seconds until Ctrl-C, --count\n"
            "snapshots, or the process exits. Prints one line per snapshot.")
    p.add_argument("pid", type=_pid, metavar="PID")
    p.add_argument("--interval", type=_positive_float, required=True, metavar="SECONDS",
                   help="seconds between snapshot starts")
    p.add_argument("--count", type=int, default=0, metavar="N",
                   help="stop after N snapshots (default: until interrupted)")
    _tracker_args(p)
    _store_arg(p, service=False)
    _json_arg(p)
    p.set_defaults(func=cmd_watch)

    p = add("list", "list snapshots", "List every snapshot in the store, oldest first.")
    p.add_argument("--pid", type=_pid, help="only snapshots of this PID")
    _store_arg(p)
    _json_arg(p)
    p.set_defaults(func=cmd_list)

    p = add("show", "show a snapshot's restore metadata",
            "Show snapshot ID: its mappings, counts, timings, and its page map: for every\n"
            "page holding content, which snapshot's data holds it (or that it is zero).\n"
            "Pages not in the map are absent: zeros in anonymous memory, the file's\n"
            "content in a private file mapping.")
    p.add_argument("id", metavar="ID")
    _store_arg(p, service=False)
    _json_arg(p)
    p.set_defaults(func=cmd_show)

    p = add("materialize", "write a snapshot's memory to files",
            "Write the memory of snapshot ID into DIR: one file per captured mapping, of\n"
            "exactly the mapping's size, and DIR/index.json describing them. Works for\n"
            "any snapshot, also old ones after newer ones exist.")
    p.add_argument("id", metavar="ID")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR",
                   help="new or empty directory to write into")
    _store_arg(p)
    _json_arg(p)
    p.set_defaults(func=cmd_materialize)

    p = add("verify", "check the whole store",
            "Decompress every extent and check its checksum, check every chain link and\n"
            "that every page holding content has a source. Exits 1 on any problem.")
    _store_arg(p)
    _json_arg(p)
    p.set_defaults(func=cmd_verify)

    try:
        from .service.cli_commands import add_service_commands
    except ImportError:
        pass
    else:
        add_service_commands(sub)
    return parser


def _tracker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracker", choices=["auto", "uffd-wp", "hash"], default="auto",
                   help="how changed pages are found: uffd-wp (kernel write-protect, the "
                        "default when it works), hash (reads everything, stores what "
                        "changed), auto (the best that works; the choice is recorded)")
    p.add_argument("--fuzzy", action="store_true",
                   help="do not freeze the process (pre-copy rounds): pages written during "
                        "the copy are caught by the next snapshot")
    p.add_argument("--max-bytes", type=_size, default=0, metavar="SIZE",
                   help="capture at most SIZE of changed pages (e.g. 64M); the rest stays "
                        "marked and goes in the next snapshot (default: no limit)")


def _open_store(args: argparse.Namespace, create: bool = False) -> Store:
    return Store.open(args.store or default_store_path(), create=create)


def _engine(args: argparse.Namespace) -> Any:
    from .engine import Engine

    return Engine(_open_store(args, create=True))


def cmd_snapshot(args: argparse.Namespace) -> int:
    client = _service(args)
    if client is not None:
        with client:
            summary = client.call("snapshot", pid=args.pid, tracker=args.tracker,
                                  fuzzy=args.fuzzy, max_pages=args.max_bytes // PAGE_SIZE)
    else:
        with _engine(args) as eng:
            prog = Progress(f"snapshot {args.pid}")
            try:
                meta = eng.snapshot(args.pid, tracker=args.tracker, fuzzy=args.fuzzy,
                                    max_pages=args.max_bytes // PAGE_SIZE, progress=prog.add)
            finally:
                prog.finish()
        summary = snapshot_summary(meta)
    print(json.dumps(summary) if args.json else summary["id"])
    return 0


_WATCH_HEADER = (f"{'id':<14} {'kind':<5} {'dirty':>8} {'read':>10} {'stored':>10} "
                 f"{'ratio':>6} {'freeze ms':>9} {'total ms':>9}")


def watch_line(m: SnapshotMeta) -> str:
    ratio = m.counts.bytes_read / m.counts.bytes_stored if m.counts.bytes_stored else 0.0
    return (f"{m.id:<14} {m.kind:<5} {m.counts.pages_dirty:>8} "
            f"{human_bytes(m.counts.bytes_read):>10} {human_bytes(m.counts.bytes_stored):>10} "
            f"{ratio:>6.1f} {m.timings.freeze_ms:>9.1f} {m.timings.total_ms:>9.1f}")


def cmd_watch(args: argparse.Namespace) -> int:
    if args.count < 0:
        raise UserError("--count must be 0 (until interrupted) or positive")
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    taken = 0
    with _engine(args) as eng:
        if not args.json:
            print(_WATCH_HEADER, flush=True)
        next_at = time.monotonic()
        try:
            while not stop and (args.count == 0 or taken < args.count):
                try:
                    meta = eng.snapshot(args.pid, tracker=args.tracker, fuzzy=args.fuzzy,
                                        max_pages=args.max_bytes // PAGE_SIZE)
                except TargetGone:
                    print(f"ckptd: process {args.pid} exited; {taken} snapshots taken",
                          file=sys.stderr)
                    return 0 if taken else EXIT_TARGET_GONE
                taken += 1
                print(json.dumps(snapshot_summary(meta)) if args.json else watch_line(meta),
                      flush=True)
                next_at += args.interval
                delay = next_at - time.monotonic()
                if delay < 0:
                    log.warning("snapshot took longer than the interval; next one now")
                    next_at = time.monotonic()
                elif args.count == 0 or taken < args.count:
                    time.sleep(delay)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    client = _service(args)
    if client is not None:
        with client:
            snaps: list[dict[str, Any]] = client.call("snapshots", pid=args.pid)["snapshots"]
    else:
        store = _open_store(args)
        snaps = [snapshot_summary(m) for m in store.list_snapshots()
                 if args.pid is None or m.pid == args.pid]
    if args.json:
        print(json.dumps(snaps))
        return 0
    if not snaps:
        return 0
    print(f"{'ID':<14} {'PID':>7} {'KIND':<5} {'TRACKER':<7} {'PARENT':<14} "
          f"{'CREATED':<19} {'PAGES':>8} {'STORED':>10}")
    for s in snaps:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["created"]))
        print(f"{s['id']:<14} {s['pid']:>7} {s['kind']:<5} {s['tracker']:<7} "
              f"{s['parent'] or '-':<14} {created:<19} {s['pages']:>8} "
              f"{human_bytes(s['bytes_stored']):>10}")
    return 0


def _source_json(src: object) -> str:
    if isinstance(src, store_reader.DataRef):
        return src.snapshot
    return str(src)


def cmd_show(args: argparse.Namespace) -> int:
    store = _open_store(args)
    meta, pm, lineage = store_reader.page_map(store, args.id)
    merged: list[list[Any]] = []
    for s, e, src in pm:
        label = _source_json(src)
        if merged and merged[-1][1] == s and merged[-1][2] == label:
            merged[-1][1] = e
        else:
            merged.append([s, e, label])
    missing = store_reader.unsourced(meta, pm)
    if args.json:
        out = snapshot_summary(meta)
        out.update({
            "lineage": [m.id for m in lineage],
            "vmas": [v.model_dump() for v in meta.vmas],
            "page_map": [{"start": s, "end": e, "source": src} for s, e, src in merged],
            "unsourced": [[s, e] for s, e in missing],
        })
        print(json.dumps(out))
        return 0
    summary = snapshot_summary(meta)
    print(f"snapshot {meta.id}  pid {meta.pid}  {meta.kind}"
          + (f" ({meta.full_reason})" if meta.full_reason else f", parent {meta.parent}"))
    print(f"tracker {meta.tracker} ({meta.tracker_reason}), {meta.consistency}"
          + (", TRUNCATED by a page budget" if meta.truncated else ""))
    print(f"created {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(meta.created))}; "
          f"freeze {summary['freeze_ms']} ms, total {summary['total_ms']} ms")
    print(f"pages: {meta.counts.pages_present} holding content, {meta.counts.pages_read} read, "
          f"{meta.counts.pages_stored} stored ({human_bytes(meta.counts.bytes_stored)}), "
          f"{meta.counts.pages_zero} zero")
    print(f"restore needs: {' -> '.join(m.id for m in lineage)}")
    print("\nmappings:")
    for v in meta.vmas:
        held = sum(e - st for st, e, _ in pm.clip(v.start, v.end)) // PAGE_SIZE
        print(f"  {v.start:012x}-{v.end:012x} {v.perms} {v.capture:<7} "
              f"{held:>8} pages held  {v.path or ''}")
    print("\npage map (address range -> snapshot holding the content, or zero):")
    for st, e, label in merged:
        print(f"  {st:012x}-{e:012x} {(e - st) // PAGE_SIZE:>8} pages  {label}")
    if missing:
        print(f"\nWARNING: {sum(e - st for st, e in missing) // PAGE_SIZE} pages hold "
              "content but no snapshot stored them")
    return 0


def cmd_materialize(args: argparse.Namespace) -> int:
    client = _service(args)
    if client is not None:
        with client:
            index = client.call("materialize", snapshot=args.id,
                                out_dir=str(args.output.resolve()))
    else:
        store = _open_store(args)
        prog = Progress(f"materialize {args.id}")
        try:
            index = store_reader.materialize(store, args.id, args.output,
                                             progress=prog.update)
        finally:
            prog.finish()
    if args.json:
        print(json.dumps(index))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    client = _service(args)
    if client is not None:
        with client:
            result = client.call("verify")
        count, problems = result["snapshots"], result["problems"]
    else:
        store = _open_store(args)
        prog = Progress("verify")
        try:
            count, problems = store_reader.verify(store, progress=prog.update)
        finally:
            prog.finish()
    if args.json:
        print(json.dumps({"snapshots": count, "ok": not problems, "problems": problems}))
    else:
        for p in problems:
            print(f"ckptd: verify: {p}", file=sys.stderr)
    return EXIT_PROBLEMS if problems else 0


def setup_logging(level: str) -> None:
    under_systemd = bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))
    fmt = "%(name)s: %(message)s" if under_systemd else "ckptd: %(levelname)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper()), format=fmt, stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UserError as e:
        print(f"ckptd: error: {e}", file=sys.stderr)
        return e.exit_code
    except TargetGone as e:
        print(f"ckptd: error: {e}", file=sys.stderr)
        return EXIT_TARGET_GONE
    except CorruptStore as e:
        print(f"ckptd: error: store is damaged: {e} (run `ckptd verify`)", file=sys.stderr)
        return EXIT_CORRUPT
    except CkptdError as e:
        print(f"ckptd: error: {e}", file=sys.stderr)
        return EXIT_INTERNAL
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception:
        log.exception("internal error while running %r", " ".join(sys.argv))
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
