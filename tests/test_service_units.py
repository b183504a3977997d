"""Unit tests of the service's pure parts: config, protocol, authorization rule, metrics,
logging, retention planning; and of the parts that meet the kernel directly (sd_notify
on a real datagram socket, pidfds and start times of real processes)."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ckptd.errors import TargetNotFound
from ckptd.service import auth, maintenance, protocol
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
from ckptd.store.format import Counts, SnapshotMeta, Timings

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
    ],
)
def test_bad_config_one_line(text: str, expect: list[str]) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "x.toml")
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("x.toml: ")
    for e in expect:
        assert e in msg


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


def test_may_write_dir() -> None:
    alice = auth.Peer(pid=2, uid=1000, gid=100)
    assert auth.may_write_dir(alice, 1000, 0, 0o700)
    assert not auth.may_write_dir(alice, 1000, 0, 0o500)
    assert auth.may_write_dir(alice, 0, 100, 0o770)
    assert not auth.may_write_dir(alice, 0, 0, 0o755)
    assert auth.may_write_dir(alice, 0, 0, 0o1777)


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
    text = m.render().decode()
    assert 'ckptd_snapshots_total{kind="delta"} 2' in text
    assert 'ckptd_snapshot_failures_total{reason="we\\"ird"} 1' in text
    assert 'ckptd_freeze_seconds_bucket{le="0.0025"} 0' in text
    assert 'ckptd_freeze_seconds_bucket{le="0.005"} 1' in text
    assert 'ckptd_freeze_seconds_bucket{le="+Inf"} 2' in text
    assert "ckptd_freeze_seconds_count 2" in text
    assert "ckptd_registered_processes 3" in text
    assert "# TYPE ckptd_freeze_seconds histogram" in text
    for line in text.splitlines():
        assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2


# --- retention planning ---------------------------------------------------------------


def _meta(seq: int, kind: str = "delta", created: float = 0.0,
          stored: int = 100) -> SnapshotMeta:
    return SnapshotMeta(
        id=f"9-1-{seq}", chain="9-1", seq=seq, parent=None if kind == "full" else f"9-1-{seq-1}",
        kind=kind, pid=9, created=created, tracker="uffd-wp", consistency="frozen", vmas=[],
        present=[], data_file=None, data_bytes=stored, frames=[], extents=[], zeros=[],
        counts=Counts(bytes_stored=stored), timings=Timings(),
    )


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
