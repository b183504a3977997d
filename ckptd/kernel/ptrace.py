"""ptrace: freeze every thread of a process, and inject one syscall into it.

Only PTRACE_SEIZE is used: if ckptd dies, the kernel detaches and every thread resumes
(a thread that was in group-stop before stays stopped). A signal that reaches a held
thread (a signal-delivery-stop) is delivered at once, never kept by ckptd: a signal
held by the tracer is lost if the tracer dies. The pending PTRACE_INTERRUPT then stops
the thread again before it returns to user code.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
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
        options = abi.PTRACE_O_SUSPEND_SECCOMP if self.suspend_seccomp else 0
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
        self.threads.clear()
        if errors:
            raise errors[0]

    # --- syscall injection -----------------------------------------------------------

    def inject_syscall(self, number: int, *args: int, tid: int | None = None) -> int:
        """Run one syscall in the target (its main thread by default) and return its raw
        result (negative errno on failure). Registers are restored exactly afterwards, so
        an interrupted syscall restarts as if nothing happened."""
        tid = tid or self.pid
        th = self.threads[tid]
        for _ in range(16):
            saved = abi.UserRegs()
            ptrace(abi.PTRACE_GETREGS, tid, 0, saved)
            insn_addr, borrowed = _syscall_instruction(self.pid, saved.rip)
            try:
                regs = abi.UserRegs()
                ctypes.memmove(ctypes.byref(regs), ctypes.byref(saved), ctypes.sizeof(regs))
                regs.rip = insn_addr
                regs.rax = number
                # orig_rax = -1: the kernel's syscall-restart logic must leave these
                # registers alone when the thread leaves this stop.
                regs.orig_rax = ctypes.c_ulong(-1).value
                for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args,
                                       strict=False):
                    setattr(regs, name, ctypes.c_ulong(value).value)
                ptrace(abi.PTRACE_SETREGS, tid, 0, regs)
                try:
                    result, interrupted_by = self._single_step_syscall(th, insn_addr)
                finally:
                    ptrace(abi.PTRACE_SETREGS, tid, 0, saved)
            finally:
                if borrowed is not None:
                    _write_mem(self.pid, insn_addr, borrowed)
            if interrupted_by is None:
                return result
            # A signal came before the instruction ran. Deliver it with the thread's own
            # registers back in place, stop the thread again, and retry.
            th.stopped = False
            ptrace(abi.PTRACE_CONT, tid, 0, interrupted_by)
            ptrace(abi.PTRACE_INTERRUPT, tid)
            self._wait_stop(th)
            if tid not in self.threads:
                raise TargetGone(f"thread {tid} exited during injection")
        raise RuntimeError(f"signals kept interrupting the injected syscall in {tid}")

    def _single_step_syscall(self, th: _Thread, insn_addr: int) -> tuple[int, int | None]:
        """Step over the syscall instruction. Returns (result, None) once it ran, or
        (0, signal) when a signal stopped the thread before it ran."""
        regs = abi.UserRegs()
        status = 0
        for _ in range(8):
            ptrace(abi.PTRACE_SINGLESTEP, th.tid, 0, 0)
            try:
                _, status = os.waitpid(th.tid, abi.WAIT_ALL_THREADS)
            except ChildProcessError:
                raise TargetGone(f"thread {th.tid} exited during injection") from None
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self.threads.pop(th.tid, None)
                raise TargetGone(f"process {self.pid} died during injection")
            ptrace(abi.PTRACE_GETREGS, th.tid, 0, regs)
            if regs.rip == insn_addr + len(abi.SYSCALL_INSN):
                # The step's own SIGTRAP: suppressed, since detach passes no signal.
                return ctypes.c_long(regs.rax).value, None
            sig = os.WSTOPSIG(status)
            if status >> 16 == 0 and sig != signal.SIGTRAP:
                return 0, sig
            # An event stop (a group-stop of a stopped process reported again) before
            # the instruction ran: step again.
        raise RuntimeError(f"injected syscall in {th.tid} stopped at {regs.rip:#x} "
                           f"(status {status:#x}) before completing")


def _read_mem(pid: int, addr: int, size: int) -> bytes:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, size, addr)
    finally:
        os.close(fd)


def _write_mem(pid: int, addr: int, data: bytes) -> None:
    fd = os.open(f"/proc/{pid}/mem", os.O_WRONLY | os.O_CLOEXEC)
    try:
        if os.pwrite(fd, data, addr) != len(data):
            raise OSError(errno.EIO, f"short write restoring code at {addr:#x} in {pid}")
    finally:
        os.close(fd)


def _syscall_instruction(pid: int, rip: int) -> tuple[int, bytes | None]:
    """Address of a `syscall` instruction in the target. Prefers one that already exists in
    an executable mapping (nothing written). Falls back to borrowing two bytes at rip,
    returning the original bytes to put back."""
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
                return lo + i, None
    original = _read_mem(pid, rip, len(abi.SYSCALL_INSN))
    _write_mem(pid, rip, abi.SYSCALL_INSN)
    return rip, original
