"""The target comes first: injection, freezing and ckptd dying must never harm it."""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import Target, needs_root, run_cli, wait_for

from ckptd.engine import Engine
from ckptd.errors import TargetBusy, TargetGone, UserError
from ckptd.kernel import abi, procfs, ptrace
from ckptd.store import Store
from ckptd.store import reader as store_reader

pytestmark = needs_root
ROOT = str(Path(__file__).resolve().parent.parent)  # for `python -c` children importing ckptd

# Blocks in read() on stdin; answers each line with the sha256 of it.
READER = """
import hashlib, sys
print('ready', flush=True)
for line in sys.stdin:
    print(hashlib.sha256(line.encode()).hexdigest(), flush=True)
"""


def _regs(pid: int) -> abi.UserRegs:
    with ptrace.Freezer(pid):
        regs = abi.UserRegs()
        from ckptd.kernel.syscalls import ptrace as raw_ptrace

        raw_ptrace(abi.PTRACE_GETREGS, pid, 0, regs)
        return regs


def _code(pid: int) -> dict[tuple[int, int], bytes]:
    out = {}
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for m in procfs.read_maps(pid):
            if "x" in m.perms and m.path != "[vsyscall]":
                out[(m.start, m.end)] = os.pread(fd, m.size, m.start)
    finally:
        os.close(fd)
    return out


def _fds(pid: int) -> dict[int, str]:
    return procfs.fd_targets(pid)


def test_injection_leaves_registers_code_and_fds_as_they_were(engine: Engine) -> None:
    with Target.python(READER) as t:
        time.sleep(0.1)  # settle into read()
        regs_before = _regs(t.pid)
        code_before = _code(t.pid)
        fds_before = _fds(t.pid)
        meta = engine.snapshot(t.pid, tracker="uffd-wp")
        assert meta.tracker == "uffd-wp"
        regs_after = _regs(t.pid)
        for name, _ in abi.UserRegs._fields_:
            assert getattr(regs_after, name) == getattr(regs_before, name), name
        assert _code(t.pid) == code_before
        fds_after = _fds(t.pid)
        extra = {fd: link for fd, link in fds_after.items() if fd not in fds_before}
        # The one documented difference: our userfaultfd, close-on-exec.
        assert list(extra.values()) == ["anon_inode:[userfaultfd]"]
        assert {fd: fds_after[fd] for fd in fds_before} == fds_before
        (uffd_fd,) = extra
        assert procfs.fd_flags(t.pid, uffd_fd) & os.O_CLOEXEC
        # With its standard streams open, the lowest free number (as the kernel gives it).
        assert uffd_fd == min(set(range(3, max(fds_before) + 2)) - set(fds_before))
        # And it still computes correct results.
        for msg in ("hello", "x" * 5000, "after the snapshot"):
            assert t.send(msg) == hashlib.sha256((msg + "\n").encode()).hexdigest()


# Talks over its stdin/stdout pipes moved to fds 10 and 11, then closes fds 0, 1 and 2,
# as a daemon does. "open" makes it open /dev/null and answer with the fd it got (a
# daemon expects 0 there); any other line is answered with its sha256.
NO_STDIO = """
import hashlib, os
inp = os.fdopen(os.dup2(0, 10), 'r')
out = os.fdopen(os.dup2(1, 11), 'w')
for fd in (0, 1, 2):
    os.close(fd)
out.write('ready\\n'); out.flush()
for line in inp:
    if line == 'open\\n':
        fd = os.open('/dev/null', os.O_WRONLY)
        os.write(fd, b'to /dev/null')
        out.write(f'{fd}\\n')
    else:
        out.write(hashlib.sha256(line.encode()).hexdigest() + '\\n')
    out.flush()
"""


def test_userfaultfd_never_takes_a_closed_standard_stream(store: Store,
                                                          engine: Engine) -> None:
    """The kernel gives userfaultfd() the lowest free fd, 0 in a process that closed its
    standard streams; ckptd moves it above 2 before the process runs again."""
    with Target.python(NO_STDIO) as t:
        time.sleep(0.1)
        fds_before = _fds(t.pid)
        assert not {0, 1, 2} & set(fds_before) and {10, 11} <= set(fds_before)
        first = engine.snapshot(t.pid, tracker="uffd-wp")
        assert first.tracker == "uffd-wp" and first.kind == "full"
        fds_after = _fds(t.pid)
        extra = {fd: link for fd, link in fds_after.items() if fd not in fds_before}
        assert list(extra.values()) == ["anon_inode:[userfaultfd]"], fds_after
        (uffd_fd,) = extra
        assert uffd_fd >= 3
        assert not {0, 1, 2} & set(fds_after)
        assert {fd: fds_after[fd] for fd in fds_before} == fds_before
        flags = procfs.fd_flags(t.pid, uffd_fd)
        assert flags & os.O_CLOEXEC and flags & os.O_NONBLOCK
        # The process gets fd 0 back for its next open, and runs on.
        assert t.send("open") == "0"
        for msg in ("hello", "x" * 5000):
            assert t.send(msg) == hashlib.sha256((msg + "\n").encode()).hexdigest()
        # The tracker's record names the fd where it is now: another engine (as a new
        # ckptd process would) recognises it and takes a delta.
        with Engine(store) as again:
            second = again.snapshot(t.pid, tracker="uffd-wp")
        assert second.kind == "delta" and second.parent == first.id, second.full_reason
        assert procfs.userfaultfd_fds(t.pid) == [uffd_fd]
        assert t.send("bye") == hashlib.sha256(b"bye\n").hexdigest()


def test_userfaultfd_that_cannot_move_off_a_standard_stream_is_closed(
        engine: Engine) -> None:
    """With RLIMIT_NOFILE at 3, the userfaultfd gets fd 0 and cannot be moved to 3 or
    above (fcntl fails with EINVAL): ckptd closes it again, leaves the fds as they were,
    and auto falls back to the hash tracker."""
    with Target.python(NO_STDIO) as t:
        time.sleep(0.1)
        resource.prlimit(t.pid, resource.RLIMIT_NOFILE, (3, 3))
        fds_before = _fds(t.pid)
        with pytest.raises(UserError, match="cannot move the target's userfaultfd off fd 0"):
            engine.snapshot(t.pid, tracker="uffd-wp")
        assert _fds(t.pid) == fds_before
        meta = engine.snapshot(t.pid)
        assert meta.tracker == "hash" and "cannot move" in (meta.tracker_reason or "")
        assert _fds(t.pid) == fds_before
        assert t.send("open") == "0"
        assert t.send("still") == hashlib.sha256(b"still\n").hexdigest()


def test_target_blocked_in_read_comes_through(engine: Engine) -> None:
    with Target.python(READER) as t:
        time.sleep(0.1)
        for _ in range(3):
            engine.snapshot(t.pid)
            assert t.state() == "S"
        assert t.send("ping") == hashlib.sha256(b"ping\n").hexdigest()


def test_target_in_nanosleep_wakes_on_time(engine: Engine) -> None:
    code = """
import time, sys
print('ready', flush=True)
t0 = time.monotonic()
time.sleep(1.5)
print(f'{time.monotonic() - t0:.3f}', flush=True)
sys.stdin.readline()
"""
    with Target.python(code) as t:
        time.sleep(0.2)
        engine.snapshot(t.pid)
        engine.snapshot(t.pid)
        slept = float(t.readline(timeout=10))
        # The interrupted sleep was restarted, not cut short or failed.
        assert 1.5 <= slept < 5.0
        assert t.alive()


def test_stopped_target_stays_stopped(engine: Engine) -> None:
    with Target.python(READER) as t:
        time.sleep(0.1)
        os.kill(t.pid, signal.SIGSTOP)
        assert wait_for(lambda: t.state() == "T")
        first = engine.snapshot(t.pid)  # injection happens here
        assert t.state() == "T"
        second = engine.snapshot(t.pid)
        assert t.state() == "T"
        assert first.kind == "full" and second.kind == "delta"
        os.kill(t.pid, signal.SIGCONT)
        assert t.send("go") == hashlib.sha256(b"go\n").hexdigest()


# Counts the SIGUSR1 it handled; answers each line on stdin with the count.
SIGUSR1_COUNTER = """
import signal, sys
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
print('ready', flush=True)
for line in sys.stdin:
    print(len(got), flush=True)
"""


def test_signals_during_freeze_are_delivered(engine: Engine) -> None:
    with Target.python(SIGUSR1_COUNTER) as t:
        time.sleep(0.1)
        engine.snapshot(t.pid)

        def send_signal(pid: int, vmas: object) -> None:
            os.kill(pid, signal.SIGUSR1)

        engine.snapshot(t.pid, on_frozen=send_signal)
        assert wait_for(lambda: t.send("count") == "1", timeout=5)



def test_one_injection_session_runs_several_syscalls() -> None:
    """Several syscalls in one session, the registers written back once at the end; a
    signal that arrives between two of them is delivered with the thread's own
    registers, and the next syscall still runs."""
    with Target.python(SIGUSR1_COUNTER) as t:
        time.sleep(0.1)  # settle into read()
        regs_before = _regs(t.pid)
        with ptrace.Freezer(t.pid) as fz, fz.injection() as inj:
            assert inj.syscall(39) == t.pid  # getpid()
            assert inj.syscall(abi.SYS_fcntl, 10_000, abi.F_DUPFD_CLOEXEC, 0) == -errno.EBADF
            assert inj.syscall(39) == t.pid
        time.sleep(0.1)  # back into read() (frozen at once, it would not be there yet)
        regs_after = _regs(t.pid)
        for name, _ in abi.UserRegs._fields_:
            assert getattr(regs_after, name) == getattr(regs_before, name), name
        assert t.send("count") == "0"
        with ptrace.Freezer(t.pid) as fz, fz.injection() as inj:
            assert inj.syscall(39) == t.pid
            # Pending from now on: the thread takes it on its way to the next syscall.
            os.kill(t.pid, signal.SIGUSR1)
            assert inj.syscall(39) == t.pid
        assert wait_for(lambda: t.send("count") == "1", timeout=5)
        assert t.alive()

class _SignalBeforeInterrupt(ptrace.Freezer):
    """A Freezer that sends SIGUSR1 after seizing each thread and before interrupting
    it, so that the thread, running and traced, reports a signal-delivery stop before
    its interrupt stop: the race that ckptd must handle without keeping the signal."""

    def _seize(self, tid: int) -> bool:
        from ckptd.kernel.syscalls import ptrace as raw_ptrace

        raw_ptrace(abi.PTRACE_SEIZE, tid, 0, 0)
        self.threads[tid] = ptrace._Thread(tid)
        os.kill(tid, signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while procfs.process_state(tid) != "t" and time.monotonic() < deadline:
            time.sleep(0.001)  # until the signal-delivery stop ("t": tracing stop)
        assert procfs.process_state(tid) == "t", "the signal did not stop the thread"
        raw_ptrace(abi.PTRACE_INTERRUPT, tid)
        return True


def test_a_signal_delivery_stop_while_freezing_is_passed_on() -> None:
    """Deterministic version of the race: the signal's delivery stop comes first. The
    handler must run exactly once, and the target must go on."""
    with Target.python(SIGUSR1_COUNTER) as t:
        time.sleep(0.1)
        with _SignalBeforeInterrupt(t.pid) as fz:
            assert all(th.stopped for th in fz.threads.values())
            assert procfs.process_state(t.pid) == "t"
        assert wait_for(lambda: t.send("count") == "1", timeout=5)
        assert t.send("count") == "1"  # once, not twice
        assert t.alive()


def test_a_signal_seen_while_freezing_survives_ckptd_being_killed() -> None:
    """ckptd never holds a signal: a freezer that collected a signal-delivery stop and
    is then SIGKILLed (the kernel detaches) must leave the signal delivered."""
    with Target.python(SIGUSR1_COUNTER) as t:
        time.sleep(0.1)
        child = os.fork()
        if child == 0:  # the "ckptd": freeze, then die without thawing
            try:
                _SignalBeforeInterrupt(t.pid).freeze()
                os.kill(os.getpid(), signal.SIGKILL)
            finally:
                os._exit(1)
        _, status = os.waitpid(child, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
        assert wait_for(lambda: t.send("count") == "1", timeout=5)
        assert t.alive()


# Starts short-lived threads without pause, so that new threads appear while the
# freezer works; each one bumps a counter the main thread reports.
THREAD_SPAWNER = """
import sys, threading
count = 0
def bump():
    global count
    count += 1
def spawn():
    while True:
        th = threading.Thread(target=bump)
        th.start()
        th.join()
threading.Thread(target=spawn, daemon=True).start()
threading.Thread(target=spawn, daemon=True).start()
print('ready', flush=True)
for line in sys.stdin:
    print(count, flush=True)
"""


def test_freeze_holds_every_thread_of_a_process_that_keeps_starting_threads() -> None:
    """Threads started while the freezer works are held too: while frozen, every task
    of the process is in a tracing stop, and the process goes on afterwards."""
    with Target.python(THREAD_SPAWNER) as t:
        for _ in range(300):
            with ptrace.Freezer(t.pid) as fz:
                tids = procfs.thread_ids(t.pid)
                assert set(tids) <= set(fz.threads), "a thread escaped the freeze"
                states = {tid: procfs.process_state(tid) for tid in tids}
                assert all(st == "t" for st in states.values()), states
                assert len(tids) >= 3  # main and both spawners, at least
        before = int(t.send("count"))
        assert wait_for(lambda: int(t.send("count")) > before, timeout=5)
        assert t.alive()


ONE_THREAD_THEN_TWO = """
import sys, threading
count = 0
def spin():
    global count
    while True:
        count += 1
print('ready', flush=True)
for line in sys.stdin:
    if line.strip() == 'start':
        threading.Thread(target=spin, daemon=True).start()
    print(threading.active_count(), flush=True)
"""


def test_freeze_through_kept_proc_files_holds_a_thread_started_since() -> None:
    """With kept /proc files the freezer learns from stat that the main thread is the
    only one and skips listing threads; a thread started after one freeze is still held
    by the next."""
    with Target.python(ONE_THREAD_THEN_TWO) as t:
        files = procfs.ProcFiles(t.pid)
        try:
            with ptrace.Freezer(t.pid, files=files) as fz:
                assert set(fz.threads) == {t.pid} == set(procfs.thread_ids(t.pid))
                assert procfs.process_state(t.pid) == "t"
            assert t.send("start") == "2"
            for _ in range(20):
                with ptrace.Freezer(t.pid, files=files) as fz:
                    tids = procfs.thread_ids(t.pid)
                    assert len(tids) == 2 and set(tids) == set(fz.threads)
                    assert all(procfs.process_state(tid) == "t" for tid in tids)
            assert t.send("again") == "2" and t.alive()
        finally:
            files.close()


def test_target_exiting_mid_snapshot_leaves_no_half_snapshot(engine: Engine,
                                                              store: Store) -> None:
    with Target.python(READER) as t:
        time.sleep(0.1)
        good = engine.snapshot(t.pid)

        def kill_it(pid: int, vmas: object) -> None:
            # Dies after the scan, before its pages are copied.
            os.kill(pid, signal.SIGKILL)
            assert wait_for(lambda: procfs.process_state(pid) in ("Z", "X"))

        with pytest.raises(TargetGone, match="exited during the snapshot"):
            engine.snapshot(t.pid, on_frozen=kill_it)
    assert [m.id for m in store.list_snapshots()] == [good.id]
    # No data file; the engine's own owner lock stays while it is open.
    assert [p.name for p in store.tmp_dir.iterdir() if not p.name.startswith("owner.")] == []
    assert list((store.chain_dir(good.chain) / "data").iterdir()) == [store.data_path(good)]
    assert store_reader.verify(store) == (1, [])
    with pytest.raises(UserError, match="no process"):
        engine.snapshot(t.pid)


KILLS_HELD_TARGET = """
import os, signal, sys, time
from pathlib import Path
from ckptd.engine import Engine
from ckptd.errors import TargetGone
from ckptd.kernel import procfs
from ckptd.store import Store
eng = Engine(Store.open(Path(sys.argv[1]), create=True))
pid = int(sys.argv[2])
eng.snapshot(pid)
def kill_it(pid, vmas):
    os.kill(pid, signal.SIGKILL)
    while procfs.process_state(pid) not in ("Z", "X"):
        time.sleep(0.01)
try:
    eng.snapshot(pid, on_frozen=kill_it)
except TargetGone:
    print("gone", flush=True)
time.sleep(60)  # the tracer thread lives on, as the service's capture thread does
"""


def test_a_target_killed_while_held_can_be_reaped_by_its_parent(tmp_path: Path) -> None:
    """A tracee's exit goes to its tracer first: a freezer that did not collect it kept
    the killed target a zombie that its own parent's wait() could not reap (the
    parent hung) for as long as ckptd's capture thread lived."""
    with Target.python(READER) as t:
        time.sleep(0.1)
        ckptd = subprocess.Popen(
            [sys.executable, "-c", KILLS_HELD_TARGET, str(tmp_path / "store"), str(t.pid)],
            stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert ckptd.stdout is not None and ckptd.stdout.readline().strip() == "gone"
            assert t.proc.wait(timeout=10) == -signal.SIGKILL
        finally:
            ckptd.kill()
            ckptd.wait()


CKPTD_DIES = """
import os, signal, sys
from pathlib import Path
from ckptd.engine import Engine
from ckptd.store import Store
eng = Engine(Store.open(Path(sys.argv[1]), create=True))
eng.snapshot(int(sys.argv[2]))
def die(pid, vmas):
    os.kill(os.getpid(), signal.SIGKILL)   # ckptd dies while the target is frozen
eng.snapshot(int(sys.argv[2]), on_frozen=die)
"""


def test_ckptd_killed_while_target_frozen(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    with Target.python(READER) as t:
        time.sleep(0.1)
        r = subprocess.run([sys.executable, "-c", CKPTD_DIES, str(store_dir), str(t.pid)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == -signal.SIGKILL, r.stderr
        # The kernel detached: the target runs and answers.
        assert wait_for(lambda: t.state() in ("S", "R"))
        assert t.send("alive?") == hashlib.sha256(b"alive?\n").hexdigest()
        store = Store.open(store_dir)
        snaps = store.list_snapshots()
        assert len(snaps) == 1 and snaps[0].kind == "full"
        assert store_reader.verify(store) == (1, [])
        # The get-and-clear of the killed round was lost with it: the next snapshot
        # must not pretend to be a delta of the first.
        with Engine(store) as eng:
            nxt = eng.snapshot(t.pid)
        assert nxt.kind == "full" and nxt.full_reason and "did not complete" in nxt.full_reason
        assert t.send("still") == hashlib.sha256(b"still\n").hexdigest()


INJECTS_THEN_DIES = """
import os, signal, sys
from ckptd.kernel import ptrace
pid = int(sys.argv[1])
fz = ptrace.Freezer(pid)
fz.freeze()
assert fz.inject_syscall(39) == pid  # getpid(), run by the target
os.kill(os.getpid(), signal.SIGKILL)  # ckptd dies with the target held after an injection
"""

SLEEPER_1500 = """
import time, sys
print('ready', flush=True)
t0 = time.monotonic()
time.sleep(1.5)
print(f'{time.monotonic() - t0:.3f}', flush=True)
for line in sys.stdin:
    print(line.strip()[::-1], flush=True)
"""


@pytest.mark.parametrize("code", [READER, SLEEPER_1500], ids=["read", "sleep"])
def test_ckptd_killed_right_after_an_injection_leaves_the_target_running(code: str) -> None:
    """The kernel's detach must leave nothing of the injection behind: no signal (a
    single step would leave a SIGTRAP that kills the target), and the syscall the
    thread was blocked in restarts."""
    with Target.python(code) as t:
        time.sleep(0.2)  # blocked in read() or in the sleep
        r = subprocess.run([sys.executable, "-c", INJECTS_THEN_DIES, str(t.pid)],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.returncode == -signal.SIGKILL, r.stderr
        if code is READER:
            assert t.send("alive?") == hashlib.sha256(b"alive?\n").hexdigest()
        else:
            slept = float(t.readline(timeout=10))
            assert 1.5 <= slept < 5.0  # restarted, not cut short or failed
            assert t.send("abc") == "cba"
        assert t.alive() and t.state() in ("S", "R")


# A second thread sits in vfork() (uninterruptible sleep, D) while its child sleeps 5 s;
# the main thread answers each line on stdin.
VFORK_WAITER_C = r"""
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
static void *waiter(void *arg) {
    pid_t c = vfork();
    if (c == 0) { sleep(5); _exit(0); }
    waitpid(c, 0, 0);
    return arg;
}
int main(void) {
    pthread_t t;
    char line[256];
    pthread_create(&t, 0, waiter, 0);
    printf("ready\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        printf("got %s", line);
        fflush(stdout);
    }
    return 0;
}
"""


def test_a_thread_in_uninterruptible_sleep_skips_the_round(engine: Engine,
                                                           tmp_path: Path) -> None:
    """A thread in D cannot stop until it wakes, and the threads already held would
    wait with it: the round gives up after a short grace instead, and the process runs
    on."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler (cc) for a thread that sits in vfork()")
    (tmp_path / "w.c").write_text(VFORK_WAITER_C)
    subprocess.run([cc, "-O1", "-pthread", "-o", str(tmp_path / "w"), str(tmp_path / "w.c")],
                   check=True)
    with Target([str(tmp_path / "w")]) as t:
        assert wait_for(lambda: any(procfs.process_state(tid) == "D"
                                    for tid in procfs.thread_ids(t.pid)), timeout=5)
        started = time.monotonic()
        with pytest.raises(TargetBusy, match="uninterruptible sleep"):
            engine.snapshot(t.pid, tracker="hash")
        # It gave up instead of waiting for the child's 5 s sleep to end.
        assert time.monotonic() - started < 2.5
        assert t.send("hello") == "got hello"
        assert procfs.read_status(t.pid)["TracerPid"] == "0"


def test_tracking_survives_separate_invocations(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    with Target.python(READER) as t:
        time.sleep(0.1)
        ids = []
        for _ in range(3):
            r = run_cli("snapshot", str(t.pid), "--store", store, "--json")
            assert r.returncode == 0, r.stderr
            import json

            ids.append(json.loads(r.stdout))
        assert [s["kind"] for s in ids] == ["full", "delta", "delta"]
        assert all(s["tracker"] == "uffd-wp" for s in ids)
        assert ids[2]["parent"] == ids[1]["id"]
        # Still exactly one extra fd in the target after three ckptd processes.
        assert list(procfs.fd_targets(t.pid).values()).count("anon_inode:[userfaultfd]") == 1


def test_exec_starts_a_new_chain_with_a_full_snapshot(engine: Engine) -> None:
    code = f"""
import os, sys
print('ready', flush=True)
sys.stdin.readline()
os.execv(sys.executable, [sys.executable, '-c', {READER!r}])
"""
    with Target.python(code) as t:
        time.sleep(0.1)
        before = engine.snapshot(t.pid)
        assert t.send("exec") == "ready"
        after = engine.snapshot(t.pid)
        assert after.chain != before.chain
        assert after.kind == "full" and "exec" in (after.full_reason or "")
        assert after.tracker == "uffd-wp"
        again = engine.snapshot(t.pid)
        assert again.kind == "delta" and again.chain == after.chain


SECCOMP_TARGET = """
import ctypes, sys
# A seccomp filter that kills the process if it ever calls userfaultfd (323).
libc = ctypes.CDLL(None, use_errno=True)
class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint)]
class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]
prog = (SockFilter * 4)(
    SockFilter(0x20, 0, 0, 0),            # ld [nr]
    SockFilter(0x15, 0, 1, 323),          # jeq userfaultfd
    SockFilter(0x06, 0, 0, 0x80000000),   # ret KILL_PROCESS
    SockFilter(0x06, 0, 0, 0x7fff0000),   # ret ALLOW
)
fprog = SockFprog(4, prog)
assert libc.prctl(38, 1, 0, 0, 0) == 0                      # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0     # PR_SET_SECCOMP, FILTER
""" + READER


def test_seccomp_target_survives_injection(engine: Engine) -> None:
    with Target.python(SECCOMP_TARGET) as t:
        time.sleep(0.1)
        assert procfs.read_status(t.pid)["Seccomp"] == "2"
        meta = engine.snapshot(t.pid, tracker="uffd-wp")
        assert meta.tracker == "uffd-wp"
        assert t.send("still here") == hashlib.sha256(b"still here\n").hexdigest()
        engine.snapshot(t.pid)
        assert t.alive()


FOREIGN_UFFD = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.syscall(323, 0o2000000 | 1)
assert fd >= 0, ctypes.get_errno()
""" + READER


def test_target_with_its_own_userfaultfd_is_refused_and_auto_falls_back(
        engine: Engine) -> None:
    with Target.python(FOREIGN_UFFD) as t:
        time.sleep(0.1)
        with pytest.raises(UserError, match="already uses userfaultfd"):
            engine.snapshot(t.pid, tracker="uffd-wp")
        meta = engine.snapshot(t.pid)
        assert meta.tracker == "hash" and "already uses userfaultfd" in meta.tracker_reason
        assert t.send("ok?") == hashlib.sha256(b"ok?\n").hexdigest()
