"""Compaction folds old snapshots into a new base; a crash at any step loses nothing."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import GroundTruth, GroundTruthRecorder, Target, assert_materializes_to, needs_root

from ckptd.engine import Engine
from ckptd.errors import CkptdError, UserError
from ckptd.intervals import contains, normalize
from ckptd.kernel import procfs
from ckptd.kernel.abi import PAGE_SIZE
from ckptd.store import SnapshotMeta, Store
from ckptd.store import compact as compact_module
from ckptd.store import reader as store_reader
from ckptd.store.compact import compact_chain
from ckptd.store.format import FLOOR_VERSION, FORMAT_VERSION, vmas_json
from ckptd.store.writerid import writer_id

pytestmark = needs_root


def _chain_of_snapshots(store: Store, n: int, base_mib: int = 8
                        ) -> tuple[str, dict[str, GroundTruth]]:
    rec = GroundTruthRecorder()
    truths: dict[str, GroundTruth] = {}
    with Target.churn(threads=2, base_mib=base_mib, seed=3) as t, Engine(store) as eng:
        for _ in range(n):
            time.sleep(0.03)
            meta = eng.snapshot(t.pid, on_frozen=rec)
            truths[meta.id] = rec.last
    return meta.chain, truths


def _check_all(store: Store, truths: dict[str, GroundTruth], out: Path) -> list[str]:
    listed = [m.id for m in store.list_snapshots()]
    for sid in listed:
        assert_materializes_to(store, sid, truths[sid], out / f"{sid}-{time.monotonic_ns()}")
    assert store_reader.verify(store)[1] == []
    return listed


def test_compaction_folds_into_a_new_base(store: Store, tmp_path: Path) -> None:
    chain, truths = _chain_of_snapshots(store, 10)
    ids = list(truths)
    summary = compact_chain(store, chain, ids[5])
    assert "now a full base" in summary
    listed = _check_all(store, truths, tmp_path)
    assert listed == ids[5:]
    base = store.get(ids[5])
    assert base.kind == "full" and base.parent is None
    assert base.full_reason and "compacted" in base.full_reason
    assert store.lineage(ids[-1])[0].id == ids[5]
    # Old data files are gone: only the new base's and the later deltas' remain.
    data = {p.name for p in (store.chain_dir(chain) / "data").iterdir()}
    assert data == {m.data_file for m in store.list_snapshots() if m.data_file}
    # Snapshots continue on top of it.
    with pytest.raises(UserError, match="not in chain"):
        compact_chain(store, "1-1", ids[6])


def test_compacting_the_newest_keeps_tracking_incremental(store: Store, tmp_path: Path) -> None:
    rec = GroundTruthRecorder()
    with Target.churn(threads=2, base_mib=8, seed=5) as t, Engine(store) as eng:
        metas = [eng.snapshot(t.pid) for _ in range(4)]
        compact_chain(store, metas[-1].chain, metas[-1].id)
        nxt = eng.snapshot(t.pid, on_frozen=rec)
    assert nxt.kind == "delta" and nxt.parent == metas[-1].id
    assert [m.id for m in store.list_snapshots()] == [metas[-1].id, nxt.id]
    assert_materializes_to(store, nxt.id, rec.last, tmp_path / "m")


# A target with one region of REGION_PAGES pages in which only the first 3 of every 8
# pages hold content: its full snapshot packs many 3-page extents into each frame. It
# answers "fill P ..." by writing new content into those pages (holes included).
REGION_PAGES = 768
HOLES = """
import ctypes, mmap, random, sys
P, N = 4096, int(sys.argv[1])
m = mmap.mmap(-1, N * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_NOHUGEPAGE)  # the holes stay unpopulated
rng = random.Random(7)
def fill(p):
    m[p * P : (p + 1) * P] = rng.randbytes(64) * (P // 64)
for p in range(N):
    if p % 8 < 3:
        fill(p)
print("ready", flush=True)
print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
for line in sys.stdin:
    for p in line.split()[1:]:
        fill(int(p))
    print("ok", flush=True)
"""


FrameKey = tuple[str, int]  # (snapshot id, frame index)


def _frame_extents(meta: SnapshotMeta, frame: int) -> list[tuple[int, int, int]]:
    return [(e.addr, e.pages, e.skip) for e in meta.extents if e.frame == frame]


def _whole_frames(lineage: list[SnapshotMeta]) -> set[FrameKey]:
    """The frames whose every page the page map of lineage[-1] takes from that frame,
    by the definition, page by page: a page comes from the newest snapshot that stored
    it (or zeroed it), as long as it held content at every snapshot since."""
    src: dict[int, FrameKey | None] = {}
    for m in lineage:
        for e in m.extents:
            for k in range(e.pages):
                src[e.addr + k * PAGE_SIZE] = (m.id, e.frame)
        for z in m.zeros:
            for k in range(z.pages):
                src[z.addr + k * PAGE_SIZE] = None
        present = normalize(tuple(r) for r in m.present)  # type: ignore[misc]
        src = {a: v for a, v in src.items() if contains(present, a)}
    whole: set[FrameKey] = set()
    for m in lineage:
        for f in range(len(m.frames)):
            if all(src.get(addr + k * PAGE_SIZE) == (m.id, f)
                   for addr, pages, _ in _frame_extents(m, f) for k in range(pages)):
                whole.add((m.id, f))
    return whole


def _raw_frames(store: Store, metas: list[SnapshotMeta]) -> dict[FrameKey, bytes]:
    reader = store_reader.FrameReader(store, {m.id: m for m in metas})
    try:
        return {(m.id, f): reader.raw_frame(m.id, f)
                for m in metas for f in range(len(m.frames))}
    finally:
        reader.close()


def _compact_checking_raw_copies(store: Store, upto: str, rewritten: FrameKey
                                 ) -> tuple[SnapshotMeta, set[FrameKey]]:
    """Compact up to `upto`; check that exactly the source frames that stay whole were
    copied unchanged (same compressed bytes, crc32 and extents), and that `rewritten`,
    a frame of several extents one of whose pages got new content, is not among them
    and was compressed again. Returns the new base and the whole source frames."""
    lineage = store.lineage(upto)
    whole = _whole_frames(lineage)
    before = _raw_frames(store, lineage)
    metas = {m.id: m for m in lineage}
    summary = compact_chain(store, lineage[-1].chain, upto)
    base = store.get(upto)
    after = _raw_frames(store, [base])
    copied = re.search(r"\((\d+) of (\d+) frames copied unchanged\)", summary)
    assert copied, summary
    assert (int(copied[1]), int(copied[2])) == (len(whole), len(base.frames))
    new_by_bytes = {raw: f for (_, f), raw in after.items()}
    for key in whole:
        f = new_by_bytes.get(before[key])
        assert f is not None, f"whole frame {key} was not copied unchanged"
        src = metas[key[0]]
        assert base.frames[f].crc32 == src.frames[key[1]].crc32
        assert _frame_extents(base, f) == _frame_extents(src, key[1])
    assert len(_frame_extents(metas[rewritten[0]], rewritten[1])) > 1
    assert rewritten not in whole and before[rewritten] not in new_by_bytes
    return base, whole


def test_compaction_copies_multi_extent_frames_that_stay_whole(store: Store,
                                                               tmp_path: Path) -> None:
    """Frames of several extents are copied raw when nothing newer replaced any of
    their pages, and recompressed when something did; pages that land between the
    extents of a copied frame put the new base's extents out of address order. Every
    snapshot restores byte for byte, through two compactions."""
    rec = GroundTruthRecorder()
    truths: dict[str, GroundTruth] = {}
    with Target([sys.executable, "-c", HOLES, str(REGION_PAGES)]) as t, \
            Engine(store) as eng:
        region = int(t.readline())
        end = region + REGION_PAGES * PAGE_SIZE

        def snap() -> SnapshotMeta:
            meta = eng.snapshot(t.pid, on_frozen=rec)
            truths[meta.id] = rec.last
            return meta

        def page(addr: int) -> str:
            return str((addr - region) // PAGE_SIZE)

        first = snap()
        assert first.kind == "full"
        in_region = [f for f in range(len(first.frames))
                     if all(region <= a < end for a, _, _ in _frame_extents(first, f))
                     and len(_frame_extents(first, f)) > 1]
        assert len(in_region) >= 3, in_region
        x, y, z = in_region[:3]
        x_ext, y_ext = _frame_extents(first, x), _frame_extents(first, y)
        # Overwrite a page of frame x; write the hole right after y's first extent
        # (y itself stays whole), and a few other holes.
        hole = y_ext[0][0] + y_ext[0][1] * PAGE_SIZE
        assert hole < y_ext[1][0]
        assert t.send(f"fill {page(x_ext[1][0] + PAGE_SIZE)} {page(hole)} 4 13 500") == "ok"
        second = snap()

        base, whole = _compact_checking_raw_copies(store, second.id, (first.id, x))
        assert (first.id, y) in whole and (first.id, z) in whole
        # The hole's page comes from another frame than y's extents around it, and
        # lies between them.
        addrs = [e.addr for e in base.extents]
        assert addrs != sorted(addrs)
        hole_frame = next(e.frame for e in base.extents if e.addr <= hole < e.addr
                          + e.pages * PAGE_SIZE)
        y_new = next(e.frame for e in base.extents if e.addr == y_ext[0][0])
        z_new = next(e.frame for e in base.extents
                     if e.addr == _frame_extents(first, z)[0][0])
        assert hole_frame != y_new
        assert _check_all(store, truths, tmp_path / "1") == [second.id]

        # Now the compacted base's frames are the sources: y loses a page, z and
        # the other untouched frames are copied raw again.
        assert t.send(f"fill {page(y_ext[-1][0])}") == "ok"
        snap()
        fourth = snap()
        _, whole = _compact_checking_raw_copies(store, fourth.id, (second.id, y_new))
        assert (second.id, z_new) in whole
        fifth = snap()
        assert fifth.kind == "delta" and fifth.parent == fourth.id
    assert _check_all(store, truths, tmp_path / "2") == [fourth.id, fifth.id]


def test_compaction_keeps_rewritten_pages_apart_from_unchanged_ones(store: Store,
                                                                   tmp_path: Path) -> None:
    """Pages written since the old base go into frames of their own in the new base. A
    process that keeps writing the same few pages then leaves the other frames whole,
    and the next compaction copies them raw. (Packed with unchanged pages, each written
    page kept a frame of up to 64 partial, compaction after compaction.)"""
    rec = GroundTruthRecorder()
    truths: dict[str, GroundTruth] = {}
    with Target([sys.executable, "-c", HOLES, str(REGION_PAGES)]) as t, \
            Engine(store) as eng:
        region = int(t.readline())

        def snap() -> SnapshotMeta:
            meta = eng.snapshot(t.pid, on_frozen=rec)
            truths[meta.id] = rec.last
            return meta

        def frame_pages(meta: SnapshotMeta, f: int) -> set[int]:
            return {a + k * PAGE_SIZE for a, n, _ in _frame_extents(meta, f)
                    for k in range(n)}

        # Content pages far apart, one in each of four frames of the full snapshot, and
        # a hole: written in four rounds, then the hole alone in the next, so that the
        # last delta's frame is partly replaced and its pages must be compressed again.
        hot_pages = [0, 200, 300, 400, 600]
        hot = {region + p * PAGE_SIZE for p in hot_pages}
        cold = {region + p * PAGE_SIZE for p in range(REGION_PAGES)
                if p % 8 < 3 and p not in hot_pages}
        fill = "fill " + " ".join(map(str, hot_pages))

        def apart(meta: SnapshotMeta) -> list[int]:
            """The frames holding written pages; none may hold an unchanged one (they
            may hold pages the target's interpreter wrote meanwhile)."""
            frames = [f for f in range(len(meta.frames)) if frame_pages(meta, f) & hot]
            assert not [f for f in frames if frame_pages(meta, f) & cold], frames
            return frames

        assert snap().kind == "full"
        for _ in range(4):  # written over and over, as a process does
            assert t.send(fill) == "ok"
            snap()
        assert t.send("fill 300") == "ok"
        third = snap()
        compact_chain(store, third.chain, third.id)
        base = store.get(third.id)
        assert set().union(*(frame_pages(base, f) for f in apart(base))) >= hot

        # Written again: every frame of unchanged pages is copied raw.
        assert t.send(fill) == "ok"
        fourth = snap()
        before = _raw_frames(store, [base])
        cold_frames = [f for f in range(len(base.frames)) if frame_pages(base, f) & cold]
        compact_chain(store, fourth.chain, fourth.id)
        again = store.get(fourth.id)
        after = set(_raw_frames(store, [again]).values())
        assert [f for f in cold_frames if before[(base.id, f)] not in after] == []
        apart(again)
        fifth = snap()
        assert fifth.kind == "delta" and fifth.parent == fourth.id
    assert _check_all(store, truths, tmp_path / "m") == [fourth.id, fifth.id]


def test_compaction_packs_pages_written_all_over_with_the_rest(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the deltas wrote mostly new pages each time, keeping their pages apart
    would cut a run of unchanged pages at each of them, for nothing (new writes will
    land elsewhere): they are packed in address order with the rest. The same chain,
    compacted in three copies of the store: never apart, by the rule, always apart."""
    rec = GroundTruthRecorder()
    truths: dict[str, GroundTruth] = {}
    with Target([sys.executable, "-c", HOLES, str(REGION_PAGES)]) as t, \
            Engine(store) as eng:
        t.readline()

        def snap() -> SnapshotMeta:
            meta = eng.snapshot(t.pid, on_frozen=rec)
            truths[meta.id] = rec.last
            return meta

        snap()
        written = [p for p in range(REGION_PAGES) if p % 8 == 1]  # a third of the content
        assert t.send("fill " + " ".join(map(str, written))) == "ok"
        snap()
        # Half of them again: the first delta's frames go partial, so its pages left
        # are compressed again, with the base's pages around them.
        assert t.send("fill " + " ".join(map(str, written[::2]))) == "ok"
        third = snap()
    rule = compact_module._keep_apart
    extents = {}
    for name, choice in (("never", lambda *a: False), ("rule", rule),
                         ("always", lambda *a: True)):
        copy = tmp_path / name
        shutil.copytree(store.root, copy)
        monkeypatch.setattr(compact_module, "_keep_apart", choice)
        other = Store.open(copy)
        compact_chain(other, third.chain, third.id)
        extents[name] = len(other.get(third.id).extents)
        assert_materializes_to(other, third.id, truths[third.id], tmp_path / f"m-{name}")
    assert extents["rule"] == extents["never"] < extents["always"], extents


# The start of the crash scripts below: kill_at_nth_fsync(n) makes the process SIGKILL
# itself right before its n-th fsync from then on.
FSYNC_KILLER = """
import os, signal, sys
from pathlib import Path
def kill_at_nth_fsync(n):
    calls = 0
    real_fsync = os.fsync
    def counting_fsync(fd):
        nonlocal calls
        calls += 1
        if calls == n:
            os.kill(os.getpid(), signal.SIGKILL)
        real_fsync(fd)
    os.fsync = counting_fsync
"""

# kill_at_nth_step(n): SIGKILL right before the n-th fsync, rename or unlink from then on,
# which are the steps that change what a crash leaves on disk.
STEP_KILLER = """
import os, signal, sys
from pathlib import Path
def kill_at_nth_step(n):
    calls = 0
    def wrap(real):
        def step(*args, **kw):
            nonlocal calls
            calls += 1
            if calls == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kw)
        return step
    for name in ("fsync", "rename", "unlink"):
        setattr(os, name, wrap(getattr(os, name)))
"""

KILL_COMPACTION_AT_NTH_STEP = STEP_KILLER + """
from ckptd.store import Store
from ckptd.store.compact import compact_chain
store = Store.open(Path(sys.argv[1]))
kill_at_nth_step(int(sys.argv[3]))
compact_chain(store, sys.argv[2].rsplit('-', 1)[0], sys.argv[2])
print("completed")
"""


@pytest.mark.parametrize("store_version", [FORMAT_VERSION, 2])
def test_a_crash_at_every_step_of_compaction_loses_nothing(store: Store, tmp_path: Path,
                                                           store_version: int) -> None:
    """Kill a compaction right before each of its fsyncs, renames and unlinks in turn,
    each time from the same chain: writing and publishing the new base, upgrading a
    version 2 store, writing the floor, removing the older files (with no fsync between
    them) and their data. Whatever is left lists the whole chain or the part from the
    new base on, every listed snapshot restores byte for byte, and the files a kill
    leaves below the floor cannot be read; compacting again and clean_leftovers remove
    them."""
    chain, truths = _chain_of_snapshots(store, 6, base_mib=1)
    ids = list(truths)
    upto = ids[3]
    new_floor = int(upto.rsplit("-", 1)[1])  # its seq
    if store_version != FORMAT_VERSION:  # as version 2 wrote it: the same files, but for
        # the versions, and every snapshot holding its own vmas (no vmas_from before 4)
        for path, key in [(store.root / "STORE.json", "version"),
                          (store.chain_dir(chain) / "CHAIN.json", "format_version"),
                          *((store.snapshot_path(i), "format_version") for i in ids)]:
            obj = json.loads(path.read_text())
            if obj.pop("vmas_from", None) is not None:
                obj["vmas"] = json.loads(vmas_json(store.get(obj["id"]).mappings))
            path.write_text(json.dumps({**obj, key: store_version}))
    pristine = tmp_path / "pristine"
    shutil.copytree(store.root, pristine)
    states = set()
    restored = set()
    for n in range(1, 200):
        root = tmp_path / f"s{n}"
        shutil.copytree(pristine, root)
        r = subprocess.run([sys.executable, "-c", KILL_COMPACTION_AT_NTH_STEP, str(root), upto,
                            str(n)], capture_output=True, text=True, timeout=120)
        s = Store.open(root)
        # Materializing every listed snapshot is most of the time here: once for each
        # set of files the listed snapshots are read from (many kills leave the same).
        listed_files = _files_read_to_restore(s)
        if listed_files in restored:
            listed = [m.id for m in s.list_snapshots()]
            assert store_reader.verify(s)[1] == []
        else:
            listed = _check_all(s, truths, tmp_path / f"m{n}")
            restored.add(listed_files)
        floor = s.floor(chain)
        assert listed == (ids[3:] if floor > 1 else ids)
        version = json.loads((root / "STORE.json").read_text())["version"]
        # No floor in a store an older ckptd reads.
        assert version == max(store_version, FLOOR_VERSION) or floor == 1
        left_below = [i for i in s.snapshot_files(chain) if i not in listed]
        for sid in left_below:
            with pytest.raises(UserError, match="no snapshot"):
                s.get(sid)
        states.add((floor, s.get(upto).kind, len(left_below), version))
        # Compacting again finishes the job, and the leftovers of the killed one go.
        compact_chain(s, chain, upto)
        with s.lock_chain(chain):
            s.clean_leftovers(chain)
        s.drop_spares()
        assert sorted(os.listdir(s.chain_dir(chain) / "snapshots")) == \
            sorted(f"{i}.json" for i in ids[3:])
        assert store_reader.verify(s) == (3, [])
        assert s.floor(chain) == s.get(upto).seq
        assert json.loads((root / "STORE.json").read_text())["version"] == \
            max(store_version, FLOOR_VERSION)
        s.close()  # its own owner lock (from the compaction above) goes too
        s.clean_tmp()
        assert os.listdir(s.tmp_dir) == []
        shutil.rmtree(root)
        if r.returncode == 0:
            assert "completed" in r.stdout
            break
        assert r.returncode == -signal.SIGKILL, r.stderr
    else:
        raise AssertionError("compaction never completed")
    # It was interrupted before the base was published, after it, after the floor with
    # every older file still there, and with some of them removed.
    assert {(1, "delta"), (1, "full"), (new_floor, "full")} <= {st[:2] for st in states}
    assert {st[2] for st in states if st[0] == new_floor} >= {0, 1, 2, 3}


def _files_read_to_restore(store: Store) -> str:
    """A digest of what restoring the listed snapshots reads: their metadata and data
    (data files by content: each compaction run names its new one at random)."""
    h = hashlib.sha256()
    for m in store.list_snapshots():
        data = hashlib.sha256(store.data_path(m).read_bytes()).hexdigest() \
            if m.data_file else None
        h.update(m.model_copy(update={"data_file": data}).model_dump_json().encode())
    return h.hexdigest()


def test_clean_orphans_goes_by_the_id_in_the_name(store: Store, tmp_path: Path) -> None:
    """Files of unpublished ids go unparsed, a published id keeps only the file its
    metadata names, and names of any other form are left alone."""
    chain, truths = _chain_of_snapshots(store, 3)
    ids = list(truths)
    base = store.get(ids[0])
    assert base.data_file is not None  # an 8 MiB full snapshot: not inline
    data_dir = store.chain_dir(chain) / "data"
    content = store.data_path(base).read_bytes()
    stale_of_published = f"{ids[0]}.0badc0de.zst"
    of_unpublished = f"{chain}-99.0123abcd.zst"
    foreign = ["notes.zst", f"{ids[0]}.zst", f"{ids[0]}.0BADC0DE.zst",
               f"{chain}-98.0123abcd.zst.bak", f".{ids[1]}.0123abcd.zst"]
    for name in [stale_of_published, of_unpublished, *foreign]:
        (data_dir / name).write_bytes(content)
    with store.lock_chain(chain):
        removed = store.clean_orphans(chain)
    assert sorted(removed) == sorted([stale_of_published, of_unpublished])
    left = {p.name for p in data_dir.iterdir()}
    assert left == {base.data_file, *foreign} | {
        m.data_file for m in store.list_snapshots() if m.data_file}
    _check_all(store, truths, tmp_path)
    with store.lock_chain(chain):
        assert store.clean_orphans(chain) == []  # nothing else is an orphan


def _rejection(call: Callable[[], object]) -> tuple[type[BaseException], str]:
    with pytest.raises(CkptdError) as info:
        call()
    return type(info.value), str(info.value)


def _vmas_first(obj: dict[str, object], vmas: bytes) -> bytes:
    """`obj` as capture writes a snapshot file (compact, `vmas` first), with `vmas` as
    the JSON of its mappings."""
    rest = json.dumps({k: v for k, v in obj.items() if k != "vmas"}, separators=(",", ":"))
    return b'{"vmas":' + vmas + b"," + rest[1:].encode()


def test_compaction_rejects_a_damaged_folded_snapshot_as_get_does(store: Store) -> None:
    """The folded snapshots are parsed only in part, but a damaged or unknown-version one
    fails with the error the full parse gives, and the chain is left as it was: also when
    the file begins with the same mappings as the snapshot compacted into, which the
    parse skips."""
    chain, truths = _chain_of_snapshots(store, 4)
    ids = list(truths)
    victim = store.snapshot_path(ids[1])
    good = victim.read_bytes()
    upto_vmas = vmas_json(store.get(ids[3]).mappings)
    # As version 3 wrote every delta: holding its vmas (the skipped bytes), no vmas_from.
    obj = json.loads(good)
    obj.pop("vmas_from")
    obj["vmas"] = json.loads(upto_vmas)
    damages = {  # what the error must name: the parse stops at it
        "format version 5": {**obj, "format_version": 5},
        "format version 5 ": {  # the version is checked before anything else
            **obj, "format_version": 5, "frames": "nope"},
        "'frames'": {**obj, "frames": "nope"},
        "'extents', 0, 'pages'": {**obj, "extents": [{"addr": 0}]},
        "'parent'": {k: v for k, v in obj.items() if k != "parent"},
        "both set": {**obj, "data_file": "x", "data_inline": ""},
    }
    as_captured = _vmas_first(obj, upto_vmas)
    damaged = [
        ("not JSON", good[: len(good) // 2]),
        ("not JSON", as_captured[: len(as_captured) - 100]),
        ("not JSON", as_captured[:-1] + b",}"),
        # Only the file's first member: `{` + the rest alone would be valid JSON.
        ("not JSON", b'{"vmas":' + upto_vmas + b",}"),
        *((what, json.dumps(o).encode()) for what, o in damages.items()),
        *((what, _vmas_first(o, upto_vmas)) for what, o in damages.items()),
    ]
    for what, raw in damaged:
        victim.write_bytes(raw)
        expected = _rejection(lambda: store.get(ids[1]))
        assert what.strip() in expected[1]
        assert _rejection(lambda: store.pages(ids[1])) == expected, what
        assert _rejection(lambda: store.lineage(ids[3])) == expected, what
        assert _rejection(lambda: store.fold_lineage(ids[3])) == expected, what
        assert _rejection(lambda: compact_chain(store, chain, ids[3])) == expected, what
        assert store.snapshot_ids(chain) == ids, what
    # Undamaged, the file with the skipped mappings folds as the plain parse reads it.
    victim.write_bytes(as_captured)
    assert store.fold_lineage(ids[3])[1][1] == store.pages(ids[1])
    victim.write_bytes(good)
    compact_chain(store, chain, ids[3])
    assert store.snapshot_ids(chain) == ids[3:]


def test_deltas_share_unchanged_mappings_and_folding_skips_repeated_ones(
        store: Store) -> None:
    """A delta whose mappings did not change names the snapshot that holds them
    (vmas_from) instead of repeating them, and readers resolve it. Files that do repeat
    them (as version 3 wrote every delta) begin with the same `vmas` as the snapshot
    compacted into; folding parses them without those bytes, and reads exactly what the
    plain parse of each file reads."""
    with Target.python("import sys\nprint('ready', flush=True)\nsys.stdin.readline()\n") \
            as t, Engine(store) as eng:
        ids = [eng.snapshot(t.pid).id for _ in range(4)]
    files = {i: json.loads(store.snapshot_path(i).read_bytes()) for i in ids}
    base_vmas = store.get(ids[0]).mappings
    assert files[ids[0]]["vmas"] and files[ids[0]]["vmas_from"] is None
    for sid in ids[1:]:
        assert files[sid]["vmas"] is None and files[sid]["vmas_from"] == ids[0]
        assert store.get(sid).vmas == base_vmas and store.get(sid).vmas_from is None
        assert len(store.snapshot_path(sid).read_bytes()) < len(vmas_json(base_vmas))
    assert [m.vmas for m in store.lineage(ids[-1])] == [base_vmas] * 4
    for sid in ids[1:-1]:
        obj = {k: v for k, v in files[sid].items() if k != "vmas_from"}
        store.snapshot_path(sid).write_bytes(
            _vmas_first({**obj, "format_version": 3}, vmas_json(base_vmas)))
    meta, lineage = store.fold_lineage(ids[-1])
    assert [m.id for m in lineage] == ids and lineage[-1] is meta
    skipped = b'{"vmas":' + vmas_json(meta.mappings) + b","
    for sid, folded in zip(ids[1:-1], lineage[1:-1], strict=True):
        assert store.snapshot_path(sid).read_bytes().startswith(skipped)
        assert folded == store.pages(sid)
    assert lineage[0] == store.pages(ids[0])


def test_deltas_sharing_the_vmas_of_a_compacted_snapshot_read_them_from_the_new_base(
        store: Store, tmp_path: Path) -> None:
    """Compaction retires the snapshot that holds the vmas later deltas share, before and
    after it: those deltas read them from the chain's floor snapshot, the new base,
    which has the same mappings; the engine goes on naming the retired holder."""
    with Target.python("import sys\nprint('ready', flush=True)\nsys.stdin.readline()\n") \
            as t, Engine(store) as eng:
        ids = [eng.snapshot(t.pid).id for _ in range(4)]
        chain = store.get(ids[0]).chain
        compact_chain(store, chain, ids[2])
        ids += [eng.snapshot(t.pid).id for _ in range(2)]
    assert store.snapshot_ids(chain) == ids[2:]
    vmas = store.get(ids[2]).mappings
    for sid in ids[3:]:
        assert json.loads(store.snapshot_path(sid).read_bytes())["vmas_from"] == ids[0]
        assert store.get(sid).vmas == vmas
    assert [m.vmas for m in store.lineage(ids[-1])] == [vmas] * 4
    assert [m.vmas for m in store.chain_snapshots(chain)] == [vmas] * 4
    assert store_reader.verify(store) == (4, [])
    index = store_reader.materialize(store, ids[-1], tmp_path / "out")
    assert len(index["vmas"]) == sum(v.capture == "private" for v in vmas)
    # The holder gone without a compaction having raised the floor past it is damage.
    store.snapshot_path(ids[2]).unlink()
    with pytest.raises(CkptdError, match=f"shares the vmas of {ids[2]}, which is missing"):
        store.get(ids[3])
    count, problems = store_reader.verify(store)
    assert count == 3 and any(f"shares the vmas of {ids[2]}, which is missing" in p
                              for p in problems)


def test_compaction_keeps_folded_files_as_spares_that_later_snapshots_reuse(
        store: Store, tmp_path: Path) -> None:
    """Compaction renames the folded snapshots' metadata files to spare (dot) names; the
    listing ignores them; the next snapshots are written into them (same inodes) and
    restore byte for byte; closing the engine deletes the rest. Leftovers of a ckptd
    that is gone are cleaned, a live one's kept."""
    rec = GroundTruthRecorder()
    truths: dict[str, GroundTruth] = {}
    with Target.churn(threads=2, base_mib=8, seed=11) as t, Engine(store) as eng:
        for _ in range(8):
            meta = eng.snapshot(t.pid, on_frozen=rec)
            truths[meta.id] = rec.last
        ids = list(truths)
        snaps = store.chain_dir(meta.chain) / "snapshots"
        compact_chain(store, meta.chain, ids[5])
        spares = {n: os.stat(snaps / n).st_ino for n in os.listdir(snaps)
                  if n.startswith(".spare.")}
        assert len(spares) == 5 and all(f".spare.{writer_id()}." in n for n in spares)
        assert [m.id for m in store.list_snapshots()] == ids[5:]
        later = []
        for _ in range(3):
            meta = eng.snapshot(t.pid, on_frozen=rec)
            truths[meta.id] = rec.last
            later.append(meta.id)
        reused = {os.stat(store.snapshot_path(i)).st_ino for i in later}
        assert reused <= set(spares.values())
        left = [n for n in os.listdir(snaps) if n.startswith(".spare.")]
        assert len(left) == 2
    # Closing the engine deletes the spares it will not use.
    assert not [n for n in os.listdir(snaps) if n.startswith(".")]
    assert _check_all(store, truths, tmp_path) == ids[5:] + later
    assert store_reader.verify(store) == (6, [])
    # A ckptd that died left a spare and a temporary file; a live one's are kept.
    gone = _dead_pid()
    (snaps / f".spare.{gone}.3").write_bytes(b"{}")
    (snaps / f".{later[-1]}.json.{gone}.tmp").write_bytes(b"{")
    (snaps / f".spare.{os.getpid()}.99").write_bytes(b"{}")
    removed = store.clean_leftovers(meta.chain)
    assert sorted(removed) == sorted([f".spare.{gone}.3", f".{later[-1]}.json.{gone}.tmp"])
    assert [n for n in os.listdir(snaps) if n.startswith(".")] == [f".spare.{os.getpid()}.99"]


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


KILL_PUBLISHING_THROUGH_A_SPARE = FSYNC_KILLER + """
from ckptd.engine import Engine
from ckptd.store import Store
from ckptd.store.compact import compact_chain
store = Store.open(Path(sys.argv[1]))
pid, n = int(sys.argv[2]), int(sys.argv[3])
with Engine(store) as eng:
    eng.snapshot(pid)
    last = eng.snapshot(pid)
    compact_chain(store, last.chain, last.id)   # the older ones become spares
    kill_at_nth_fsync(n)
    eng.snapshot(pid)                              # published through a spare
print("completed")
"""


def test_a_crash_while_publishing_through_a_spare_loses_nothing(store: Store,
                                                                 tmp_path: Path) -> None:
    rec = GroundTruthRecorder()
    with Target.churn(threads=2, base_mib=8, seed=13) as t:
        with Engine(store) as eng:
            first = eng.snapshot(t.pid, on_frozen=rec)
        for n in range(1, 40):
            r = subprocess.run([sys.executable, "-c", KILL_PUBLISHING_THROUGH_A_SPARE,
                                str(store.root), str(t.pid), str(n)],
                               capture_output=True, text=True, timeout=120)
            count, problems = store_reader.verify(store)
            assert problems == [] and count >= 1
            listed = [m.id for m in store.list_snapshots()]
            # Whatever is listed restores: the newest needs its whole lineage.
            store_reader.materialize(store, listed[-1], tmp_path / f"m{n}")
            if r.returncode == 0:
                assert "completed" in r.stdout
                break
            assert r.returncode == -signal.SIGKILL, r.stderr
        else:
            raise AssertionError("the snapshot through a spare never completed")
        assert n > 2
        assert t.alive()
    assert first.id not in listed  # compacted away by the runs


def test_forgetting_a_process_deletes_its_chains_spares(store: Store) -> None:
    """The service forgets a process it unregisters: the spares of its chain, which no
    later snapshot will use, are deleted then, not when the service stops."""
    with Target.churn(threads=1, base_mib=4, seed=17) as t, Engine(store) as eng:
        metas = [eng.snapshot(t.pid) for _ in range(4)]
        snaps = store.chain_dir(metas[-1].chain) / "snapshots"
        compact_chain(store, metas[-1].chain, metas[-1].id)
        assert len([n for n in os.listdir(snaps) if n.startswith(".spare.")]) == 3
        eng.forget(t.pid)
        assert not [n for n in os.listdir(snaps) if n.startswith(".")]
        assert [m.id for m in store.list_snapshots()] == [metas[-1].id]


def test_a_reader_of_a_file_retired_and_reused_meanwhile_sees_no_snapshot(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader takes no lock. It opens a snapshot's file, and before it reads, a
    compaction retires that file as a spare and the next snapshot is written into the
    same inode: the reader gets another snapshot's JSON (or, mid-write, a mix) under the
    name it opened. That is a snapshot retired meanwhile, as for a file unlinked
    meanwhile, not a damaged store: a listing goes on without it, and a walk to the full
    base starts again from the new base."""
    with Target.churn(threads=1, base_mib=1, seed=5) as t, Engine(store) as eng:
        ids = [eng.snapshot(t.pid).id for _ in range(4)]
        chain = ids[0].rsplit("-", 1)[0]
        reader = Store.open(store.root)
        real = Store._read_snapshot
        race: dict[str, str] = {}  # snapshot the reader opens: compaction's upto
        published: list[str] = []

        def racing(self: Store, sid: str) -> tuple[str, bytes]:
            upto = race.pop(sid, None) if self is reader else None
            if upto is None:
                return real(self, sid)
            path = self.snapshot_file(chain, sid)
            with open(path, "rb", buffering=0) as f:  # opened, not read yet
                compact_chain(store, chain, upto)  # `sid` is the newest file it retires
                published.append(eng.snapshot(t.pid).id)  # through that very spare
                assert os.fstat(f.fileno()).st_ino == os.stat(
                    store.snapshot_path(published[-1])).st_ino
                return path, f.read()

        monkeypatch.setattr(Store, "_read_snapshot", racing)
        race[ids[2]] = ids[3]
        listed = [m.id for m in reader.chain_snapshots(chain)]
        assert published and ids[2] not in listed and ids[3] in listed
        # A restore's walk: the parent it reads becomes the next snapshot meanwhile.
        newest = eng.snapshot(t.pid).id
        race[published[0]] = newest
        assert [m.id for m in reader.lineage(newest)] == [newest]
        assert not race


def test_leftovers_of_a_dead_ckptd_whose_pid_is_in_use_again_are_removed(
        store: Store) -> None:
    with Target.churn(threads=1, base_mib=1, seed=7) as t:
        with Engine(store) as eng:
            chain = eng.snapshot(t.pid).chain
        # What a ckptd that ran as PID 1 (in a container) left when it was killed in
        # the middle of a round and of a compaction; PID 1 is now another process
        # (another start time). Its tmp/ file names an owner whose lock file went with
        # it (tmpfiles.py); its spare and temporary metadata name it `<pid>-<start>`.
        dead = f"1-{procfs.start_time(1) + 12345}"
        snaps = store.chain_dir(chain) / "snapshots"
        left = [store.tmp_dir / f"{'0b' * 8}.{chain}-2.0badcafe.zst",
                snaps / f".spare.{dead}.4", snaps / f".{chain}-2.json.{dead}.tmp",
                store.chain_dir(chain) / f".FLOOR.json.{dead}.tmp"]
        for path in left:
            path.write_bytes(b"left by a ckptd that is gone")
        ours = snaps / f".spare.{writer_id()}.7"  # a live writer's (ours): kept
        ours.write_bytes(b"{}")
        with Engine(store) as eng:  # a new process: its first round cleans up
            eng.snapshot(t.pid)
        assert [p.name for p in left if p.exists()] == []
        assert ours.exists()
