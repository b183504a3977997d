"""The service end to end: a real `ckptd serve` process, real clients on its socket, real
target processes. Needs root (ptrace and userfaultfd on other processes)."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_service_support import (
    NOT_ROOT_REASON,
    PYTHON,
    ROOT,
    Daemon,
    Target,
    as_user,
    pattern,
    raw_exchange,
    targets,
    wait_for,
    write_config,
)

from ckptd.errors import PermissionDenied, TargetNotFound, UserError
from ckptd.kernel import procfs
from ckptd.service import fdlimit
from ckptd.service.client import Client, try_service
from ckptd.store import Store

pytestmark = [pytest.mark.root, pytest.mark.skipif(not ROOT, reason=NOT_ROOT_REASON)]

NOBODY = 65534


@pytest.fixture
def daemon(tmp_path: Path) -> Any:
    d = Daemon(tmp_path).start()
    yield d
    d.kill()


def _read_region(out_dir: Path, addr: int, length: int) -> bytes:
    index = json.loads((out_dir / "index.json").read_text())
    for v in index["vmas"]:
        if v["start"] <= addr and addr + length <= v["end"]:
            with open(out_dir / v["file"], "rb") as f:
                f.seek(addr - v["start"])
                return f.read(length)
    raise AssertionError(f"no mapping holds {addr:#x} in {out_dir}")


def _rounds(d: Daemon, pid: int) -> int:
    for p in d.call("list")["processes"]:
        if p["pid"] == pid:
            return int(p["rounds"])
    return -1


def test_register_snapshot_list_materialize_byte_exact(daemon: Daemon, tmp_path: Path) -> None:
    t = Target(pages=256)
    try:
        t.fill(1)
        reg = daemon.call("register", pid=t.pid)
        assert reg["pid"] == t.pid and reg["registered"]
        # Registration takes a first (full) snapshot right away.
        wait_for(lambda: _rounds(daemon, t.pid) >= 1, "first round")
        s1 = daemon.call("snapshots", pid=t.pid)["snapshots"][-1]
        assert s1["kind"] == "full"
        t.fill(2, first=10, count=5)  # dirty 5 pages
        s2 = daemon.call("snapshot", pid=t.pid)
        assert s2["kind"] == "delta" and s2["parent"] == s1["id"]
        assert s2["pages_stored"] >= 5
        listed = [s["id"] for s in daemon.call("snapshots", pid=t.pid)["snapshots"]]
        assert listed[-2:] == [s1["id"], s2["id"]]
        show = daemon.call("show", snapshot=s2["id"])
        assert show["lineage"] == [s1["id"], s2["id"]]
        assert show["snapshot"]["kind"] == "delta"

        expect1 = b"".join(pattern(1, p) for p in range(256))
        expect2 = (b"".join(pattern(1, p) for p in range(10))
                   + b"".join(pattern(2, p) for p in range(10, 15))
                   + b"".join(pattern(1, p) for p in range(15, 256)))
        for sid, expect in ((s1["id"], expect1), (s2["id"], expect2)):
            out = tmp_path / f"out-{sid}"
            res = daemon.call("materialize", snapshot=sid, out_dir=str(out))
            assert res["out_dir"] == str(out)
            assert _read_region(out, t.addr, 256 * 4096) == expect
        v = daemon.call("verify")
        assert v["ok"], v["problems"]

        # The process exits: it is unregistered, its snapshots are kept.
        t.kill()
        wait_for(lambda: _rounds(daemon, t.pid) == -1, "unregister on exit")
        assert [s["id"] for s in daemon.call("snapshots", pid=t.pid)["snapshots"]] == listed
        wait_for(lambda: "unregistered: the process exited" in daemon.log(), "exit logged")
    finally:
        t.kill()
    assert daemon.stop() == 0


def test_cli_commands_against_service(daemon: Daemon) -> None:
    env = {**os.environ, "CKPTD_SOCKET": str(daemon.socket)}

    def ckptd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PYTHON, "-m", "ckptd", *args], env=env, text=True,
                              capture_output=True, check=False)

    with targets(1, 16) as (t,):
        r = ckptd("register", str(t.pid), "--interval", "1h", "--keep-last", "5", "--json")
        assert r.returncode == 0, r.stderr
        body = json.loads(r.stdout)
        assert body["policy"]["retention"]["keep_last"] == 5
        assert body["overrides"] == {"interval": 3600.0, "retention": {"keep_last": 5}}
        r = ckptd("ps")
        assert r.returncode == 0 and str(t.pid) in r.stdout
        r = ckptd("ps", "--json")
        assert [p["pid"] for p in json.loads(r.stdout)] == [t.pid]
        r = ckptd("status")
        assert r.returncode == 0 and "1 process" in r.stdout
        status = json.loads(ckptd("status", "--json").stdout)
        assert status["registered"] == 1
        # The daemon inherited our limits, and raised its soft one to the hard one.
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        fit = (hard - fdlimit.RESERVED_FDS) // fdlimit.FDS_PER_REGISTRATION
        assert status["registrations_max"] == min(1024, fit)
        assert f"1 registered, at most {min(1024, fit)}" in r.stdout
        r = ckptd("unregister", str(t.pid))
        assert (r.returncode, r.stdout, r.stderr) == (0, "", "")  # quiet on success
        # Mistakes: one line, non-zero exit, no traceback.
        for args in (["unregister", str(t.pid)], ["register", "999999999"],
                     ["register", str(t.pid), "--jitter", "3"],
                     ["register", "abc"], ["status", "--socket", "/nonexistent/sock"]):
            r = ckptd(*args)
            assert r.returncode != 0, args
            # One line (argparse's mistakes too), no traceback.
            assert "Traceback" not in r.stderr, (args, r.stderr)
            assert len(r.stderr.splitlines()) == 1, (args, r.stderr)
            assert r.stderr.startswith("ckptd"), (args, r.stderr)
            if args[1] != "abc":
                assert len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert try_service("/nonexistent/sock") is None
    c = try_service(daemon.socket)
    assert c is not None
    c.close()


def test_engine_commands_use_the_running_service(daemon: Daemon, tmp_path: Path) -> None:
    """snapshot/list/materialize/verify without --store go through the service."""
    env = {**os.environ, "CKPTD_SOCKET": str(daemon.socket)}
    env.pop("CKPTD_STORE", None)

    def ckptd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PYTHON, "-m", "ckptd", *args], env=env, text=True,
                              capture_output=True, check=False)

    with targets(1, 16) as (t,):
        r = ckptd("snapshot", str(t.pid), "--json")
        assert r.returncode == 0, r.stderr
        snap = json.loads(r.stdout)
        assert snap["pid"] == t.pid and snap["kind"] == "full"
        r = ckptd("snapshot", str(t.pid))
        assert r.returncode == 0 and r.stdout.strip() == f"{snap['chain']}-2"
    # The snapshots are in the service's store, which the CLI never opened itself.
    listed = json.loads(ckptd("list", "--json").stdout)
    assert [s["id"] for s in listed] == [snap["id"], f"{snap['chain']}-2"]
    assert {m.id for m in Store.open(daemon.store).list_snapshots()} == \
        {s["id"] for s in listed}
    out = tmp_path / "via-service"
    r = ckptd("materialize", snap["id"], "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "index.json").read_text())["id"] == snap["id"]
    r = ckptd("verify", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True


def test_retention_and_compaction_in_the_background(daemon: Daemon, tmp_path: Path) -> None:
    """keep_last and compact_after at work: old rounds fold into a new base, the newest
    still restores byte for byte, and verify passes."""
    t = Target(pages=128)
    try:
        t.fill(1)
        daemon.call("register", pid=t.pid, policy={
            "interval": 0.3, "jitter": 0,
            "retention": {"keep_last": 4, "compact_after": 3}})
        for seed in range(2, 14):
            t.fill(seed, first=seed, count=3)
            time.sleep(0.35)
        wait_for(lambda: _rounds(daemon, t.pid) >= 12, "rounds")
        daemon.call("unregister", pid=t.pid)  # waits for the round in flight

        def settled() -> bool:
            snaps = daemon.call("snapshots", pid=t.pid)["snapshots"]
            return len(snaps) <= 4
        wait_for(settled, "retention applied")
        snaps = daemon.call("snapshots", pid=t.pid)["snapshots"]
        assert snaps[0]["kind"] == "full" and snaps[0]["seq"] > 1
        # A job that ran on after the unregistration lets go of what it kept there.
        chain = snaps[0]["chain"]
        wait_for(lambda: not _spares(daemon.store, chain) and not _holds_dir(
            daemon, daemon.store / "chains" / chain / "snapshots"), "the chain released")
        assert [s["seq"] for s in snaps] == list(range(snaps[0]["seq"], snaps[-1]["seq"] + 1))
        expect = bytearray(b"".join(pattern(1, p) for p in range(128)))
        for seed in range(2, 14):
            for p in range(seed, seed + 3):
                expect[p * 4096:(p + 1) * 4096] = pattern(seed, p)
        out = tmp_path / "newest"
        daemon.call("materialize", snapshot=snaps[-1]["id"], out_dir=str(out))
        assert _read_region(out, t.addr, 128 * 4096) == bytes(expect)
        v = daemon.call("verify")
        assert v["ok"], v["problems"]
        # A file below the chain's floor, as a power loss while compaction removed the
        # older files could bring one back (here a name holding the newest snapshot's
        # metadata), is not a snapshot for the service either.
        store = Store.open(daemon.store)
        assert 1 < store.floor(chain) <= snaps[0]["seq"]
        stale = f"{chain}-{store.floor(chain) - 1}"
        (store.chain_dir(chain) / "snapshots" / f"{stale}.json").write_bytes(
            store.snapshot_path(snaps[-1]["id"]).read_bytes())
        assert daemon.call("snapshots", pid=t.pid)["snapshots"] == snaps
        for op, args in (("show", {}), ("materialize", {"out_dir": str(tmp_path / "x")})):
            with pytest.raises(UserError, match="no snapshot"):
                daemon.call(op, snapshot=stale, **args)
        assert daemon.call("verify") == v
    finally:
        t.kill()


def test_restart_keeps_registrations(tmp_path: Path) -> None:
    d = Daemon(tmp_path).start()
    try:
        with targets(2, 32) as (keep, dies):
            for t in (keep, dies):
                d.call("register", pid=t.pid, policy={"interval": 3600, "jitter": 0.2})
                wait_for(lambda t=t: _rounds(d, t.pid) >= 1, "first round")
            before = d.call("snapshots", pid=keep.pid)["snapshots"]
            assert d.stop() == 0
            reg_file = d.store / "service" / "registrations.json"
            assert reg_file.stat().st_mode & 0o777 == 0o600
            dies.kill()  # gone while the service is down
            d.start()
            procs = d.call("list")["processes"]
            assert [p["pid"] for p in procs] == [keep.pid]
            assert procs[0]["overrides"] == {"interval": 3600.0, "jitter": 0.2}
            assert f"registration of pid {dies.pid}" in d.log() and "dropped" in d.log()
            # Re-armed on start: a snapshot right away, in the same chain.
            wait_for(lambda: _rounds(d, keep.pid) >= 1, "re-arm round")
            after = d.call("snapshots", pid=keep.pid)["snapshots"]
            assert len(after) == len(before) + 1
            new = after[-1]
            assert new["chain"] == before[-1]["chain"] and new["seq"] == before[-1]["seq"] + 1
            # Incremental if tracking survived, full (with the reason) otherwise.
            assert new["kind"] == "delta" or new["full_reason"]
            assert d.call("verify")["ok"]
        assert d.stop() == 0
    finally:
        d.kill()


def test_sighup_reloads_config_keeps_registrations(tmp_path: Path) -> None:
    d = Daemon(tmp_path, interval="1h").start()
    try:
        with targets(1, 16) as (t,):
            d.call("register", pid=t.pid)
            wait_for(lambda: _rounds(d, t.pid) >= 1, "first round")
            assert d.call("list")["processes"][0]["policy"]["interval"] == 3600
            text = d.config.read_text().replace('interval = "1h"', 'interval = "200ms"')
            d.config.write_text(text.replace('log_level = "debug"', 'log_level = "info"'))
            d.signal(signal.SIGHUP)
            wait_for(lambda: d.call("list")["processes"][0]["policy"]["interval"] == 0.2,
                     "new defaults applied")
            # The new interval drives the existing registration: rounds keep coming.
            base = _rounds(d, t.pid)
            wait_for(lambda: _rounds(d, t.pid) >= base + 2, "rounds at the new interval")
            # A broken file on reload is refused; the service keeps its running config.
            d.config.write_text(text.replace('interval = "200ms"', 'interval = "-1"'))
            d.signal(signal.SIGHUP)
            wait_for(lambda: "reload refused" in d.log(), "refusal logged")
            assert d.call("list")["processes"][0]["policy"]["interval"] == 0.2
            # The reload op does the same for root clients.
            d.config.write_text(text)
            assert d.call("reload")["registered"] == 1
        assert d.stop() == 0
    finally:
        d.kill()


@pytest.mark.parametrize("grace", ["30s", "0s"], ids=["finish", "abandon"])
def test_sigterm_during_snapshot(tmp_path: Path, grace: str) -> None:
    d = Daemon(tmp_path, config_extra=f'shutdown_grace = "{grace}"').start()
    try:
        t = Target(pages=96 * 1024)  # 384 MiB
        try:
            t.fill(1, 0, 16)
            d.call("register", pid=t.pid)
            wait_for(lambda: _rounds(d, t.pid) >= 1, "first round")
            t.cmd(f"rand 0 {t.pages}")  # incompressible: a long compress + write
            errors: list[BaseException] = []

            def snap() -> None:
                try:
                    with Client(d.socket) as c:
                        c.call("snapshot", pid=t.pid)
                except BaseException as exc:  # the service may stop before replying
                    errors.append(exc)

            th = threading.Thread(target=snap)
            th.start()
            wait_for(lambda: d.call("status")["in_flight"] >= 1, "snapshot in flight",
                     step=0.005)
            d.signal(signal.SIGTERM)
            assert d.proc is not None
            assert d.proc.wait(120) == 0
            th.join(120)
            log = d.log()
            if grace == "0s":
                assert "abandoning" in log
            # The target runs on, no longer traced or stopped.
            st = t.state()
            assert st["TracerPid"] == "0" and st["State"][0] in "RS"
            t.cmd("fill 3 0 1")
            # The store holds only complete snapshots: verify with a fresh service.
            d2 = Daemon(tmp_path).start()
            try:
                v = d2.call("verify")
                assert v["ok"], v["problems"]
                snaps = d2.call("snapshots", pid=t.pid)["snapshots"]
                assert [s["seq"] for s in snaps] == list(range(1, len(snaps) + 1))
                assert d2.stop() == 0
            finally:
                d2.kill()
        finally:
            t.kill()
    finally:
        d.kill()


@pytest.fixture
def open_tmp() -> Any:
    """A temporary directory other users can traverse (pytest's tmp_path is 0700)."""
    import shutil
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="ckptd-svc-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_non_root_client(open_tmp: Path) -> None:
    tmp_path = open_tmp
    d = Daemon(tmp_path, config_extra='socket_group = "nogroup"').start()
    try:
        assert d.socket.stat().st_mode & 0o777 == 0o660
        with targets(1, 16) as (root_t,), targets(1, 16, uid=NOBODY) as (own_t,):
            d.call("register", pid=root_t.pid)
            wait_for(lambda: _rounds(d, root_t.pid) >= 1, "root target round")

            def as_nobody(op: str, **fields: Any) -> Any:
                def call() -> Any:
                    with Client(d.socket) as c:
                        return c.call(op, **fields)
                return as_user(NOBODY, NOBODY, call)

            r = as_nobody("register", pid=root_t.pid)
            assert r["error"] == PermissionDenied.__name__ and "another user" in r["message"]
            r = as_nobody("snapshot", pid=root_t.pid)
            assert r["error"] == PermissionDenied.__name__
            r = as_nobody("unregister", pid=root_t.pid)
            assert r["error"] == PermissionDenied.__name__
            root_snap = d.call("snapshots", pid=root_t.pid)["snapshots"][0]["id"]
            r = as_nobody("show", snapshot=root_snap)
            assert r["error"] == TargetNotFound.__name__  # same as missing: not revealed
            r = as_nobody("verify")
            assert r["error"] == PermissionDenied.__name__
            r = as_nobody("reload")
            assert r["error"] == PermissionDenied.__name__
            # Its own process: allowed, and it sees only its own.
            r = as_nobody("register", pid=own_t.pid)
            assert r["ok"]["pid"] == own_t.pid, r
            wait_for(lambda: _rounds(d, own_t.pid) >= 1, "own target round")
            r = as_nobody("list")
            assert [p["pid"] for p in r["ok"]["processes"]] == [own_t.pid]
            r = as_nobody("snapshots")
            assert {s["pid"] for s in r["ok"]["snapshots"]} == {own_t.pid}
            own_snap = r["ok"]["snapshots"][0]["id"]
            # Materialize only where it could write itself.
            r = as_nobody("materialize", snapshot=own_snap, out_dir="/root/x")
            assert r["error"] == PermissionDenied.__name__
            out = tmp_path / "mine"
            out.mkdir()
            os.chown(out, NOBODY, NOBODY)
            r = as_nobody("materialize", snapshot=own_snap, out_dir=str(out / "m"))
            assert "ok" in r, r
            assert (out / "m" / "index.json").stat().st_uid == NOBODY
            r = as_nobody("unregister", pid=own_t.pid)
            assert r["ok"]["unregistered"]
        assert d.stop() == 0
    finally:
        d.kill()


def test_malformed_and_oversized_requests(daemon: Daemon) -> None:
    replies = raw_exchange(daemon.socket, [
        b"this is not json\n",
        b"[1, 2, 3]\n",
        b'{"id": 1, "op": "fly"}\n',
        b'{"id": 2, "op": "register", "pid": "many"}\n',
        b'{"id": 3}\n',
        b"x" * (2 << 20) + b"\n",
        b'{"id": 4, "op": "ping"}\n',
        # Deeper than the interpreter's stack; an integer too long for int(): both
        # used to escape the parser and drop the connection.
        b"[" * 200000 + b"\n",
        b'{"id": ' + b"7" * 5000 + b', "op": "ping"}\n',
        b'{"id": 5, "op": "ping"}\n',
    ], replies=10)
    codes = [r["error"]["code"] if not r["ok"] else "ok" for r in replies]
    assert codes == ["bad-json", "bad-json", "unknown-op", "bad-request", "bad-request",
                     "too-large", "ok", "bad-json", "bad-json", "ok"]
    assert replies[2]["id"] == 1 and replies[6]["id"] == 4 and replies[9]["id"] == 5
    # An oversized message with no newline at all, then the client goes away.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(daemon.socket))
    s.sendall(b"y" * (3 << 20))
    s.settimeout(60)
    line = s.recv(65536).split(b"\n")[0]
    assert json.loads(line)["error"]["code"] == "too-large"
    s.close()
    # Errors from the service itself are replies too.
    with pytest.raises(TargetNotFound):
        daemon.call("unregister", pid=999999999)
    with pytest.raises(UserError):
        daemon.call("materialize", snapshot="1-1-1", out_dir="relative")
    assert daemon.call("ping")["protocol"] == 1
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert "Traceback" not in daemon.log()


def _read_until_closed(s: socket.socket) -> tuple[bytes, float]:
    """Everything `s` receives until the service closes it, and when that happened."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data, time.monotonic()


def test_unfinished_requests_time_out(tmp_path: Path) -> None:
    """A request that is begun must be finished within request_timeout, however the
    client trickles it; a connection idle between requests stays open."""
    d = Daemon(tmp_path, config_extra='request_timeout = "1s"').start()
    try:
        idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        idle.settimeout(60)
        idle.connect(str(d.socket))
        half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        half.settimeout(60)
        half.connect(str(d.socket))
        t0 = time.monotonic()
        half.sendall(b'{"id": 1, "op": "pi')
        data, closed = _read_until_closed(half)
        reply = json.loads(data.split(b"\n")[0])
        assert reply["error"]["code"] == "timeout", reply
        assert "within 1 s" in reply["error"]["message"]
        assert 1.0 <= closed - t0 < 30, closed - t0
        half.close()

        # One byte every 0.3 s keeps data coming, but the request's time runs from its
        # first byte: closed after about 1 s, long before the 40 bytes are sent.
        trickle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        trickle.settimeout(60)
        trickle.connect(str(d.socket))
        t0 = time.monotonic()
        sent = 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for byte in b'{"id": 2, "op": "ping"}       ' + b" " * 10:
                trickle.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.3)
        data, closed = _read_until_closed(trickle)
        assert json.loads(data.split(b"\n")[0])["error"]["code"] == "timeout"
        assert sent < 40, (sent, closed - t0)  # closed before the request was whole
        trickle.close()

        # A request that ended gives the next one its own time: two whole requests
        # 0.7 s apart, each sent in two halves 0.5 s apart, are both answered.
        paced = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        paced.settimeout(60)
        paced.connect(str(d.socket))
        for rid in (3, 4):
            paced.sendall(f'{{"id": {rid}, "op": '.encode())
            time.sleep(0.5)
            paced.sendall(b'"ping"}\n')
            time.sleep(0.7)
        got = b""
        while got.count(b"\n") < 2:
            got += paced.recv(65536)
        assert [json.loads(line)["id"] for line in got.splitlines()] == [3, 4]
        paced.close()

        # A client that sends requests but takes no reply: once the socket's buffers
        # are full, the service waits request_timeout for it, then closes it.
        deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deaf.settimeout(60)
        deaf.connect(str(d.socket))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            deaf.sendall(b'{"op": "status"}\n' * 20000)
        wait_for(lambda: "a reply not taken within 1 s" in d.log(), "the deaf client closed")
        with contextlib.suppress(ConnectionResetError):
            _read_until_closed(deaf)  # what was sent before, then the end
        deaf.close()

        # The idle connection, silent for all of this, still works.
        assert time.monotonic() - t0 > 1.5
        idle.sendall(b'{"id": 5, "op": "ping"}\n')
        assert json.loads(idle.recv(65536).split(b"\n")[0])["result"]["protocol"] == 1
        idle.close()
        assert "request unfinished after 1 s" in d.log()
        assert d.stop() == 0
        assert "Traceback" not in d.log()
    finally:
        d.kill()


def test_metrics_on_socket_and_http(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = Daemon(tmp_path, config_extra=f'[metrics]\nlisten = "127.0.0.1:{port}"').start()
    try:
        with targets(1, 16) as (t,):
            d.call("register", pid=t.pid)
            wait_for(lambda: _rounds(d, t.pid) >= 1, "first round")
            text = d.call("metrics")["text"]
            assert 'ckptd_snapshots_total{kind="full"} 1' in text
            assert "ckptd_registered_processes 1" in text
            assert "ckptd_freeze_seconds_count 1" in text
            with socket.create_connection(("127.0.0.1", port), timeout=60) as c:
                c.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                data = b""
                while chunk := c.recv(65536):
                    data += chunk
            assert data.startswith(b"HTTP/1.0 200 OK")
            assert b"ckptd_bytes_stored_total" in data
        assert d.stop() == 0
    finally:
        d.kill()


def test_sd_notify_protocol(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(path))
    srv.settimeout(60)
    d = Daemon(tmp_path, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000",
                              "INVOCATION_ID": "test"}).start(wait=False)
    try:
        seen: list[str] = []
        while not any("WATCHDOG=1" in m for m in seen):
            seen.append(srv.recv(4096).decode())
        ready = next(m for m in seen if "READY=1" in m.split("\n"))
        assert "STATUS=0 processes, last snapshot never" in ready.split("\n")
        # READY=1 comes once the socket is bound: a client connects right away.
        assert d.call("ping")["protocol"] == 1
        d.signal(signal.SIGHUP)
        while not any("RELOADING=1" in m for m in seen):
            seen.append(srv.recv(4096).decode())
        assert d.stop() == 0
        while not any("STOPPING=1" in m for m in seen):
            seen.append(srv.recv(4096).decode())
        # Under systemd (INVOCATION_ID), log lines carry a syslog priority prefix.
        lines = [ln for ln in d.log().splitlines() if ln]
        assert lines and all(ln[0] == "<" and ln[2] == ">" for ln in lines), lines[:3]
    finally:
        d.kill()
        srv.close()


def test_bad_config_refuses_to_start(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[defaults]\ntracker = "magic"\n')
    r = subprocess.run([PYTHON, "-m", "ckptd", "serve", "--config", str(cfg)],
                       capture_output=True, text=True, check=False)
    assert r.returncode != 0
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "defaults.tracker" in err and "'magic'" in err and "uffd-wp" in err
    r = subprocess.run([PYTHON, "-m", "ckptd", "serve", "--config", str(tmp_path / "none")],
                       capture_output=True, text=True, check=False)
    assert r.returncode != 0 and "no such config file" in r.stderr


def test_second_instance_refused(daemon: Daemon, tmp_path: Path) -> None:
    r = subprocess.run([PYTHON, "-m", "ckptd", "serve", "--config", str(daemon.config)],
                       capture_output=True, text=True, check=False, timeout=120)
    assert r.returncode != 0 and "already serving" in r.stderr
    assert daemon.call("ping")


def test_byte_cap_truncates_and_nothing_is_lost(daemon: Daemon, tmp_path: Path) -> None:
    t = Target(pages=512)
    try:
        t.fill(1)
        daemon.call("register", pid=t.pid, policy={"max_bytes_per_round": 64 * 4096})
        wait_for(lambda: _rounds(daemon, t.pid) >= 1, "first round")
        first = daemon.call("snapshots", pid=t.pid)["snapshots"][-1]
        # A full snapshot is not capped (it must hold everything); deltas are.
        assert first["kind"] == "full"
        t.fill(2, 0, 200)  # 200 pages written, cap is 64 per round
        snaps = []
        while True:
            s = daemon.call("snapshot", pid=t.pid)
            snaps.append(s)
            assert s["pages_dirty"] <= 64
            if not s["truncated"]:
                break
            assert len(snaps) < 10
        assert len(snaps) >= 4 and sum(s["pages_dirty"] for s in snaps) >= 200
        out = tmp_path / "capped"
        daemon.call("materialize", snapshot=snaps[-1]["id"], out_dir=str(out))
        expect = (b"".join(pattern(2, p) for p in range(200))
                  + b"".join(pattern(1, p) for p in range(200, 512)))
        assert _read_region(out, t.addr, 512 * 4096) == expect
    finally:
        t.kill()


# Holds a process under ptrace (PTRACE_SEIZE, which does not stop it) until killed: a
# second tracer is refused, so every snapshot of the process fails meanwhile.
TRACER = """
import sys
from ckptd.kernel.syscalls import ptrace
ptrace(0x4206, int(sys.argv[1]), 0, 0)
print("traced", flush=True)
sys.stdin.read()
"""


def test_failed_timer_round_is_counted_and_logged(daemon: Daemon) -> None:
    """Nobody awaits a timer round: its failure must still reach the process's
    counters, the metrics and the log, and the schedule must go on."""
    t = Target(pages=16)
    tracer = subprocess.Popen([PYTHON, "-c", TRACER, str(t.pid)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert tracer.stdout is not None and tracer.stdout.readline().strip() == "traced"
        daemon.call("register", pid=t.pid, policy={"interval": 0.2, "jitter": 0})

        def proc() -> dict[str, Any]:
            return next(p for p in daemon.call("list")["processes"] if p["pid"] == t.pid)

        wait_for(lambda: proc()["failures"] >= 2, "failed rounds")
        p = proc()
        assert p["rounds"] == 0 and "Operation not permitted" in p["last_error"]
        assert daemon.call("status")["failures"] >= 2
        assert 'ckptd_snapshot_failures_total{reason="os_error"}' in \
            daemon.call("metrics")["text"]
        assert f"pid {t.pid}: snapshot failed" in daemon.log()
        # The tracer goes away: the next rounds succeed; the process stayed registered.
        tracer.kill()
        tracer.wait()
        wait_for(lambda: proc()["rounds"] >= 1, "a round once the tracer is gone")
        assert proc()["last_error"] is None
    finally:
        tracer.kill()
        tracer.wait()
        t.kill()
    assert daemon.stop() == 0


def test_unregister_waits_for_a_timer_round_in_flight(daemon: Daemon) -> None:
    """A timer round runs in a capture thread and nobody awaits it; unregistering the
    process meanwhile returns only once that round has ended and been recorded."""
    t = Target(pages=96 * 1024)  # 384 MiB, incompressible: a first round of seconds
    try:
        t.cmd(f"rand 0 {t.pages}")
        daemon.call("register", pid=t.pid)
        wait_for(lambda: daemon.call("status")["in_flight"] >= 1, "first round running",
                 step=0.005)
        res = daemon.call("unregister", pid=t.pid)
        assert res["rounds"] == 1 and res["last_snapshot"] is not None
        snaps = daemon.call("snapshots", pid=t.pid)["snapshots"]
        assert [s["id"] for s in snaps] == [res["last_snapshot"]]
        assert daemon.call("status")["in_flight"] == 0
        assert daemon.call("verify")["ok"]
    finally:
        t.kill()
    assert daemon.stop() == 0


@pytest.mark.slow
def test_fifty_processes_one_second_for_a_minute(tmp_path: Path) -> None:
    d = Daemon(tmp_path, log_level="info").start()
    try:
        with targets(50, 64) as ts:
            for t in ts:
                t.cmd("tick")
                # Compaction off (neither trigger can fire): every round must stay listed
                # to prove none was lost.
                d.call("register", pid=t.pid,
                       policy={"interval": 1,
                               "retention": {"compact_after": 1000, "compact_ratio": 1e9}})
            time.sleep(60)  # the load under test; nothing is asserted about its timing
            procs = {p["pid"]: p for p in d.call("list")["processes"]}
            assert sorted(procs) == sorted(t.pid for t in ts)
            for t in ts:
                d.call("unregister", pid=t.pid)  # waits for a round in flight
            status = d.call("status")
            for t in ts:
                p = procs[t.pid]
                assert p["max_in_flight"] == 1, p
                assert p["failures"] == 0, p
                snaps = d.call("snapshots", pid=t.pid)["snapshots"]
                # No snapshot lost: every round is in the store, seqs are contiguous,
                # and each delta's parent is the snapshot before it.
                assert len(snaps) >= p["rounds"] > 0
                assert [s["seq"] for s in snaps] == list(range(1, len(snaps) + 1))
                for a, b in itertools.pairwise(snaps):
                    assert b["parent"] == a["id"] or b["kind"] == "full"
                    # No overlap: a round starts after the previous one published.
                    assert b["created"] - b["total_ms"] / 1e3 >= a["created"] - 0.002
            assert status["failures"] == 0
            print(f"\n50 x 1 s for 60 s: {status['snapshots']} snapshots, "
                  f"{status['overruns']} overruns")
            assert d.call("verify")["ok"]
        assert d.stop() == 0
    finally:
        d.kill()


def _soft_nofile(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no open-file limit in /proc/PID/limits")


def test_open_file_limit_is_raised_and_bounds_registrations(tmp_path: Path) -> None:
    # Started as systemd starts services: a soft limit far below the hard one. Each
    # registration holds 4 descriptors, so at the old soft limit of 64 the first round of
    # the ~10th registration ran out (EMFILE). The service raises the soft limit to the
    # hard one, and refuses, with a message, a registration beyond what that holds.
    hard = fdlimit.RESERVED_FDS + 6 * fdlimit.FDS_PER_REGISTRATION
    d = Daemon(tmp_path, nofile=(64, hard)).start()
    try:
        assert d.proc is not None
        assert _soft_nofile(d.proc.pid) == hard
        assert "open-file limit raised from 64 to" in d.log()
        assert "has room for 6 registrations" in d.log()  # the startup warning
        assert d.call("status")["registrations_max"] == 6
        with targets(7, 16) as ts:
            for t in ts[:6]:
                d.call("register", pid=t.pid)
            with pytest.raises(UserError, match="LimitNOFILE"):
                d.call("register", pid=ts[6].pid)
            # The six hold: each round of each takes a write-protect snapshot.
            for t in ts[:6]:
                d.call("snapshot", pid=t.pid)
            procs = {p["pid"]: p for p in d.call("list")["processes"]}
            assert sorted(procs) == sorted(t.pid for t in ts[:6])
            for t in ts[:6]:
                assert procs[t.pid]["failures"] == 0, procs[t.pid]
                snaps = d.call("snapshots", pid=t.pid)["snapshots"]
                assert snaps and snaps[-1]["tracker"] == "uffd-wp", snaps[-1]
            assert "Too many open files" not in d.log()
            assert d.stop() == 0
            # Restarted with room for 4: the six are restored (never dropped for
            # this), and the log says which limit to raise.
            d = Daemon(tmp_path, nofile=(64, hard - 2 * fdlimit.FDS_PER_REGISTRATION))
            d.start()
            assert len(d.call("list")["processes"]) == 6
            assert "6 registrations restored, but the open-file limit" in d.log()
            assert d.stop() == 0
    finally:
        d.kill()


def test_python_dash_m_and_help() -> None:
    for cmd in ("serve", "register", "unregister", "status", "ps"):
        r = subprocess.run([sys.executable, "-m", "ckptd", cmd, "--help"],
                           capture_output=True, text=True, check=False)
        assert r.returncode == 0 and "usage: ckptd " + cmd in r.stdout
    r = subprocess.run([sys.executable, "-m", "ckptd", "serve", "--check"],
                       capture_output=True, text=True, check=False,
                       env={**os.environ, "HOME": "/nonexistent"})
    assert r.returncode == 0 and json.loads(r.stdout)["service"]["concurrency"] == 1


# --- security review: names, paths, hostile input, limits ------------------------------


def _as_nobody(d: Daemon, op: str, **fields: Any) -> Any:
    def call() -> Any:
        with Client(d.socket) as c:
            return c.call(op, **fields)
    return as_user(NOBODY, NOBODY, call)


def _raw(d: Daemon, line: bytes, uid: int = 0) -> dict[str, Any]:
    """One raw request line, from root or from `uid`; the reply."""
    if uid == 0:
        return raw_exchange(d.socket, [line], replies=1)[0]
    got = as_user(uid, uid, lambda: raw_exchange(d.socket, [line], replies=1)[0])
    return got["ok"]  # type: ignore[no-any-return]


def test_names_cannot_lead_outside_the_store(open_tmp: Path) -> None:
    d = Daemon(open_tmp, config_extra='socket_group = "nogroup"').start()
    try:
        # What a user can plant where the service would follow a lax name: a chain of
        # its own uid, and a snapshot whose mapping points at a file only root reads.
        planted = open_tmp / "y-1"
        (planted / "snapshots").mkdir(parents=True)
        (planted / "CHAIN.json").write_text(json.dumps({"chain": "y-1", "uid": NOBODY}))
        (planted / "snapshots" / "y-1-5.json").write_text(json.dumps(
            {"id": "y-1-5", "vmas": [{"path": "/etc/shadow", "inode": 1}]}))
        for p in (planted, *planted.rglob("*")):
            os.lchown(p, NOBODY, NOBODY)
        rel = os.path.relpath(planted, d.store / "chains")
        assert rel.startswith("../") and (d.store / "chains" / rel).resolve() == planted
        out = open_tmp / "out"
        requests = [
            {"op": "show", "snapshot": f"{rel}-5"},
            {"op": "materialize", "snapshot": f"{rel}-5", "out_dir": str(out)},
            {"op": "compact", "chain": rel},
            {"op": "compact", "chain": rel, "upto": f"{rel}-5"},
            {"op": "compact", "chain": "1-1", "upto": f"{rel}-5"},
            {"op": "snapshots", "chain": rel},
        ]
        for uid in (NOBODY, 0):
            for req in requests:
                reply = _raw(d, json.dumps({"id": 9, **req}).encode() + b"\n", uid)
                assert not reply["ok"] and reply["error"]["code"] == "bad-request", reply
                assert reply["id"] == 9
                assert "not a snapshot id" in reply["error"]["message"] \
                    or "not a chain name" in reply["error"]["message"]
        # Nothing was created in the planted chain (compact.lock, lock) or at out_dir.
        assert sorted(p.name for p in planted.rglob("*")) == \
            ["CHAIN.json", "snapshots", "y-1-5.json"]
        assert not out.exists()
        assert "Traceback" not in d.log()
        assert d.stop() == 0
    finally:
        d.kill()


# Maps two files privately, read-only (their pages stay clean: snapshots do not hold
# them, materialize fills them from the files), having opened them as root; then drops
# to the uid given and makes itself dumpable again, so that uid may snapshot it.
MAPPER = r"""
import ctypes, mmap, os, sys
maps = []
for path in sys.argv[2:]:
    with open(path, "rb") as f:
        maps.append(mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ))
uid = int(sys.argv[1])
os.setgroups([]); os.setgid(uid); os.setuid(uid)
ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)
print(" ".join(str(m[0]) for m in maps), flush=True)
sys.stdin.readline()
"""


def _mapped(out_dir: Path, path: Path) -> tuple[dict[str, Any], bytes]:
    """The index entry of the mapping of `path`, and the bytes materialized for it."""
    index = json.loads((out_dir / "index.json").read_text())
    v = next(v for v in index["vmas"] if v["path"] == str(path))
    return v, (out_dir / v["file"]).read_bytes()


def test_materialize_reads_mapped_files_only_as_the_client_could(open_tmp: Path) -> None:
    d = Daemon(open_tmp, config_extra='socket_group = "nogroup"').start()
    secret, public = open_tmp / "secret", open_tmp / "public"
    secret.write_bytes(b"p" * 8192)
    os.chmod(secret, 0o600)  # root's: the process got it by a descriptor opened as root
    public.write_bytes(b"q" * 8192)
    os.chmod(public, 0o644)
    mine = open_tmp / "mine"
    mine.mkdir()
    os.chown(mine, NOBODY, NOBODY)
    proc = subprocess.Popen([PYTHON, "-c", MAPPER, str(NOBODY), str(secret), str(public)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().split() == ["112", "113"]
        snap = _as_nobody(d, "snapshot", pid=proc.pid)["ok"]
        # Root changes the secret in place, after the snapshot: same file, new content.
        with open(secret, "r+b") as f:
            f.write(b"S" * 8192)
        r = _as_nobody(d, "materialize", snapshot=snap["id"], out_dir=str(mine / "m"))
        assert "ok" in r, r
        v, data = _mapped(mine / "m", secret)
        assert v["clean_file_pages"]["content"] == \
            f"not filled: {secret}: uid {NOBODY} may not read it"
        assert data == bytes(8192)
        v, data = _mapped(mine / "m", public)
        assert v["clean_file_pages"]["content"] == "filled" and data == b"q" * 8192
        # Root may read anything: it gets the file's content now, flagged as changed
        # since the snapshot.
        d.call("materialize", snapshot=snap["id"], out_dir=str(open_tmp / "root-out"))
        v, data = _mapped(open_tmp / "root-out", secret)
        assert v["clean_file_pages"]["content"].startswith(
            f"filled, but {secret} was modified after the snapshot") and data == b"S" * 8192
        assert d.stop() == 0
    finally:
        proc.kill()
        proc.wait()
        d.kill()


def test_materialize_never_follows_the_clients_paths_as_root(open_tmp: Path) -> None:
    d = Daemon(open_tmp, config_extra='socket_group = "nogroup"').start()
    try:
        with targets(1, 16, uid=NOBODY) as (t,):
            t.fill(3)
            snap = _as_nobody(d, "snapshot", pid=t.pid)["ok"]["id"]
            mine = open_tmp / "mine"
            mine.mkdir(mode=0o755)
            os.chown(mine, NOBODY, NOBODY)
            rootdir = open_tmp / "rootdir"  # root's, empty: what a swap would aim at
            rootdir.mkdir(mode=0o755)
            (mine / "link").symlink_to(rootdir)
            os.lchown(mine / "link", NOBODY, NOBODY)
            (mine / "theirs").mkdir(mode=0o755)  # root's, in nobody's directory

            def refused(out_dir: Path) -> dict[str, Any]:
                r = _as_nobody(d, "materialize", snapshot=snap, out_dir=str(out_dir))
                assert "error" in r, r
                return r  # type: ignore[no-any-return]

            # out_dir itself a symlink (as a swap after any check would leave it).
            r = refused(mine / "link")
            assert r["error"] == UserError.__name__ and "symbolic link" in r["message"]
            # A symlink on the way: walked with nobody's permissions, not root's.
            r = refused(mine / "link" / "new")
            assert r["error"] == PermissionDenied.__name__, r
            # An existing directory that is not nobody's, and root's own.
            for out in (mine / "theirs", open_tmp / "rootdir"):
                r = refused(out)
                assert r["error"] == PermissionDenied.__name__, r
            r = refused(Path("/root/ckptd-out"))
            assert r["error"] == PermissionDenied.__name__
            for p in (rootdir, mine / "theirs"):
                st = p.stat()
                assert os.listdir(p) == [] and (st.st_uid, st.st_mode & 0o777) == (0, 0o755)
            assert not Path("/root/ckptd-out").exists()
            # ".." after a symlink is the target's parent, as the kernel walks it: here
            # open_tmp, root's.
            r = refused(mine / "link" / ".." / "ok")
            assert r["error"] == PermissionDenied.__name__
            assert not (open_tmp / "ok").exists()
            # Where nobody may write: a new directory, and files, all nobody's.
            r = _as_nobody(d, "materialize", snapshot=snap, out_dir=str(mine / "ok"))
            assert "ok" in r, r
            out = mine / "ok"
            assert r["ok"]["out_dir"] == str(out) and r["ok"]["index"] == str(out / "index.json")
            st = out.stat()
            assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (NOBODY, NOBODY, 0o700)
            files = list(out.iterdir())
            assert len(files) == r["ok"]["files"] + 1
            for f in files:
                st = f.stat()
                assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (NOBODY, NOBODY, 0o600)
            assert _read_region(out, t.addr, 16 * 4096) == \
                b"".join(pattern(3, p) for p in range(16))
            # An empty directory of its own is taken too.
            (mine / "empty").mkdir()
            os.chown(mine / "empty", NOBODY, NOBODY)
            r = _as_nobody(d, "materialize", snapshot=snap, out_dir=str(mine / "empty"))
            assert "ok" in r and (mine / "empty" / "index.json").stat().st_uid == NOBODY
        assert d.stop() == 0
    finally:
        d.kill()


def _notes(srv: socket.socket, until: str) -> list[str]:
    """sd_notify messages, up to and including the first that has the line `until`."""
    seen: list[str] = []
    while not seen or until not in seen[-1].split("\n"):
        seen.append(srv.recv(4096).decode())
    return seen


def test_reload_of_a_config_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(path))
    srv.settimeout(60)
    d = Daemon(tmp_path, env={"NOTIFY_SOCKET": str(path)}).start(wait=False)
    try:
        _notes(srv, "READY=1")
        good = d.config.read_bytes()
        d.config.write_bytes(good + b"# caf\xe9\n")  # Latin-1, not UTF-8
        with pytest.raises(UserError, match=r"reload refused: .*not UTF-8") as ei:
            d.call("reload")
        assert type(ei.value) is UserError  # user-error, not internal
        # systemd waits for READY=1 after RELOADING=1: it comes, for a refusal too.
        seen = _notes(srv, "READY=1")
        reloading = [i for i, m in enumerate(seen) if "RELOADING=1" in m.split("\n")]
        assert reloading and reloading[0] < len(seen) - 1
        d.signal(signal.SIGHUP)  # the same through the signal
        seen = _notes(srv, "READY=1")
        assert any("RELOADING=1" in m.split("\n") for m in seen)
        wait_for(lambda: d.log().count("reload refused") >= 2, "both refusals logged")
        d.config.write_bytes(good)
        assert d.call("reload")["reloaded"] is True
        _notes(srv, "READY=1")
        assert "Traceback" not in d.log()
        assert d.stop() == 0
    finally:
        d.kill()
        srv.close()


def _daemon_fds(d: Daemon) -> list[str]:
    assert d.proc is not None
    fd_dir = f"/proc/{d.proc.pid}/fd"
    out = []
    for n in os.listdir(fd_dir):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            out.append(os.readlink(f"{fd_dir}/{n}"))
    return out


def _holds(d: Daemon, pid: int) -> bool:
    """Whether the daemon keeps files of process `pid` open (the engine's tracking)."""
    return any(f.startswith(f"/proc/{pid}/") for f in _daemon_fds(d))


def test_one_off_snapshots_keep_bounded_tracking(tmp_path: Path) -> None:
    # Room for 3 registrations in the open-file limit: one-off snapshots of unregistered
    # processes keep the tracking of the 3 most recent at most (not one per process
    # ever snapshotted, until each exits).
    hard = fdlimit.RESERVED_FDS + 3 * fdlimit.FDS_PER_REGISTRATION
    d = Daemon(tmp_path, nofile=(64, hard)).start()
    try:
        with targets(5, 16) as ts:
            for t in ts:
                assert d.call("snapshot", pid=t.pid)["kind"] == "full"
            wait_for(lambda: not _holds(d, ts[0].pid) and not _holds(d, ts[1].pid),
                     "the least recently used forgotten")
            assert all(_holds(d, t.pid) for t in ts[2:])
            assert _daemon_fds(d).count("anon_inode:[pidfd]") == 3
            # A kept one goes on incrementally; a forgotten one is tracked again,
            # in place of the least recently used.
            assert d.call("snapshot", pid=ts[4].pid)["kind"] == "delta"
            d.call("snapshot", pid=ts[0].pid)
            assert _holds(d, ts[0].pid)
            wait_for(lambda: not _holds(d, ts[2].pid), "ts[2] forgotten for ts[0]")
            assert _daemon_fds(d).count("anon_inode:[pidfd]") == 3
            # Registering takes a one-off's tracking over; once unregistered, a new
            # one-off is watched again: its exit releases everything.
            # Kept now: ts[3], ts[4], ts[0]. A registration needs room in the open-file
            # budget too: the least recently used one-off (ts[3]) makes way for it.
            t = ts[4]
            d.call("register", pid=t.pid)
            wait_for(lambda: not _holds(d, ts[3].pid), "ts[3] forgotten for a registration")
            d.call("unregister", pid=t.pid)
            assert not _holds(d, t.pid)
            d.call("snapshot", pid=t.pid)
            assert _holds(d, t.pid)
            t.kill()
            wait_for(lambda: not _holds(d, t.pid), "the exited process's files closed")
            assert _daemon_fds(d).count("anon_inode:[pidfd]") == 1  # ts[0]'s
            assert _holds(d, ts[0].pid)
        assert "Too many open files" not in d.log()
        assert d.stop() == 0
    finally:
        d.kill()


def test_bad_inputs_are_client_errors(daemon: Daemon, tmp_path: Path) -> None:
    with targets(1, 16) as (t,):
        sid = daemon.call("snapshot", pid=t.pid)["id"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out_dir, why in ((str(tmp_path / "a\0b"), "NUL"),
                         (str(afile), "exists and is not a directory"),
                         (str(afile / "sub"), "is not a directory")):
        with pytest.raises(UserError, match=why) as ei:
            daemon.call("materialize", snapshot=sid, out_dir=out_dir)
        assert type(ei.value) is UserError, ei.value
    for fields in ({"chain": "999999-1", "upto": "999999-1-3"}, {"chain": "999999-1"}):
        with pytest.raises(TargetNotFound, match="no chain '999999-1'"):
            daemon.call("compact", **fields)
    chain = sid.rpartition("-")[0]
    with pytest.raises(TargetNotFound, match="no snapshot"):
        daemon.call("compact", chain=chain, upto=f"{chain}-99")
    assert "chain has no snapshots" not in daemon.log()
    assert "internal error" not in daemon.log() and "Traceback" not in daemon.log()


def _serve(config: Path, *extra: str, user: int | None = None
           ) -> subprocess.CompletedProcess[str]:
    if user is not None:
        # In a forked child that drops to `user`, which may not read the interpreter's
        # library: what `serve` imports is imported here first.
        import uvloop  # noqa: F401
        from helpers import run_cli

        import ckptd.service.daemon  # noqa: F401
        return run_cli("serve", "--config", str(config), *extra, user=user)
    return subprocess.run([PYTHON, "-m", "ckptd", "serve", "--config", str(config), *extra],
                          capture_output=True, text=True, check=False, timeout=120)


def _one_line(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode not in (0, 70), (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_startup_problems_are_one_line(open_tmp: Path) -> None:
    store = open_tmp / "store"

    def config(name: str, **service: str) -> Path:
        cfg = open_tmp / f"{name}.toml"
        lines = [f'{k} = "{v}"' for k, v in {"store": str(store), **service}.items()]
        cfg.write_text("[service]\n" + "\n".join(lines) + "\n")
        os.chmod(cfg, 0o644)
        return cfg

    # A socket directory it may not create (nobody, under /root).
    cfg = config("nodir", socket="/root/ckptd-test-dir/ckptd.sock")
    _one_line(_serve(cfg, user=NOBODY), "service.socket", "/root/ckptd-test-dir/ckptd.sock",
              "cannot create its directory", "Permission denied")
    # A socket path longer than sun_path: `serve` and `serve --check` both refuse it.
    cfg = config("long", socket=str(open_tmp / ("s" * 120)))
    for extra in ((), ("--check",)):
        _one_line(_serve(cfg, *extra), "service.socket", "at most 107 bytes")
    # An unknown socket group: refused by --check as by serve.
    cfg = config("group", socket=str(open_tmp / "run" / "g.sock"),
                 socket_group="no-such-group-here")
    for extra in ((), ("--check",)):
        _one_line(_serve(cfg, *extra), "service.socket_group", "no-such-group-here",
                  "no such group")
    # A metrics address already taken.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = config("metrics", socket=str(open_tmp / "run" / "m.sock"))
        cfg.write_text(cfg.read_text() + f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
        _one_line(_serve(cfg), "metrics.listen", f"127.0.0.1:{port}", "Address already in use")
    assert not (open_tmp / "run" / "m.sock").exists()  # bound, then removed again
    # None of these got as far as the store.
    assert not store.exists()
    cfg = open_tmp / "inf.toml"
    cfg.write_text("[defaults]\ninterval = inf\n")
    _one_line(_serve(cfg, "--check"), "defaults.interval", "inf", "finite")


def test_second_instance_touches_nothing(daemon: Daemon, tmp_path: Path) -> None:
    # Its own store, the first's socket: it stops at the socket, before the store.
    other = tmp_path / "other"
    other.mkdir()
    cfg = write_config(other / "ckptd.toml", other / "store", daemon.socket)
    _one_line(_serve(cfg), "another ckptd is already serving", str(daemon.socket))
    assert not (other / "store").exists()
    assert daemon.call("ping")


def test_out_dir_swapped_during_materialize_is_not_followed(open_tmp: Path) -> None:
    """The race made deterministic: the client's mapped file, replaced by a FIFO after
    the snapshot, would hold root's materialize (opening it blocks until a writer
    comes) while the client swaps out_dir for a symlink to a directory of root's."""
    d = Daemon(open_tmp, config_extra='socket_group = "nogroup"').start()
    mine = open_tmp / "mine"
    mine.mkdir(mode=0o755)
    os.chown(mine, NOBODY, NOBODY)
    data = mine / "data"
    data.write_bytes(b"d" * 8192)
    rootdir = open_tmp / "rootdir"
    rootdir.mkdir(mode=0o755)
    proc = subprocess.Popen([PYTHON, "-c", MAPPER, str(NOBODY), str(data)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().split() == ["100"]
        snap = _as_nobody(d, "snapshot", pid=proc.pid)["ok"]["id"]
        data.unlink()
        os.mkfifo(data)
        os.chown(data, NOBODY, NOBODY)
        out = mine / "out"
        result: list[Any] = []
        worker = threading.Thread(target=lambda: result.append(
            _as_nobody(d, "materialize", snapshot=snap, out_dir=str(out))))
        worker.start()
        swapped = False
        while worker.is_alive():
            try:
                fd = os.open(data, os.O_WRONLY | os.O_NONBLOCK)  # only while a reader waits
            except OSError as exc:
                assert exc.errno == errno.ENXIO
                time.sleep(0.005)
                continue
            os.rename(out, mine / "moved")
            os.symlink(rootdir, out)
            os.close(fd)  # the reader gets EOF and goes on
            swapped = True
            break
        worker.join()
        assert not swapped, "the service opened the client's FIFO for reading"
        assert os.listdir(rootdir) == [] and rootdir.stat().st_uid == 0
        assert "ok" in result[0], result
        v, got = _mapped(out, data)
        assert v["clean_file_pages"]["content"] == f"not filled: {data}: not a regular file"
        assert got == bytes(8192)
        assert d.stop() == 0
    finally:
        proc.kill()
        proc.wait()
        d.kill()


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is needed")
def test_materialize_for_a_user_with_only_the_units_capabilities(open_tmp: Path) -> None:
    """Everything materialize does for a non-root client (walking its paths, creating
    and handing over the directory and files, reading a mapped file) works within the
    unit's capability bounding set, which has no CAP_SETUID, CAP_FOWNER or the like."""
    from test_service_systemd import _unit_caps

    d = Daemon(open_tmp, config_extra='socket_group = "nogroup"')
    spec = ",".join(["-all"] + ["+" + c.removeprefix("CAP_").lower() for c in _unit_caps()])
    d.log_file = open(d.log_path, "wb")  # noqa: SIM115
    d.proc = subprocess.Popen(
        ["setpriv", f"--bounding-set={spec}", "--inh-caps=-all", PYTHON, "-m", "ckptd",
         "serve", "--config", str(d.config)],
        stdout=d.log_file, stderr=subprocess.STDOUT, cwd=str(Path(__file__).parent.parent))
    mine = open_tmp / "mine"
    mine.mkdir(mode=0o755)
    os.chown(mine, NOBODY, NOBODY)
    data = mine / "data"
    data.write_bytes(b"m" * 8192)
    os.chown(data, NOBODY, NOBODY)
    (mine / "empty").mkdir(mode=0o750)
    os.chown(mine / "empty", NOBODY, NOBODY)
    proc = subprocess.Popen([PYTHON, "-c", MAPPER, str(NOBODY), str(data)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        d.wait_ready()
        assert proc.stdout is not None and proc.stdout.readline().split() == ["109"]
        snap = _as_nobody(d, "snapshot", pid=proc.pid)["ok"]["id"]
        for out, mode in ((mine / "new", 0o700), (mine / "empty", 0o750)):
            r = _as_nobody(d, "materialize", snapshot=snap, out_dir=str(out))
            assert "ok" in r, (r, d.log())
            st = out.stat()
            assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (NOBODY, NOBODY, mode)
            assert all(f.stat().st_uid == NOBODY for f in out.iterdir())
            v, got = _mapped(out, data)
            assert v["clean_file_pages"]["content"] == "filled" and got == b"m" * 8192
        assert d.stop() == 0
    finally:
        proc.kill()
        proc.wait()
        d.kill()


# --- races between requests, exits and the shutdown ---------------------------------------


class _Pending:
    """One request on its own connection, sent from a thread: its reply is read when it
    comes (a request that waits for a round in flight, say)."""

    def __init__(self, d: Daemon, request: dict[str, Any]) -> None:
        self.sent = threading.Event()
        self._reply: dict[str, Any] | None = None
        self._error: BaseException | None = None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(120)
        self._sock.connect(str(d.socket))
        self._line = json.dumps({"id": 1, **request}).encode() + b"\n"
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self.sent.wait(30), "request not sent"

    def _run(self) -> None:
        try:
            self._sock.sendall(self._line)
            self.sent.set()
            buf = b""
            while b"\n" not in buf:
                chunk = self._sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the service closed the connection")
                buf += chunk
            self._reply = json.loads(buf.split(b"\n", 1)[0])
        except BaseException as exc:  # handed to reply()
            self._error = exc
        finally:
            self._sock.close()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def reply(self) -> dict[str, Any]:
        self._thread.join(120)
        assert not self._thread.is_alive(), "no reply"
        if self._error is not None:
            raise self._error
        assert self._reply is not None
        return self._reply


class _Conn:
    """A connection opened now, to send requests on later (the service stops accepting
    connections once it is stopping, and goes on serving the open ones)."""

    def __init__(self, d: Daemon) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(60)
        self._sock.connect(str(d.socket))
        self._buf = b""

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self._sock.sendall(json.dumps({"id": 1, **request}).encode() + b"\n")
        while b"\n" not in self._buf:
            chunk = self._sock.recv(65536)
            assert chunk, "the service closed the connection"
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)  # type: ignore[no-any-return]

    def close(self) -> None:
        self._sock.close()


def _long_first_round(d: Daemon) -> Target:
    """A registered process whose first (full) round runs for a while (about 3 s here):
    640 MiB of incompressible memory. Returns once that round is in flight."""
    t = Target(pages=160 * 1024)
    t.cmd(f"rand 0 {t.pages}")
    d.call("register", pid=t.pid)
    wait_for(lambda: d.call("status")["in_flight"] >= 1, "the first round in flight",
             step=0.005)
    return t


def _request(op: str, **fields: Any) -> bytes:
    return json.dumps({"id": 1, "op": op, **fields}).encode() + b"\n"


def test_sigterm_refuses_new_work_and_waits_for_what_runs(tmp_path: Path) -> None:
    """Once SIGTERM has come, requests that would use the engine or the store answer
    `busy` on connections already open; a `snapshot` request that was waiting for the
    process's timer round does not run after it (the shutdown closes the engine): it
    answers `busy` too; a registered process that exits is not unregistered (the
    registration is saved as it is, and dropped at the next start); the service exits
    0 with nothing logged as failed."""
    d = Daemon(tmp_path, config_extra='shutdown_grace = "120s"').start()
    try:
        with targets(1, 16) as (small,):
            d.call("register", pid=small.pid)
            wait_for(lambda: _rounds(d, small.pid) >= 1, "small's first round")
            sid = d.call("snapshots", pid=small.pid)["snapshots"][-1]["id"]
            chain = sid.rpartition("-")[0]
            big = _long_first_round(d)
            try:
                conn = _Conn(d)
                waiting = _Pending(d, {"op": "snapshot", "pid": big.pid})
                time.sleep(0.3)  # for the service to read it: it waits for the round
                assert d.call("status")["in_flight"] >= 1 and not waiting.done()
                d.signal(signal.SIGTERM)
                wait_for(lambda: "stop requested" in d.log(), "the stop noticed")
                for op, fields in (("compact", {"chain": chain}),
                                   ("unregister", {"pid": small.pid}),
                                   ("snapshot", {"pid": small.pid}),
                                   ("register", {"pid": small.pid}),
                                   ("show", {"snapshot": sid})):
                    r = conn.ask({"op": op, **fields})
                    assert not r["ok"] and r["error"]["code"] == "busy", (op, r)
                    assert r["error"]["message"] == "the service is stopping"
                assert conn.ask({"op": "ping"})["ok"]
                small.kill()  # exits while the service waits for big's round
                time.sleep(0.2)  # for its pidfd to wake the loop
                assert not waiting.done()  # big's round still runs
                r = waiting.reply()
                assert not r["ok"] and r["error"]["code"] == "busy", r
                conn.close()
                assert d.proc is not None and d.proc.wait(120) == 0
            finally:
                big.kill()
        log = d.log()
        for bad in ("Traceback", "failed", "internal", "unregistered", "abandoning"):
            assert bad not in log, (bad, log)
        saved = json.loads((d.store / "service" / "registrations.json").read_text())
        assert {r["pid"] for r in saved["registrations"]} == {small.pid, big.pid}
        # big has its timer round's snapshot only: the on-demand one never ran.
        store = Store.open(d.store)
        (big_chain,) = [c for c in store.chain_ids() if c.startswith(f"{big.pid}-")]
        assert [(m.seq, m.kind) for m in store.chain_snapshots(big_chain)] == [(1, "full")]
        d2 = Daemon(tmp_path).start()
        try:
            for t in (small, big):  # both exited: dropped at the start
                assert f"registration of pid {t.pid} " in d2.log()
            assert d2.call("list")["processes"] == []
            v = d2.call("verify")
            assert v["ok"], v["problems"]
            assert d2.stop() == 0
        finally:
            d2.kill()
    finally:
        d.kill()


def test_register_while_unregistering_is_busy(daemon: Daemon) -> None:
    """`unregister` waits for the round in flight with the registration still listed:
    a `register` of the PID meanwhile answers `busy` (it used to answer "updated", and
    the registration was dropped right after), and so does a second `unregister`'s
    not-found; the unregistration then completes."""
    big = _long_first_round(daemon)
    try:
        leaving = _Pending(daemon, {"op": "unregister", "pid": big.pid})
        time.sleep(0.3)  # for the service to read it: it waits for the round
        r = _raw(daemon, _request("register", pid=big.pid, policy={"interval": "2h"}))
        assert not leaving.done()  # the round still ran: the unregistration was under way
        assert not r["ok"] and r["error"]["code"] == "busy", r
        assert "being unregistered" in r["error"]["message"]
        again = _raw(daemon, _request("unregister", pid=big.pid))
        assert not again["ok"] and again["error"]["code"] == "not-found", again
        assert "being unregistered" in again["error"]["message"]
        u = leaving.reply()
        assert u["ok"] and u["result"]["unregistered"] and u["result"]["rounds"] == 1, u
        assert daemon.call("list")["processes"] == []
        saved = json.loads((daemon.store / "service" / "registrations.json").read_text())
        assert saved["registrations"] == []
    finally:
        big.kill()


def _block_registry_write(d: Daemon) -> Path:
    """A FIFO where the service writes its registry's temporary file: the next save
    blocks in open() until the test reads the FIFO, and then fails (fsync of a FIFO is
    EINVAL): a real failing write, at a moment the test chooses."""
    assert d.proc is not None
    writer = f"{d.proc.pid}-{procfs.start_time(d.proc.pid)}"  # see store/writerid.py
    fifo = d.store / "service" / f".registrations.json.{writer}.tmp"
    os.mkfifo(fifo, 0o600)
    return fifo


def _drain(fifo: Path) -> None:
    with open(fifo, "rb") as f:  # blocks until the service opens it to write
        f.read()


def _pidfds(d: Daemon) -> int:
    return _daemon_fds(d).count("anon_inode:[pidfd]")


def test_registration_not_saved_is_undone(daemon: Daemon) -> None:
    """A registration whose save fails is not kept (it used to stay listed and watched,
    with no timer, and a second `register` answered "updated" and still took no
    snapshot): one error, then nothing of it is left, and registering again works."""
    with targets(1, 16) as (t,):
        fifo = _block_registry_write(daemon)
        pending = _Pending(daemon, {"op": "register", "pid": t.pid})
        _drain(fifo)
        r = pending.reply()
        assert not r["ok"] and r["error"]["code"] == "internal", r
        assert r["error"]["message"].startswith(f"CkptdError: PID {t.pid} not registered: "
                                                "cannot save ")
        assert daemon.call("list")["processes"] == []
        assert _pidfds(daemon) == 0
        assert daemon.call("status")["registered"] == 0
        again = daemon.call("register", pid=t.pid)
        assert again["updated"] is False
        wait_for(lambda: _rounds(daemon, t.pid) >= 1, "the first round")
        saved = json.loads((daemon.store / "service" / "registrations.json").read_text())
        assert [r["pid"] for r in saved["registrations"]] == [t.pid]
    assert "Traceback" not in daemon.log()


def test_process_exiting_while_its_registration_is_saved(daemon: Daemon) -> None:
    """A process that exits while its registration is being saved: the exit unregisters
    it, and the `register` answers `gone` instead of starting a timer for a registration
    that is no longer there. A policy change whose save fails is undone."""
    with targets(2, 16) as (a, b):
        daemon.call("register", pid=a.pid)
        fifo = _block_registry_write(daemon)
        # a's policy change saves first, and blocks in the FIFO holding the save lock;
        # b's registration then waits for that lock.
        update = _Pending(daemon, {"op": "register", "pid": a.pid,
                                   "policy": {"interval": "2h"}})

        def intervals() -> dict[int, float]:
            return {p["pid"]: p["policy"]["interval"]
                    for p in daemon.call("list")["processes"]}
        wait_for(lambda: intervals().get(a.pid) == 7200.0, "a's update saving")
        new = _Pending(daemon, {"op": "register", "pid": b.pid})
        wait_for(lambda: b.pid in intervals(), "b's registration saving")
        b.kill()
        wait_for(lambda: b.pid not in intervals(), "b unregistered on its exit")
        _drain(fifo)  # a's save fails; b's goes through
        r = new.reply()
        assert not r["ok"] and r["error"]["code"] == "gone", r
        assert "exited while it was being registered" in r["error"]["message"]
        u = update.reply()
        assert not u["ok"] and u["error"]["code"] == "internal", u
        assert "policy not changed" in u["error"]["message"]
        assert intervals() == {a.pid: 3600.0}  # the old policy, as saved
        wait_for(lambda: re.search(rf"pid {b.pid} \(.*\) unregistered: the process "
                                   "exited", daemon.log()), "b's unregistration logged")
        saved = json.loads((daemon.store / "service" / "registrations.json").read_text())
        assert [(r["pid"], r["policy"]["interval"]) for r in saved["registrations"]] == [
            (a.pid, None)]
        assert _pidfds(daemon) == 1  # a's
        assert daemon.call("snapshots", pid=b.pid)["snapshots"] == []
        assert daemon.call("status")["registered"] == 1


def _spares(store: Path, chain: str) -> list[str]:
    return [n for n in os.listdir(store / "chains" / chain / "snapshots")
            if n.startswith(".spare.")]


def _holds_dir(d: Daemon, path: Path) -> bool:
    return os.path.realpath(path) in _daemon_fds(d)


def test_compacting_a_chain_nobody_snapshots_keeps_nothing_open(daemon: Daemon) -> None:
    """Compaction keeps the files it retires as spares for the chain's next snapshots,
    and the chain's snapshots/ directory open. For a chain no tracked process publishes
    in any more (its process unregistered, or a one-off's process exited), the service
    lets go of them after compacting: no spare files left, no descriptor held."""
    with targets(2, 32) as (reg_t, once_t):
        daemon.call("register", pid=reg_t.pid)
        wait_for(lambda: _rounds(daemon, reg_t.pid) >= 1, "the first round")
        for seed in range(2, 20):
            reg_t.fill(seed, first=seed, count=2)
            daemon.call("snapshot", pid=reg_t.pid)
        for seed in range(2, 8):
            once_t.fill(seed, first=seed, count=2)
            daemon.call("snapshot", pid=once_t.pid)
        assert daemon.call("unregister", pid=reg_t.pid)["rounds"] == 19
        once_t.kill()
        wait_for(lambda: not _holds(daemon, once_t.pid), "the one-off's tracking dropped")
        for t, count in ((reg_t, 19), (once_t, 6)):
            snaps = daemon.call("snapshots", pid=t.pid)["snapshots"]
            assert len(snaps) == count
            chain = snaps[0]["chain"]
            snapdir = daemon.store / "chains" / chain / "snapshots"
            assert not _holds_dir(daemon, snapdir)
            res = daemon.call("compact", chain=chain)
            assert f"removed {count - 1} older snapshot(s)" in res["result"], res
            assert _spares(daemon.store, chain) == []
            assert not _holds_dir(daemon, snapdir)
            assert [s["id"] for s in daemon.call("snapshots", pid=t.pid)["snapshots"]] == [
                snaps[-1]["id"]]
        v = daemon.call("verify")
        assert v["ok"], v["problems"]
    # The unregistration's log line counts the rounds, not the ids kept in memory (16).
    assert re.search(rf"pid {reg_t.pid} \(.*\) unregistered: .* \(19 round\(s\) this "
                     r"run\)", daemon.log()), daemon.log()


def test_a_process_that_has_exited_is_neither_registered_nor_snapshotted(
        daemon: Daemon) -> None:
    """A zombie's PID is still taken and its /proc entries answer the permission checks:
    the service checks, after them, that the process it opened a pidfd for is alive (a
    PID reused meanwhile would have passed the checks as another process)."""
    z = subprocess.Popen([PYTHON, "-c", "pass"])
    try:
        wait_for(lambda: Path(f"/proc/{z.pid}/stat").read_text().split()[2] == "Z",
                 "a zombie")
        for op in ("register", "snapshot"):
            r = _raw(daemon, _request(op, pid=z.pid))
            assert not r["ok"] and r["error"]["code"] == "gone", (op, r)
            assert r["error"]["message"] == (f"TargetGone: process {z.pid} exited during "
                                             "the request; nothing was done")
        assert daemon.call("list")["processes"] == []
        assert daemon.call("snapshots", pid=z.pid)["snapshots"] == []
        assert _pidfds(daemon) == 0
    finally:
        z.wait()


def test_show_through_the_service_and_from_the_store_agree(daemon: Daemon) -> None:
    """`ckptd show ID --json` prints the same through the service as from the store:
    the service's reply carries the page map (merged ranges, source snapshot or zero)
    and the unsourced ranges, built by the same function."""
    env = {**os.environ, "CKPTD_SOCKET": str(daemon.socket)}

    def show(*args: str) -> Any:
        r = subprocess.run([PYTHON, "-m", "ckptd", "show", *args], env=env, text=True,
                           capture_output=True, check=False)
        assert r.returncode == 0, r.stderr
        return r.stdout

    with targets(1, 64) as (t,):
        t.fill(1)
        first = daemon.call("snapshot", pid=t.pid)
        t.fill(2, first=10, count=5)
        t.cmd("fill 0 30 1")  # pattern(0, 30): not a zero page
        second = daemon.call("snapshot", pid=t.pid)
    sid = second["id"]
    reply = daemon.call("show", snapshot=sid)
    assert reply["unsourced"] == []
    sources = {r["source"] for r in reply["page_map"]}
    assert {first["id"], sid} <= sources <= {first["id"], sid, "zero"}
    rows = reply["page_map"]
    assert all(a["end"] <= b["start"] for a, b in itertools.pairwise(rows))
    assert not any(a["end"] == b["start"] and a["source"] == b["source"]
                   for a, b in itertools.pairwise(rows))  # merged
    via_service = json.loads(show(sid, "--json"))
    via_store = json.loads(show(sid, "--json", "--store", str(daemon.store)))
    assert via_service == via_store
    assert via_service["page_map"] == rows and via_service["unsourced"] == []
    text = show(sid)
    assert text == show(sid, "--store", str(daemon.store))
    assert "the service does not send it" not in text


def test_register_bounds_durations_like_the_command_line(daemon: Daemon) -> None:
    """An interval the timer cannot sleep (1e300 s is finite) is a bad request naming
    the field, as `ckptd register --interval` refuses it: at most 365 days (keep_age at
    most 36500 days)."""
    with targets(1, 16) as (t,):
        for policy, field in (({"interval": 1e300}, "policy.interval"),
                              ({"interval": "366d"}, "policy.interval"),
                              ({"retention": {"keep_age": 1e300}},
                               "policy.retention.keep_age")):
            r = _raw(daemon, _request("register", pid=t.pid, policy=policy))
            assert not r["ok"] and r["error"]["code"] == "bad-request", r
            assert r["error"]["message"].startswith(f"register: {field}: too long: at most")
        assert daemon.call("list")["processes"] == []
        ok = daemon.call("register", pid=t.pid, policy={"interval": "365d"})
        assert ok["policy"]["interval"] == 365 * 86400.0
