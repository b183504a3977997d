"""CLI subcommands that run or talk to the service: serve, register, unregister,
status, ps. ckptd/cli.py adds them with add_service_commands()."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..cli import MAX_AGE, count_arg, duration_arg, pid_arg, size_arg
from ..errors import UserError
from .client import Client, default_socket
from .config import DEFAULT_CONFIG_PATH, PolicyOverride
from .views import human_age


def _socket_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", type=Path, metavar="PATH", default=None,
                   help="control socket of the service (default: $CKPTD_SOCKET, else "
                        "/run/ckptd/ckptd.sock)")


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


class _Renamed(argparse.Action):
    """An option that was renamed: using it is a one-line mistake naming the new ones.
    It also stops argparse from taking it as an abbreviation of a longer option."""

    def __init__(self, *args: Any, help_text: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.help_text = help_text

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        parser.error(f"{option_string} is not an option of {parser.prog}: {self.help_text}")


def _client(args: argparse.Namespace) -> Client:
    return Client(args.socket or default_socket())


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=1)
    sys.stdout.write("\n")


def add_service_commands(sub: Any) -> None:
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "serve", help="run the ckptd service (systemd runs this)", formatter_class=fmt,
        description=(
            "Run the long-running service: it takes periodic incremental snapshots of the\n"
            "processes registered with it and answers the control socket. It reads\n"
            f"--config (default {DEFAULT_CONFIG_PATH}; built-in defaults if that file does\n"
            "not exist). SIGHUP reloads the config and keeps registrations; SIGTERM\n"
            "finishes the snapshots in flight and exits 0. Under systemd it speaks\n"
            "sd_notify (Type=notify, watchdog). See docs/service.md."),
        epilog=("examples:\n"
                "  ckptd serve --config /etc/ckptd/ckptd.toml\n"
                "  ckptd serve --config ./dev.toml --check   validate the file and exit"))
    p.add_argument("--config", type=Path, metavar="PATH", default=None,
                   help=f"TOML config file (default: {DEFAULT_CONFIG_PATH} if it exists)")
    p.add_argument("--check", action="store_true",
                   help="only validate the configuration, print the effective settings")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "register", help="have the service snapshot a process periodically",
        formatter_class=fmt,
        description=(
            "Register PID with the running service, to checkpoint it in the background.\n"
            "The service takes a snapshot right away (full), then one every --interval\n"
            "(incremental), and drops old ones by the retention options. Options override\n"
            "the service's [defaults] for this process only; registering an already\n"
            "registered PID replaces its overrides. Registrations survive service\n"
            "restarts, and end when the process exits (its snapshots are kept). Non-root\n"
            "users may register only their own processes. Sizes take K, M, G, T (or KiB,\n"
            "MiB, GiB, TiB: powers of 1024)."),
        epilog=("examples:\n"
                "  ckptd register 1234 --interval 30s\n"
                "  ckptd register 1234 --interval 5m --keep-last 12 --keep-bytes 10G\n"
                "  ckptd register 1234 --interval 1m --max-bytes-per-round 64M"))
    p.add_argument("pid", type=pid_arg, metavar="PID")
    p.add_argument("--interval", type=duration_arg(), metavar="DURATION",
                   help="time between snapshot starts: seconds, or 500ms, 30s, 5m, 2h")
    p.add_argument("--jitter", type=float, metavar="FRACTION",
                   help="random delay of each start, as a fraction of the interval (0-0.5)")
    p.add_argument("--tracker", choices=["auto", "uffd-wp", "hash"],
                   help="how changed pages are found (auto: uffd-wp when the kernel allows)")
    cons = p.add_mutually_exclusive_group()
    cons.add_argument("--fuzzy", dest="consistency", action="store_const", const="fuzzy",
                      help="do not freeze the process (faster; pages may be inconsistent)")
    cons.add_argument("--frozen", dest="consistency", action="store_const", const="frozen",
                      help="freeze the process while pages are found and copied (default)")
    p.add_argument("--max-bytes-per-round", type=size_arg, metavar="SIZE",
                   help="cap on memory captured per round (0: none); the rest stays marked "
                        "written and is captured next round, so nothing is lost "
                        "(policy max_bytes_per_round)")
    p.add_argument("--keep-last", type=count_arg, metavar="N",
                   help="keep at most the N newest snapshots (0: no limit; "
                        "retention.keep_last)")
    p.add_argument("--keep-age", metavar="DURATION",
                   type=duration_arg(zero_ok=True, limit=MAX_AGE, limit_text="36500d"),
                   help="drop snapshots older than this (0: no limit; retention.keep_age)")
    p.add_argument("--keep-bytes", type=size_arg, metavar="SIZE",
                   help="drop the oldest snapshots beyond SIZE stored for this process "
                        "(0: no limit; retention.max_bytes)")
    # Was the retention budget, and is one letter short of --max-bytes-per-round, which
    # argparse would take it as an abbreviation of: refuse it, naming both.
    p.add_argument("--max-bytes", action=_Renamed, nargs="?", help=argparse.SUPPRESS,
                   help_text="use --keep-bytes SIZE (retention: bytes kept for this "
                             "process) or --max-bytes-per-round SIZE (cap per snapshot)")
    p.add_argument("--compact-ratio", type=float, metavar="R",
                   help="fold old deltas into a new base once the deltas since the base "
                        "store R times the base's pages (> 0, built-in default 1; a base counts "
                        "as at least 256 pages)")
    p.add_argument("--compact-after", type=int, metavar="N",
                   help="also fold them when a restore would need more than N snapshots "
                        "(>= 2, built-in default 256)")
    _socket_arg(p)
    _json_arg(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser(
        "unregister", help="stop snapshotting a process", formatter_class=fmt,
        description=("Stop the service's periodic snapshots of PID, when you no longer\n"
                     "need new checkpoints of it. Its snapshots are kept (`ckptd list --pid\n"
                     "PID`). Quiet on success."),
        epilog=("examples:\n"
                "  ckptd unregister 1234\n"
                "  ckptd unregister 1234 --json   print rounds and the last snapshot taken"))
    p.add_argument("pid", type=pid_arg, metavar="PID")
    _socket_arg(p)
    _json_arg(p)
    p.set_defaults(func=cmd_unregister)

    p = sub.add_parser(
        "status", help="is the service running, and how is it doing", formatter_class=fmt,
        description=("Show the running service, to check that it runs and keeps up:\n"
                     "version, uptime, store, registered processes, snapshots taken,\n"
                     "failures and overruns. Exits 2 with one line when no service answers\n"
                     "on the socket."),
        epilog=("examples:\n"
                "  ckptd status\n"
                "  ckptd status --socket /run/ckptd/ckptd.sock --json"))
    _socket_arg(p)
    _json_arg(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "ps", help="list the processes registered with the service", formatter_class=fmt,
        description=("List the processes registered with the service, to see which are\n"
                     "checkpointed and how their rounds go: one line each with interval,\n"
                     "rounds, last snapshot, next one, failures and overruns. Non-root users\n"
                     "see their own."),
        epilog=("examples:\n"
                "  ckptd ps\n"
                "  ckptd ps --json    each registration with its effective policy"))
    _socket_arg(p)
    _json_arg(p)
    p.set_defaults(func=cmd_ps)


def cmd_serve(args: argparse.Namespace) -> int:
    from .config import load_config

    if args.check:
        cfg = load_config(args.config)
        _print_json(cfg.model_dump(mode="json"))
        return 0
    from .daemon import serve

    return serve(args.config)


# Policy key (service config, docs/api.md) -> register's option, where the name differs.
_OPTION_OF = {"max_bytes": "--keep-bytes"}
# register's namespace attribute -> retention key.
_RETENTION = {"keep_last": "keep_last", "keep_age": "keep_age", "keep_bytes": "max_bytes",
              "compact_ratio": "compact_ratio", "compact_after": "compact_after"}


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    top = {k: getattr(args, k) for k in
           ("interval", "jitter", "tracker", "consistency", "max_bytes_per_round")
           if getattr(args, k) is not None}
    ret = {key: getattr(args, attr) for attr, key in _RETENTION.items()
           if getattr(args, attr) is not None}
    body: dict[str, Any] = {**top, "retention": ret}
    try:
        PolicyOverride.model_validate(body)
    except ValidationError as exc:
        e = exc.errors()[0]
        key = str(e["loc"][-1])
        opt = _OPTION_OF.get(key, "--" + key.replace("_", "-"))
        raise UserError(f"{opt} {e.get('input')!r}: {e['msg']}") from None
    return body


def cmd_register(args: argparse.Namespace) -> int:
    policy = _overrides(args)
    with _client(args) as c:
        res = c.call("register", pid=args.pid, policy=policy)
    if args.json:
        _print_json(res)
    return 0


def cmd_unregister(args: argparse.Namespace) -> int:
    with _client(args) as c:
        res = c.call("unregister", pid=args.pid)
    if args.json:
        _print_json(res)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as c:
        res = c.call("status")
    if args.json:
        _print_json(res)
        return 0
    up = res["uptime"]
    print(f"ckptd {res['version']} running, pid {res['pid']}, up {up:.0f}s")
    print(f"  {res['status']}")
    print(f"  store      {res['store']}")
    print(f"  socket     {res['socket']}")
    print(f"  config     {res['config'] or 'built-in defaults'}")
    print(f"  processes  {res['registered']} registered, at most "
          f"{res['registrations_max']}")
    print(f"  snapshots  {res['snapshots']} taken, {res['failures']} failed, "
          f"{res['overruns']} overruns, {res['in_flight']} in flight")
    return 0


def _ago(v: float | None) -> str:
    return human_age(v) if v is not None else "-"


def cmd_ps(args: argparse.Namespace) -> int:
    with _client(args) as c:
        res = c.call("list")
    procs = res["processes"]
    if args.json:
        _print_json(procs)
        return 0
    if not procs:
        print("no processes registered (see `ckptd register --help`)")
        return 0
    print(f"{'PID':>7}  {'COMM':<15} {'INTERVAL':>8} {'ROUNDS':>6} {'LAST':>10} "
          f"{'NEXT':>6} {'FAIL':>4} {'OVERRUN':>7}  LAST SNAPSHOT")
    for p in sorted(procs, key=lambda x: x["pid"]):
        nxt = "-" if p["next_in"] is None else f"{p['next_in']:.0f}s"
        print(f"{p['pid']:>7}  {p['comm'][:15]:<15} {p['policy']['interval']:>7g}s "
              f"{p['rounds']:>6} {_ago(p['last_snapshot_age']):>10} {nxt:>6} "
              f"{p['failures']:>4} {p['overruns']:>7}  {p['last_snapshot'] or '-'}")
    return 0
