"""Per-process snapshot timers.

Rules:
- Each registered process has one timer task. Round k is due at base_k plus a random
  jitter in [0, jitter * interval], rounded up to a multiple of the batch window when
  there is one; base_{k+1} = base_k + interval.
- The batch window (the service's `batch_window`) makes the rounds of many processes
  come due at the same instants, so that their timers fire in one wake-up of the loop and
  the rounds run back to back in a capture thread, which then finds its caches warm
  from the round before. Rounding moves a start later by less than the window; it never
  moves the bases, so a process's rounds stay one interval apart on average.
- One process never has two rounds at once: a timer starts its next round only once its
  previous one has ended, and timer rounds and on-demand rounds take the same
  per-process lock to start (an on-demand round holds it to its end, and first waits
  for a timer round in flight).
- A round that ends after its next base moves that base to its end (the schedule slides
  instead of bursting to catch up). It has overrun when waiting for a free slot plus the
  round took longer than the interval: that is counted.
- At most `concurrency` rounds run at once, over all processes (a semaphore; or, for
  rounds posted to threads, a pool of that many threads).
- A round, once started, is never cut short: stopping a process, or the service, waits
  for its round in flight (the service bounds that wait with its shutdown grace).

The round itself is supplied by the service, so the timing rules are tested without a
kernel. It is either a coroutine function, whose timer rounds each run in a task under
the semaphore, or, given `post`, a plain function, whose timer rounds are posted to run
in a thread (the service's capture workers).

Cost: every registered process goes through this loop once per interval, so it is kept
lean. A timer hands its round off and goes straight back to sleep until the next one is
due: the event loop wakes once per round, for the timer. The round's end is recorded by
whoever ends it (the worker thread, for posted rounds), with the overrun accounting, and
wakes the loop only if something waits for that round: its timer finding it still
running when the next round is due, an on-demand round of the same process, or a stop.
A timer sleeps on one future that a loop timer resolves (asyncio.wait_for would create a
task per sleep, and cancel and await it on every timeout). A timer is never cancelled
while its round is in flight: `stop` and `shutdown` wake it, and it exits once the round
has ended. On-demand rounds (`run_exclusive`) run in their own task, so that a client
going away never cuts one short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .config import Policy
from .registry import Registration

log = logging.getLogger("ckptd.service.scheduler")

T = TypeVar("T")
# A coroutine function, or, for a Scheduler given `post`, a plain function.
RoundFn = Callable[[Registration], Any]
# post(fn, *args): run fn(*args) in one of `concurrency` threads (workers.Workers.post).
PostFn = Callable[..., None]


class Stopped(Exception):
    """An on-demand round was refused: the scheduler is stopping."""


@dataclass(eq=False)
class Slot:
    reg: Registration
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    timer: asyncio.Task[None] | None = None
    current: asyncio.Task[Any] | None = None  # the latest on-demand round
    stopped: bool = False  # the timer exits instead of planning another round
    sleeping: asyncio.Future[bool] | None = None  # the timer's sleep, to wake it early
    round_task: asyncio.Task[None] | None = None  # a timer round run as a task
    # Shared with the thread that ends a timer round, under Scheduler._mutex:
    in_round: bool = False  # the timer's round is in flight: let it end, do not cancel
    called: float = 0.0  # time.monotonic() when the round in flight was due
    ended: float = 0.0  # time.monotonic() when the timer's last round ended
    waiters: list[asyncio.Future[None]] | None = None  # woken when the round ends
    streak: int = 0  # overruns in a row (written only by the code ending a round)


def batched(due: float, window: float) -> float:
    """`due` rounded up to a multiple of `window` (0: unchanged). A multiple that floating
    point puts a hair before `due` is taken as it is: the timer then fires at once."""
    if window <= 0:
        return due
    return math.ceil(due / window) * window


def _wake(fut: asyncio.Future[bool], due: bool) -> None:
    if not fut.done():
        fut.set_result(due)


def _wake_all(futs: list[asyncio.Future[None]]) -> None:
    for f in futs:
        if not f.done():
            f.set_result(None)


class Scheduler:
    def __init__(
        self,
        run_round: RoundFn,
        policy_of: Callable[[Registration], Policy],
        concurrency: int,
        on_overrun: Callable[[Registration], None] | None = None,
        rng: random.Random | None = None,
        *,
        post: PostFn | None = None,
        batch_window: float = 0.0,
    ) -> None:
        """With `post`, on_overrun and policy_of are called in the thread that ends a
        timer round (they must be safe there)."""
        self._run_round = run_round
        self._policy_of = policy_of
        self._on_overrun = on_overrun
        self._rng = rng or random.Random()
        self._post = post
        # Due times are rounded up to a multiple of this (0: not rounded); see the rules.
        # Set it, then call policies_changed(), to re-plan the sleeping timers.
        self.batch_window = batch_window
        self.sem = asyncio.Semaphore(concurrency)
        self.concurrency = concurrency
        self.slots: dict[int, Slot] = {}
        # Rounds started and not ended: timer rounds from their hand-off (waiting for a
        # free slot included), on-demand rounds once they hold the semaphore.
        self.in_flight = 0
        self._mutex = threading.Lock()  # slots' round state and the in-flight counts
        self._loop: asyncio.AbstractEventLoop | None = None
        # Refuse on-demand rounds that have not started (see the rules). Set on the loop.
        self.stopping = False
        # On-demand rounds not over yet (their tasks), for a shutdown to wait for.
        self.on_demand: set[asyncio.Task[Any]] = set()

    def set_concurrency(self, n: int) -> None:
        """Rounds already holding the old semaphore release it; new rounds use this one.
        (Posted rounds are bounded by the pool, which the service resizes.)"""
        if n != self.concurrency:
            self.concurrency = n
            self.sem = asyncio.Semaphore(n)

    def start(self, reg: Registration, first_delay: float | None = None) -> Slot:
        self._loop = asyncio.get_running_loop()
        slot = Slot(reg, ended=time.monotonic())
        self.slots[reg.pid] = slot
        slot.timer = asyncio.create_task(self._timer(slot, first_delay), name=f"timer-{reg.pid}")
        return slot

    def _halt(self, slot: Slot) -> None:
        """No more timer rounds: a sleeping or queued timer is cancelled; one whose round
        is in flight is woken, and exits once that round has ended."""
        slot.stopped = True
        timer = slot.timer
        if timer is None or timer is asyncio.current_task():
            return
        if slot.in_round:  # only its end, in any thread, clears it: the timer must wait
            if slot.sleeping is not None:
                _wake(slot.sleeping, False)
        else:
            timer.cancel()

    async def stop(self, pid: int) -> Slot | None:
        """Stop the timer; wait for a round in flight (unless called from it)."""
        slot = self.slots.pop(pid, None)
        if slot is None:
            return None
        self._halt(slot)
        me = asyncio.current_task()
        # Wait without taking results: the rounds' owners report their outcomes.
        waits = {t for t in (slot.timer, slot.current)
                 if t is not None and t is not me and not t.done()}
        if waits:
            await asyncio.wait(waits)
        return slot

    # --- the state of a round, shared with the thread that ends it ----------------------

    def _count_in(self, reg: Registration) -> None:
        # Under self._mutex.
        reg.in_flight += 1
        self.in_flight += 1
        if reg.in_flight > reg.max_in_flight:
            reg.max_in_flight = reg.in_flight

    def _count_out(self, reg: Registration) -> None:
        # Under self._mutex.
        reg.in_flight -= 1
        self.in_flight -= 1

    async def _round_over(self, slot: Slot) -> None:
        """Return once the timer's round in flight, if any, has ended."""
        assert self._loop is not None
        while True:
            with self._mutex:
                if not slot.in_round:
                    return
                fut: asyncio.Future[None] = self._loop.create_future()
                if slot.waiters is None:
                    slot.waiters = []
                slot.waiters.append(fut)
            await fut

    def _hand_off(self, slot: Slot, called: float) -> bool:
        """Start the timer's round, due since `called`, unless the timer has been
        stopped (False). The round ends in _ended."""
        if slot.stopped:
            return False
        reg = slot.reg
        with self._mutex:
            slot.in_round = True
            slot.called = called
            self._count_in(reg)
        try:
            if self._post is not None:
                self._post(self._thread_round, slot)
            else:
                slot.round_task = asyncio.create_task(self._task_round(slot),
                                                      name=f"round-{reg.pid}")
        except BaseException:
            self._ended(slot, None, ran=False)
            raise
        return True

    def _thread_round(self, slot: Slot) -> None:
        # In a worker thread. A round that has not begun when its timer is stopped (it
        # waited for a free thread) is not run: not begun, it cannot be cut short.
        if slot.stopped:
            self._ended(slot, None, ran=False)
            return
        error: Exception | None = None
        try:
            self._run_round(slot.reg)
        except Exception as exc:
            error = exc
        finally:
            self._ended(slot, error)

    async def _task_round(self, slot: Slot) -> None:
        error: Exception | None = None
        ran = False
        try:
            async with self.sem:
                if not slot.stopped:
                    ran = True
                    await self._run_round(slot.reg)
        except Exception as exc:
            error = exc
        finally:
            self._ended(slot, error, ran)

    def _ended(self, slot: Slot, error: Exception | None, ran: bool = True) -> None:
        """The timer's round has ended (in whatever thread ended it): log a failure,
        count an overrun, record the end, and wake the loop if anything waits for it."""
        reg = slot.reg
        end = time.monotonic()
        try:
            if error is not None:
                # The service's round reports its own failures; anything reaching here
                # is a bug in it. Log with context; the schedule goes on.
                log.error("pid %d: round failed unexpectedly", reg.pid, exc_info=error)
            if ran:
                self._account(slot, end - slot.called)
        finally:  # whatever happened above, the round is over: never leave it in flight
            with self._mutex:
                slot.ended = end
                slot.in_round = False
                self._count_out(reg)
                waiters, slot.waiters = slot.waiters, None
            if waiters and self._loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                    self._loop.call_soon_threadsafe(_wake_all, waiters)

    def _account(self, slot: Slot, took: float) -> None:
        """Overrun: waiting for a free slot plus the round took longer than the
        interval. Logged when a streak starts and when it ends, not on every round."""
        reg = slot.reg
        interval = self._policy_of(reg).interval
        if took > interval:
            reg.overruns += 1
            slot.streak += 1
            if self._on_overrun is not None:
                self._on_overrun(reg)
            if slot.streak == 1:
                log.warning("pid %d: round took %.3gs, over its %.3gs interval; starts "
                            "move later until rounds fit again", reg.pid, took, interval)
        elif slot.streak:
            log.info("pid %d: back on schedule after %d overrun round(s)", reg.pid,
                     slot.streak)
            slot.streak = 0

    # --- rounds -------------------------------------------------------------------------

    async def _exclusive(self, slot: Slot, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn` as a round of slot's process: under its lock, after a timer round in
        flight, and under the global limit."""
        async with slot.lock:
            await self._round_over(slot)  # the timer cannot start one while we hold the lock
            async with self.sem:
                # Checked here, not only when the round was asked for: it may have waited
                # for a timer round or a free slot past the start of a shutdown, which
                # then closes what the round would use.
                if self.stopping:
                    raise Stopped("the service is stopping")
                reg = slot.reg
                with self._mutex:
                    self._count_in(reg)
                try:
                    return await fn()
                finally:
                    with self._mutex:
                        self._count_out(reg)

    async def run_exclusive(self, slot: Slot, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn` as a round of slot's process: under its lock and the global limit.
        The round runs in its own task, so cancelling the caller never cuts it short."""
        return await asyncio.shield(self.start_exclusive(slot, fn))

    def start_exclusive(self, slot: Slot, fn: Callable[[], Awaitable[T]]) -> asyncio.Task[T]:
        """run_exclusive's round, started: its task, for a caller that must act once the
        round is over, whether or not it still waits for it. Stopped if stopping."""
        self._loop = asyncio.get_running_loop()
        if self.stopping:
            raise Stopped("the service is stopping")
        task = asyncio.create_task(self._exclusive(slot, fn), name=f"round-{slot.reg.pid}")
        slot.current = task
        self.on_demand.add(task)
        task.add_done_callback(self.on_demand.discard)
        return task

    async def _timer(self, slot: Slot, first_delay: float | None) -> None:
        loop = asyncio.get_running_loop()
        reg = slot.reg
        prev_base: float | None = None  # slot time of the previous round
        pending_first = first_delay
        while True:
            frac = self._rng.random()
            fired: float | None = None  # the due time a loop timer fired for
            # Plan, then sleep until due. A policy change (reload, re-register) wakes the
            # timer to re-plan with the new interval, counted from the previous slot.
            while True:
                if slot.stopped:
                    await self._round_over(slot)  # the round in flight ends first
                    return
                with self._mutex:  # in_round only goes from True to False behind our back
                    running, ended = slot.in_round, slot.ended
                pol = self._policy_of(reg)
                # One interval after the previous slot; if that has passed when the
                # previous round ended, the schedule slides to its end (no burst of
                # catch-ups). While it runs, that end is not known yet: plan as if it
                # ended in time, and look again when the round is due.
                if prev_base is None:
                    base = ended  # the timer's start
                elif running:
                    base = prev_base + pol.interval
                else:
                    base = max(prev_base + pol.interval, ended)
                offset = (pending_first if pending_first is not None
                          else frac * pol.jitter * pol.interval)
                due = base + offset
                due = batched(due, self.batch_window)
                now = time.monotonic()
                reg.next_due = time.time() + max(0.0, due - now)
                # A loop timer may fire a fraction of a millisecond early: that counts
                # as due, if the plan has not moved since.
                if due <= now or (fired is not None and due <= fired):
                    if not running:
                        break
                    # Due while the previous round still runs (it may overrun): wait for
                    # its end, then plan again from it.
                    await self._round_over(slot)
                    continue
                sleep = slot.sleeping = loop.create_future()
                handle = loop.call_later(due - now, _wake, sleep, True)
                try:
                    # True: the loop timer fired. False: woken to re-plan (or to stop).
                    fired = due if await sleep else None
                finally:
                    handle.cancel()
                    slot.sleeping = None
            pending_first = None
            called = time.monotonic()
            async with slot.lock:  # an on-demand round holds it while it runs
                if not self._hand_off(slot, called):
                    return  # stopped while it waited for the lock
            prev_base = base

    def policies_changed(self) -> None:
        """Re-plan every sleeping timer with the current policies."""
        for slot in self.slots.values():
            if slot.sleeping is not None:
                _wake(slot.sleeping, False)

    async def shutdown(self) -> None:
        """Stop all timers and refuse on-demand rounds not started yet. Rounds in flight
        run to their end; the caller waits for them (with its grace) through what they
        run in its worker threads, and through `on_demand`."""
        self.stopping = True
        for slot in self.slots.values():
            self._halt(slot)
