"""Scheduler rules with a coroutine standing in for the round (the rules are about
timers and locks, not the kernel). No timing is asserted: only orderings and counts that
follow from the rules."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from pathlib import Path

import pytest

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


def test_stop_and_shutdown_let_a_timer_round_finish() -> None:
    """Timer rounds run inline in the timer task: stopping must not cancel one that has
    started (its work would be cut off from its bookkeeping), nor start another."""

    async def main() -> None:
        entered = asyncio.Event()
        release = asyncio.Event()
        done: list[int] = []

        async def round_(reg: Registration) -> None:
            entered.set()
            await release.wait()
            done.append(reg.pid)

        s = Scheduler(round_, lambda r: Policy(interval=0.001, jitter=0), concurrency=2)
        s.start(_reg(1), first_delay=0.0)
        s.start(_reg(2), first_delay=60.0)  # asleep: cancelled at once
        await entered.wait()
        await s.shutdown()
        timers = [s.slots[1].timer, s.slots[2].timer]
        await asyncio.sleep(0.01)
        assert timers[1] is not None and timers[1].cancelled()
        assert timers[0] is not None and not timers[0].done() and done == []
        release.set()
        await asyncio.wait([timers[0]])
        assert done == [1] and not timers[0].cancelled()
        await asyncio.sleep(0.01)
        assert done == [1]  # no round after the stop
        assert s.in_flight == 0

    asyncio.run(main())


def test_stop_while_queued_behind_the_lock() -> None:
    """A timer that waits for the lock (an on-demand round holds it) is cancelled by
    stop(), and stop() waits for the on-demand round."""

    async def main() -> None:
        release = asyncio.Event()
        rounds: list[str] = []

        async def timer_round(reg: Registration) -> None:
            rounds.append("timer")

        async def on_demand() -> None:
            await release.wait()
            rounds.append("on-demand")

        s = Scheduler(timer_round, lambda r: Policy(interval=0.001, jitter=0), concurrency=1)
        slot = s.start(_reg(4), first_delay=0.02)
        demand = asyncio.create_task(s.run_exclusive(slot, on_demand))
        await asyncio.sleep(0.06)  # the timer is due, and waits for the lock
        assert rounds == [] and slot.lock.locked() and not slot.in_round
        stopper = asyncio.create_task(s.stop(4))
        await asyncio.sleep(0.01)
        assert not stopper.done()
        release.set()
        await stopper
        await demand
        assert rounds == ["on-demand"] and slot.timer is not None and slot.timer.done()

    asyncio.run(main())


def test_policy_change_wakes_a_sleeping_timer() -> None:
    async def main() -> None:
        policy = Policy(interval=3600, jitter=0)
        calls = 0

        async def round_(reg: Registration) -> None:
            nonlocal calls
            calls += 1

        s = Scheduler(round_, lambda r: policy, concurrency=1)
        reg = _reg(6)
        s.start(reg)  # a first round now, the next one an hour later
        while calls < 1:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)
        assert calls == 1 and reg.next_due is not None and reg.next_due > time.time() + 3000
        policy = Policy(interval=0.005, jitter=0)
        s.policies_changed()
        while calls < 4:
            await asyncio.sleep(0.005)
        await s.stop(6)

    asyncio.run(main())


# --- capture workers --------------------------------------------------------------------


def test_workers_hand_off() -> None:
    import threading

    from ckptd.service.workers import Workers

    async def main() -> None:
        w = Workers(2, "t-workers")
        value, name = await w.submit(lambda a, b=0: (a + b, threading.current_thread().name),
                                     1, b=2)
        assert value == 3 and name.startswith("t-workers_")
        # The kernel knows the thread by that name too (top -H, /proc/PID/task/TID/comm).
        comm = await w.submit(lambda: Path(f"/proc/self/task/{threading.get_native_id()}/comm")
                              .read_text().strip())
        assert comm.startswith("t-workers_")

        def boom() -> None:
            raise ValueError("bad")

        with pytest.raises(ValueError, match="bad"):
            await w.submit(boom)
        # A job whose awaiting task gave up still counts until it has finished.
        gate = threading.Event()
        fut = w.submit(gate.wait, 5)
        fut.cancel()
        assert w.jobs == 1
        idle = asyncio.create_task(w.wait_idle())
        await asyncio.sleep(0.01)
        assert not idle.done()
        gate.set()
        await asyncio.wait_for(idle, 5)
        assert w.jobs == 0
        # Resizing: more threads at once; fewer once the queued jobs are done.
        w.resize(3)
        assert w.size == 3
        names = await asyncio.gather(*(w.submit(
            lambda: (time.sleep(0.05), threading.current_thread().name)[1])
            for _ in range(3)))
        assert len(set(names)) == 3
        w.resize(1)
        assert await w.submit(lambda: 5) == 5
        w.shutdown(wait=True)
        assert not [t for t in threading.enumerate() if t.name.startswith("t-workers_")]

    asyncio.run(main())


def test_workers_post(caplog: pytest.LogCaptureFixture) -> None:
    """post(): no future, no call back into the loop; the job still counts for
    wait_idle(), and an exception escaping it is logged, not lost."""
    import threading

    from ckptd.service.workers import Workers

    async def main() -> None:
        w = Workers(1, "t-post")
        gate = threading.Event()
        ran: list[str] = []
        w.post(lambda: (gate.wait(30), ran.append(threading.current_thread().name)))
        assert w.jobs == 1
        idle = asyncio.create_task(w.wait_idle())
        await asyncio.sleep(0.01)
        assert not idle.done()
        gate.set()
        await asyncio.wait_for(idle, 30)
        assert w.jobs == 0 and ran and ran[0].startswith("t-post_")

        def boom() -> None:
            raise ValueError("lost?")

        w.post(boom)
        await asyncio.wait_for(w.wait_idle(), 30)
        assert await w.submit(lambda: 6) == 6  # the thread lives on
        w.shutdown(wait=True)

    caplog.set_level("ERROR", logger="ckptd.service.workers")
    asyncio.run(main())
    records = [r for r in caplog.records if r.name == "ckptd.service.workers"]
    assert len(records) == 1 and records[0].levelname == "ERROR"
    assert records[0].exc_info is not None and "lost?" in str(records[0].exc_info[1])
