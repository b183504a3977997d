"""The edges of the commit point, on real processes and a real store: an interruption
right after the metadata rename, a second ckptd process working on the same chain, and
letting go of a chain while another thread may publish in it."""

from __future__ import annotations

import os
import threading
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

from ckptd.engine import Engine
from ckptd.store import Store
from ckptd.store import reader as store_reader

pytestmark = needs_root

PAGES = PAGE_WRITER_PAGES
WRITER = PAGE_WRITER


class _Interrupted(Exception):
    """Stands for Ctrl-C (KeyboardInterrupt) or a failed directory fsync."""


def test_interruption_after_the_rename_keeps_the_snapshot(store: Store,
                                                          tmp_path: Path) -> None:
    """If the round is interrupted between the metadata's rename and the end of publish,
    the snapshot is listed: its data must stay, and the next round must extend it."""
    truth = GroundTruthRecorder()
    with Target.python(WRITER) as t, Engine(store) as engine:
        first = engine.snapshot(t.pid, tracker="uffd-wp")
        assert t.send("w 1 2 3") == "ok"
        publish = store.publish

        def publish_then_interrupt(*a: object, **kw: object) -> None:
            publish(*a, **kw)  # type: ignore[arg-type]
            raise _Interrupted("right after the rename")

        store.publish = publish_then_interrupt  # type: ignore[method-assign]
        with pytest.raises(_Interrupted):
            engine.snapshot(t.pid, tracker="uffd-wp", on_frozen=truth)
        store.publish = publish  # type: ignore[method-assign]
        second_truth = truth.last

        ids = store.snapshot_ids(first.chain)
        assert len(ids) == 2, ids
        interrupted = store.get(ids[-1])
        assert interrupted.parent == first.id and interrupted.kind == "delta"
        checked, problems = store_reader.verify(store)
        assert checked >= 2 and problems == [], problems
        assert_materializes_to(store, interrupted.id, second_truth, tmp_path / "a")

        assert t.send("w 4 5") == "ok"
        third = engine.snapshot(t.pid, tracker="uffd-wp", on_frozen=truth)
        assert third.parent == interrupted.id and third.kind == "delta"
        assert_materializes_to(store, third.id, truth.last, tmp_path / "b")


def test_a_round_of_another_ckptd_on_the_same_chain_is_noticed(store: Store,
                                                                tmp_path: Path) -> None:
    """Two ckptd processes on one target and store (the service and a `ckptd watch`):
    a round of the other one that did its get-and-clear and then failed took the
    written pages with it. The first one must not take a delta that misses them."""
    truth = GroundTruthRecorder()
    other_store = Store.open(store.root)  # the other process's view of the same store
    with Target.python(WRITER) as t, Engine(store) as service, \
            Engine(other_store) as watch:
        base = service.snapshot(t.pid, tracker="uffd-wp")
        assert t.send("w 7 8 9") == "ok"

        def fail(pid: int, vmas: object) -> None:
            raise _Interrupted("the other round fails after its get-and-clear")

        with pytest.raises(_Interrupted):
            watch.snapshot(t.pid, tracker="uffd-wp", on_frozen=fail)
        assert store.snapshot_ids(base.chain) == [base.id]  # it published nothing

        nxt = service.snapshot(t.pid, tracker="uffd-wp", on_frozen=truth)
        assert nxt.kind == "full", nxt.full_reason
        assert_materializes_to(store, nxt.id, truth.last, tmp_path / "m")


def test_forget_waits_for_the_chain_lock(store: Store) -> None:
    """Forgetting a process closes the chain's kept snapshots/ directory: not while
    another thread (a compaction) holds the chain lock to publish through it."""
    with Target.python(WRITER) as t, Engine(store) as engine:
        meta = engine.snapshot(t.pid)
        kept = store._snapshot_dir_fds.get(meta.chain)
        assert kept is not None and os.fstat(kept)
        done = threading.Event()
        with store.lock_chain(meta.chain):
            th = threading.Thread(target=lambda: (engine.forget(t.pid), done.set()))
            th.start()
            assert not done.wait(0.5), "forget went ahead under another holder's lock"
            assert store._snapshot_dir_fds.get(meta.chain) == kept
        th.join(30)
        assert done.is_set()
        assert meta.chain not in store._snapshot_dir_fds


def test_forget_unregisters_the_targets_memory(store: Store, tmp_path: Path) -> None:
    """Unregistered from ckptd, a process gets its memory back from our userfaultfd:
    nothing stays write-protect registered (the process may then use userfaultfd on it
    itself), and it keeps running. Tracked again, every page is read anew (the memory
    is registered as new), so the next snapshot still restores exactly."""
    from ckptd.kernel import procfs

    truth = GroundTruthRecorder()
    with Target.python(WRITER) as t, Engine(store) as engine:
        engine.snapshot(t.pid, tracker="uffd-wp")
        assert any("uw" in flags for _, _, flags in procfs.uffd_vma_flags(t.pid))
        engine.forget(t.pid)
        assert procfs.uffd_vma_flags(t.pid) == []
        assert t.send("w 1 2") == "ok"
        again = engine.snapshot(t.pid, tracker="uffd-wp", on_frozen=truth)
        assert any("uw" in flags for _, _, flags in procfs.uffd_vma_flags(t.pid))
        assert again.counts.pages_read >= again.counts.pages_present > PAGES
        assert_materializes_to(store, again.id, truth.last, tmp_path / "m")


def test_a_snapshot_for_another_start_time_is_refused(store: Store) -> None:
    """The service authorizes a client for a process, then asks the engine for a
    snapshot by PID: if the PID is another process's by then (its start time differs),
    nothing is stored, and no chain is made for that other process."""
    from ckptd.errors import TargetGone
    from ckptd.kernel import procfs

    with Target.python(WRITER) as t, Engine(store) as engine:
        start = procfs.start_time(t.pid)
        with pytest.raises(TargetGone, match="another process"):
            engine.snapshot(t.pid, start_time=start + 1)
        assert store.chain_ids() == []
        assert engine.snapshot(t.pid, start_time=start).kind == "full"


def test_a_snapshot_file_without_a_format_version_is_damaged(store: Store) -> None:
    """Every reader refuses it the same way: not taken as the current version by one
    and failing with a raw validation error in another."""
    import json as json_module

    from ckptd.errors import CorruptStore

    with Target.python(WRITER) as t, Engine(store) as engine:
        meta = engine.snapshot(t.pid)
    path = store.snapshot_path(meta.id)
    doc = json_module.loads(path.read_bytes())
    del doc["format_version"]
    path.write_text(json_module.dumps(doc))
    for read in (store.get, store.head, store.pages):
        with pytest.raises(CorruptStore, match="no format version"):
            read(meta.id)
    _, problems = store_reader.verify(store)
    assert any("no format version" in p for p in problems), problems
