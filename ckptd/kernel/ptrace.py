"""ptrace: freeze every thread of a process, and inject syscalls into it.

Only PTRACE_SEIZE is used: if ckptd dies, the kernel detaches and every thread resumes
(a thread that was in group-stop before stays stopped). A signal that reaches a held
thread (a signal-delivery-stop) is delivered at once, never kept by ckptd: a signal
held by the tracer is lost if the tracer dies. The pending PTRACE_INTERRUPT then stops
the thread again before it returns to user code.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from . import abi, procfs
from .syscalls import ptrace


class TargetGone(Exception):
    """The target process exited (or its thread did) while we were working on it."""


@dataclass
class _Thread:
    tid: int
    stopped: bool = False


@dataclass
class Freezer:
    """Holds every thread of `pid` in a ptrace stop. Use as a context manager."""

    pid: int
    suspend_seccomp: bool = False
    threads: dict[int, _Thread] = field(default_factory=dict)
    # The process's kept /proc files, if the caller has them: with the main thread held,
    # one read of stat says whether it is the only thread (the usual case), where
    # listing /proc/PID/task costs five system calls.
    files: procfs.ProcFiles | None = None

    def __enter__(self) -> Freezer:
        self.freeze()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thaw()

    def _seize(self, tid: int) -> bool:
        # TRACESYSGOOD: see inject_syscall. It changes nothing for the freeze itself.
        options = abi.PTRACE_O_TRACESYSGOOD | (
            abi.PTRACE_O_SUSPEND_SECCOMP if self.suspend_seccomp else 0)
        try:
            ptrace(abi.PTRACE_SEIZE, tid, 0, options)
        except OSError as e:
            if e.errno == errno.ESRCH:
                return False  # thread exited between listing and seizing
            if e.errno == errno.EPERM and procfs.has_exited(tid):
                return False  # exiting: the kernel refuses to attach to a dead task
            raise
        self.threads[tid] = _Thread(tid)
        try:
            ptrace(abi.PTRACE_INTERRUPT, tid)
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise
        return True

    def _wait_stop(self, th: _Thread) -> None:
        while not th.stopped:
            try:
                _, status = os.waitpid(th.tid, abi.WAIT_ALL_THREADS)
            except ChildProcessError:
                del self.threads[th.tid]
                if th.tid == self.pid:
                    raise TargetGone(f"process {self.pid} exited") from None
                return
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                del self.threads[th.tid]
                if th.tid == self.pid:
                    raise TargetGone(f"process {self.pid} exited")
                return
            if not os.WIFSTOPPED(status):
                continue
            sig = os.WSTOPSIG(status)
            if status >> 16 == 0:
                # Signal-delivery-stop: deliver it now (see the module doc); the
                # interrupt still pending stops the thread again.
                ptrace(abi.PTRACE_CONT, th.tid, 0, sig)
                continue
            th.stopped = True  # interrupt-stop or group-stop

    def freeze(self) -> None:
        try:
            # The main thread first, without a listing: for a single-threaded process
            # stat's thread count (with kept files) or the one listing below then only
            # confirms that nothing else runs (a listing costs as much as the seize).
            if self._seize(self.pid):
                self._wait_stop(self.threads[self.pid])
                if self._only_thread():
                    return
            while True:
                try:
                    tids = procfs.thread_ids(self.pid)
                except FileNotFoundError:
                    raise TargetGone(f"process {self.pid} exited") from None
                new = [t for t in tids if t not in self.threads]
                if not new:
                    break
                for tid in new:
                    _wait_while_uninterruptible(tid)
                    self._seize(tid)
                for tid in new:
                    th = self.threads.get(tid)
                    if th is not None:
                        self._wait_stop(th)
            if self.pid not in self.threads:
                raise TargetGone(f"process {self.pid} exited")
        except BaseException:
            self.thaw()
            raise

    def _only_thread(self) -> bool:
        """Is the main thread, now held, the process's only thread? A held thread cannot
        start another, so the answer stays true while we hold it."""
        if self.files is None:
            return False
        try:
            fields = self.files.stat_fields()
        except (FileNotFoundError, ProcessLookupError):
            raise TargetGone(f"process {self.pid} exited") from None
        return int(fields[procfs.STAT_NUM_THREADS]) == 1

    def thaw(self) -> None:
        errors: list[BaseException] = []
        for th in list(self.threads.values()):
            if not th.stopped:
                # Seized but never reported a stop: it must stop before it can be
                # detached; the INTERRUPT is pending, so this wait is short.
                try:
                    self._wait_stop(th)
                except TargetGone:
                    continue
                if th.tid not in self.threads:
                    continue
            try:
                ptrace(abi.PTRACE_DETACH, th.tid, 0, 0)
            except OSError as e:
                if e.errno != errno.ESRCH:
                    errors.append(e)
                else:
                    _reap_traced_exit(th.tid)
        self.threads.clear()
        if errors:
            raise errors[0]

    # --- syscall injection -----------------------------------------------------------

    def injection(self, tid: int | None = None) -> Injection:
        """A session that runs syscalls in one held thread (the main thread by default),
        as many as the caller needs: `with fz.injection() as inj: inj.syscall(...)`. The
        thread's own registers are read once, at the start, and written back once, at
        the end; see Injection."""
        return Injection(self, tid or self.pid)

    def inject_syscall(self, number: int, *args: int, tid: int | None = None) -> int:
        """Run one syscall in the target (its main thread by default) and return its raw
        result (negative errno on failure): an injection session of one syscall."""
        with self.injection(tid) as inj:
            return inj.syscall(number, *args)

    def _run_syscall(self, th: _Thread) -> tuple[int, int | None]:
        """Let the thread run the `syscall` instruction its registers point at, from
        syscall-entry stop to syscall-exit stop. Returns (result, None) once it ran, or
        (0, signal) when a signal stopped the thread before it ran."""
        regs = abi.UserRegs()
        entered = False
        status = 0
        for _ in range(8):
            ptrace(abi.PTRACE_SYSCALL, th.tid, 0, 0)
            try:
                _, status = os.waitpid(th.tid, abi.WAIT_ALL_THREADS)
            except ChildProcessError:
                raise TargetGone(f"thread {th.tid} exited during injection") from None
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self.threads.pop(th.tid, None)
                raise TargetGone(f"process {self.pid} died during injection")
            if not os.WIFSTOPPED(status):
                continue
            sig = os.WSTOPSIG(status)
            if sig == abi.SYSCALL_STOP_SIG:
                if entered:
                    ptrace(abi.PTRACE_GETREGS, th.tid, 0, regs)
                    return ctypes.c_long(regs.rax).value, None
                entered = True
                continue
            if status >> 16 == 0 and not entered:
                return 0, sig  # a signal-delivery stop: the syscall has not run
            # An event stop (a group-stop of a stopped process reported again) before the
            # instruction ran: go on.
        raise RuntimeError(f"injected syscall in {th.tid} did not complete "
                           f"(last status {status:#x})")


class Injection:
    """Syscalls run in one held thread of a frozen target (see Freezer.injection). The
    thread goes on afterwards exactly as if it had only been stopped: an interrupted
    syscall restarts.

    Each syscall runs between two syscall stops (PTRACE_SYSCALL), never by a single step:
    a step ends in a SIGTRAP signal-delivery stop, and if ckptd died there the kernel's
    detach would deliver that SIGTRAP and kill the target. A syscall stop reports
    SIGTRAP|0x80 (PTRACE_O_TRACESYSGOOD, set at seize), which the kernel cannot send as a
    signal, and detach clears syscall tracing. The next syscall of the session starts
    from the previous one's exit stop. The thread's own registers are read when the
    session starts and written back when it ends (or before a signal is delivered to
    it, see syscall). What remains unsafe is the tracer dying while the injected
    registers are in place, from the first syscall of a session to its end, a few
    system calls per syscall: catchable signals are held off for the whole session, and
    ckptd runs its sessions in a child process of their own (track/injector.py), so
    that ckptd itself dying does not matter (docs/kernel.md, known limitations).
    Callers run their syscalls back to back and do other work outside it."""

    def __init__(self, fz: Freezer, tid: int) -> None:
        self._fz = fz
        self._tid = tid
        self._th = fz.threads[tid]
        self._own = abi.UserRegs()  # the thread's own registers
        self._insn = 0  # a `syscall` instruction in the target
        # Where the thread is: "own" (an event stop, with its own registers), "exit" (the
        # exit stop of an injected syscall, with injected registers) or "unknown" (an
        # injected syscall failed part way).
        self._where = "own"
        self._signals = contextlib.ExitStack()

    def __enter__(self) -> Injection:
        self._own = self._read_own()
        if _inside_rseq_critical_section(self._tid, self._own.rip):
            # Checked once: until the session ends the thread runs none of its own
            # instructions, only the injected syscalls and, for a signal that arrives
            # meanwhile, the kernel's signal delivery, which takes it out of any section.
            raise InjectionDeferred(f"thread {self._tid} is inside an rseq critical section")
        self._insn = _syscall_instruction(self._fz.pid)
        self._signals.enter_context(signals_held())
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            if self._where == "exit":
                # At the syscall-exit stop: outside the signal path, so the kernel will
                # not apply the restart decision that was pending at the interrupt.
                # Apply it here, as the kernel would have.
                self._set_regs(_restarted(self._own), quiet=exc_type is not None)
            elif self._where == "unknown":
                self._set_regs(self._own, quiet=True)  # the thread may be gone
            self._where = "own"
        finally:
            self._signals.close()  # held signals arrive now, with the registers back

    def syscall(self, number: int, *args: int) -> int:
        """Run one syscall in the thread and return its raw result (negative errno on
        failure)."""
        tid = self._tid
        for _ in range(16):
            regs = abi.UserRegs()
            ctypes.memmove(ctypes.byref(regs), ctypes.byref(self._own), ctypes.sizeof(regs))
            regs.rip = self._insn
            regs.rax = number
            # orig_rax = -1: the kernel's syscall-restart logic must leave these registers
            # alone when the thread leaves this stop.
            regs.orig_rax = _NO_SYSCALL
            for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args,
                                   strict=False):
                setattr(regs, name, ctypes.c_ulong(value).value)
            self._where = "unknown"
            ptrace(abi.PTRACE_SETREGS, tid, 0, regs)
            result, interrupted_by = self._fz._run_syscall(self._th)
            if interrupted_by is None:
                self._where = "exit"
                return result
            # At a signal-delivery stop, before the instruction ran: inside the signal
            # path, where the thread's own registers, restart code included, are handled
            # as if nothing had happened (the syscalls run before in this session left
            # no trace in them).
            ptrace(abi.PTRACE_SETREGS, tid, 0, self._own)
            self._where = "own"
            # Deliver the signal, then stop the thread again and retry. The interrupt goes
            # first, so the thread stops before it runs any of its own code (a handler
            # included) with seccomp possibly suspended.
            self._th.stopped = False
            ptrace(abi.PTRACE_INTERRUPT, tid)
            ptrace(abi.PTRACE_CONT, tid, 0, interrupted_by)
            self._fz._wait_stop(self._th)
            if tid not in self._fz.threads:
                raise TargetGone(f"thread {tid} exited during injection")
            self._own = self._read_own()  # as the signal delivery left them
        raise RuntimeError(f"signals kept interrupting the injected syscall in {tid}")

    def _read_own(self) -> abi.UserRegs:
        regs = abi.UserRegs()
        ptrace(abi.PTRACE_GETREGS, self._tid, 0, regs)
        return regs

    def _set_regs(self, regs: abi.UserRegs, quiet: bool) -> None:
        if quiet:
            with contextlib.suppress(OSError):
                ptrace(abi.PTRACE_SETREGS, self._tid, 0, regs)
        else:
            ptrace(abi.PTRACE_SETREGS, self._tid, 0, regs)


def _reap_traced_exit(tid: int) -> None:
    """A tracee that cannot be detached (ESRCH) was killed while held: its exit is
    reported to us, its tracer, first, and until we collect it the process stays a
    zombie that its own parent cannot reap. Collect it; SIGKILL makes the exit prompt,
    but not instant."""
    deadline = time.monotonic() + 1.0
    while True:
        try:
            got, status = os.waitpid(tid, abi.WAIT_ALL_THREADS | abi.WNOHANG)
        except ChildProcessError:
            return  # collected already, or not ours to collect
        if got == tid and os.WIFSTOPPED(status):
            # Not dead after all, and stopped now: let it go.
            with contextlib.suppress(ProcessLookupError):
                ptrace(abi.PTRACE_DETACH, tid, 0, 0)
            return
        if got == tid or time.monotonic() >= deadline:
            return
        time.sleep(0.001)


class ThreadBlocked(Exception):
    """A thread of the target stayed in uninterruptible sleep (D): it cannot stop until
    it wakes, and the threads already held would wait with it."""


# How long a thread in D may keep the freeze waiting (the threads held meanwhile wait
# too). Disk I/O and a vfork() parent leave D within that; a hung network filesystem
# does not, and the snapshot is then skipped.
UNINTERRUPTIBLE_GRACE_S = 0.02


def _wait_while_uninterruptible(tid: int) -> None:
    deadline = None
    while True:
        try:
            state = procfs.process_state(tid)
        except (FileNotFoundError, ProcessLookupError):
            return  # gone: _seize handles that
        if state != "D":
            return
        now = time.monotonic()
        if deadline is None:
            deadline = now + UNINTERRUPTIBLE_GRACE_S
        elif now >= deadline:
            raise ThreadBlocked(f"thread {tid} is in uninterruptible sleep (D)")
        time.sleep(0.001)


class InjectionDeferred(Exception):
    """The thread cannot take an injected syscall at this instant; thaw and retry."""


_NO_SYSCALL = ctypes.c_ulong(-1).value
_RESTART_SAME = (-abi.ERESTARTSYS, -abi.ERESTARTNOINTR, -abi.ERESTARTNOHAND)


def _restarted(saved: abi.UserRegs) -> abi.UserRegs:
    """`saved` (registers seen at an interrupt stop) as the kernel leaves them for a
    thread that returns to user mode with no signal handler to run: an interrupted
    syscall is rewound to run again (restart_syscall for ERESTART_RESTARTBLOCK, which
    resumes a sleep with its remaining time)."""
    regs = abi.UserRegs()
    ctypes.memmove(ctypes.byref(regs), ctypes.byref(saved), ctypes.sizeof(regs))
    if saved.orig_rax == _NO_SYSCALL:
        return regs
    code = ctypes.c_long(saved.rax).value
    if code in _RESTART_SAME:
        regs.rax = saved.orig_rax
    elif code == -abi.ERESTART_RESTARTBLOCK:
        regs.rax = abi.NR_restart_syscall
    else:
        return regs
    regs.rip = saved.rip - len(abi.SYSCALL_INSN)
    regs.orig_rax = _NO_SYSCALL  # rewound already: no second restart
    return regs


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold off SIGINT, SIGTERM, SIGHUP and SIGQUIT while the target's thread runs with
    injected registers: a one-shot `ckptd snapshot` would otherwise die (or raise
    KeyboardInterrupt) in the middle and leave them in place. Only the main thread can
    change handlers; ckptd injects from a forked child (track/injector.py), whose one
    thread is its main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def record(signum: int, frame: object) -> None:
        caught.append(signum)

    previous = {}
    for sig in _HELD_SIGNALS:
        handler = signal.getsignal(sig)
        if handler is not signal.SIG_IGN and handler is not None:
            previous[sig] = signal.signal(sig, record)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in caught:
            signal.raise_signal(signum)  # now, with the thread's own registers back


_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _inside_rseq_critical_section(tid: int, rip: int) -> bool:
    """Is the thread stopped inside a restartable sequence's critical section? Running
    an injected syscall would take it out of the section and back in without the abort
    the kernel owes it (the kernel clears the section on the way out, seeing an
    instruction pointer outside it), and the section would then commit per-CPU data
    after being moved. Sections are a few instructions long: retry later."""
    conf = abi.PtraceRseqConfiguration()
    try:
        ptrace(abi.PTRACE_GET_RSEQ_CONFIGURATION, tid, ctypes.sizeof(conf), conf)
    except OSError as e:
        if e.errno in (errno.EIO, errno.EINVAL):  # kernel without the request
            return False
        raise
    if not conf.rseq_abi_pointer:
        return False
    try:
        cs_ptr = struct.unpack("<Q", _read_mem(tid, conf.rseq_abi_pointer + abi.RSEQ_CS_OFFSET,
                                               8))[0]
        if not cs_ptr:
            return False
        _, _, start_ip, post_commit_offset, _ = struct.unpack(
            abi.RSEQ_CS_FORMAT, _read_mem(tid, cs_ptr, struct.calcsize(abi.RSEQ_CS_FORMAT)))
    except (OSError, struct.error):
        return True  # unreadable: do not take the risk now
    return bool(start_ip <= rip < start_ip + post_commit_offset)


def _read_mem(pid: int, addr: int, size: int) -> bytes:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, size, addr)
    finally:
        os.close(fd)


def _syscall_instruction(pid: int) -> int:
    """Address of a `syscall` instruction in an executable mapping of the target (the
    vDSO has one). ckptd never writes one into the target's code: if it died before
    putting the bytes back, the target would run a syscall in place of its own code."""
    for m in procfs.read_maps(pid):
        if m.perms[2] != "x" or m.path == "[vsyscall]":
            continue
        chunk = 1 << 20
        for lo in range(m.start, m.end, chunk):
            try:
                data = _read_mem(pid, lo, min(chunk, m.end - lo))
            except OSError:
                break
            i = data.find(abi.SYSCALL_INSN)
            if i >= 0:
                return lo + i
    raise InjectionImpossible(f"no syscall instruction in any executable mapping of {pid}")


class InjectionImpossible(Exception):
    """The target offers no way to run a syscall in it without changing its code."""
