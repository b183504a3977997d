"""A target that execs while it is tracked, keeping its address layout.

With address-space randomization off (`setarch -R`, or the ADDR_NO_RANDOMIZE
personality, which exec keeps), a process that execs the same program with the same
arguments and environment gets the same stack and heap start: its mm fingerprint
repeats, so the engine keeps the chain. The write tracker's pagemap and userfaultfd then
belong to the old address space, and the kernel answers every question about it with
nothing (no page written, none present) rather than an error. Taken as a delta, that
round would restore the old program's memory. These tests run such an exec on the real
kernel and restore every snapshot byte for byte."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import GroundTruthRecorder, Target, assert_materializes_to, needs_root

from ckptd.engine import Engine
from ckptd.errors import AddressSpaceReplaced
from ckptd.kernel import procfs
from ckptd.kernel.ptrace import Freezer
from ckptd.store import Store
from ckptd.track.base import TrackContext
from ckptd.track.uffd_wp import UffdWpTracker

pytestmark = needs_root

# Re-execs itself once with randomization off, then again on "exec": same argv and
# environment each time, so the second exec repeats the layout of the first.
TARGET = """
import ctypes, os, sys
if os.environ.get("CKPTD_TEST_NORANDOM") != "1":
    ctypes.CDLL(None, use_errno=True).personality(0x0040000)  # ADDR_NO_RANDOMIZE
    os.environ["CKPTD_TEST_NORANDOM"] = "1"
    os.execv(sys.executable, sys.orig_argv)
heap = bytearray(os.urandom(64 * 4096))  # different content in every image
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "exec":
        os.execv(sys.executable, sys.orig_argv)
    heap[int(line) * 4096] ^= 0xFF
    print("ok", flush=True)
"""


def _fingerprint(pid: int) -> str:
    return procfs.fingerprint_of(procfs.read_stat_fields(pid))


def _exec(t: Target) -> None:
    before = _fingerprint(t.pid)
    assert t.send("exec") == "ready"
    if _fingerprint(t.pid) != before:
        pytest.skip("the exec changed the address layout (randomization still on); "
                    "this case cannot arise here")


def test_exec_between_rounds_starts_tracking_again(store: Store, tmp_path: Path) -> None:
    rec = GroundTruthRecorder()
    truths = {}
    with Target.python(TARGET) as t, Engine(store) as eng:
        for step in (None, "3"):
            if step is not None:
                assert t.send(step) == "ok"
            m = eng.snapshot(t.pid, tracker="uffd-wp", on_frozen=rec)
            truths[m.id] = rec.last
        assert m.kind == "delta"
        _exec(t)
        after = eng.snapshot(t.pid, tracker="uffd-wp", on_frozen=rec)
        truths[after.id] = rec.last
        assert after.kind == "full" and after.chain == m.chain
        assert after.full_reason is not None and "exec'd" in after.full_reason
        assert t.send("5") == "ok"
        nxt = eng.snapshot(t.pid, tracker="uffd-wp", on_frozen=rec)
        truths[nxt.id] = rec.last
        assert nxt.kind == "delta" and nxt.parent == after.id
        # Tracking works on the new image: a delta reads what was written, not all.
        assert 0 < nxt.counts.pages_read < nxt.counts.pages_present // 4
    for sid, truth in truths.items():
        assert assert_materializes_to(store, sid, truth, tmp_path / sid) > 0


def test_exec_after_arm_fails_the_harvest_not_the_data(store: Store, tmp_path: Path
                                                        ) -> None:
    """An exec between arming and the freeze: the harvest must notice, drop its tracking
    and let the engine take the round again."""
    rec = GroundTruthRecorder()
    with Target.python(TARGET) as t, Engine(store) as eng:
        eng.snapshot(t.pid, tracker="uffd-wp")
        last = eng.snapshot(t.pid, tracker="uffd-wp")
        tracker = UffdWpTracker()
        ctx = TrackContext(pid=t.pid, state_dir=store.state_dir(last.chain),
                           parent_present=list(last.present), parent_id=last.id,
                           snapshot_id=f"{last.chain}-{last.seq + 1}", fuzzy=False,
                           max_pages=0, privileged=os.geteuid() == 0)
        eng.forget(t.pid)  # the engine's tracker closes: this one takes over the fd
        assert tracker.arm(ctx).full_reason is None
        _exec(t)
        try:
            with Freezer(t.pid), pytest.raises(AddressSpaceReplaced):
                tracker.harvest(ctx, procfs.read_maps(t.pid), False)
            assert tracker.fd < 0 and tracker.pm is None  # started over
        finally:
            tracker.close()
        m = eng.snapshot(t.pid, tracker="uffd-wp", on_frozen=rec)
        assert m.kind == "full"
        assert assert_materializes_to(store, m.id, rec.last, tmp_path / "m") > 0
