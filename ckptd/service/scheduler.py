"""Per-process snapshot timers.

Rules:
- Each registered process has one timer task. Round k is due at base_k plus a random
  jitter in [0, jitter * interval]; base_{k+1} = base_k + interval.
- One process never has two rounds at once: timer rounds and on-demand rounds take the
  same per-process lock.
- A round that ends after its next base has overrun: it is counted, and the next base
  moves to the end of that round (the schedule slides instead of bursting to catch up).
- At most `concurrency` rounds run at once, over all processes (a semaphore).
- A round, once started, is never cut short: stopping a process, or the service, waits
  for its round in flight (the service bounds that wait with its shutdown grace).

The round itself is a coroutine supplied by the service, so the timing rules are tested
without a kernel.

Cost: every registered process goes through this loop once per interval, so it is kept
lean. A timer sleeps on one future that a loop timer resolves (asyncio.wait_for would
create a task per sleep, and cancel and await it on every timeout), and runs its rounds
inline instead of in a task of their own: a timer is therefore never cancelled while a
round runs (`stop` and `shutdown` let it finish and exit). On-demand rounds
(`run_exclusive`) do run in their own task, so that a client going away never cuts one
short.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .config import Policy
from .registry import Registration

log = logging.getLogger("ckptd.service.scheduler")

T = TypeVar("T")
RoundFn = Callable[[Registration], Awaitable[Any]]


@dataclass(eq=False)
class Slot:
    reg: Registration
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    timer: asyncio.Task[None] | None = None
    current: asyncio.Task[Any] | None = None  # the latest on-demand round
    in_round: bool = False  # the timer is running a round: let it finish, do not cancel
    stopped: bool = False  # the timer exits instead of planning another round
    sleeping: asyncio.Future[bool] | None = None  # the timer's sleep, to wake it early


class _Stopped(Exception):
    """A timer's round found the timer stopped once it got the lock: not run."""


def _wake(fut: asyncio.Future[bool], due: bool) -> None:
    if not fut.done():
        fut.set_result(due)


class Scheduler:
    def __init__(
        self,
        run_round: RoundFn,
        policy_of: Callable[[Registration], Policy],
        concurrency: int,
        on_overrun: Callable[[Registration], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._run_round = run_round
        self._policy_of = policy_of
        self._on_overrun = on_overrun
        self._rng = rng or random.Random()
        self.sem = asyncio.Semaphore(concurrency)
        self.concurrency = concurrency
        self.slots: dict[int, Slot] = {}
        self.in_flight = 0

    def set_concurrency(self, n: int) -> None:
        """Rounds already holding the old semaphore release it; new rounds use this one."""
        if n != self.concurrency:
            self.concurrency = n
            self.sem = asyncio.Semaphore(n)

    def start(self, reg: Registration, first_delay: float | None = None) -> Slot:
        slot = Slot(reg)
        self.slots[reg.pid] = slot
        slot.timer = asyncio.create_task(self._timer(slot, first_delay), name=f"timer-{reg.pid}")
        return slot

    def _halt(self, slot: Slot) -> None:
        """No more timer rounds: a sleeping or queued timer is cancelled; one in a round
        finishes it, then exits."""
        slot.stopped = True
        timer = slot.timer
        if timer is not None and not slot.in_round and timer is not asyncio.current_task():
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

    async def _exclusive(self, slot: Slot, fn: Callable[[], Awaitable[T]],
                         timer: bool = False) -> T:
        """Run `fn` as a round of slot's process: under its lock and the global limit.
        A timer's round raises _Stopped if the timer was stopped while it queued."""
        async with slot.lock, self.sem:
            if timer:
                if slot.stopped:
                    raise _Stopped
                slot.in_round = True
            reg = slot.reg
            reg.in_flight += 1
            self.in_flight += 1
            if reg.in_flight > reg.max_in_flight:
                reg.max_in_flight = reg.in_flight
            try:
                return await fn()
            finally:
                reg.in_flight -= 1
                self.in_flight -= 1
                if timer:
                    slot.in_round = False

    async def run_exclusive(self, slot: Slot, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn` as a round of slot's process: under its lock and the global limit.
        The round runs in its own task, so cancelling the caller never cuts it short."""
        task = asyncio.create_task(self._exclusive(slot, fn), name=f"round-{slot.reg.pid}")
        slot.current = task
        return await asyncio.shield(task)

    async def _timer(self, slot: Slot, first_delay: float | None) -> None:
        loop = asyncio.get_running_loop()
        reg = slot.reg
        round_fn = functools.partial(self._run_round, reg)  # one per timer, not per round
        prev_base: float | None = None  # slot time of the previous round
        prev_end = loop.time()
        pending_first = first_delay
        streak = 0
        while not slot.stopped:
            frac = self._rng.random()
            # Sleep until due. A policy change (reload, re-register) wakes the timer to
            # re-plan with the new interval, counted from the previous slot.
            while True:
                pol = self._policy_of(reg)
                # One interval after the previous slot; if that has passed while the
                # round ran, the schedule slides to its end (no burst of catch-ups).
                base = (prev_end if prev_base is None
                        else max(prev_base + pol.interval, prev_end))
                offset = (pending_first if pending_first is not None
                          else frac * pol.jitter * pol.interval)
                due = base + offset
                delay = due - loop.time()
                reg.next_due = time.time() + max(0.0, delay)
                if delay <= 0:
                    break
                sleep = slot.sleeping = loop.create_future()
                handle = loop.call_at(due, _wake, sleep, True)
                try:
                    # True: the loop timer fired (it may be a fraction of a millisecond
                    # early; that counts as due). False: woken to re-plan.
                    if await sleep:
                        break
                finally:
                    handle.cancel()
                    slot.sleeping = None
            pending_first = None
            called = loop.time()
            try:
                await self._exclusive(slot, round_fn, timer=True)
            except _Stopped:
                return
            except Exception:
                # The service's round reports its own failures; anything reaching here is
                # a bug in it. Log with context and keep the schedule alive.
                log.exception("pid %d: round failed unexpectedly", reg.pid)
            prev_end = loop.time()
            prev_base = base
            pol = self._policy_of(reg)
            # Overrun: waiting for a free slot plus the round took longer than the interval.
            # Logged when a streak starts and when it ends, not on every round.
            if prev_end - called > pol.interval:
                reg.overruns += 1
                streak += 1
                if self._on_overrun is not None:
                    self._on_overrun(reg)
                if streak == 1:
                    log.warning("pid %d: round took %.3gs, over its %.3gs interval; starts "
                                "move later until rounds fit again", reg.pid,
                                prev_end - called, pol.interval)
            elif streak:
                log.info("pid %d: back on schedule after %d overrun round(s)", reg.pid, streak)
                streak = 0

    def policies_changed(self) -> None:
        """Re-plan every sleeping timer with the current policies."""
        for slot in self.slots.values():
            if slot.sleeping is not None:
                _wake(slot.sleeping, False)

    async def shutdown(self) -> None:
        """Stop all timers. Rounds in flight run to their end; the caller waits for them
        (with its grace) through what they run in its worker threads."""
        for slot in self.slots.values():
            self._halt(slot)

    def rounds_in_flight(self) -> list[asyncio.Task[Any]]:
        out: list[asyncio.Task[Any]] = []
        for s in self.slots.values():
            if s.in_round and s.timer is not None:
                out.append(s.timer)
            if s.current is not None and not s.current.done():
                out.append(s.current)
        return out
