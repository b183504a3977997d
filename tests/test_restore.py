"""Byte-exact restore of every snapshot of a busy, multi-threaded process."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from helpers import (
    LIBC_MM,
    GroundTruth,
    GroundTruthRecorder,
    Target,
    assert_materializes_to,
    needs_root,
)

from ckptd.engine import Engine
from ckptd.store import Store
from ckptd.store import reader as store_reader

pytestmark = needs_root


def _rounds(engine: Engine, store: Store, tmp_path: Path, tracker: str, rounds: int,
            fuzzy_every: int = 0) -> None:
    rec = GroundTruthRecorder()
    truths: dict[str, GroundTruth] = {}
    kinds: list[str] = []
    with Target.churn(threads=3, base_mib=16) as t:
        for i in range(rounds):
            time.sleep(0.05)  # let the threads change things
            meta = engine.snapshot(t.pid, tracker=tracker, on_frozen=rec)
            assert meta.tracker == tracker
            truths[meta.id] = rec.last
            kinds.append(meta.kind)
            assert t.alive(), f"target died after snapshot {i}"
        assert t.alive()
    assert kinds[0] == "full" and all(k == "delta" for k in kinds[1:]), kinds
    # Every snapshot, the oldest included, after all the newer ones exist.
    for sid, truth in truths.items():
        n = assert_materializes_to(store, sid, truth, tmp_path / f"m-{sid}")
        assert n >= 5
    count, problems = store_reader.verify(store)
    assert count == rounds and problems == []


def test_uffd_wp_restores_every_snapshot_byte_for_byte(engine: Engine, store: Store,
                                                       tmp_path: Path) -> None:
    _rounds(engine, store, tmp_path, "uffd-wp", rounds=24)


def test_hash_tracker_restores_every_snapshot_byte_for_byte(engine: Engine, store: Store,
                                                            tmp_path: Path) -> None:
    _rounds(engine, store, tmp_path, "hash", rounds=8)


def test_deltas_store_only_changed_pages(engine: Engine, store: Store) -> None:
    code = """
import mmap, sys
m = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, 8 << 20, 4096): m[i:i + 4] = b'full'
print('ready', flush=True)
for line in sys.stdin:
    for i in range(int(line)): m[i * 4096 * 7 + 100] = 1 + (m[i * 4096 * 7 + 100] % 200)
    print('ok', flush=True)
"""
    with Target.python(code) as t:
        for tracker in ("uffd-wp", "hash"):
            base = engine.snapshot(t.pid, tracker=tracker)
            assert base.kind == "full"
            assert base.counts.pages_stored >= 2048  # 8 MiB of non-zero pages
            t.send("50")
            delta = engine.snapshot(t.pid, tracker=tracker)
            assert delta.kind == "delta" and delta.parent == base.id
            # The 50 pages written, plus whatever the interpreter touched; far from all.
            assert 50 <= delta.counts.pages_stored < 400, delta.counts
            quiet = engine.snapshot(t.pid, tracker=tracker)
            assert quiet.counts.pages_stored < 100, quiet.counts


def test_zero_pages_are_markers_not_data(engine: Engine, store: Store, tmp_path: Path) -> None:
    code = """
import mmap, sys
m = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, 4 << 20, 4096): m[i] = 1; m[i] = 0   # populated, all zero
print('ready', flush=True)
sys.stdin.readline()
"""
    rec = GroundTruthRecorder()
    with Target.python(code) as t:
        meta = engine.snapshot(t.pid, on_frozen=rec)
    assert meta.counts.pages_zero >= 1024
    assert all(z.pages >= 1 for z in meta.zeros)
    assert_materializes_to(store, meta.id, rec.last, tmp_path / "m")


@pytest.mark.parametrize("fuzzy", [True])
def test_fuzzy_rounds_then_frozen_final_round_is_exact(engine: Engine, store: Store,
                                                        tmp_path: Path, fuzzy: bool) -> None:
    """Pre-copy: rounds without freezing, then one frozen round that is exact."""
    rec = GroundTruthRecorder()
    with Target.churn(threads=2, base_mib=16, seed=7) as t:
        for _ in range(4):
            meta = engine.snapshot(t.pid, fuzzy=fuzzy)
            assert meta.consistency == "fuzzy" and meta.timings.freeze_ms == 0.0
        final = engine.snapshot(t.pid, on_frozen=rec)
        assert final.kind == "delta" and final.consistency == "frozen"
    assert_materializes_to(store, final.id, rec.last, tmp_path / "m")


def test_mapping_replaced_at_the_same_address_is_captured(
        engine: Engine, store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The tracker remembers which mappings it registered. A mapping unmapped and mapped
    again at the same address and size looks identical in /proc/PID/maps but is no longer
    registered: the checked get-and-clear must notice, and the round must still capture
    the new content exactly."""
    code = LIBC_MM + """
import mmap
SIZE = 64 * 4096
PROT_RW, FLAGS = 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
MAP_FIXED_NOREPLACE = 0x100000
addr = libc.mmap(None, SIZE, PROT_RW, FLAGS, -1, 0)
ctypes.memset(addr, 0x11, SIZE)
print('ready', flush=True)
for line in sys.stdin:
    assert libc.munmap(addr, SIZE) == 0
    again = libc.mmap(addr, SIZE, PROT_RW, FLAGS | MAP_FIXED_NOREPLACE, -1, 0)
    assert again == addr, (hex(again or 0), hex(addr))
    ctypes.memset(addr + 4096 * 3, int(line), 4096 * 5)
    print(f'{addr:x}', flush=True)
"""
    rec = GroundTruthRecorder()
    caplog.set_level(logging.INFO, logger="ckptd")
    with Target.python(code) as t:
        first = engine.snapshot(t.pid, tracker="uffd-wp", on_frozen=rec)
        assert_materializes_to(store, first.id, rec.last, tmp_path / "m0")
        for i, byte in enumerate((0x22, 0x33)):
            caplog.clear()
            t.send(str(byte))
            meta = engine.snapshot(t.pid, tracker="uffd-wp", on_frozen=rec)
            assert meta.kind == "delta"
            # The replaced mapping reads as zeros except the 5 pages written: all of its
            # new content must be in this round (the old 0x11 pages are gone).
            truth = rec.last
            assert_materializes_to(store, meta.id, truth, tmp_path / f"m{i + 1}")
            assert t.alive()
            # ... and it was the checked get-and-clear that caught it.
            assert any("no longer registered" in r.getMessage() for r in caplog.records)


def test_private_file_pages_that_revert_to_the_file_are_restored_as_the_file(
        engine: Engine, store: Store, tmp_path: Path) -> None:
    """Copy-on-write pages of a private file mapping can be dropped (MADV_DONTNEED): the
    page then shows the file again, and the write tracker does not report it, whether the
    page stays empty or a read maps the file's page again. Each round must still restore
    exactly what the process sees."""
    data = tmp_path / "backing.bin"
    data.write_bytes(bytes(range(256)) * 16 * 64)  # 64 pages of a known pattern
    code = f"""
import mmap, sys
f = open({str(data)!r}, 'r+b')
m = mmap.mmap(f.fileno(), 64 * 4096, flags=mmap.MAP_PRIVATE,
              prot=mmap.PROT_READ | mmap.PROT_WRITE)
for p in range(0, 64, 2):
    m[p * 4096:p * 4096 + 8] = b'cow-page'
print('ready', flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == 'drop':
        for p in map(int, args):
            m.madvise(mmap.MADV_DONTNEED, p * 4096, 4096)
    elif cmd == 'write':
        for p in map(int, args):
            m[p * 4096 + 100:p * 4096 + 108] = b'again!!!'
    elif cmd == 'dropread':  # dropped, then the file's page mapped again by a read
        for p in map(int, args):
            m.madvise(mmap.MADV_DONTNEED, p * 4096, 4096)
            m[p * 4096]
    print('ok', flush=True)
"""
    rec = GroundTruthRecorder()
    with Target.python(code) as t:
        steps = [None, "drop 0 2 4", "write 1 3", "drop 1 6", "write 0", "dropread 8 10",
                 None]
        for i, step in enumerate(steps):
            if step is not None:
                assert t.send(step) == "ok"
            meta = engine.snapshot(t.pid, tracker="uffd-wp", on_frozen=rec)
            assert meta.kind == ("full" if i == 0 else "delta")
            assert_materializes_to(store, meta.id, rec.last, tmp_path / f"m{i}")


def test_two_ckptd_processes_on_one_chain_keep_the_state_file_current(
        engine: Engine, store: Store, tmp_path: Path) -> None:
    """A service and a `ckptd snapshot --store` run may take turns on one chain. Each
    round must restore exactly, and the tracker state on disk must name the newest
    snapshot whoever took it (the service updates the file in place; the other process
    replaces it by a rename)."""
    rec = GroundTruthRecorder()
    with Target.churn(threads=2, base_mib=8, seed=3) as t, Engine(store) as other:
        order = [engine, engine, other, engine, other, other, engine]
        for i, eng in enumerate(order):
            time.sleep(0.05)
            meta = eng.snapshot(t.pid, tracker="uffd-wp", on_frozen=rec)
            assert_materializes_to(store, meta.id, rec.last, tmp_path / f"m{i}")
            state = json.loads((store.chain_dir(meta.chain) / "state" / "uffd-wp.json")
                               .read_text())
            assert state["synced_with"] == meta.id, (i, state, meta.id)
        assert t.alive()
