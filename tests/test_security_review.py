"""Security review: what an unprivileged user can make the root service or root's CLI do.
Real processes, real files, real users (nobody, and setuid binaries); no mocks. Most
tests need root: they skip without it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_service_support import (
    NOT_ROOT_REASON,
    PYTHON,
    ROOT,
    Daemon,
    as_user,
    wait_for,
)

from ckptd.service.client import Client

NOBODY = 65534
needs_root = pytest.mark.skipif(not ROOT, reason=NOT_ROOT_REASON)


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temporary directory other users can traverse (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="ckptd-sec-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _as_nobody(d: Daemon, op: str, **fields: Any) -> Any:
    def call() -> Any:
        with Client(d.socket) as c:
            return c.call(op, **fields)
    return as_user(NOBODY, NOBODY, call)


# --- a registered process that its user can no longer ptrace ---------------------------

# A set-uid root program: says "ready", holds a secret only root should see, and waits
# for a line on stdin.
SUID_C = r"""
#include <stdio.h>
#include <string.h>
#include <unistd.h>
static char secret[8192];
int main(void) {
    if (geteuid() != 0) { puts("not-root"); fflush(stdout); return 1; }
    memset(secret, 'S', sizeof secret - 1);
    puts("ready"); fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof line, stdin)) return 0;
    return 0;
}
"""

# Started as root, becomes `uid` (and dumpable again, so that uid may register it); then
# on "nodump" it makes itself non-dumpable (as ssh-agent and gpg-agent do), on "exec" it
# execs the program in argv[2]. Answers each command with a line.
DROPPER = r"""
import ctypes, os, sys
uid = int(sys.argv[1])
os.setgroups([]); os.setgid(uid); os.setuid(uid)
libc = ctypes.CDLL(None)
libc.prctl(4, 1, 0, 0, 0)
buf = bytearray(b"D" * (64 << 10))
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "nodump":
        libc.prctl(4, 0, 0, 0, 0)
        print("done", flush=True)
    elif cmd == "exec":
        os.execv(sys.argv[2], [sys.argv[2]])
"""


def _compile_suid(where: Path) -> Path:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    src, exe = where / "suid.c", where / "suid"
    src.write_text(SUID_C)
    subprocess.run(["cc", "-O0", "-o", str(exe), str(src)], check=True)
    os.chown(exe, 0, 0)
    os.chmod(exe, 0o4755)
    return exe


def _chains_of(store: Path, pid: int) -> list[dict[str, Any]]:
    out = []
    for c in sorted((store / "chains").glob(f"{pid}-*")):
        if not (c / "CHAIN.json").exists():
            continue  # being created (CHAIN.json comes last, by rename): as Store.chain_ids
        info = json.loads((c / "CHAIN.json").read_text())
        info["snapshots"] = sorted(p.name for p in (c / "snapshots").glob("*.json"))
        out.append(info)
    return out


@needs_root
@pytest.mark.parametrize("change", ["nodump", "exec-setuid"])
def test_rounds_stop_when_the_registrant_could_no_longer_ptrace(open_tmp: Path,
                                                                change: str) -> None:
    """A user registers its own process; the process then becomes one the user may not
    ptrace (non-dumpable, or set-uid root by exec). The root service must capture nothing
    of it from then on: no round, no chain of the new image."""
    suid = _compile_suid(open_tmp)
    d = Daemon(open_tmp, config_extra='socket_group = "nogroup"').start()
    proc = subprocess.Popen([PYTHON, "-c", DROPPER, str(NOBODY), str(suid)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        r = _as_nobody(d, "register", pid=proc.pid, policy={"interval": "100ms"})
        assert "ok" in r, r
        wait_for(lambda: _chains_of(d.store, proc.pid)
                 and len(_chains_of(d.store, proc.pid)[0]["snapshots"]) >= 2, "rounds")
        if change == "nodump":
            proc.stdin.write("nodump\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "done"
        else:
            proc.stdin.write("exec\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "ready"  # now euid 0
        before = _chains_of(d.store, proc.pid)
        time.sleep(1.5)  # 15 intervals
        after = _chains_of(d.store, proc.pid)
        # The first chain is the user's own process before the change; nothing after.
        assert len(after) == 1, after
        assert len(after[0]["snapshots"]) <= len(before[0]["snapshots"]) + 1, (before, after)
        time.sleep(0.5)
        assert _chains_of(d.store, proc.pid)[0]["snapshots"] == after[0]["snapshots"]
        # The registration is dropped, and the log says why.
        wait_for(lambda: not _as_nobody(d, "list")["ok"]["processes"], "registration dropped")
        assert "may not ptrace" in d.log() or "not dumpable" in d.log()
    finally:
        proc.kill()
        proc.wait()
        d.kill()


@needs_root
def test_root_snapshot_of_a_non_dumpable_process_is_not_the_users(open_tmp: Path) -> None:
    """Root snapshots a process of nobody's that made itself non-dumpable (as ssh-agent
    does, to keep its keys from its own user). The chain is root's: nobody must not
    list, show or materialize it. /proc/PID itself keeps the owner it had when first
    looked up, so reading the owner there recorded the chain as nobody's."""
    d = Daemon(open_tmp, config_extra='socket_group = "nogroup"').start()
    proc = subprocess.Popen([PYTHON, "-c", DROPPER, str(NOBODY), "/bin/true"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        os.stat(f"/proc/{proc.pid}")  # looked up while dumpable, as `ps` would
        proc.stdin.write("nodump\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"
        snap = d.call("snapshot", pid=proc.pid)["id"]
        assert _chains_of(d.store, proc.pid)[0]["uid"] == 0
        assert _as_nobody(d, "snapshots")["ok"]["snapshots"] == []
        assert _as_nobody(d, "show", snapshot=snap)["error"] == "TargetNotFound"
    finally:
        proc.kill()
        proc.wait()
        d.kill()


# --- a store root's CLI does not own ----------------------------------------------------


def _hostile_store(where: Path, victim: Path) -> Path:
    """A store made by nobody, whose chains/ and tmp/ are symlinks to `victim`."""
    from ckptd.store import Store

    real = Store.open(where / "model", create=True)
    store = where / "x"
    store.mkdir()
    shutil.copy(real.root / "STORE.json", store / "STORE.json")
    os.symlink(victim, store / "chains")
    os.symlink(victim, store / "tmp")
    for p in (store, store / "STORE.json", store / "chains", store / "tmp"):
        os.lchown(p, NOBODY, NOBODY)
    return store


@needs_root
def test_root_cli_does_not_write_to_a_store_another_user_owns(open_tmp: Path) -> None:
    from helpers import run_cli

    victim = open_tmp / "victim"
    victim.mkdir(mode=0o755)
    os.chmod(victim, 0o755)
    (victim / "precious").write_text("keep me")
    store = _hostile_store(open_tmp, victim)
    # Reading is allowed (root may inspect a user's store), and changes nothing.
    r = run_cli("list", "--store", str(store))
    assert r.returncode == 0, r.stderr
    assert victim.stat().st_mode & 0o777 == 0o755, "root chmodded through the symlink"
    # Writing (a snapshot) is refused: the store is not root's.
    target = subprocess.Popen(["sleep", "60"])
    try:
        r = run_cli("snapshot", str(target.pid), "--store", str(store))
    finally:
        target.kill()
        target.wait()
    assert r.returncode != 0
    assert "owned by uid 65534" in r.stderr, r.stderr
    assert (victim / "precious").read_text() == "keep me"
    assert victim.stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in victim.iterdir()) == ["precious"]


def test_atomic_write_never_follows_a_planted_temporary(tmp_path: Path) -> None:
    """atomic_write's temporary name is predictable (.NAME.PID.tmp): a symlink planted
    there must not make it write through to the link's target."""
    from ckptd.store.fsutil import atomic_write

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    d = tmp_path / "d"
    d.mkdir()
    os.symlink(victim, d / f".f.{os.getpid()}.tmp")
    atomic_write(d / "f", b"new")
    assert victim.read_bytes() == b"precious"
    assert (d / "f").read_bytes() == b"new"
    assert (d / "f").stat().st_mode & 0o777 == 0o600


def test_directories_ckptd_creates_are_private_under_any_umask(tmp_path: Path) -> None:
    """Missing parents of a new store and of a materialize out_dir were made with the
    caller's umask (0777 under umask 0): anyone could then rename the store or the
    output away and put their own in its place."""
    from ckptd.store import Store
    from ckptd.store.reader import _open_out_dir

    old = os.umask(0)
    try:
        Store.open(tmp_path / "a" / "b" / "store", create=True)
        fd, _ = _open_out_dir(str(tmp_path / "o" / "p" / "out"), None)
        os.close(fd)
    finally:
        os.umask(old)
    for d in ("a", "a/b", "a/b/store", "a/b/store/chains", "a/b/store/tmp", "o", "o/p",
              "o/p/out"):
        assert (tmp_path / d).stat().st_mode & 0o777 == 0o700, d


# --- the socket, connections, metrics ---------------------------------------------------


@needs_root
def test_socket_directory_other_users_may_write_is_refused(open_tmp: Path) -> None:
    """In a directory others may write, a user can plant a socket of its own at the path
    (a fake service, or one that makes ours refuse to start), or swap ours for a symlink
    between bind() and chmod()/chown(), which followed it (chmod 0660 of any file)."""
    pub = open_tmp / "pub"
    pub.mkdir()
    os.chmod(pub, 0o1777)
    d = Daemon(open_tmp)
    d.socket = pub / "ckptd.sock"
    from test_service_support import write_config
    write_config(d.config, d.store, d.socket)
    d.start(wait=False)
    try:
        assert d.proc is not None
        rc = d.proc.wait(60)
        assert rc == 2, d.log()
        assert "other users may write" in d.log(), d.log()
        assert not d.socket.exists()
    finally:
        d.kill()


@needs_root
def test_one_user_cannot_take_every_connection(open_tmp: Path) -> None:
    """Connections are limited to 128; one unprivileged user holding them all (idle, or
    half a request each) locked every other client out, root included."""
    d = Daemon(open_tmp, config_extra='socket_group = "nogroup"').start()
    try:
        results: list[Any] = []
        t = threading.Thread(target=lambda: results.append(
            as_user(NOBODY, NOBODY, _hold_connections(d.socket, 140, 4.0))))
        t.start()
        time.sleep(2.0)  # the hog holds its connections now
        assert d.call("ping")["your_uid"] == 0
        t.join()
        assert results and results[0]["ok"]["refused"] > 0, results
    finally:
        d.kill()


def _hold_connections(path: Path, n: int, hold: float) -> Any:
    """A function for as_user: open `n` connections with half a request each, hold
    them `hold` seconds; returns how many the service refused (busy, or closed)."""
    def fn() -> dict[str, int]:
        held = []
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(path))
            s.sendall(b'{"op": "pi')
            held.append(s)
        time.sleep(hold)
        refused = 0
        for s in held:
            s.setblocking(False)
            try:
                data = s.recv(4096)
                refused += data == b"" or b"busy" in data
            except BlockingIOError:
                pass
            s.close()
        return {"refused": refused}
    return fn


@needs_root
def test_metrics_http_connections_are_bounded(open_tmp: Path) -> None:
    """metrics.listen is a TCP port any local user (or, bound wider, anyone) may
    connect to. An idle connection was held forever, with no limit on how many: a
    user could exhaust the root service's open files."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    d = Daemon(open_tmp, config_extra=f'[metrics]\nlisten = "127.0.0.1:{port}"').start()
    try:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
        time.sleep(0.5)
        closed = 0
        deadline = time.monotonic() + 15
        for s in idle:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(OSError):
                closed += s.recv(1) == b""
            s.close()
        assert closed == len(idle), f"only {closed} of {len(idle)} idle connections closed"
    finally:
        d.kill()


# --- what a non-root client learns about others -----------------------------------------


@needs_root
def test_compact_does_not_reveal_other_users_chains(open_tmp: Path) -> None:
    """`show` and `materialize` answer another user's snapshot as if it did not exist;
    `compact` answered `permission` for another user's chain and `not-found` for a
    missing one, telling which chains (processes snapshotted) exist."""
    d = Daemon(open_tmp, config_extra='socket_group = "nogroup"').start()
    target = subprocess.Popen(["sleep", "60"])
    try:
        chain = d.call("snapshot", pid=target.pid)["chain"]
        theirs = _as_nobody(d, "compact", chain=chain)
        missing = _as_nobody(d, "compact", chain="999999-1")
        assert theirs["error"] == missing["error"] == "TargetNotFound", (theirs, missing)
        assert chain not in theirs["message"] or "999999-1" in missing["message"]
    finally:
        target.kill()
        target.wait()
        d.kill()


# --- open: resource limits per user -----------------------------------------------------


@needs_root
def test_one_user_cannot_take_every_registration(open_tmp: Path) -> None:
    d = Daemon(open_tmp, config_extra='socket_group = "nogroup"\nmax_registrations = 4'
               ).start()
    procs = []
    try:
        def spawn() -> subprocess.Popen[bytes]:
            def drop() -> None:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            return subprocess.Popen(["sleep", "60"], preexec_fn=drop)
        procs = [spawn() for _ in range(4)]
        answers = [_as_nobody(d, "register", pid=p.pid) for p in procs]
        # At most half of the service's registrations for one non-root user (the
        # default of service.max_registrations_per_user); root may still register.
        assert sum("ok" in a for a in answers) == 2, answers
        assert all("max_registrations_per_user" in str(a) for a in answers[2:]), answers
        assert d.call("register", pid=procs[2].pid)["registered"]
    finally:
        for p in procs:
            p.kill()
            p.wait()
        d.kill()
