"""Run the userfaultfd injection in a child process, so that ckptd dying cannot leave a
target thread with injected registers.

While a target thread runs an injected syscall its registers are not its own. If its
tracer dies then, the kernel detaches it and it resumes with them, and crashes. The
tracer here is a child forked for the injection alone: when ckptd is killed (SIGKILL
included), the child is not, finishes the session, puts the thread's registers back,
detaches and exits. Its result goes back over a socket pair: the fd number in the
target and ckptd's own copy of that userfaultfd (SCM_RIGHTS), or the exception it
raised. If ckptd is gone by then, the userfaultfd stays in the target for the next ckptd
to take over (see UffdWpTracker._adopt).

The child runs only the injection (ptrace, /proc reads, one pidfd) with what the fork
copied, and leaves with os._exit whatever happens, so none of the parent's other work
(its threads, event loop, buffered files, atexit hooks) runs in it.
"""

from __future__ import annotations

import os
import pickle
import socket
from collections.abc import Callable
from typing import Any

from ..errors import TrackerUnavailable

_MAX_REPLY = 1 << 16


def in_child(work: Callable[[], tuple[int, int]]) -> tuple[int, int]:
    """Run `work` in a forked child and return what it returned: (a number, an fd of the
    child's, which arrives as a new fd of ours). An exception `work` raises is raised
    here (a copy, without its traceback)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        child = os.fork()
    except BaseException as e:
        ours.close()
        theirs.close()
        if isinstance(e, OSError):  # EAGAIN (a task limit), ENOMEM: nothing was done
            raise TrackerUnavailable(f"cannot start the injection process: {e.strerror}") \
                from e
        raise
    if child == 0:
        _child(theirs, ours, work)  # never returns
    theirs.close()
    try:
        with ours:
            payload, fds, _flags, _addr = socket.recv_fds(ours, _MAX_REPLY, 1)
    finally:
        status = _reap(child)
    # ("ok", number) or ("error", exception); ("none", None) if the child said nothing.
    reply: tuple[str, Any] = pickle.loads(payload) if payload else ("none", None)
    kind, value = reply
    if kind == "ok" and len(fds) == 1:
        return int(value), fds[0]
    for fd in fds:
        os.close(fd)
    if kind == "none":
        raise TrackerUnavailable(f"the injection process {child} ended without an answer "
                                 f"(wait status {status:#x})")
    if kind == "ok":
        raise TrackerUnavailable("the injection process sent no userfaultfd")
    raise value


def _child(sock: socket.socket, other: socket.socket,
           work: Callable[[], tuple[int, int]]) -> None:
    code = 0
    try:
        other.close()
        fds: list[int] = []
        try:
            number, fd = work()
            payload = pickle.dumps(("ok", number))
            fds = [fd]
        except BaseException as e:  # every outcome goes to the parent
            payload = _pickled_error(e)
        try:
            socket.send_fds(sock, [payload], fds)
        except OSError:
            code = 1  # ckptd is gone: what the injection made stays for the next one
    finally:
        os._exit(code)


def _pickled_error(e: BaseException) -> bytes:
    """The exception, pickled so that it loads again; else a stand-in that says what it
    was."""
    try:
        payload = pickle.dumps(("error", e))
        pickle.loads(payload)
        return payload
    except Exception:
        return pickle.dumps(("error", TrackerUnavailable(
            f"the injection failed: {type(e).__name__}: {e}")))


def _reap(child: int) -> int:
    while True:
        try:
            _, status = os.waitpid(child, 0)
            return status
        except ChildProcessError:
            return 0  # reaped by someone else (a loop's child watcher)
        except InterruptedError:
            continue
