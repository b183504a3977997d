"""Threads that run the service's snapshot rounds for the event loop.

Why not loop.run_in_executor: every call there builds a concurrent.futures.Future (with
its own Condition and RLock), a work item, an asyncio future chained to it through two
callbacks, and the caller's shield. At 100 rounds a second that machinery was a large
part of what the service added to the engine's own work. Here a call is one queue put on
the way in and one call_soon_threadsafe on the way out, which resolves a plain asyncio
future; the threads live as long as the service.

The pool counts the jobs it has not finished, independently of the futures it returns,
so a caller that stops waiting (a cancelled task) cannot hide a job still running from
`wait_idle()`, which the service's shutdown grace relies on.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ..kernel.syscalls import name_os_thread

T = TypeVar("T")

_Item = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any],
              tuple[Any, ...], dict[str, Any]]


class Workers:
    """`size` threads taking jobs in submission order. `submit`, `resize` and
    `wait_idle` must be called on the thread of one event loop (the loop of the first
    submit, or a later one once that loop is closed)."""

    def __init__(self, size: int, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._size = 0
        self._started = 0  # for thread names
        self.jobs = 0  # submitted and not yet finished (counted on the loop's thread)
        self._idle: list[asyncio.Future[None]] = []
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
        loop = self._loop
        if loop is None or loop.is_closed():
            # Asked once, not per call: asyncio.get_running_loop() makes a getpid()
            # system call each time (it checks for a fork).
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self.jobs += 1
        self._queue.put((loop, fut, fn, args, kwargs))
        return fut

    async def wait_idle(self) -> None:
        """Return once no job is queued or running."""
        if self.jobs:
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

    def _finished(self, fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
        # On the loop's thread: one callback per job, whatever became of its future.
        self.jobs -= 1
        if not fut.done():
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
        if not self.jobs and self._idle:
            idle, self._idle = self._idle, []
            for w in idle:
                if not w.done():
                    w.set_result(None)

    def _work(self) -> None:
        name_os_thread()
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                return
            loop, fut, fn, args, kwargs = item
            del item
            try:
                value, ok = fn(*args, **kwargs), True
            except BaseException as exc:  # handed to the awaiting task, which re-raises it
                value, ok = exc, False
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                loop.call_soon_threadsafe(self._finished, fut, ok, value)
            # Drop references before blocking: the result must not outlive its round.
            del loop, fut, fn, args, kwargs, value
