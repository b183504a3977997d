"""ckptd's command line. Quiet on success, --json for scripts, progress on a terminal,
one line and a non-zero exit for mistakes."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .errors import CkptdError, CorruptStore, StoreFull, TargetBusy, TargetGone, UserError
from .intervals import clip_to, normalize, total
from .kernel.abi import PAGE_SIZE
from .progress import Progress, human_bytes
from .service.client import try_service
from .service.config import parse_duration, size_from_text
from .store import SnapshotMeta, Store, default_store_path
from .store import reader as store_reader
from .store.store import ROOT_STORE
from .store.views import page_map_view, snapshot_summary

log = logging.getLogger("ckptd")

EXIT_PROBLEMS = 1  # verify found problems
EXIT_USAGE = 2
# The others come with the error (errors.py: each class's exit_code).
EXIT_TARGET_GONE = TargetGone.exit_code
EXIT_CORRUPT = CorruptStore.exit_code
EXIT_STORE_FULL = StoreFull.exit_code
EXIT_TRY_AGAIN = TargetBusy.exit_code
EXIT_INTERNAL = CkptdError.exit_code

# Bounds on option values: beyond them a value is a typo (or "inf"), and passing it on
# only moves the failure somewhere less clear (time.sleep, int(), the scheduler).
MAX_INTERVAL = 365 * 86400.0
MAX_AGE = 100 * 365 * 86400.0

DESCRIPTION = """\
ckptd takes incremental memory snapshots of running Linux processes without their
cooperation. The first snapshot of a process is full; later ones store only the pages
written since (tracked by the kernel with async userfaultfd write-protect and
PAGEMAP_SCAN), compressed with zstd. Any snapshot can be restored byte for byte.
"""

EPILOG = f"""\
examples:
  ckptd snapshot 1234                 take a snapshot of PID 1234, print its id
  ckptd watch 1234 --interval 5s      a snapshot every 5 s until Ctrl-C
  ckptd list                          every snapshot in the store
  ckptd show 1234-1-3                 restore metadata: where each page lives
  ckptd materialize 1234-1-3 -o out/  memory of each mapping as files + index.json
  ckptd verify                        check every checksum and chain link
  ckptd serve                         the service (systemd runs it: systemd/ckptd.service)
  ckptd register 1234 --interval 30s  have the service snapshot PID 1234 every 30 s

When a service is running, snapshot, list, show, materialize and verify go through it
unless --store DIR or $CKPTD_STORE is given. Otherwise the store is --store DIR, else
$CKPTD_STORE, else {ROOT_STORE} (root) or ~/.local/state/ckptd.
Sizes take K, M, G, T (or KiB, MiB, GiB, TiB: powers of 1024); durations take 500ms,
30s, 5m, 2h, 7d. Snapshot ids are PID-CHAIN-SEQ: a new chain starts when the process
execs. docs/ in the source tree describes the store format, the kernel side, the
service and its socket protocol. Each command's --help has examples.
"""


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported in one line (what is wrong, where to read
    more) instead of the usage block followed by the error."""

    # The subcommands' parsers by name (build_parser fills it): a mistake argparse finds
    # only at the top (unrecognized arguments) is reported by the subcommand's parser.
    commands: Mapping[str, argparse.ArgumentParser]

    def error(self, message: str) -> NoReturn:
        # argparse's own messages are one line; a type error's text is ours. Collapsing
        # whitespace keeps the promise for any other message.
        one_line = " ".join(message.split())
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line} (see '{self.prog} --help')\n")


def _store_arg(p: argparse.ArgumentParser, service: bool = True) -> None:
    default = f"$CKPTD_STORE, {ROOT_STORE} as root, else ~/.local/state/ckptd"
    # --store and --socket exclude each other: one says "not through the service", the
    # other "through this service".
    group = p.add_mutually_exclusive_group() if service else p
    group.add_argument("--store", type=Path, metavar="DIR",
                       help=f"work on this store directly (default: ask the running service, "
                            f"else {default})" if service else f"store directory (default: "
                            f"{default})")
    if service:
        group.add_argument("--socket", type=Path, metavar="PATH",
                           help="go through the service at this control socket, and fail if "
                                "none answers there (default: $CKPTD_SOCKET, else "
                                "/run/ckptd/ckptd.sock, and the store when no service "
                                "answers)")


def _service(args: argparse.Namespace) -> Any:
    """A client of the running service, or None: work on the store directly. --store (or
    $CKPTD_STORE) means the store. An explicit --socket means that service, and not
    reaching it is an error: falling back would silently read another store. The default
    socket falls back to the store when no service answers there."""
    if args.store is not None:
        return None
    if args.socket is None and os.environ.get("CKPTD_STORE"):
        return None
    client = try_service(args.socket)
    if client is None and args.socket is not None:
        raise UserError(
            f"no ckptd service answers at {args.socket}: start it with `ckptd serve`, fix "
            "--socket, or use --store DIR to work on a store directly"
        )
    return client


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def _digits(text: str, most: int) -> bool:
    # ASCII only: str.isdigit() also accepts other scripts' digits, which int() reads.
    # Bounded: int() refuses over 4300 digits, with a message about Python's limit.
    return text.isascii() and text.isdigit() and len(text) <= most


def pid_arg(text: str) -> int:
    """A PID: a positive decimal integer."""
    if not _digits(text, 10) or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a PID (a positive integer)")
    return int(text)


def count_arg(text: str) -> int:
    """A whole number >= 0."""
    if not _digits(text, 4300):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    if len(text) > 18:
        raise argparse.ArgumentTypeError(f"{text!r} is too large")
    return int(text)


def size_arg(text: str) -> int:
    """Bytes: a number with an optional suffix K, M, G, T (or KiB, MiB, GiB, TiB), all
    powers of 1024, as in the config file. '64M' and '64MiB' are 64 MiB."""
    try:
        return int(size_from_text(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def duration_arg(zero_ok: bool = False, limit: float = MAX_INTERVAL,
                 limit_text: str = "365d") -> Callable[[str], float]:
    """Seconds: a number, or 500ms, 30s, 5m, 2h, 7d (the service config's syntax).
    Finite, greater than 0 (or 0 with `zero_ok`), at most `limit`."""

    def parse(text: str) -> float:
        try:
            value = float(parse_duration(text))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a duration: {exc}") from None
        if not (value >= 0 if zero_ok else value > 0):
            raise argparse.ArgumentTypeError(
                f"{text!r} must be {'0 or more' if zero_ok else 'greater than 0'}")
        # A 400-digit number parses to infinity.
        if not math.isfinite(value) or value > limit:
            raise argparse.ArgumentTypeError(f"{text!r} is too long (at most {limit_text})")
        return value

    return parse


def _pages(nbytes: int) -> int:
    # Rounded up: a budget smaller than a page must not become 0, which means no limit.
    return -(-nbytes // PAGE_SIZE)


def build_parser() -> Parser:
    parser = Parser(
        prog="ckptd", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ckptd {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("CKPTD_LOG_LEVEL", "warning"),
                        choices=["debug", "info", "warning", "error"],
                        help="what to log on stderr (default: warning)")
    # parser_class is Parser by default (the top parser's class); said for the reader.
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=Parser)
    parser.commands = sub.choices

    def add(name: str, help: str, description: str, examples: str
            ) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description,
                              epilog="examples:\n" + examples,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = add("snapshot", "take one snapshot of a process",
            "Take one snapshot of PID now and print its id: a checkpoint at a moment you\n"
            "choose (`watch` and `register` take them periodically). The first snapshot of\n"
            "a process is full; later ones store only the pages written since the previous\n"
            "one. The process is frozen (all threads, via ptrace) only while changed pages\n"
            "are found and copied; compression and fsync happen after it runs again.",
            "  ckptd snapshot 1234                    snapshot PID 1234, print its id\n"
            "  ckptd snapshot 1234 --max-bytes 64M --json\n"
            "                                         at most 64 MiB of changed pages now,\n"
            "                                         the rest next time; print JSON")
    p.add_argument("pid", type=pid_arg, metavar="PID", help="the process to snapshot")
    _tracker_args(p)
    _store_arg(p)
    _json_arg(p)
    p.set_defaults(func=cmd_snapshot)

    p = add("watch", "take snapshots periodically in the foreground",
            "Take a snapshot of PID every --interval until Ctrl-C, --count snapshots, or\n"
            "the process exits, printing one line per snapshot: to see how much a process\n"
            "writes, or to checkpoint it for a while from a terminal. Works on the store\n"
            "directly; for snapshots that go on in the background, use `ckptd register`.",
            "  ckptd watch 1234 --interval 5s                  every 5 s until Ctrl-C\n"
            "  ckptd watch 1234 --interval 500ms --count 10 --json\n"
            "                                                  10 snapshots, a JSON line each")
    p.add_argument("pid", type=pid_arg, metavar="PID", help="the process to snapshot")
    p.add_argument("--interval", type=duration_arg(), required=True, metavar="DURATION",
                   help="time between snapshot starts: seconds, or 500ms, 30s, 5m, 2h")
    p.add_argument("--count", type=count_arg, default=0, metavar="N",
                   help="stop after N snapshots (default: until interrupted)")
    _tracker_args(p)
    _store_arg(p, service=False)
    _json_arg(p)
    p.set_defaults(func=cmd_watch)

    p = add("list", "list snapshots",
            "List the snapshots in the store, oldest first within each process: to find\n"
            "the id to show or materialize.",
            "  ckptd list                    every snapshot, one line each\n"
            "  ckptd list --pid 1234 --json  the snapshots of PID 1234, as JSON")
    p.add_argument("--pid", type=pid_arg, help="only snapshots of this PID")
    _store_arg(p)
    _json_arg(p)
    p.set_defaults(func=cmd_list)

    p = add("show", "show a snapshot's restore metadata",
            "Show snapshot ID before restoring it: its mappings, counts, timings, the\n"
            "snapshots a restore reads, and its page map: for every page holding content,\n"
            "which snapshot's data holds it (or that it is zero). Pages not in the map are\n"
            "absent: zeros in anonymous memory, the file's content in a private file\n"
            "mapping.",
            "  ckptd show 1234-1-3         what 1234-1-3 holds, and where each page lives\n"
            "  ckptd show 1234-1-3 --json  the same as JSON (lineage, vmas, page_map)")
    p.add_argument("id", metavar="ID", help="a snapshot id, as `ckptd list` prints it")
    _store_arg(p)
    _json_arg(p)
    p.set_defaults(func=cmd_show)

    p = add("materialize", "write a snapshot's memory to files",
            "Write the memory of snapshot ID into DIR, to restore or inspect it: one file\n"
            "per captured mapping, of exactly the mapping's size, and DIR/index.json\n"
            "describing them. Works for any snapshot, also old ones after newer ones exist.",
            "  ckptd materialize 1234-1-3 -o restore/         the files and restore/index.json\n"
            "  ckptd materialize 1234-1-3 -o restore/ --json  also print the index")
    p.add_argument("id", metavar="ID", help="a snapshot id, as `ckptd list` prints it")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR",
                   help="new or empty directory to write into")
    _store_arg(p)
    _json_arg(p)
    p.set_defaults(func=cmd_materialize)

    p = add("verify", "check the whole store",
            "Check the whole store, after a crash or before relying on old snapshots:\n"
            "decompress every extent and check its checksum, check every chain link and\n"
            "that every page holding content has a source. Prints each problem on stderr\n"
            "and exits 1 if there is any; quiet and 0 when all is well.",
            "  ckptd verify                    quiet, exit 0: every snapshot restores\n"
            "  ckptd verify --store /srv/ckpt  check the store in /srv/ckpt\n"
            "  ckptd verify --json             {\"snapshots\": N, \"ok\": true, \"problems\": []}")
    _store_arg(p)
    _json_arg(p)
    p.set_defaults(func=cmd_verify)

    # Imported here: cli_commands uses this module's argument types.
    from .service.cli_commands import add_service_commands

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
    p.add_argument("--max-bytes", type=size_arg, default=0, metavar="SIZE",
                   help="capture at most SIZE of changed pages per snapshot (e.g. 64M or "
                        "64MiB, powers of 1024); the rest stays marked and goes in the next "
                        "snapshot (default: no limit)")


def _open_store(args: argparse.Namespace, create: bool = False) -> Store:
    return Store.open(args.store or default_store_path(), create=create)


def _engine(args: argparse.Namespace) -> Any:
    from .capture import identify
    from .engine import Engine

    # Check the target before creating the store: a mistyped PID, or a process the user
    # may not trace, must not leave a new (default) store behind.
    identify(args.pid)
    return Engine(_open_store(args, create=True))


def cmd_snapshot(args: argparse.Namespace) -> int:
    client = _service(args)
    if client is not None:
        with client:
            summary = client.call("snapshot", pid=args.pid, tracker=args.tracker,
                                  fuzzy=args.fuzzy, max_pages=_pages(args.max_bytes))
    else:
        with _engine(args) as eng:
            prog = Progress(f"snapshot {args.pid}")
            try:
                meta = eng.snapshot(args.pid, tracker=args.tracker, fuzzy=args.fuzzy,
                                    max_pages=_pages(args.max_bytes), progress=prog.add)
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
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    taken = 0
    with _engine(args) as eng:
        next_at = time.monotonic()
        try:
            while not stop and (args.count == 0 or taken < args.count):
                try:
                    meta = eng.snapshot(args.pid, tracker=args.tracker, fuzzy=args.fuzzy,
                                        max_pages=_pages(args.max_bytes))
                except TargetGone:
                    print(f"ckptd: process {args.pid} exited; {taken} snapshots taken",
                          file=sys.stderr)
                    return 0 if taken else EXIT_TARGET_GONE
                except (TargetBusy, StoreFull) as e:
                    # Nothing stored this time; the next round tries again (a full disk
                    # may get room: retention, an operator).
                    print(f"ckptd: {e}", file=sys.stderr)
                else:
                    if taken == 0 and not args.json:
                        # After the first snapshot: a failed watch prints its error alone.
                        print(_WATCH_HEADER, flush=True)
                    taken += 1
                    print(json.dumps(snapshot_summary(meta)) if args.json
                          else watch_line(meta), flush=True)
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


PageMapRows = list[dict[str, Any]]


def _show_from_store(args: argparse.Namespace
                     ) -> tuple[SnapshotMeta, list[str], PageMapRows, list[list[int]]]:
    # The service's `show` builds its reply with the same function: the same output.
    view = page_map_view(_open_store(args), args.id)
    return view.meta, view.lineage, view.page_map, view.unsourced


def _meta_from_detail(detail: dict[str, Any]) -> SnapshotMeta:
    """The SnapshotMeta of the service's `show` reply, which leaves out the per-extent
    lists (docs/api.md): what `show` prints needs none of them."""
    known = {k: v for k, v in detail.items() if k in SnapshotMeta.model_fields}
    return SnapshotMeta.model_validate(
        {**known, "data_inline": None, "frames": [], "extents": [], "zeros": []})


def _show_from_service(client: Any, snapshot_id: str
                       ) -> tuple[SnapshotMeta, list[str], PageMapRows | None,
                                  list[list[int]] | None]:
    with client:
        res = client.call("show", snapshot=snapshot_id)
    # page_map and unsourced are None from a service older than them.
    return (_meta_from_detail(res["snapshot"]), list(res["lineage"]), res.get("page_map"),
            res.get("unsourced"))


def cmd_show(args: argparse.Namespace) -> int:
    client = _service(args)
    page_map: PageMapRows | None
    missing: list[list[int]] | None
    if client is not None:
        meta, lineage, page_map, missing = _show_from_service(client, args.id)
    else:
        meta, lineage, page_map, missing = _show_from_store(args)
    if args.json:
        out = snapshot_summary(meta)
        out.update({
            "lineage": lineage,
            "vmas": [v.model_dump() for v in meta.mappings],
            "page_map": page_map,
            "unsourced": missing,
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
    print(f"restore needs: {' -> '.join(lineage)}")
    print("\nmappings:")
    held_spans = normalize((r["start"], r["end"]) for r in page_map or [])
    for v in meta.mappings:
        held = (f"{total(clip_to(held_spans, v.start, v.end)) // PAGE_SIZE:>8}"
                if page_map is not None else f"{'-':>8}")
        print(f"  {v.start:012x}-{v.end:012x} {v.perms} {v.capture:<7} "
              f"{held} pages held  {v.path or ''}")
    if page_map is None:
        print(f"\npage map: the service does not send it; `ckptd show {meta.id} --store DIR` "
              "reads it from the store")
        return 0
    print("\npage map (address range -> snapshot holding the content, or zero):")
    for r in page_map:
        st, e = r["start"], r["end"]
        print(f"  {st:012x}-{e:012x} {(e - st) // PAGE_SIZE:>8} pages  {r['source']}")
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
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Report it as the subcommand's mistake: its --help lists what it takes.
        culprit = parser.commands.get(args.command, parser)
        culprit.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(args.log_level)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CkptdError as e:
        # The error's class carries the exit code: 2 for a usage mistake, 13 for no
        # permission, 3 target gone, 4 damaged store, 74 store full, 75 try again, 70
        # otherwise, as README.md documents.
        text = f"store is damaged: {e} (run `ckptd verify`)" \
            if isinstance(e, CorruptStore) else str(e)
        print(f"ckptd: error: {text}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception:
        log.exception("internal error while running %r", " ".join(sys.argv))
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
