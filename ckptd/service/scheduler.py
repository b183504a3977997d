"""Per-process snapshot timers.

Rules:
- Each registered process has one timer task. Round k is due at base_k plus a random
  jitter in [0, jitter * interval]; base_{k+1} = base_k + interval.
- One process never has two rounds at once: timer rounds and on-demand rounds take the
  same per-process lock.
- A round that ends after its next base has overrun: it is counted, and the next base
  moves to the end of that round (the schedule slides instead of bursting to catch up).
- At most `concurrency` rounds run at once, over all processes (a semaphore).

The round itself is a coroutine supplied by the service, so the timing rules are tested
without a kernel.
"""

from __future__ import annotations

import asyncio
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


@dataclass
class Slot:
    reg: Registration
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    timer: asyncio.Task[None] | None = None
    current: asyncio.Task[Any] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)


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

    async def stop(self, pid: int) -> Slot | None:
        """Stop the timer; wait for a round in flight (unless called from it)."""
        slot = self.slots.pop(pid, None)
        if slot is None:
            return None
        me = asyncio.current_task()
        if slot.timer is not None and slot.timer is not me:
            slot.timer.cancel()
        if slot.current is not None and slot.current is not me and not slot.current.done():
            # Wait without taking its result: the round's owner reports its outcome.
            await asyncio.wait({slot.current})
        return slot

    async def run_exclusive(self, slot: Slot, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn` as a round of slot's process: under its lock and the global limit.
        The round runs in its own task, so cancelling the caller never cuts it short."""

        async def guarded() -> T:
            async with slot.lock:
                sem = self.sem
                async with sem:
                    slot.reg.in_flight += 1
                    self.in_flight += 1
                    slot.reg.max_in_flight = max(slot.reg.max_in_flight, slot.reg.in_flight)
                    try:
                        return await fn()
                    finally:
                        slot.reg.in_flight -= 1
                        self.in_flight -= 1

        task = asyncio.create_task(guarded(), name=f"round-{slot.reg.pid}")
        slot.current = task
        return await asyncio.shield(task)

    async def _timer(self, slot: Slot, first_delay: float | None) -> None:
        loop = asyncio.get_running_loop()
        reg = slot.reg
        prev_base: float | None = None  # slot time of the previous round
        prev_end = loop.time()
        pending_first = first_delay
        streak = 0
        while True:
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
                delay = base + offset - loop.time()
                reg.next_due = time.time() + max(0.0, delay)
                if delay <= 0:
                    break
                slot.wake.clear()
                try:
                    await asyncio.wait_for(slot.wake.wait(), delay)
                except TimeoutError:
                    break
            pending_first = None
            called = loop.time()
            try:
                await self.run_exclusive(slot, lambda: self._run_round(reg))
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
            slot.wake.set()

    async def shutdown(self) -> None:
        """Cancel all timers (rounds in flight are left to the caller to wait for)."""
        for slot in self.slots.values():
            if slot.timer is not None:
                slot.timer.cancel()

    def rounds_in_flight(self) -> list[asyncio.Task[Any]]:
        return [s.current for s in self.slots.values()
                if s.current is not None and not s.current.done()]
