"""Threads that run the service's snapshot rounds for the event loop.

Why not loop.run_in_executor: every call there builds a concurrent.futures.Future (with
its own Condition and RLock), a work item, an asyncio future chained to it through two
callbacks, and the caller's shield. At 100 rounds a second that machinery was a large
part of what the service added to the engine's own work. Here a call is one queue put on
the way in and one call_soon_threadsafe on the way out, which resolves a plain asyncio
future; the threads live as long as the service. A job nobody awaits (`post`, the
scheduler's timer rounds) has no way out at all: the event loop does not wake for it.

The pool counts the jobs it has not finished, independently of the futures it returns,
so a caller that stops waiting (a cancelled task) cannot hide a job still running from
`wait_idle()`, which the service's shutdown grace relies on. The count changes under a
lock: posted jobs leave it from their worker thread, which wakes the loop only when
`wait_idle()` is waiting for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ..kernel.syscalls import name_os_thread

log = logging.getLogger("ckptd.service.workers")
T = TypeVar("T")

# (loop, future, fn, args, kwargs); the future is None for a posted job.
_Item = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any] | None",
              Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class Workers:
    """`size` threads taking jobs in submission order. `submit`, `post`, `resize` and
    `wait_idle` must be called on the thread of one event loop (the loop of the first
    submit or post, or a later one once that loop is closed)."""

    def __init__(self, size: int, name: str,
                 on_idle: Callable[[], None] | None = None) -> None:
        """`on_idle`: called in a worker thread after a job when no job is queued, and
        before the thread exits; a job counts as finished only after it (the capture
        pool publishes its staged rounds there: see Engine.flush)."""
        self._name = name
        self._on_idle = on_idle
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._size = 0
        self._started = 0  # for thread names
        self.jobs = 0  # submitted or posted, and not yet finished (under _count_lock)
        self._count_lock = threading.Lock()
        self._idle: list[asyncio.Future[None]] = []  # wait_idle() callers (under the lock)
        self._loop: asyncio.AbstractEventLoop | None = None  # of the first submit
        self.resize(size)

    @property
    def size(self) -> int:
        return self._size

    def resize(self, size: int) -> None:
        """Start threads, or retire some once they finish the jobs already queued."""
        if size < 1:
            raise ValueError("a worker pool needs at least one thread")
        while self._size < size:
            t = threading.Thread(target=self._work, name=f"{self._name}_{self._started}",
                                 daemon=True)
            self._started += 1
            t.start()
            self._threads.append(t)
            self._size += 1
        while self._size > size:
            self._queue.put(None)  # the next thread to take it exits
            self._size -= 1
        self._threads = [t for t in self._threads if t.is_alive()]

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        """Run fn(*args, **kwargs) in a worker; the future holds its result or exception.
        Cancelling the future does not stop the call."""
        loop = self._get_loop()
        fut: asyncio.Future[T] = loop.create_future()
        with self._count_lock:
            self.jobs += 1
        self._queue.put((loop, fut, fn, args, kwargs))
        return fut

    def post(self, fn: Callable[..., object], *args: Any) -> None:
        """Run fn(*args) in a worker, and nothing else: no future, no call back into the
        event loop. fn reports its own outcome; an exception escaping it is logged."""
        loop = self._get_loop()  # for waking wait_idle()
        with self._count_lock:
            self.jobs += 1
        self._queue.put((loop, None, fn, args, {}))

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or loop.is_closed():
            # Asked once, not per call: asyncio.get_running_loop() makes a getpid()
            # system call each time (it checks for a fork).
            loop = self._loop = asyncio.get_running_loop()
        return loop

    async def wait_idle(self) -> None:
        """Return once no job is queued or running."""
        with self._count_lock:
            if not self.jobs:
                return
            fut = asyncio.get_running_loop().create_future()
            self._idle.append(fut)
        await fut

    def shutdown(self, wait: bool = True) -> None:
        """Stop every thread after the jobs already queued."""
        for _ in range(self._size):
            self._queue.put(None)
        self._size = 0
        if wait:
            for t in self._threads:
                t.join()
        self._threads = []

    def _done(self) -> list[asyncio.Future[None]]:
        """In a worker, after each job: count it out; the wait_idle() callers to wake."""
        with self._count_lock:
            self.jobs -= 1
            if self.jobs or not self._idle:
                return []
            idle, self._idle = self._idle, []
            return idle

    @staticmethod
    def _finished(fut: asyncio.Future[Any] | None, ok: bool, value: Any,
                  idle: list[asyncio.Future[None]]) -> None:
        # On the loop's thread.
        if fut is not None and not fut.done():
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
        for w in idle:
            if not w.done():
                w.set_result(None)

    def _idle_hook(self) -> None:
        if self._on_idle is None:
            return
        try:
            self._on_idle()
        except Exception:
            log.exception("%s: the idle hook failed", self._name)

    def _work(self) -> None:
        name_os_thread()
        get, get_nowait = self._queue.get, self._queue.get_nowait
        hooked = True  # the idle hook has run since this thread's last job
        while True:
            try:
                item = get_nowait()
            except queue.Empty:
                if not hooked:
                    # Another thread took the job this one saw queued after its own: run
                    # the hook before sleeping (a capture thread's staged rounds hold
                    # locks that others may be waiting for).
                    self._idle_hook()
                    hooked = True
                item = get()
            if item is None:
                self._idle_hook()
                return
            loop, fut, fn, args, kwargs = item
            del item
            try:
                value, ok = fn(*args, **kwargs), True
            except BaseException as exc:  # handed to the awaiting task, which re-raises it
                value, ok = exc, False
                if fut is None:  # posted: nobody awaits it
                    log.error("posted job %r failed", fn, exc_info=exc)
            hooked = self._queue.empty()
            if hooked:
                self._idle_hook()
            idle = self._done()
            if fut is not None or idle:
                with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                    loop.call_soon_threadsafe(self._finished, fut, ok, value, idle)
            # Drop references before blocking: the result must not outlive its round.
            del loop, fut, fn, args, kwargs, value, idle
