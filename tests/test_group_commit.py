"""Group commit (Engine.snapshot with `later`, then Engine.flush): staged rounds are
invisible until the flush, listed and restorable byte for byte after it, and a failed
flush leaves nothing behind and a chain that goes on. Real processes and a real store."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
from helpers import (
    PAGE_WRITER,
    PAGE_WRITER_PAGES,
    GroundTruthRecorder,
    Target,
    assert_materializes_to,
    needs_root,
)

from ckptd.engine import Engine, PublishLater
from ckptd.errors import StoreFull
from ckptd.store import SnapshotMeta, Store
from ckptd.store import reader as store_reader

pytestmark = needs_root



class Outcomes:
    """What a staged round's `later` heard."""

    def __init__(self) -> None:
        self.published: list[SnapshotMeta] = []
        self.failed: list[Exception] = []

    def later(self) -> PublishLater:
        return PublishLater(self.published.append, self.failed.append)


def _listed(store: Store, chain: str) -> list[str]:
    return store.snapshot_ids(chain)


def test_staged_rounds_are_listed_only_after_the_flush(store: Store, tmp_path: Path) -> None:
    truth = {0: GroundTruthRecorder(), 1: GroundTruthRecorder()}
    out = Outcomes()
    with Target.python(PAGE_WRITER) as a, Target.python(PAGE_WRITER) as b, Engine(store) as engine:
        targets = [a, b]
        firsts = [engine.snapshot(t.pid, tracker="uffd-wp") for t in targets]
        for i, t in enumerate(targets):
            assert t.send(f"w {i + 1} {i + 5} 30") == "ok"
        staged = [engine.snapshot(t.pid, tracker="uffd-wp", on_frozen=truth[i],
                                  later=out.later()) for i, t in enumerate(targets)]
        for first, meta in zip(firsts, staged, strict=True):
            assert meta.kind == "delta" and meta.parent == first.id
            assert _listed(store, first.chain) == [first.id], "visible before the flush"
        assert out.published == [] and out.failed == []

        engine.flush()
        assert out.failed == []
        assert [m.id for m in out.published] == [m.id for m in staged]
        for first, meta in zip(firsts, staged, strict=True):
            assert _listed(store, first.chain) == [first.id, meta.id]
        checked, problems = store_reader.verify(store)
        assert checked == 4 and problems == [], problems
        for i, meta in enumerate(staged):
            assert_materializes_to(store, meta.id, truth[i].last, tmp_path / f"m{i}")

        # The chains go on from the published rounds.
        for i, t in enumerate(targets):
            assert t.send("w 9") == "ok"
            nxt = engine.snapshot(t.pid, tracker="uffd-wp", on_frozen=truth[i])
            assert nxt.kind == "delta" and nxt.parent == staged[i].id
            assert_materializes_to(store, nxt.id, truth[i].last, tmp_path / f"n{i}")
        engine.flush()
        assert len(out.published) == 2  # the direct rounds left nothing staged


def test_a_round_of_a_process_with_a_staged_round_publishes_that_first(
        store: Store, tmp_path: Path) -> None:
    """Its locks are held by the staged round: the next round, grouped or not, in the
    same thread must publish the group first rather than wait for itself."""
    out = Outcomes()
    truth = GroundTruthRecorder()
    with Target.python(PAGE_WRITER) as t, Engine(store) as engine:
        engine.snapshot(t.pid, tracker="uffd-wp")
        assert t.send("w 3") == "ok"
        staged = engine.snapshot(t.pid, tracker="uffd-wp", later=out.later())
        assert t.send("w 4") == "ok"
        again = engine.snapshot(t.pid, tracker="uffd-wp", later=out.later())
        assert [m.id for m in out.published] == [staged.id]
        assert t.send("w 5") == "ok"
        direct = engine.snapshot(t.pid, tracker="uffd-wp", on_frozen=truth)
        assert [m.id for m in out.published] == [staged.id, again.id]
        assert direct.parent == again.id and again.parent == staged.id
        assert _listed(store, direct.chain)[-3:] == [staged.id, again.id, direct.id]
        assert_materializes_to(store, direct.id, truth.last, tmp_path / "m")


def test_forgetting_a_process_waits_for_its_staged_round(store: Store) -> None:
    """Another thread letting go of the process waits for the group to be published
    (it needs the process's lock), then finds the snapshot listed."""
    out = Outcomes()
    with Target.python(PAGE_WRITER) as t, Engine(store) as engine:
        engine.snapshot(t.pid, tracker="uffd-wp")
        assert t.send("w 1") == "ok"
        staged = engine.snapshot(t.pid, tracker="uffd-wp", later=out.later())
        forgetter = threading.Thread(target=engine.forget, args=(t.pid,))
        forgetter.start()
        forgetter.join(0.5)
        assert forgetter.is_alive(), "forget did not wait for the staged round"
        engine.flush()
        forgetter.join(10)
        assert not forgetter.is_alive()
        assert [m.id for m in out.published] == [staged.id]
        assert staged.id in _listed(store, staged.chain)


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_a_failed_sync_stores_nothing_and_the_next_round_is_full(
        store: Store, tmp_path: Path, err: int) -> None:
    """The first sync of the group fails (as syncfs does for a writeback error): every
    round of the group fails, nothing of them stays in the store, and, as their
    get-and-clear took pages no snapshot holds, the next round of each is full."""
    out = Outcomes()
    truth = GroundTruthRecorder()
    with Target.python(PAGE_WRITER) as t, Engine(store) as engine:
        first = engine.snapshot(t.pid, tracker="uffd-wp")
        assert t.send("w " + " ".join(str(p) for p in range(PAGE_WRITER_PAGES))) == "ok"
        chain_dir = store.chain_dir(first.chain)
        before = {d: set(os.listdir(chain_dir / d)) for d in ("snapshots", "data")}
        staged = engine.snapshot(t.pid, tracker="uffd-wp", later=out.later())
        sync = store.sync

        def failing_sync() -> None:
            raise OSError(err, os.strerror(err))

        store.sync = failing_sync  # type: ignore[method-assign]
        try:
            engine.flush()
        finally:
            store.sync = sync  # type: ignore[method-assign]
        assert out.published == [] and len(out.failed) == 1
        if err == errno.ENOSPC:
            assert isinstance(out.failed[0], StoreFull)
        assert staged.id in str(out.failed[0])
        assert _listed(store, first.chain) == [first.id]
        after = {d: set(os.listdir(chain_dir / d)) for d in ("snapshots", "data")}
        # A reused spare may stay (a dot file readers ignore); nothing else is new.
        new = {d: {n for n in after[d] - before[d] if not n.startswith(".spare.")}
               for d in after}
        assert new == {"snapshots": set(), "data": set()}, new
        assert os.listdir(store.tmp_dir) == [] or all(
            n.startswith("owner.") for n in os.listdir(store.tmp_dir))

        assert t.send("w 7") == "ok"
        nxt = engine.snapshot(t.pid, tracker="uffd-wp", on_frozen=truth)
        assert nxt.kind == "full", nxt.full_reason
        assert_materializes_to(store, nxt.id, truth.last, tmp_path / "m")
        checked, problems = store_reader.verify(store)
        assert checked == 2 and problems == [], problems


def test_an_unexpected_error_in_the_flush_still_ends_every_round(store: Store) -> None:
    """Whatever a sync raises, each staged round of the group is ended (failed, its
    locks released): a round left holding its process's lock would hang every later
    round of that process, and with it the capture thread."""
    out = Outcomes()
    with Target.python(PAGE_WRITER) as t, Engine(store) as engine:
        first = engine.snapshot(t.pid, tracker="uffd-wp")
        assert t.send("w 2") == "ok"
        engine.snapshot(t.pid, tracker="uffd-wp", later=out.later())
        sync = store.sync

        def broken_sync() -> None:
            raise RuntimeError("not an OSError")

        store.sync = broken_sync  # type: ignore[method-assign]
        try:
            engine.flush()
        except RuntimeError:
            pass  # asserted below through its effects
        finally:
            store.sync = sync  # type: ignore[method-assign]
        assert out.published == [] and len(out.failed) == 1, (out.published, out.failed)
        assert _listed(store, first.chain) == [first.id]

        done: list[SnapshotMeta] = []
        other = threading.Thread(
            target=lambda: done.append(engine.snapshot(t.pid, tracker="uffd-wp")),
            daemon=True)
        other.start()
        other.join(10)
        assert not other.is_alive(), "the failed round still holds the process's lock"
        assert done and done[0].kind == "full"


def test_forget_returns_only_after_the_rounds_bookkeeping(store: Store) -> None:
    """A staged round's `later` callback runs before its locks are released: whoever
    waits for the process (the service's unregistration, in engine.forget) must find its
    last round counted, not have it counted after the process is gone (the service
    would then keep a maintenance tally for an unregistered PID)."""
    order: list[str] = []

    def published(meta: SnapshotMeta) -> None:
        time.sleep(0.3)
        order.append("published")

    later = PublishLater(published, lambda e: order.append(f"failed {e}"))
    with Target.python(PAGE_WRITER) as t, Engine(store) as engine:
        engine.snapshot(t.pid, tracker="uffd-wp")
        assert t.send("w 1") == "ok"
        engine.snapshot(t.pid, tracker="uffd-wp", later=later)

        def forget() -> None:
            engine.forget(t.pid)
            order.append("forgotten")

        forgetter = threading.Thread(target=forget)
        forgetter.start()
        forgetter.join(0.2)
        assert forgetter.is_alive()
        engine.flush()
        forgetter.join(10)
        assert order == ["published", "forgotten"]
