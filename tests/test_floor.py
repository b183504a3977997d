"""The chain floor (FLOOR.json, format version 3): compaction records that the snapshots
below its new base are retired before it removes their files, so the files a crash or
a power loss leaves below the floor are never listed, read, restored or counted, and are
deleted later. And the version rule around it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    GroundTruth,
    GroundTruthRecorder,
    Target,
    assert_materializes_to,
    needs_root,
    run_cli,
)

import ckptd.store.store as store_module
from ckptd.engine import Engine
from ckptd.errors import CorruptStore, StoreError, UnknownSnapshot
from ckptd.service.maintenance import ChainTally
from ckptd.store import Store, parse_snapshot_id
from ckptd.store import reader as store_reader
from ckptd.store.compact import compact_chain
from ckptd.store.format import FORMAT_VERSION


def _chain(store: Store, n: int, seed: int) -> tuple[str, dict[str, GroundTruth]]:
    rec = GroundTruthRecorder()
    truths: dict[str, GroundTruth] = {}
    with Target.churn(threads=1, base_mib=1, seed=seed) as t, Engine(store) as eng:
        for _ in range(n):
            time.sleep(0.02)
            meta = eng.snapshot(t.pid, on_frozen=rec)
            truths[meta.id] = rec.last
    return meta.chain, truths


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _one_line_error(r: subprocess.CompletedProcess[str], code: int) -> str:
    assert r.returncode == code, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@needs_root
def test_files_below_the_floor_are_not_snapshots(store: Store, tmp_path: Path) -> None:
    """Compaction removes the files below the floor with no directory fsync, so a power
    loss may bring back any of them: a full snapshot whose data file is gone, a delta
    whose parent is gone, or a name whose file was a spare that a later snapshot's
    metadata was written into. No reader lists, reads or counts them; clean_orphans and
    clean_leftovers delete them."""
    chain, truths = _chain(store, 8, seed=21)
    ids = list(truths)
    old = {i: store.snapshot_path(i).read_bytes() for i in ids}
    base_data = store.get(ids[0]).data_file
    assert base_data is not None  # a full snapshot of a Python process: not inline
    compact_chain(store, chain, ids[5])
    floor = parse_snapshot_id(ids[5])[1]
    assert store.floor(chain) == floor
    floor_file = json.loads((store.chain_dir(chain) / "FLOOR.json").read_text())
    assert floor_file["format_version"] == FORMAT_VERSION and floor_file["chain"] == chain
    assert floor_file["floor"] == floor and floor_file["created"] <= time.time()
    assert (store.chain_dir(chain) / "FLOOR.json").stat().st_mode & 0o777 == 0o600

    snaps = store.chain_dir(chain) / "snapshots"
    data_dir = store.chain_dir(chain) / "data"
    (snaps / f"{ids[0]}.json").write_bytes(old[ids[0]])
    (snaps / f"{ids[2]}.json").write_bytes(old[ids[2]])
    (snaps / f"{ids[4]}.json").write_bytes(old[ids[6]])
    orphan = f"{ids[0]}.0123abcd.zst"
    (data_dir / orphan).write_bytes(b"\x28\xb5\x2f\xfd")
    floor_tmp = f".FLOOR.json.{_dead_pid()}.tmp"
    (store.chain_dir(chain) / floor_tmp).write_bytes(b"{")
    below = [ids[0], ids[2], ids[4]]

    assert store.snapshot_files(chain) == below + ids[5:]
    assert store.snapshot_ids(chain) == ids[5:]
    assert store.listing(chain) == (floor, ids[5:])
    assert [m.id for m in store.list_snapshots()] == ids[5:]
    assert store.latest(chain) == store.get(ids[-1])
    for sid in below:
        for read in (store.get, store.head, store.pages, store.lineage):
            with pytest.raises(UnknownSnapshot, match="no snapshot"):
                read(sid)
    assert store_reader.verify(store) == (3, [])
    assert [e.id for e in ChainTally(chain).entries(store)] == ids[5:]
    r = run_cli("list", "--store", str(store.root), "--json")
    assert r.returncode == 0, r.stderr
    assert [s["id"] for s in json.loads(r.stdout)] == ids[5:]
    for cmd in (["show", ids[2]], ["materialize", ids[2], "-o", str(tmp_path / "x")]):
        r = run_cli(*cmd, "--store", str(store.root))
        assert "no snapshot" in _one_line_error(r, 2)
    for sid in ids[5:]:
        assert_materializes_to(store, sid, truths[sid], tmp_path / sid)

    with store.lock_chain(chain):
        assert store.clean_orphans(chain) == [orphan]
        assert store.clean_leftovers(chain) == [floor_tmp, *(f"{i}.json" for i in below)]
    assert sorted(n for n in os.listdir(snaps) if not n.startswith(".spare.")) == \
        sorted(f"{i}.json" for i in ids[5:])
    assert not (store.chain_dir(chain) / floor_tmp).exists()
    assert store_reader.verify(store) == (3, [])

    # A delta at the floor, which only damage makes, does not reach below it either.
    (snaps / f"{ids[5]}.json").write_bytes(old[ids[5]])
    (snaps / f"{ids[4]}.json").write_bytes(old[ids[4]])
    assert store.get(ids[5]).parent == ids[4]
    with pytest.raises(CorruptStore, match=f"needs its parent {ids[4]}, which is missing"):
        store.lineage(ids[-1])
    assert f"{ids[5]}: parent {ids[4]} is missing" in store_reader.verify(store)[1]


@needs_root
def test_compaction_removes_what_an_earlier_one_left_below_the_floor(store: Store) -> None:
    chain, truths = _chain(store, 6, seed=22)
    ids = list(truths)
    old = store.snapshot_path(ids[1]).read_bytes()
    compact_chain(store, chain, ids[2])
    (store.chain_dir(chain) / "snapshots" / f"{ids[1]}.json").write_bytes(old)
    summary = compact_chain(store, chain, ids[4])
    assert "removed 2 older snapshot(s)" in summary  # ids[2] and ids[3]: listed ones
    assert store.snapshot_files(chain) == ids[4:]
    assert store.floor(chain) == parse_snapshot_id(ids[4])[1]
    # Compacting at the floor again changes nothing.
    compact_chain(store, chain, ids[4])
    assert store.floor(chain) == parse_snapshot_id(ids[4])[1]
    assert store_reader.verify(store) == (2, [])


# Another ckptd: extend the chain by three snapshots and compact it up to the newest,
# getting killed right after the compaction removed the oldest two files.
OTHER_CKPTD = """
import os, signal, sys
from pathlib import Path
from ckptd.engine import Engine
from ckptd.store import Store
from ckptd.store.compact import compact_chain
store = Store.open(Path(sys.argv[1]))
retired = 0
real_retire = store.retire_snapshot
def retire(chain, sid):
    global retired
    if retired == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    retired += 1
    real_retire(chain, sid)
store.retire_snapshot = retire
with Engine(store) as eng:
    for _ in range(3):
        last = eng.snapshot(int(sys.argv[2]))
    compact_chain(store, last.chain, last.id)
"""


@needs_root
def test_a_cached_parent_below_anothers_floor_is_not_reused(store: Store,
                                                           tmp_path: Path) -> None:
    """The engine checks its cached parent with two stats, not by reading the floor.
    When another ckptd published after it and compacted past it, and was killed while
    removing the older files, the cached parent's file may still be there; compaction
    removes oldest first, so the next one is too, and the engine lists the chain."""
    rec = GroundTruthRecorder()
    with Target.churn(threads=1, base_mib=1, seed=23) as t, Engine(store) as eng:
        mine = [eng.snapshot(t.pid) for _ in range(3)]
        r = subprocess.run([sys.executable, "-c", OTHER_CKPTD, str(store.root), str(t.pid)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == -signal.SIGKILL, r.stderr
        chain = mine[-1].chain
        newest = f"{chain}-6"
        assert store.floor(chain) == 6
        assert store.snapshot_files(chain) == [mine[2].id, f"{chain}-4", f"{chain}-5", newest]
        nxt = eng.snapshot(t.pid, on_frozen=rec)
    # Extends the chain (full or delta, as the other ckptd's tracking state allows),
    # instead of taking seq 4, which would be below the floor and never listed.
    assert nxt.id == f"{chain}-7" and nxt.parent in (newest, None)
    assert store.snapshot_ids(chain) == [newest, nxt.id]
    assert_materializes_to(store, nxt.id, rec.last, tmp_path / "m")
    assert store_reader.verify(store) == (2, [])


@needs_root
def test_a_new_store_is_of_the_current_version(store: Store) -> None:
    chain, truths = _chain(store, 2, seed=24)
    assert FORMAT_VERSION == 4
    assert json.loads((store.root / "STORE.json").read_text())["version"] == 4
    assert store.chain_info(chain).format_version == 4
    assert all(store.get(i).format_version == 4 for i in truths)


@needs_root
@pytest.mark.parametrize("old_version", [1, 2])
def test_an_older_store_is_upgraded_at_its_first_floor(
        store: Store, tmp_path: Path, old_version: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store created by an older ckptd keeps its version while this one only adds
    snapshots (an older ckptd still opens it, and refuses each new file by its
    version). Before the first floor, STORE.json says version 3, so that an older
    ckptd, which would list the files below a floor, refuses the whole store."""
    info_path = store.root / "STORE.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "version": old_version}))
    store = Store.open(store.root)
    chain, truths = _chain(store, 4, seed=25)
    ids = list(truths)
    assert json.loads(info_path.read_text())["version"] == old_version
    compact_chain(store, chain, ids[0])  # nothing to remove: no floor
    assert store.floor(chain) == 1
    assert json.loads(info_path.read_text())["version"] == old_version
    # An older ckptd (reading versions 1 and 2) opens it, and refuses the new files.
    with monkeypatch.context() as m:
        m.setattr(store_module, "READABLE_VERSIONS", (1, 2))
        with pytest.raises(StoreError, match="is a snapshot of format version 4; this ckptd "
                                             "reads versions 1, 2: use a ckptd release"):
            Store.open(store.root).get(ids[1])
    compact_chain(store, chain, ids[2])
    assert json.loads(info_path.read_text()) == {**info, "version": 3}
    assert info_path.stat().st_mode & 0o777 == 0o600
    assert store.floor(chain) == parse_snapshot_id(ids[2])[1]
    with monkeypatch.context() as m:
        m.setattr(store_module, "READABLE_VERSIONS", (1, 2))
        with pytest.raises(StoreError, match=f"{info_path} is a store of format version 3; "
                                             "this ckptd reads versions 1, 2: use a ckptd "
                                             "release that matches the store"):
            Store.open(store.root)
    for sid in ids[2:]:
        assert_materializes_to(Store.open(store.root), sid, truths[sid], tmp_path / sid)
    assert store_reader.verify(store) == (2, [])


def test_a_floor_of_an_unknown_version_or_damaged_is_refused(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s", create=True)
    chain = store.create_chain({"pid": 4242, "start_time": 1, "mm_fingerprint": "1:2:3:4",
                                "comm": "x", "exe": None, "cmdline": [], "uid": 0}).chain
    path = store.chain_dir(chain) / "FLOOR.json"
    good = {"format_version": 3, "chain": chain, "floor": 5, "created": time.time()}
    path.write_text(json.dumps(good))
    assert store.floor(chain) == 5
    cases = {
        json.dumps({**good, "format_version": 5}):
            (2, f"{path} is a chain floor of format version 5; this ckptd reads versions "
                "1, 2, 3, 4: use a ckptd release that matches the store"),
        json.dumps({**good, "format_version": 5, "floor": "x"}):  # version first
            (2, "chain floor of format version 5"),
        "{": (4, "FLOOR.json: not JSON"),
        json.dumps({**good, "floor": 0}): (4, "('floor',): Input should be greater"),
        json.dumps({**good, "extra": 1}): (4, "('extra',): Extra inputs"),
        json.dumps({**good, "chain": "4242-9"}): (4, "names chain '4242-9'"),
    }
    for raw, (code, message) in cases.items():
        path.write_text(raw)
        with pytest.raises(StoreError if code == 2 else CorruptStore) as info:
            store.snapshot_ids(chain)
        assert message in str(info.value)
        assert message in _one_line_error(run_cli("list", "--store", str(store.root)), code)
        r = run_cli("verify", "--store", str(store.root))
        assert r.returncode == 1 and message in r.stderr
