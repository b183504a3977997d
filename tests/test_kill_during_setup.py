"""SIGKILL of ckptd while it sets up write-protect tracking in a target: the one part of
a round that is not safe to die in. Each test kills a real ckptd process (itself, at an
exact point, through a patched function) and looks at the real target afterwards.

- Dying with the injected registers in place: the injection runs in a child process
  (track/injector.py), which finishes it; the target lives on.
- Dying after the target created the userfaultfd but before state/uffd-wp.json names
  it: the record written before the injection (target_fd -1, "installing") lets the next
  ckptd take that userfaultfd over; a userfaultfd the target made itself is never taken.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import TARGETS, needs_root

from ckptd.engine import Engine
from ckptd.kernel import procfs
from ckptd.store import Store
from ckptd.store import reader as store_reader

pytestmark = needs_root

# argv: store, target pid, where to die. The patched function SIGKILLs ckptd itself.
DIE_DURING_SETUP = """
import os, signal, sys, time
from pathlib import Path
from ckptd.engine import Engine
from ckptd.kernel import ptrace
from ckptd.store import Store
from ckptd.track import uffd_wp

def die(*args, **kw):
    os.kill(os.getpid(), signal.SIGKILL)

CKPTD = os.getpid()
if sys.argv[3] == "registers-set":
    # PTRACE_SETREGS with the injected registers has run; the syscall has not. The
    # injection runs in a child of ckptd (track/injector.py): that child kills ckptd
    # here, and waits until it is gone before going on. (Were the injection to run in
    # ckptd itself, ckptd would kill itself here, with the registers in place.)
    run_syscall = ptrace.Freezer._run_syscall
    def kill_ckptd_then_run(self, th):
        os.kill(CKPTD, signal.SIGKILL)
        while os.path.exists(f"/proc/{CKPTD}/stat") and \
                open(f"/proc/{CKPTD}/stat").read().split(") ")[1][0] not in "ZX":
            time.sleep(0.001)
        return run_syscall(self, th)
    ptrace.Freezer._run_syscall = kill_ckptd_then_run
elif sys.argv[3] == "state-unsaved":
    # The target made the userfaultfd and ckptd took its copy; the record naming it is
    # next (the "installing" record before the injection is written).
    save = uffd_wp.UffdWpTracker._save_state
    def save_or_die(self, ctx):
        if self.state.target_fd != uffd_wp.INSTALLING:
            die()
        save(self, ctx)
    uffd_wp.UffdWpTracker._save_state = save_or_die
else:
    # Before the injection: only the "installing" record is written.
    uffd_wp.UffdWpTracker._inject_with_retries = die
store = Store.open(Path(sys.argv[1]), create=True)
with Engine(store) as eng:
    eng.snapshot(int(sys.argv[2]), tracker="uffd-wp")
print("completed")
"""


def _target() -> subprocess.Popen[str]:
    t = subprocess.Popen([sys.executable, str(TARGETS / "counter.py"), "64", "500"],
                         stdout=subprocess.PIPE, text=True)
    assert t.stdout is not None and t.stdout.readline().startswith("ready")
    return t


def _die(root: Path, pid: int, where: str) -> None:
    r = subprocess.run([sys.executable, "-c", DIE_DURING_SETUP, str(root), str(pid), where],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr


def _next_ckptd_takes_over(root: Path, pid: int, left: list[int]) -> None:
    """A new ckptd takes the userfaultfd `left` (the target's only one) over: a full
    snapshot, then a delta, with no second userfaultfd and a clean store."""
    with Engine(Store.open(root)) as eng:
        meta = eng.snapshot(pid)
        assert meta.tracker == "uffd-wp", meta.tracker_reason
        assert meta.kind == "full" and "taken over" in (meta.full_reason or "")
        delta = eng.snapshot(pid)
    assert delta.tracker == "uffd-wp" and delta.kind == "delta", delta.full_reason
    assert procfs.userfaultfd_fds(pid) == left
    assert store_reader.verify(Store.open(root)) == (2, [])


def test_target_survives_ckptd_killed_with_injected_registers(tmp_path: Path) -> None:
    """ckptd is SIGKILLed while the target's thread holds the injected registers. The
    injection's own process finishes it: the target lives on unharmed, holding the one
    userfaultfd, which the next ckptd takes over (a full snapshot, then deltas)."""
    root = tmp_path / "store"
    t = _target()
    try:
        _die(root, t.pid, "registers-set")
        wait_until_one_userfaultfd = time.monotonic() + 60
        while not procfs.userfaultfd_fds(t.pid) and time.monotonic() < wait_until_one_userfaultfd:
            time.sleep(0.01)
        left = procfs.userfaultfd_fds(t.pid)
        assert len(left) == 1, left
        assert t.poll() is None, f"target died: {t.returncode}"
        _next_ckptd_takes_over(root, t.pid, left)
        time.sleep(0.3)  # the counter checks its pages before each write: still running
        assert t.poll() is None, f"target exited {t.returncode}"
    finally:
        t.kill()
        t.wait()


def test_tracking_survives_ckptd_killed_before_recording_the_userfaultfd(
        tmp_path: Path) -> None:
    """The next ckptd takes over the userfaultfd the dead one installed: write-protect
    tracking goes on with a full snapshot, then deltas, and the target holds no second
    userfaultfd."""
    root = tmp_path / "store"
    t = _target()
    try:
        _die(root, t.pid, "state-unsaved")
        assert t.poll() is None  # only the setup is lost, not the target
        left = procfs.userfaultfd_fds(t.pid)
        assert len(left) == 1
        _next_ckptd_takes_over(root, t.pid, left)
    finally:
        t.kill()
        t.wait()


# argv: store, target pid. The injecting child sends ckptd (this script, whose main
# thread snapshots) SIGINT while the injected registers are set, as a Ctrl-C would.
INTERRUPTED_SETUP = """
import os, signal, sys
from pathlib import Path
from ckptd.engine import Engine
from ckptd.kernel import ptrace
from ckptd.store import Store

CKPTD = os.getpid()
run_syscall = ptrace.Freezer._run_syscall
def interrupt_then_run(self, th):
    if os.getpid() != CKPTD:
        os.kill(CKPTD, signal.SIGINT)
    return run_syscall(self, th)
ptrace.Freezer._run_syscall = interrupt_then_run
store = Store.open(Path(sys.argv[1]), create=True)
try:
    with Engine(store) as eng:
        eng.snapshot(int(sys.argv[2]), tracker="uffd-wp")
    print("completed")
except KeyboardInterrupt:
    print("interrupted")
"""


def test_ctrl_c_during_the_setup_keeps_the_userfaultfd_recorded(tmp_path: Path) -> None:
    """The interrupt waits until the new userfaultfd is recorded, then stops the
    snapshot: the next ckptd uses that userfaultfd (no second one, no fallback)."""
    root = tmp_path / "store"
    t = _target()
    try:
        r = subprocess.run([sys.executable, "-c", INTERRUPTED_SETUP, str(root), str(t.pid)],
                           capture_output=True, text=True, timeout=60)
        assert r.stdout.strip() == "interrupted", r.stdout + r.stderr
        assert t.poll() is None
        left = procfs.userfaultfd_fds(t.pid)
        assert len(left) == 1
        with Engine(Store.open(root)) as eng:
            meta = eng.snapshot(t.pid)
            assert meta.tracker == "uffd-wp", meta.tracker_reason
            assert "taken over" not in (meta.full_reason or "")
            delta = eng.snapshot(t.pid)
        assert delta.kind == "delta", delta.full_reason
        assert procfs.userfaultfd_fds(t.pid) == left
        assert store_reader.verify(Store.open(root)) == (2, [])
    finally:
        t.kill()
        t.wait()


# Makes a userfaultfd of its own when told to (close-on-exec only, not O_NONBLOCK).
OWN_UFFD = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
print("ready", flush=True)
sys.stdin.readline()
fd = libc.syscall(323, 0o2000000)
print(fd, flush=True)
sys.stdin.readline()
"""


def test_a_userfaultfd_the_target_made_itself_is_never_taken_over(tmp_path: Path) -> None:
    """ckptd dies after writing its "installing" record and before the injection; the
    target then makes a userfaultfd of its own. The next ckptd must take that one for
    the target's (not O_NONBLOCK: not made by ckptd), leave it alone, and use the hash
    tracker."""
    root = tmp_path / "store"
    t = subprocess.Popen([sys.executable, "-c", OWN_UFFD], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert t.stdout is not None and t.stdin is not None
        assert t.stdout.readline().strip() == "ready"
        _die(root, t.pid, "before-injection")
        state = next(root.glob("chains/*/state/uffd-wp.json"))
        assert '"target_fd": -1' in state.read_text()
        assert procfs.userfaultfd_fds(t.pid) == []
        t.stdin.write("go\n")
        t.stdin.flush()
        own = int(t.stdout.readline())
        assert procfs.userfaultfd_fds(t.pid) == [own]
        with Engine(Store.open(root)) as eng:
            meta = eng.snapshot(t.pid)
        assert meta.tracker == "hash", meta.tracker_reason
        assert "already uses userfaultfd" in meta.tracker_reason
        assert procfs.userfaultfd_fds(t.pid) == [own]
        assert procfs.fdinfo(t.pid, own)["API"].split(":")[1] == "0"  # untouched
        assert t.poll() is None
    finally:
        t.kill()
        t.wait()
