"""Unit tests of the service's pure parts: config, protocol, authorization rule, metrics,
logging, retention planning; and of the parts that meet the kernel directly (sd_notify
on a real datagram socket, pidfds and start times of real processes)."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from ckptd.errors import CkptdError, TargetNotFound, UserError
from ckptd.service import auth, maintenance, protocol
from ckptd.service.client import Client
from ckptd.service.config import (
    ConfigError,
    PolicyOverride,
    Retention,
    ServiceConfig,
    load_config,
    parse_config,
)
from ckptd.service.logsetup import OneLineFormatter, under_systemd
from ckptd.service.metrics import Metrics
from ckptd.service.notify import Notifier
from ckptd.service.registry import (
    Registry,
    new_record,
    open_process,
    pidfd_exited,
    read_start_time,
)
from ckptd.store import Store, fsutil
from ckptd.store.format import Counts, Kind, SnapshotMeta, Timings

REPO = Path(__file__).resolve().parent.parent


# --- config ---------------------------------------------------------------------------


def test_defaults_need_no_file() -> None:
    cfg = ServiceConfig()
    assert cfg.service.socket == Path("/run/ckptd/ckptd.sock")
    assert cfg.defaults.interval > 0
    assert parse_config("") == cfg


def test_example_config_matches_models() -> None:
    cfg = load_config(REPO / "config" / "ckptd.toml")
    # The example documents the defaults: loading it changes nothing.
    assert cfg == ServiceConfig()


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ('[defaults]\ninterval = "5x"', ["defaults.interval", "'5x'", "30s"]),
        ('[defaults]\ntracker = "soft"', ["defaults.tracker", "'soft'", "uffd-wp"]),
        ("[service]\nconcurrency = 0", ["service.concurrency", "0", "greater than or equal"]),
        ("[service]\nstorre = 1", ["unknown setting", "service.storre"]),
        ("[defaults.retention]\nkeep_last = -1", ["defaults.retention.keep_last", "-1"]),
        ('[service]\nlog_level = "loud"', ["service.log_level", "'loud'", "'debug'"]),
        ("[defaults\n", ["not valid TOML"]),
        ('[metrics]\nlisten = "9469"', ["metrics.listen", "HOST:PORT"]),
        # inf and nan would pass ge=0 and reach the scheduler.
        ("[defaults]\ninterval = inf", ["defaults.interval", "inf", "finite"]),
        ("[defaults.retention]\nkeep_age = nan", ["defaults.retention.keep_age", "nan"]),
        ("[service]\nshutdown_grace = inf", ["service.shutdown_grace", "finite"]),
        ("[defaults]\njitter = nan", ["defaults.jitter", "nan"]),
        # More digits than a float holds: int() of it raised OverflowError.
        (f'[defaults]\nmax_bytes_per_round = "{"9" * 400}"',
         ["defaults.max_bytes_per_round", "too large"]),
        # What `serve` would refuse, `serve --check` (which only loads) refuses too.
        ('[service]\nsocket_group = "no-such-group-here"',
         ["service.socket_group", "'no-such-group-here'", "no such group"]),
        (f'[service]\nsocket = "/run/{"s" * 104}"',
         ["service.socket", "at most 107 bytes", "has 109"]),
        # Powers of 1000 or of 1024? Refused rather than guessed.
        ('[defaults]\nmax_bytes_per_round = "64MB"',
         ["defaults.max_bytes_per_round", "ambiguous", "64M or 64MiB"]),
        ('[defaults.retention]\nmax_bytes = "2048T"',
         ["defaults.retention.max_bytes", "too large"]),
    ],
)
def test_bad_config_one_line(text: str, expect: list[str]) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "x.toml")
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("x.toml: ")
    for e in expect:
        assert e in msg


@pytest.mark.parametrize(("text", "size"), [
    ("8192", 8192), ("512K", 512 << 10), ("512KiB", 512 << 10), ("64M", 64 << 20),
    ("64mib", 64 << 20), ("1.5G", 3 << 29), ("1T", 1 << 40)])
def test_sizes_are_powers_of_1024_as_on_the_command_line(text: str, size: int) -> None:
    assert parse_config(f'[defaults]\nmax_bytes_per_round = "{text}"'
                        ).defaults.max_bytes_per_round == size


def test_units_and_overrides() -> None:
    cfg = parse_config('[defaults]\ninterval = "2m"\nmax_bytes_per_round = "64MiB"\n'
                       '[defaults.retention]\nkeep_age = "7d"')
    assert cfg.defaults.interval == 120.0
    assert cfg.defaults.max_bytes_per_round == 64 << 20
    assert cfg.defaults.retention.keep_age == 7 * 86400
    eff = PolicyOverride.model_validate(
        {"interval": "5s", "retention": {"keep_last": 3}}).apply(cfg.defaults)
    assert eff.interval == 5.0 and eff.retention.keep_last == 3
    assert eff.retention.keep_age == 7 * 86400 and eff.max_bytes_per_round == 64 << 20


def test_socket_path_limit_and_existing_group() -> None:
    # 107 bytes is the most sun_path holds (with its NUL): accepted, one more is not.
    ok = "/run/" + "s" * (107 - 5)
    assert parse_config(f'[service]\nsocket = "{ok}"').service.socket == Path(ok)
    with pytest.raises(ConfigError, match="at most 107 bytes"):
        parse_config(f'[service]\nsocket = "{ok}x"')
    assert parse_config('[service]\nsocket_group = "nogroup"').service.socket_group == "nogroup"


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.toml")


# --- protocol -------------------------------------------------------------------------


def test_decoder_splits_and_bounds() -> None:
    d = protocol.FrameDecoder(max_size=16)
    assert d.feed(b'{"op":"pi') == []
    out = d.feed(b'ng"}\n\n{"op":"list"}\n')
    assert [f.data for f in out if isinstance(f, protocol.Frame)] == [
        b'{"op":"ping"}', b'{"op":"list"}']
    # An oversized line is reported once, skipped to its newline, and the next works.
    out = d.feed(b"x" * 40)
    assert len(out) == 1 and isinstance(out[0], protocol.Oversize)
    assert d.feed(b"y" * 100) == []
    out = d.feed(b'zz\n{"op":"status"}\n')
    assert [f.data for f in out if isinstance(f, protocol.Frame)] == [b'{"op":"status"}']
    assert d.pending == 0
    # Oversized but complete within one chunk.
    out = d.feed(b"q" * 30 + b"\n" + b'{"op":"ping"}\n')
    assert isinstance(out[0], protocol.Oversize) and isinstance(out[1], protocol.Frame)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"not json", "bad-json"),
        (b"[1,2]", "bad-json"),
        (b'{"id": 3}', "bad-request"),
        (b'{"op": "explode", "id": 4}', "unknown-op"),
        (b'{"op": "register"}', "bad-request"),
        (b'{"op": "register", "pid": -1}', "bad-request"),
        (b'{"op": "register", "pid": 5, "policy": {"interval": "soon"}}', "bad-request"),
        (b'{"op": "ping", "extra": 1}', "bad-request"),
        (b"\xff\xfe", "bad-json"),
        # Deeper than the interpreter's stack (RecursionError), and an integer of more
        # digits than int() converts (ValueError): replies, not a dropped connection.
        (b"[" * 200000, "bad-json"),
        (b'{"id": ' + b"1" * 5000 + b', "op": "ping"}', "bad-json"),
        (b'{"op": "register", "pid": 1, "policy": ' + b'{"a": ' * 900 + b"1" + b"}" * 900
         + b"}", "bad-request"),
        # Ids and chain names become paths in the store: only ckptd's forms pass.
        (b'{"op": "show", "snapshot": "../../../../tmp/x-1-5", "id": 4}', "bad-request"),
        (b'{"op": "materialize", "snapshot": "1-1-1/../../x-1-1", "out_dir": "/x"}',
         "bad-request"),
        (b'{"op": "compact", "chain": "../../../../tmp/y-1", "id": 4}', "bad-request"),
        (b'{"op": "compact", "chain": "1-1", "upto": "../1-1-1"}', "bad-request"),
        (b'{"op": "snapshots", "chain": "1-1/../../x"}', "bad-request"),
        (b'{"op": "show", "snapshot": "1-1-1\\n"}', "bad-request"),
        ('{"op": "show", "snapshot": "\u0661-1-1"}'.encode(), "bad-request"),  # Arabic 1
        (b'{"op": "register", "pid": 1, "policy": {"max_bytes_per_round": "' + b"9" * 400
         + b'"}}', "bad-request"),
    ],
)
def test_bad_requests(frame: bytes, code: str) -> None:
    with pytest.raises(protocol.ProtocolError) as ei:
        protocol.parse_request(frame)
    assert ei.value.code == code
    reply = json.loads(protocol.encode_protocol_error(ei.value))
    assert reply["ok"] is False and reply["error"]["code"] == code
    if b'"id": 4' in frame:
        assert reply["id"] == 4
    assert "\n" not in reply["error"]["message"] and len(reply["error"]["message"]) < 400


def test_traversal_names_say_what_is_wrong() -> None:
    with pytest.raises(protocol.ProtocolError) as ei:
        protocol.parse_request(b'{"op": "show", "snapshot": "../../../../tmp/x-1-5"}')
    assert ei.value.message == ("show: snapshot: not a snapshot id (ids look like 1234-1-5) "
                                "(got '../../../../tmp/x-1-5')")
    with pytest.raises(protocol.ProtocolError) as ei:
        protocol.parse_request(b'{"op": "compact", "chain": "../y-1"}')
    assert "compact: chain: not a chain name (chains look like 1234-1)" in ei.value.message
    req = protocol.parse_request(b'{"op": "compact", "chain": "12-3", "upto": "12-3-40"}')
    assert isinstance(req, protocol.CompactReq) and (req.chain, req.upto) == ("12-3", "12-3-40")


def test_request_roundtrip() -> None:
    line = protocol.encode_request("register", 7, pid=123, policy={"interval": 5})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    req = protocol.parse_request(line.strip())
    assert isinstance(req, protocol.RegisterReq)
    assert req.pid == 123 and req.id == 7 and req.policy.interval == 5.0
    ok = protocol.parse_reply(protocol.encode_ok(7, {"a": 1}).strip())
    assert ok.ok and ok.result == {"a": 1} and ok.id == 7
    err = protocol.parse_reply(protocol.encode_error(7, "permission", "no").strip())
    assert not err.ok and err.error == {"code": "permission", "message": "no"}


def test_every_op_parses() -> None:
    samples = {
        "register": {"pid": 1}, "unregister": {"pid": 1}, "snapshot": {"pid": 1},
        "show": {"snapshot": "1-1-1"}, "materialize": {"snapshot": "1-1-1", "out_dir": "/x"},
        "compact": {"chain": "1-1"},
    }
    for op in protocol.OPS:
        req = protocol.parse_request(json.dumps({"op": op, **samples.get(op, {})}).encode())
        assert req.op == op


# --- authorization --------------------------------------------------------------------


def _own(uid: int, gid: int = 100, dumpable: bool = True) -> auth.Ownership:
    return auth.Ownership(pid=42, uids=(uid,) * 4, gids=(gid,) * 4, dumpable=dumpable)


def test_authorization_rule() -> None:
    root = auth.Peer(pid=1, uid=0, gid=0)
    alice = auth.Peer(pid=2, uid=1000, gid=100)
    assert auth.may_act_on_process(root, _own(1000)) is None
    assert auth.may_act_on_process(root, _own(0, dumpable=False)) is None
    assert auth.may_act_on_process(alice, _own(1000)) is None
    assert "another user" in (auth.may_act_on_process(alice, _own(1001)) or "")
    assert "another user" in (auth.may_act_on_process(alice, _own(0)) or "")
    assert "not dumpable" in (auth.may_act_on_process(alice, _own(1000, dumpable=False)) or "")
    setuid = auth.Ownership(pid=42, uids=(1000, 0, 0, 0), gids=(100,) * 4, dumpable=False)
    assert auth.may_act_on_process(alice, setuid) is not None
    setgid = auth.Ownership(pid=42, uids=(1000,) * 4, gids=(100, 5, 5, 5), dumpable=True)
    assert "group" in (auth.may_act_on_process(alice, setgid) or "")
    assert auth.may_see_chain(alice, 1000) and not auth.may_see_chain(alice, 0)
    assert auth.may_see_chain(root, 1000)


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """A "system.posix_acl_access" value, as the kernel stores it."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_may_access_bits_and_acls() -> None:
    R, W, X = fsutil.MAY_READ, fsutil.MAY_WRITE, fsutil.MAY_EXEC

    def may(mode: int, owner: tuple[int, int], want: int, acl: bytes | None = None,
            who: tuple[int, int] = (1000, 100)) -> bool:
        return fsutil.may_access(mode, owner[0], owner[1], acl, who[0], who[1], want)

    # The permission bits: owner, else group, else other; never a mix of classes.
    assert may(0o700, (1000, 0), R | W | X)
    assert not may(0o500, (1000, 0), W | X)
    assert not may(0o077, (1000, 100), R)  # the owner class decides for the owner
    assert may(0o770, (0, 100), W | X)
    assert not may(0o755, (0, 0), W)
    assert may(0o1777, (0, 0), W | X)
    assert not may(0o750, (0, 0), X)
    # ACLs: a named user gets its entry, limited by the mask.
    u_obj, user, g_obj, group, mask, other = (fsutil.ACL_USER_OBJ, fsutil.ACL_USER,
                                              fsutil.ACL_GROUP_OBJ, fsutil.ACL_GROUP,
                                              fsutil.ACL_MASK, fsutil.ACL_OTHER)
    grant = _acl((u_obj, 7, 0), (user, 5, 1000), (g_obj, 0, 0), (mask, 5, 0), (other, 0, 0))
    assert may(0o750, (0, 0), R | X, grant)
    assert not may(0o750, (0, 0), W, grant)
    masked = _acl((u_obj, 7, 0), (user, 7, 1000), (g_obj, 0, 0), (mask, 4, 0), (other, 0, 0))
    assert may(0o740, (0, 0), R, masked) and not may(0o740, (0, 0), X, masked)
    # A named user entry with nothing denies what "other" would give.
    deny = _acl((u_obj, 7, 0), (user, 0, 1000), (g_obj, 5, 0), (mask, 5, 0), (other, 5, 0))
    assert not may(0o755, (0, 0), R, deny)
    assert may(0o755, (0, 0), R, deny, who=(1001, 100))
    # A matching group that does not grant it: "other" is not consulted.
    grp_deny = _acl((u_obj, 7, 0), (g_obj, 0, 0), (group, 0, 100), (mask, 7, 0),
                    (other, 5, 0))
    assert not may(0o705, (0, 0), R, grp_deny)
    grp_ok = _acl((u_obj, 7, 0), (g_obj, 0, 0), (group, 5, 100), (mask, 7, 0), (other, 0, 0))
    assert may(0o770, (0, 0), R | X, grp_ok)
    # The owning user's entry is not masked.
    assert may(0o700, (1000, 0), R | W | X, _acl((u_obj, 7, 0), (mask, 0, 0), (other, 0, 0)))
    # A malformed value is refused, never guessed.
    assert not may(0o777, (0, 0), R, b"\x02\x00\x00\x00\x01")
    assert not may(0o777, (0, 0), R, struct.pack("<I", 3) + struct.pack("<HHI", other, 7, 0))


def test_read_ownership_of_real_processes() -> None:
    own = auth.read_ownership(os.getpid())
    assert own.uids[0] == os.getuid() and own.dumpable
    with pytest.raises(TargetNotFound):
        auth.read_ownership(2**22 + 1)


def test_peer_credentials_real_socket() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        peer = auth.peer_credentials(a)
    assert peer == auth.Peer(pid=os.getpid(), uid=os.geteuid(), gid=os.getegid())


def test_client_connect_error_names_the_reason(tmp_path: Path) -> None:
    # connect() of a path longer than sun_path raises an OSError without strerror.
    with pytest.raises(UserError) as ei:
        Client(tmp_path / ("s" * 200))
    assert "AF_UNIX path too long" in str(ei.value) and "None" not in str(ei.value)


# --- sd_notify on a real datagram socket ------------------------------------------------


def test_notify_real_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(path))
    srv.settimeout(10)
    n = Notifier.from_env({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "4000000"})
    assert n.enabled and n.watchdog_interval == 2.0
    assert n.ready("1 process, last snapshot never")
    msg = srv.recv(4096).decode()
    assert "READY=1" in msg.split("\n")
    assert "STATUS=1 process, last snapshot never" in msg.split("\n")
    assert n.watchdog()
    assert srv.recv(4096) == b"WATCHDOG=1"
    n.close()
    srv.close()


def test_notify_abstract_socket() -> None:
    name = f"ckptd-test-{os.getpid()}"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind("\0" + name)
    srv.settimeout(10)
    n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
    assert n.status("hello")
    assert srv.recv(4096) == b"STATUS=hello"
    srv.close()


def test_notify_disabled_and_watchdog_pid() -> None:
    assert not Notifier.from_env({}).send(READY=1)
    other = Notifier.from_env({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "10",
                               "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_interval == 0.0


# --- logging --------------------------------------------------------------------------


def test_journal_prefix_and_one_line() -> None:
    assert under_systemd({"INVOCATION_ID": "abc"})
    assert under_systemd({"JOURNAL_STREAM": "8:123"})
    assert not under_systemd({})
    buf = io.StringIO()
    h = logging.StreamHandler(buf)
    h.setFormatter(OneLineFormatter(journal=True))
    lg = logging.getLogger("ckptd.test.journal")
    lg.addHandler(h)
    lg.propagate = False
    lg.setLevel(logging.DEBUG)
    lg.error("two\nlines")
    lg.warning("w")
    lg.info("i")
    lg.debug("d")
    try:
        raise ValueError("boom")
    except ValueError:
        lg.exception("failed")
    lines = buf.getvalue().splitlines()
    assert lines[0] == "<3>ckptd.test.journal: two | lines"
    assert [ln[:3] for ln in lines[1:4]] == ["<4>", "<6>", "<7>"]
    assert len(lines) == 5 and lines[4].startswith("<3>") and "ValueError: boom" in lines[4]


# --- metrics --------------------------------------------------------------------------


def test_metrics_text_format() -> None:
    m = Metrics()
    m.snapshots.inc(kind="full")
    m.snapshots.inc(kind="delta")
    m.snapshots.inc(kind="delta")
    m.failures.inc(reason='we"ird')
    m.freeze_seconds.observe(0.003)
    m.freeze_seconds.observe(5.0)
    m.registered.set(3)
    m.in_flight.add(2)
    m.in_flight.add(-1)
    text = m.render().decode()
    assert 'ckptd_snapshots_total{kind="delta"} 2' in text
    assert 'ckptd_snapshot_failures_total{reason="we\\"ird"} 1' in text
    assert 'ckptd_freeze_seconds_bucket{le="0.0025"} 0' in text
    assert 'ckptd_freeze_seconds_bucket{le="0.005"} 1' in text
    assert 'ckptd_freeze_seconds_bucket{le="+Inf"} 2' in text
    assert "ckptd_freeze_seconds_count 2" in text
    assert "ckptd_registered_processes 3" in text
    assert "ckptd_snapshots_in_flight 1" in text
    assert "# TYPE ckptd_freeze_seconds histogram" in text
    for line in text.splitlines():
        assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2
    # Labels name one series whatever their order.
    m.compactions.inc(result="ok", chain="1-2")
    m.compactions.inc(chain="1-2", result="ok")
    assert m.compactions.get(result="ok", chain="1-2") == 2
    assert 'ckptd_compactions_total{chain="1-2",result="ok"} 2' in m.render().decode()


# --- retention planning ---------------------------------------------------------------


def _meta(seq: int, kind: str = "delta", created: float = 0.0,
          stored: int = 100, pages: int = 0, zero: int = 0) -> SnapshotMeta:
    return SnapshotMeta(
        id=f"9-1-{seq}", chain="9-1", seq=seq, parent=None if kind == "full" else f"9-1-{seq-1}",
        kind=kind, pid=9, created=created, tracker="uffd-wp", consistency="frozen", vmas=[],
        present=[], data_file=None, data_bytes=stored, frames=[], extents=[], zeros=[],
        counts=Counts(bytes_stored=stored, pages_stored=pages, pages_zero=zero,
                      pages_present=pages + zero if kind == "full" else 0),
        timings=Timings(),
    )


def _chain(base_pages: int, deltas: list[int], zero: int = 0) -> list[SnapshotMeta]:
    """A full base of `base_pages` pages, then deltas storing the given pages each."""
    return [_meta(1, "full", pages=base_pages)] + [
        _meta(i + 2, pages=d, zero=zero) for i, d in enumerate(deltas)]


def test_retention_plan() -> None:
    chain = [_meta(1, "full", created=0)] + [_meta(i, created=i * 10) for i in range(2, 11)]
    assert maintenance.plan(chain, Retention(), now=100) is None
    p = maintenance.plan(chain, Retention(keep_last=3), now=100)
    assert p is not None and p.upto == "9-1-8" and p.drops == 7
    p = maintenance.plan(chain, Retention(keep_age=25), now=100)
    assert p is not None and p.upto == "9-1-8"  # created 80 is the first younger than 25 s
    p = maintenance.plan(chain, Retention(max_bytes=450), now=100)
    assert p is not None and p.upto == "9-1-7"  # 4 newest = 400 bytes <= 450
    # The newest is always kept.
    p = maintenance.plan(chain, Retention(keep_age=1), now=10_000)
    assert p is not None and p.upto == "9-1-10"
    # Chain length: restoring the newest needs 10 snapshots > 4: fold the older half.
    p = maintenance.plan(chain, Retention(compact_after=4), now=100)
    assert p is not None and p.upto == "9-1-6" and "compaction" in p.reason
    rebased = [_meta(1, "full"), _meta(2), _meta(3, "full"), _meta(4)]
    assert maintenance.plan(rebased, Retention(compact_after=2), now=0) is None


def test_compaction_defaults() -> None:
    assert Retention().compact_ratio == 1.0 and Retention().compact_after == 256
    # Zero or negative ratios, and inf/nan (which JSON cannot carry), are refused.
    for bad in ("0", "-1", "inf", "nan"):
        with pytest.raises(ConfigError, match="compact_ratio"):
            parse_config(f"[defaults.retention]\ncompact_ratio = {bad}")
    eff = PolicyOverride.model_validate({"retention": {"compact_ratio": 2.5}}).apply(
        ServiceConfig().defaults)
    assert eff.retention.compact_ratio == 2.5 and eff.retention.compact_after == 256


def test_register_compaction_options() -> None:
    from ckptd.cli import build_parser
    from ckptd.errors import UserError
    from ckptd.service.cli_commands import _overrides

    args = build_parser().parse_args(
        ["register", "12", "--compact-ratio", "0.5", "--compact-after", "64"])
    assert _overrides(args) == {"retention": {"compact_ratio": 0.5, "compact_after": 64}}
    args = build_parser().parse_args(["register", "12", "--compact-ratio", "0"])
    with pytest.raises(UserError, match="--compact-ratio"):
        _overrides(args)


def test_compaction_ratio_trigger() -> None:
    ret = Retention()  # ratio 1.0, compact_after 256
    # Deltas storing 900 of the base's 1000 pages: restoring is cheap enough, no compaction.
    assert maintenance.plan(_chain(1000, [100] * 9), ret, now=0) is None
    # 1000 pages: as many as the base. Fold the older half: the deltas left after the new
    # base (seq 7..11) store 500 pages, half the budget.
    p = maintenance.plan(_chain(1000, [100] * 10), ret, now=0)
    assert p is not None and p.upto == "9-1-6" and p.drops == 5
    assert "compaction" in p.reason and "compact_ratio 1" in p.reason
    # Zero runs count as pages a restore applies.
    p = maintenance.plan(_chain(1000, [50] * 10, zero=50), ret, now=0)
    assert p is not None and p.upto == "9-1-6"
    # The ratio scales the budget.
    assert maintenance.plan(_chain(1000, [100] * 19), Retention(compact_ratio=2), now=0) is None
    p = maintenance.plan(_chain(1000, [100] * 20), Retention(compact_ratio=2), now=0)
    assert p is not None and p.upto == "9-1-11"
    p = maintenance.plan(_chain(1000, [100] * 3), Retention(compact_ratio=0.25), now=0)
    assert p is not None and p.upto == "9-1-3"  # 2 deltas left store 200 > 125: fold one more
    # The base's pages are its stored + zero pages.
    zero_base = [_meta(1, "full", pages=500, zero=500)] + [_meta(i, pages=100)
                                                          for i in range(2, 11)]
    assert maintenance.plan(zero_base, ret, now=0) is None
    # Only deltas after the newest full snapshot count, against that snapshot's pages.
    rebased = [*_chain(100_000, [100] * 5), _meta(7, "full", pages=300), _meta(8, pages=299)]
    assert maintenance.plan(rebased, ret, now=0) is None
    rebased.append(_meta(9, pages=1))
    p = maintenance.plan(rebased, ret, now=0)
    assert p is not None and p.upto == "9-1-8" and p.drops == 7


def test_compaction_folds_a_burst_at_once() -> None:
    """Newest deltas much larger than the older ones: folding only the older half would
    leave the trigger standing and compact again on the next round."""
    chain = _chain(1000, [10] * 10 + [950])
    p = maintenance.plan(chain, Retention(), now=0)
    assert p is not None and p.upto == "9-1-12"  # the newest: the burst is folded too
    chain = _chain(1000, [10] * 10 + [950, 10, 10])
    p = maintenance.plan(chain, Retention(), now=0)
    assert p is not None and p.upto == "9-1-12"  # 2 x 10 pages left after it


def test_compaction_floor_for_tiny_bases() -> None:
    """A base of a few pages (or none: a truncated first snapshot) counts as
    COMPACT_FLOOR_PAGES, so a tiny process does not compact on every round."""
    floor = maintenance.COMPACT_FLOOR_PAGES
    assert floor == 256
    for base in (0, 1, 200):
        assert maintenance.plan(_chain(base, [10] * 25), Retention(), now=0) is None
        p = maintenance.plan(_chain(base, [10] * 26), Retention(), now=0)
        assert p is not None and "compaction" in p.reason, base
    assert maintenance.plan(_chain(0, [1] * 200), Retention(), now=0) is None
    # Above the floor, the base's own pages count.
    assert maintenance.plan(_chain(300, [10] * 29), Retention(), now=0) is None
    assert maintenance.plan(_chain(300, [10] * 30), Retention(), now=0) is not None


def test_compaction_length_trigger() -> None:
    """compact_after bounds the snapshots a restore reads, however small the deltas."""
    assert maintenance.plan(_chain(1000, [0] * 255), Retention(), now=0) is None  # 256
    p = maintenance.plan(_chain(1000, [0] * 256), Retention(), now=0)  # 257 snapshots
    assert p is not None and p.upto == "9-1-129" and p.drops == 128
    assert "restoring the newest needs 257 snapshots (compact_after 256)" in p.reason
    p = maintenance.plan(_chain(1000, [1] * 4), Retention(compact_after=4), now=0)
    assert p is not None and p.upto == "9-1-3"
    # Both triggers at once: the page rule may fold further than half.
    p = maintenance.plan(_chain(1000, [0] * 4 + [1000]), Retention(compact_after=4), now=0)
    assert p is not None and p.upto == "9-1-6"


def test_retention_comes_before_compaction() -> None:
    """keep_last/keep_age/max_bytes decide as before, whatever the compaction settings."""
    chain = [_meta(1, "full", created=0, pages=1000)] + [
        _meta(i, created=i * 10, pages=300) for i in range(2, 11)]
    for ret in (Retention(), Retention(compact_ratio=100.0, compact_after=1000),
                Retention(compact_ratio=0.01, compact_after=2)):
        upd = ret.model_dump()
        p = maintenance.plan(chain, Retention(**{**upd, "keep_last": 3}), now=100)
        assert p is not None and p.upto == "9-1-8" and p.drops == 7
        assert p.reason == "retention: keep_last 3"
        p = maintenance.plan(chain, Retention(**{**upd, "keep_age": 25}), now=100)
        assert p is not None and p.upto == "9-1-8" and p.reason.startswith("retention")
        p = maintenance.plan(chain, Retention(**{**upd, "max_bytes": 450}), now=100)
        assert p is not None and p.upto == "9-1-7" and p.reason.startswith("retention")
    assert maintenance.plan(chain, Retention(compact_ratio=3), now=100) is None
    p = maintenance.plan(chain, Retention(), now=100)
    assert p is not None and p.reason.startswith("compaction")


@pytest.mark.parametrize("ratio", [0.5, 1.0, 4.0])
def test_compaction_is_amortized(ratio: float) -> None:
    """Simulate rounds of varied size, bursts included, folding as planned. Every
    compaction follows at least half a page budget of newly stored delta pages, or half
    of compact_after new rounds; so compaction rewrites at most 2 / ratio base pages per
    delta page stored (plus one base per compact_after / 2 rounds), and between
    compactions a restore applies less than the budget on top of the base."""
    import random

    rng = random.Random(7)
    base_pages = 10_000
    budget = ratio * base_pages
    ret = Retention(compact_ratio=ratio)
    def entry(snapshot_id: str, kind: Kind, pages: int) -> maintenance.Entry:
        return maintenance.Entry(snapshot_id, kind, 0.0, maintenance.EntryCounts(pages, 0, 0))

    chain = [entry("9-1-1", "full", base_pages)]
    stored = rewritten = by_length = 0
    new_pages = new_rounds = 0  # since the last compaction
    rounds = 5000
    for rnd in range(2, rounds + 2):
        pages = rng.choice([rng.randint(0, 400)] * 30 + [rng.randint(0, 30_000)])
        stored += pages
        new_pages += pages
        new_rounds += 1
        chain.append(entry(f"9-1-{rnd}", "delta", pages))
        p = maintenance.plan(chain, ret, now=0)
        if p is None:
            assert sum(e.counts.pages_stored for e in chain[1:]) < budget
            assert len(chain) <= ret.compact_after
            continue
        assert p.reason.startswith("compaction")
        assert new_pages >= budget / 2 or new_rounds >= ret.compact_after // 2
        by_length += new_pages < budget / 2
        new_pages = new_rounds = 0
        rewritten += base_pages
        i = p.drops
        new_base = entry(chain[i].id, "full", base_pages)
        chain = [new_base, *chain[i + 1:]]
        assert sum(e.counts.pages_stored for e in chain[1:]) <= budget / 2
        assert len(chain) <= ret.compact_after // 2 + 1
    assert rewritten > 0
    assert rewritten <= 2 / ratio * stored + by_length * base_pages
    assert by_length <= rounds / (ret.compact_after // 2)


# --- the in-memory tally of a chain -----------------------------------------------------


def _tally_store(tmp_path: Path, n: int) -> tuple[Store, list[SnapshotMeta]]:
    store = Store.open(tmp_path / "store", create=True)
    info = store.create_chain({"pid": 9, "start_time": 1, "mm_fingerprint": "x", "comm": "t",
                               "exe": None, "cmdline": [], "uid": 0})
    assert info.chain == "9-1"
    metas = _chain(1000, [100] * (n - 1))
    for m in metas:
        store.publish(m)
    return store, metas


def test_tally_reads_heads_only_when_the_chain_changes(tmp_path: Path) -> None:
    store, metas = _tally_store(tmp_path, 3)
    tally = maintenance.ChainTally("9-1")
    tally.note(metas[-1])  # nothing loaded yet: noted snapshots wait for the first load
    entries = tally.entries(store)
    assert [e.id for e in entries] == ["9-1-1", "9-1-2", "9-1-3"] and tally.reloads == 1
    assert entries[0] == maintenance.Entry.of(metas[0])
    assert tally.entries(store) == entries and tally.reloads == 1
    # A round publishes and notes its snapshot: no file is read.
    new = _meta(4, pages=77)
    store.publish(new)
    tally.note(new)
    tally.note(new)  # noting twice changes nothing
    tally.note(_meta(2))  # nor does an older one
    entries = tally.entries(store)
    assert [e.id for e in entries][-1] == "9-1-4" and entries[-1].counts.pages_stored == 77
    assert len(entries) == 4 and tally.reloads == 1
    # Another chain's snapshot is ignored.
    other = _meta(5).model_copy(update={"id": "9-2-5", "chain": "9-2"})
    tally.note(other)
    assert len(tally.entries(store)) == 4 and tally.reloads == 1
    # Published by another ckptd process (not noted): the listing differs, reload.
    store.publish(_meta(5, pages=5))
    assert [e.id for e in tally.entries(store)][-1] == "9-1-5" and tally.reloads == 2
    # Noted but never published (or removed since): reload, and trust the disk.
    tally.note(_meta(6, pages=6))
    assert [e.id for e in tally.entries(store)][-1] == "9-1-5" and tally.reloads == 3


def test_tally_follows_a_compaction_underneath(tmp_path: Path) -> None:
    """Another process compacts: 9-1-3 becomes a full base with new counts, the older
    snapshots go. The tally must not keep the old kind and counts of 9-1-3."""
    store, metas = _tally_store(tmp_path, 5)
    tally = maintenance.ChainTally("9-1")
    assert len(tally.entries(store)) == 5
    store.publish(_meta(3, "full", pages=1234))
    for m in metas[:2]:
        store.snapshot_path(m.id).unlink()
    entries = tally.entries(store)
    assert [e.id for e in entries] == ["9-1-3", "9-1-4", "9-1-5"] and tally.reloads == 2
    assert entries[0].kind == "full" and entries[0].counts.pages_stored == 1234


def test_run_compacts_and_updates_the_tally(tmp_path: Path) -> None:
    """run() plans from the tally, compacts through the store, and the tally follows:
    the folded snapshots go, the new base is read back from disk (its head only)."""
    store, _ = _tally_store(tmp_path, 11)  # deltas store 1000 pages = the base's
    tally = maintenance.ChainTally("9-1")
    assert maintenance.run(store, "9-1", Retention(compact_ratio=2), 0, tally) is None
    assert tally.reloads == 1
    result = maintenance.run(store, "9-1", Retention(), 0, tally)
    assert result is not None and "folded 5 snapshot(s) into a base at 9-1-6" in result
    entries = tally.entries(store)
    assert [e.id for e in entries] == [f"9-1-{i}" for i in range(6, 12)]
    assert entries[0].kind == "full" and tally.reloads == 1  # no re-read of every head
    # The rewritten base's counts come from disk: these synthetic snapshots hold no data,
    # so the new base stores 0 pages (its old entry said 100) and counts as the floor.
    assert entries[0].counts.pages_stored == 0
    # Exactly what reading the chain afresh gives, and the same decisions.
    assert entries == maintenance.ChainTally("9-1").entries(store)
    for ret in (Retention(), Retention(compact_ratio=0.4), Retention(keep_last=3)):
        assert tally.may_need_work(ret, 0) == (maintenance.plan(entries, ret, 0) is not None)
    assert maintenance.run(store, "9-1", Retention(compact_ratio=2), 0, tally) is None
    assert tally.reloads == 1
    # Without a tally, run() reads the heads itself.
    assert maintenance.run(store, "9-1", Retention(compact_ratio=100, compact_after=2), 0)
    assert store.snapshot_ids("9-1") == ["9-1-9", "9-1-10", "9-1-11"]
    # A compaction that fails leaves the tally to be read from disk again.
    tally = maintenance.ChainTally("9-1")
    tally.entries(store)
    store.snapshot_path("9-1-10").unlink()  # the lineage breaks underneath
    with pytest.raises(CkptdError):
        maintenance.run(store, "9-1", Retention(keep_last=1), 0, tally)
    assert tally.remembered() is None


class _Heads:
    """What ChainTally.entries reads of a store, from a list of snapshots."""

    def __init__(self, metas: list[SnapshotMeta]) -> None:
        self.metas = {m.id: m for m in metas}

    def listing(self, chain: str) -> tuple[int, list[str]]:
        return 1, list(self.metas)  # no floor

    def head(self, snapshot_id: str, floor: int | None = None) -> SnapshotMeta:
        return self.metas[snapshot_id]


def test_tally_may_need_work_agrees_with_plan() -> None:
    """After every round the service asks the tally (constant time) instead of planning
    (linear in the chain): the two must agree on every chain and every setting, through
    noted rounds, rebases and reloads."""
    import random

    rng = random.Random(11)
    settings = [Retention(), Retention(keep_last=5), Retention(keep_age=30),
                Retention(max_bytes=2_000), Retention(compact_ratio=0.2),
                Retention(compact_ratio=3, compact_after=8),
                Retention(keep_last=40, keep_age=500, max_bytes=50_000, compact_after=20)]
    for trial in range(40):
        tally = maintenance.ChainTally("9-1")
        assert tally.may_need_work(Retention(), 0)  # nothing remembered: ask the disk
        first_kind = "full" if trial % 4 else "delta"  # a chain may start truncated
        chain = [_meta(1, first_kind, created=0.0, stored=rng.randint(0, 900),
                       pages=rng.choice([0, 3, 300, 5000]))]
        tally.entries(_Heads(chain[:1]))  # type: ignore[arg-type]
        for seq in range(2, rng.randint(3, 60)):
            kind = "full" if rng.random() < 0.05 else "delta"
            m = _meta(seq, kind, created=seq * 5.0, stored=rng.randint(0, 900),
                      pages=rng.choice([0, 1, 20, 200, 2000]), zero=rng.choice([0, 0, 7]))
            chain.append(m)
            tally.note(m)
            for ret in settings:
                now = seq * 5.0 + rng.choice([0, 10, 100, 1000])
                expect = maintenance.plan(chain, ret, now) is not None
                assert tally.may_need_work(ret, now) == expect, (trial, seq, ret)
        # Re-read from the disk (a compaction, another process): the sums follow.
        cut = rng.randrange(len(chain))
        rest = [chain[cut].model_copy(update={"kind": "full"}), *chain[cut + 1:]]
        tally.entries(_Heads(rest))  # type: ignore[arg-type]
        for ret in settings:
            assert tally.may_need_work(ret, 1e4) == (
                maintenance.plan(rest, ret, 1e4) is not None)
        tally.invalidate()
        assert tally.may_need_work(Retention(), 0) and tally.remembered() is None


# --- registry: pidfds and start times of real processes --------------------------------


def test_registry_identity_and_persistence(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        start = read_start_time(child.pid)
        pidfd, st = open_process(child.pid)
        assert st == start and not pidfd_exited(pidfd)
        reg = Registry(tmp_path / "registrations.json")
        rec = new_record(child.pid, start, 0, 0, PolicyOverride(interval=5))
        reg.add(rec, pidfd)
        (tmp_path / "registrations.json").write_bytes(reg.to_bytes())
        # A record whose start time differs is another process that reused the PID.
        with pytest.raises(TargetNotFound, match="another process"):
            open_process(child.pid, start + 1)
        again = Registry(tmp_path / "registrations.json")
        restored, gone = again.restore()
        assert [r.pid for r in restored] == [child.pid] and gone == []
        assert restored[0].record.policy.interval == 5.0
        fd2 = restored[0].pidfd
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
        assert pidfd_exited(fd2)
        again.remove(child.pid)
        restored, gone = Registry(tmp_path / "registrations.json").restore()
        assert restored == [] and len(gone) == 1 and gone[0][0].pid == child.pid
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        reg.remove(child.pid)


def test_registry_bad_file(tmp_path: Path) -> None:
    p = tmp_path / "registrations.json"
    p.write_text('{"format": "ckptd-registrations", "version": 1, "registrations": [{}]}')
    from ckptd.errors import CkptdError
    with pytest.raises(CkptdError, match="move it aside"):
        Registry(p).load_records()


def _budget_in_child(soft: int, hard: int) -> dict[str, int]:
    """fdlimit.raise_soft_limit() in a fresh process started with these limits."""
    import resource

    code = ("import json; from ckptd.service import fdlimit; b = fdlimit.raise_soft_limit(); "
            "print(json.dumps({'before': b.before, 'soft': b.soft, 'hard': b.hard, "
            "'registrations': b.registrations}))")
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True,
        cwd=str(Path(__file__).resolve().parent.parent),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
    return dict(json.loads(out.stdout))


def test_fd_budget_raises_the_soft_limit_to_the_hard_one() -> None:
    from ckptd.service import fdlimit

    b = _budget_in_child(64, 1152)
    assert b == {"before": 64, "soft": 1152, "hard": 1152,
                 "registrations": (1152 - fdlimit.RESERVED_FDS) // fdlimit.FDS_PER_REGISTRATION}
    # Already at the hard limit: nothing to raise. Below the reserve: no room at all.
    assert _budget_in_child(1152, 1152)["soft"] == 1152
    assert _budget_in_child(100, 100)["registrations"] == 0
