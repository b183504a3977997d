"""Scheduler rules with a coroutine standing in for the round (the rules are about
timers and locks, not the kernel). No timing is asserted: only orderings and counts that
follow from the rules."""

from __future__ import annotations

import asyncio
import itertools
import random

from ckptd.service.config import Policy, PolicyOverride
from ckptd.service.registry import Registration, RegistrationRecord
from ckptd.service.scheduler import Scheduler


def _reg(pid: int) -> Registration:
    rec = RegistrationRecord(pid=pid, start_time=1, uid=0, registered_by=0,
                             registered_at=0.0, policy=PolicyOverride())
    return Registration(record=rec, pidfd=-1, closed=True)


def test_no_overlap_and_global_limit() -> None:
    async def main() -> None:
        running: dict[int, int] = {}
        peak = 0
        rounds: dict[int, int] = {}
        policy = Policy(interval=0.01, jitter=0.5)

        async def round_(reg: Registration) -> None:
            nonlocal peak
            running[reg.pid] = running.get(reg.pid, 0) + 1
            assert running[reg.pid] == 1, "two rounds of one process at once"
            peak = max(peak, sum(running.values()))
            await asyncio.sleep(random.uniform(0, 0.02))
            rounds[reg.pid] = rounds.get(reg.pid, 0) + 1
            running[reg.pid] -= 1

        s = Scheduler(round_, lambda r: policy, concurrency=3, rng=random.Random(1))
        regs = [_reg(p) for p in range(1, 11)]
        for r in regs:
            s.start(r, first_delay=0.0)
        # Extra on-demand rounds race with the timers on the same processes.
        for _ in range(5):
            await asyncio.gather(*(s.run_exclusive(s.slots[r.pid], lambda r=r: round_(r))
                                   for r in regs))
        while min(rounds.get(r.pid, 0) for r in regs) < 10:
            await asyncio.sleep(0.01)
        for r in regs:
            await s.stop(r.pid)
        assert peak <= 3
        assert all(r.max_in_flight == 1 for r in regs)
        assert s.in_flight == 0

    asyncio.run(main())


def test_overrun_counted_and_schedule_slides() -> None:
    async def main() -> None:
        starts: list[float] = []
        loop = asyncio.get_running_loop()
        policy = Policy(interval=0.01, jitter=0.0)

        async def slow(reg: Registration) -> None:
            starts.append(loop.time())
            await asyncio.sleep(0.05)  # five intervals

        overruns: list[int] = []
        s = Scheduler(slow, lambda r: policy, concurrency=1,
                      on_overrun=lambda r: overruns.append(r.pid))
        reg = _reg(7)
        s.start(reg, first_delay=0.0)
        while len(starts) < 4:
            await asyncio.sleep(0.01)
        await s.stop(7)
        assert reg.overruns >= 3 and overruns == [7] * reg.overruns
        # The schedule slides: a round never starts before the previous one ended,
        # and there is no burst of catch-up rounds.
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert all(g >= 0.049 for g in gaps)

    asyncio.run(main())


def test_stop_waits_for_round_in_flight() -> None:
    async def main() -> None:
        entered = asyncio.Event()
        release = asyncio.Event()
        done: list[int] = []

        async def round_(reg: Registration) -> None:
            entered.set()
            await release.wait()
            done.append(reg.pid)

        s = Scheduler(round_, lambda r: Policy(interval=60), concurrency=2)
        s.start(_reg(3), first_delay=0.0)
        await entered.wait()
        stopper = asyncio.create_task(s.stop(3))
        await asyncio.sleep(0)
        assert not stopper.done()
        release.set()
        await stopper
        assert done == [3] and 3 not in s.slots

    asyncio.run(main())


def test_failing_round_keeps_schedule() -> None:
    async def main() -> None:
        calls = 0

        async def bad(reg: Registration) -> None:
            nonlocal calls
            calls += 1
            raise RuntimeError("bug")

        s = Scheduler(bad, lambda r: Policy(interval=0.001, jitter=0), concurrency=1)
        s.start(_reg(5), first_delay=0.0)
        while calls < 3:
            await asyncio.sleep(0.005)
        await s.stop(5)

    asyncio.run(main())


def test_set_concurrency() -> None:
    async def main() -> None:
        s = Scheduler(lambda r: asyncio.sleep(0), lambda r: Policy(), concurrency=2)
        old = s.sem
        s.set_concurrency(2)
        assert s.sem is old
        s.set_concurrency(4)
        assert s.sem is not old and s.concurrency == 4

    asyncio.run(main())
