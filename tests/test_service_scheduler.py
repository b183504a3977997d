"""Scheduler rules with a coroutine standing in for the round (the rules are about
timers and locks, not the kernel). No timing is asserted: only orderings and counts that
follow from the rules."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ckptd.service.config import Policy, PolicyOverride
from ckptd.service.registry import Registration, RegistrationRecord
from ckptd.service.scheduler import Scheduler, Stopped, batched
from ckptd.service.scheduler import _wake as scheduler_wake


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



def test_batch_window_aligns_due_times() -> None:
    """With a batch window, every timer sleeps until a multiple of the window, whatever
    its process's phase and jitter, so the rounds of many processes come due together;
    and the rules still hold (no overlap, every process keeps getting rounds)."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        window = 0.05
        targets: list[float] = []
        real_call_later = loop.call_later

        def recording_call_later(delay: float, *args: Any) -> asyncio.TimerHandle:
            if args and args[0] is scheduler_wake:  # a timer's sleep, not a test's
                targets.append(time.monotonic() + delay)  # what it sleeps until
            return real_call_later(delay, *args)

        loop.call_later = recording_call_later  # type: ignore[method-assign]
        running: dict[int, int] = {}
        rounds: dict[int, int] = {}
        policy = Policy(interval=0.12, jitter=0.5)

        async def round_(reg: Registration) -> None:
            running[reg.pid] = running.get(reg.pid, 0) + 1
            assert running[reg.pid] == 1, "two rounds of one process at once"
            await asyncio.sleep(0.001)
            rounds[reg.pid] = rounds.get(reg.pid, 0) + 1
            running[reg.pid] -= 1

        s = Scheduler(round_, lambda r: policy, concurrency=2, rng=random.Random(3),
                      batch_window=window)
        regs = [_reg(p) for p in range(1, 7)]
        for i, r in enumerate(regs):
            s.start(r, first_delay=0.013 * i)  # six different phases
        while min(rounds.get(r.pid, 0) for r in regs) < 4:
            await asyncio.sleep(0.01)
        for r in regs:
            await s.stop(r.pid)
        timer_targets = targets
        assert len(timer_targets) >= 24
        # Multiples of the window, up to the moment between the plan and the recording
        # (microseconds; allowed up to a tenth of the window, 5 ms, for a busy machine:
        # unaligned targets would each pass that with odds of 1 in 5).
        off = [t / window - round(t / window) for t in timer_targets]
        assert all(abs(o) < 0.1 for o in off), off
        # Fewer distinct instants than rounds: processes share them.
        assert len({round(t / window) for t in timer_targets}) < len(timer_targets)

    asyncio.run(main())


def test_batch_window_rounds_up_by_less_than_the_window() -> None:
    """Rounding only delays a start, by less than the window, onto a multiple of it; a
    window of 0 leaves due times alone."""
    rng = random.Random(5)
    for _ in range(10000):
        due = rng.uniform(0, 1e6)
        window = rng.choice([0.001, 0.05, 0.1, 0.25, 1.0])
        got = batched(due, window)
        assert due - 1e-9 <= got < due + window
        assert abs(got / window - round(got / window)) < 1e-6
        assert batched(due, 0.0) == due

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


def test_workers_call_the_idle_hook_once_the_queue_is_empty() -> None:
    """The capture pool publishes its staged rounds in on_idle: after a run of queued
    jobs (not between them), before wait_idle() returns, and before a thread exits."""
    import threading

    from ckptd.service.workers import Workers

    events: list[str] = []
    gate = threading.Event()

    async def main() -> None:
        w = Workers(1, "t-idle", on_idle=lambda: events.append("idle"))
        w.post(gate.wait, 5)  # holds the thread while the next jobs queue up
        for i in range(3):
            w.post(events.append, f"job{i}")
        gate.set()
        await asyncio.wait_for(w.wait_idle(), 5)
        assert events == ["job0", "job1", "job2", "idle"]
        assert await w.submit(events.append, "job3") is None
        assert events[-2:] == ["job3", "idle"]
        events.clear()
        w.shutdown(wait=True)
        assert events == ["idle"]

    asyncio.run(main())


# --- timer rounds posted to threads (the service's way) ---------------------------------
#
# With `post`, a timer round runs in a worker thread and the event loop does not wake
# when it ends: the worker records the end. These tests run real threads (Workers) and
# check that the rules still hold, including where the loop must be woken: a timer due
# while its previous round still runs, an on-demand round of the same process, a stop.


class _Probe:
    """A blocking round for worker threads that records what ran, and when, under a
    lock; rounds of chosen pids block until released."""

    def __init__(self) -> None:
        import threading
        self.mutex = threading.Lock()
        self.running: dict[int, int] = {}
        self.peak = 0
        self.overlaps = 0
        self.spans: dict[int, list[tuple[float, float]]] = {}
        self.gates: dict[int, threading.Event] = {}
        self.entered: dict[int, threading.Event] = {}

    def hold(self, pid: int) -> None:
        import threading
        self.gates[pid] = threading.Event()
        self.entered[pid] = threading.Event()

    def enter(self, pid: int) -> float:
        with self.mutex:
            n = self.running[pid] = self.running.get(pid, 0) + 1
            if n > 1:
                self.overlaps += 1
            self.peak = max(self.peak, sum(self.running.values()))
        return time.monotonic()

    def leave(self, pid: int, start: float) -> None:
        with self.mutex:
            self.running[pid] -= 1
            self.spans.setdefault(pid, []).append((start, time.monotonic()))

    def round(self, reg: Registration) -> None:
        start = self.enter(reg.pid)
        try:
            if reg.pid in self.entered:
                self.entered[reg.pid].set()
                assert self.gates[reg.pid].wait(30), "test gate never opened"
            else:
                time.sleep(random.uniform(0, 0.004))
        finally:
            self.leave(reg.pid, start)

    def rounds(self, pid: int) -> int:
        with self.mutex:
            return len(self.spans.get(pid, []))


async def _until(pred: Callable[[], object], what: str, bound: float = 30.0) -> None:
    """Poll on the loop until pred() holds; the bound only prevents a hang."""
    deadline = time.monotonic() + bound
    while not pred():
        assert time.monotonic() < deadline, f"gave up waiting for: {what}"
        await asyncio.sleep(0.002)


def test_posted_rounds_keep_the_rules() -> None:
    """Timer rounds in 2 worker threads, on-demand rounds racing them on the loop: no
    two rounds of one process at once, at most 2 at once overall, nothing left in
    flight."""
    from ckptd.service.workers import Workers

    async def main() -> None:
        probe = _Probe()
        workers = Workers(2, "t-sched")
        policy = Policy(interval=0.01, jitter=0.5)
        s = Scheduler(probe.round, lambda r: policy, concurrency=2, rng=random.Random(2),
                      post=workers.post)
        regs = [_reg(p) for p in range(1, 9)]
        for r in regs:
            s.start(r, first_delay=0.0)

        async def on_demand(reg: Registration) -> None:
            # Runs in a worker too, as the service's on-demand rounds do.
            await workers.submit(probe.round, reg)

        for _ in range(5):
            await asyncio.gather(*(s.run_exclusive(s.slots[r.pid],
                                                   lambda r=r: on_demand(r))
                                   for r in regs))
        await _until(lambda: min(probe.rounds(r.pid) for r in regs) >= 15, "rounds")
        for r in regs:
            await s.stop(r.pid)
        await workers.wait_idle()
        workers.shutdown()
        assert probe.overlaps == 0 and probe.peak <= 2
        assert all(r.max_in_flight == 1 and r.in_flight == 0 for r in regs)
        assert s.in_flight == 0
        # Each process's rounds, timer and on-demand, ran one after the other.
        for r in regs:
            spans = sorted(probe.spans[r.pid])
            assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))

    asyncio.run(main())


def test_posted_round_still_running_when_the_next_is_due() -> None:
    """The timer hands a round off and sleeps; at the next due time the round still
    runs: the timer waits for its end (no second round of the process), the overrun is
    counted once it ends, and the next round starts after it, not in a burst."""
    from ckptd.service.workers import Workers

    async def main() -> None:
        probe = _Probe()
        probe.hold(7)
        workers = Workers(1, "t-sched")
        overruns: list[int] = []
        s = Scheduler(probe.round, lambda r: Policy(interval=0.01, jitter=0),
                      concurrency=1, on_overrun=lambda r: overruns.append(r.pid),
                      post=workers.post)
        reg = _reg(7)
        slot = s.start(reg, first_delay=0.0)
        await asyncio.to_thread(probe.entered[7].wait, 30)
        await asyncio.sleep(0.1)  # ten intervals: the next round is long due
        assert probe.rounds(7) == 0 and slot.in_round
        assert slot.waiters, "the timer waits for the round in flight"
        assert reg.overruns == 0  # not over until it ends
        del probe.entered[7]  # later rounds do not block
        probe.gates[7].set()
        await _until(lambda: probe.rounds(7) >= 3, "rounds after the long one")
        await s.stop(7)
        await workers.wait_idle()
        workers.shutdown()
        assert reg.overruns >= 1 and overruns == [7] * reg.overruns
        assert probe.overlaps == 0 and reg.max_in_flight == 1 and s.in_flight == 0
        spans = probe.spans[7]
        long_end = spans[0][1]
        assert long_end - spans[0][0] >= 0.1
        # The schedule slid to the end of the long round: the j-th round after it is
        # planned j - 1 intervals after that end (it may start later, never earlier),
        # instead of the missed rounds running at once. (1 ms: a loop timer may fire
        # that early.)
        for j, (start, _) in enumerate(spans[1:]):
            assert start >= long_end + j * 0.01 - 0.001, (j, start - long_end)

    asyncio.run(main())


def test_stop_waits_for_a_posted_round_nobody_awaits() -> None:
    """The timer sleeps until its next round while this one runs in a worker: stop()
    wakes it, and returns only once the round has ended; the timer is not cancelled."""
    from ckptd.service.workers import Workers

    async def main() -> None:
        probe = _Probe()
        probe.hold(3)
        workers = Workers(1, "t-sched")
        s = Scheduler(probe.round, lambda r: Policy(interval=60), concurrency=1,
                      post=workers.post)
        reg = _reg(3)
        slot = s.start(reg, first_delay=0.0)
        await asyncio.to_thread(probe.entered[3].wait, 30)
        await asyncio.sleep(0.01)
        assert slot.sleeping is not None and slot.in_round  # asleep until the next one
        assert reg.next_due is not None and reg.next_due > time.time() + 30
        stopper = asyncio.create_task(s.stop(3))
        await asyncio.sleep(0.05)
        assert not stopper.done() and probe.rounds(3) == 0
        probe.gates[3].set()
        assert await asyncio.wait_for(stopper, 30) is slot
        assert probe.rounds(3) == 1 and not slot.in_round
        assert slot.timer is not None and slot.timer.done() and not slot.timer.cancelled()
        assert s.in_flight == 0 and reg.in_flight == 0
        await workers.wait_idle()
        workers.shutdown()

    asyncio.run(main())


def test_shutdown_skips_posted_rounds_not_begun() -> None:
    """One worker thread, two processes due at once: one round runs, the other waits
    for the thread. shutdown() lets the first finish and drops the second, which had
    not begun; both timers exit."""
    from ckptd.service.workers import Workers

    async def main() -> None:
        probe = _Probe()
        probe.hold(1)
        probe.hold(2)
        workers = Workers(1, "t-sched")
        s = Scheduler(probe.round, lambda r: Policy(interval=60), concurrency=1,
                      post=workers.post)
        s.start(_reg(1), first_delay=0.0)
        await asyncio.to_thread(probe.entered[1].wait, 30)
        s.start(_reg(2), first_delay=0.0)
        await _until(lambda: s.slots[2].in_round, "second round handed off")
        assert workers.jobs == 2 and s.in_flight == 2
        await s.shutdown()
        probe.gates[1].set()
        await asyncio.wait_for(workers.wait_idle(), 30)
        timers = [s.slots[p].timer for p in (1, 2)]
        await asyncio.wait_for(asyncio.gather(*(t for t in timers if t is not None)), 30)
        assert probe.rounds(1) == 1 and probe.rounds(2) == 0
        assert not probe.entered[2].is_set()
        assert s.in_flight == 0 and all(not s.slots[p].in_round for p in (1, 2))
        assert s.slots[2].reg.overruns == 0  # a round that did not run did not overrun
        workers.shutdown()

    asyncio.run(main())


def test_on_demand_round_waits_for_a_posted_timer_round() -> None:
    """An on-demand round of a process whose timer round runs in a worker starts only
    once that round has ended (the worker wakes the loop for it)."""
    from ckptd.service.workers import Workers

    async def main() -> None:
        probe = _Probe()
        probe.hold(4)
        workers = Workers(2, "t-sched")  # a free thread: only the rule makes it wait
        s = Scheduler(probe.round, lambda r: Policy(interval=60), concurrency=2,
                      post=workers.post)
        reg = _reg(4)
        slot = s.start(reg, first_delay=0.0)
        await asyncio.to_thread(probe.entered[4].wait, 30)
        order: list[str] = []

        async def on_demand() -> str:
            order.append("on-demand")
            return "done"

        demand = asyncio.create_task(s.run_exclusive(slot, on_demand))
        await asyncio.sleep(0.05)
        assert order == [] and not demand.done()
        order.append("timer released")
        probe.gates[4].set()
        assert await asyncio.wait_for(demand, 30) == "done"
        assert order == ["timer released", "on-demand"]
        assert reg.max_in_flight == 1
        await s.stop(4)
        assert s.in_flight == 0
        await workers.wait_idle()
        workers.shutdown()

    asyncio.run(main())


def test_on_demand_round_waiting_for_a_timer_round_does_not_start_after_shutdown() -> None:
    """An on-demand round asked for before a shutdown, and waiting for the process's
    timer round, does not run once that round ends if the scheduler is stopping by then
    (the service would be closing the engine under it): it raises Stopped. Until it has
    ended it is in `on_demand`, for the shutdown to wait for; a new one is refused at
    once."""
    from ckptd.service.workers import Workers

    async def main() -> None:
        probe = _Probe()
        probe.hold(5)
        workers = Workers(2, "t-sched")
        s = Scheduler(probe.round, lambda r: Policy(interval=60), concurrency=2,
                      post=workers.post)
        reg = _reg(5)
        slot = s.start(reg, first_delay=0.0)
        await asyncio.to_thread(probe.entered[5].wait, 30)
        ran: list[str] = []

        async def on_demand() -> str:
            ran.append("on-demand")
            return "done"

        demand = asyncio.create_task(s.run_exclusive(slot, on_demand))
        await _until(lambda: len(s.on_demand) == 1, "the on-demand round tracked")
        tracked = next(iter(s.on_demand))
        await s.shutdown()
        assert not tracked.done()  # still waiting for the timer round
        probe.gates[5].set()
        with pytest.raises(Stopped):
            await asyncio.wait_for(demand, 30)
        assert ran == [] and tracked.done() and not s.on_demand
        with pytest.raises(Stopped):
            await s.run_exclusive(slot, on_demand)
        assert ran == [] and probe.rounds(5) == 1
        await workers.wait_idle()
        assert s.in_flight == 0 and reg.in_flight == 0
        workers.shutdown()

    asyncio.run(main())


def test_failure_in_a_posted_round_is_logged_and_the_schedule_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    """Nobody awaits a posted round: an exception in it must not vanish. It is logged
    with its traceback, the round counts as ended, and later rounds run."""
    from ckptd.service.workers import Workers

    async def main() -> None:
        calls = 0
        workers = Workers(1, "t-sched")

        def bad(reg: Registration) -> None:
            nonlocal calls
            calls += 1
            raise RuntimeError(f"bug in round {calls}")

        s = Scheduler(bad, lambda r: Policy(interval=0.005, jitter=0), concurrency=1,
                      post=workers.post)
        reg = _reg(5)
        s.start(reg, first_delay=0.0)
        await _until(lambda: calls >= 3, "rounds after a failure")
        await s.stop(5)
        await workers.wait_idle()
        workers.shutdown()
        assert s.in_flight == 0 and reg.in_flight == 0

    caplog.set_level("ERROR", logger="ckptd.service.scheduler")
    asyncio.run(main())
    failed = [r for r in caplog.records if "pid 5: round failed unexpectedly" in r.message]
    assert len(failed) >= 3
    assert failed[0].exc_info is not None and "bug in round 1" in str(failed[0].exc_info[1])


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


def test_a_worker_runs_the_idle_hook_before_it_waits_for_work(monkeypatch: Any) -> None:
    """Two threads: one ends its job seeing another job queued (so no idle hook then),
    and the other thread takes that job. The first must not then sleep waiting for
    work with what its hook would have published (a capture thread's staged rounds and
    their locks) still held: after a resize from 1 to 2 threads, or while a sentinel of
    a shrink is queued, that would hold a process's lock until the next job."""
    import queue as queue_mod
    import threading

    from ckptd.service import workers as workers_mod

    pending: dict[str, bool] = {}
    stager: list[str] = []
    go_stager, go_other, taken = threading.Event(), threading.Event(), threading.Event()

    class RacyQueue:
        """A SimpleQueue whose empty(), in the staging thread, answers from before the
        other thread takes the queued job (the interleaving the race needs)."""

        def __init__(self) -> None:
            self.q: Any = real_simple_queue()
            self.raced = False

        def put(self, item: Any) -> None:
            self.q.put(item)

        def get(self, *a: Any, **k: Any) -> Any:
            return self.q.get(*a, **k)

        def get_nowait(self) -> Any:
            return self.q.get_nowait()

        def empty(self) -> bool:
            e = self.q.empty()
            if not e and not self.raced and stager and \
                    threading.current_thread().name == stager[0]:
                self.raced = True
                go_other.set()
                taken.wait(5)
            return e

    real_simple_queue = queue_mod.SimpleQueue
    monkeypatch.setattr(workers_mod.queue, "SimpleQueue", RacyQueue)

    def stage() -> None:
        stager.append(threading.current_thread().name)
        pending[stager[0]] = True
        go_stager.wait(5)

    def on_idle() -> None:
        pending[threading.current_thread().name] = False

    async def main() -> None:
        w = workers_mod.Workers(2, "t-race", on_idle=on_idle)
        w.post(stage)
        w.post(go_other.wait, 5)
        w.post(taken.set)  # queued: both threads are busy
        go_stager.set()
        await asyncio.wait_for(w.wait_idle(), 5)
        deadline = time.monotonic() + 2
        while pending[stager[0]] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        held = pending[stager[0]]
        w.shutdown(wait=True)
        assert not held, "a worker waits for work with its staged rounds unpublished"

    asyncio.run(main())
