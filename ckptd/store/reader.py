"""Reading the store: page maps, materializing memory, verifying integrity."""

from __future__ import annotations

import base64
import json
import os
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from ..errors import CorruptStore, UserError
from ..intervals import IntervalMap, Span, clip_to, intersect, normalize, subtract
from ..kernel.abi import PAGE_SIZE
from .format import SnapshotData, SnapshotMeta, Vma
from .fsutil import FILE_MODE, fsync_dir, make_private_dir
from .store import Store

Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class DataRef:
    """Page content stored in `snapshot`'s data file: extent `extent`, inside frame
    `frame`. The byte offset of address A in the frame's content is A + `delta`."""

    snapshot: str
    extent: int
    frame: int
    delta: int


ZERO = "zero"
Source = DataRef | str  # DataRef, or ZERO


def page_map(store: Store, snapshot_id: str) -> tuple[SnapshotMeta, IntervalMap[Source],
                                                       list[SnapshotMeta]]:
    """For every page holding content at `snapshot_id`: where its content lives.
    Pages not in the map are absent (zeros in anonymous memory, the file's content in a
    private file mapping). Returns (meta, map, lineage)."""
    lineage = store.lineage(snapshot_id)
    return lineage[-1], IntervalMap(resolve_sources(lineage)), lineage


def resolve_sources(lineage: Sequence[SnapshotData]) -> list[tuple[int, int, Source]]:
    """The page map of the last snapshot of `lineage` (its full base first), as pieces.

    A page's content is in the newest snapshot of the lineage that stored it (or marked
    it zero), provided the page held content at every snapshot from that one on (a page
    dropped in between and not stored again is absent). Walked newest first, so each
    stored piece is looked at once: a bitmap of the pages already sourced by newer
    snapshots tells what an older piece still provides. Linear in the pieces stored, not
    in snapshots x pieces."""
    out: list[tuple[int, int, Source]] = []
    newer_present = lineage[-1].present
    valid = normalize(tuple(p) for p in newer_present)  # type: ignore[misc]
    claimed = _PageBitmap()
    for depth, meta in enumerate(reversed(lineage)):
        # Pages present in this snapshot and every newer one. `valid` is within the
        # newer snapshot's `present`, so the same `present` (usual between the rounds of
        # an idle process) leaves it as it is. Intersecting anyway was half of the time
        # resolving a chain of 86 small snapshots took.
        if meta.present != newer_present:
            valid = intersect(valid, normalize(tuple(p) for p in meta.present))  # type: ignore[misc]
            newer_present = meta.present
        if not valid:
            break
        last = depth == len(lineage) - 1  # nothing older reads `claimed` after this one
        pieces: list[tuple[int, int, Source]] = [
            (e.addr, e.addr + e.pages * PAGE_SIZE,
             DataRef(meta.id, i, e.frame, e.skip * PAGE_SIZE - e.addr))
            for i, e in enumerate(meta.extents)
        ]
        pieces.extend((z.addr, z.addr + z.pages * PAGE_SIZE, ZERO) for z in meta.zeros)
        for start, end, src in pieces:
            for vs, ve in clip_to(valid, start, end):
                for rs, re in claimed.unclaimed(vs, ve):
                    out.append((rs, re, src))
                if not last:
                    claimed.claim(vs, ve)
    return out


class _PageBitmap:
    """A set of pages as one byte per page, in chunks allocated on first use (memory
    proportional to the address ranges touched, not to the address space)."""

    SHIFT = 15  # pages per chunk: 2**15 (128 MiB of address space, 32 KiB of bitmap)

    def __init__(self) -> None:
        self.chunks: dict[int, bytearray] = {}

    def _chunks(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(chunk key, first page, end page) for each chunk [start, end) touches."""
        p, e = start // PAGE_SIZE, end // PAGE_SIZE
        while p < e:
            key = p >> self.SHIFT
            lim = min(e, (key + 1) << self.SHIFT)
            yield key, p, lim
            p = lim

    def claim(self, start: int, end: int) -> None:
        for key, p, lim in self._chunks(start, end):
            bm = self.chunks.get(key)
            if bm is None:
                bm = self.chunks[key] = bytearray(1 << self.SHIFT)
            base = key << self.SHIFT
            bm[p - base : lim - base] = b"\x01" * (lim - p)

    def unclaimed(self, start: int, end: int) -> list[Span]:
        """The parts of [start, end) not claimed, as address spans."""
        out: list[Span] = []
        for key, p, lim in self._chunks(start, end):
            bm = self.chunks.get(key)
            if bm is None:
                _add_span(out, p, lim)
                continue
            base = key << self.SHIFT
            i, stop = p - base, lim - base
            while i < stop:
                j = bm.find(1, i, stop)  # the next claimed page
                if j < 0:
                    j = stop
                if j > i:
                    _add_span(out, base + i, base + j)
                if j >= stop:
                    break
                k = bm.find(0, j, stop)  # the next unclaimed one
                i = stop if k < 0 else k
        return out


def _add_span(out: list[Span], first_page: int, end_page: int) -> None:
    s, e = first_page * PAGE_SIZE, end_page * PAGE_SIZE
    if out and out[-1][1] == s:
        out[-1] = (out[-1][0], e)
    else:
        out.append((s, e))


def unsourced(meta: SnapshotMeta, pm: IntervalMap[Source]) -> list[Span]:
    """Pages the snapshot says hold content but for which no snapshot stored any."""
    return subtract(normalize(tuple(p) for p in meta.present), pm.spans())  # type: ignore[misc]


class FrameReader:
    """Decompresses frames, keeping recent ones. Walking a page map in address order
    visits each snapshot's frames mostly in order (a capture's frames follow its
    addresses), so keeping about one frame per snapshot, and a few more, decompresses
    nearly every frame once; the default cache is sized so. A compacted base can break
    the order (a frame it copied whole may hold extents on both sides of pages of other
    frames): that costs at most a frame decompressed again, never a wrong page."""

    def __init__(self, store: Store, metas: Mapping[str, SnapshotData], cache: int = 0
                 ) -> None:
        self.store = store
        self.metas = metas
        self.files: dict[str, int] = {}
        self.inline: dict[str, bytes] = {}  # decoded data_inline, by snapshot
        self.cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self.cache_size = cache or len(metas) + 8
        self.dctx = zstandard.ZstdDecompressor()

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()

    def raw_frame(self, snapshot: str, index: int) -> bytes:
        """The compressed bytes of one frame, as stored."""
        meta = self.metas[snapshot]
        fr = meta.frames[index]
        if meta.data_inline is not None:
            raw = self._inline(snapshot)[fr.offset : fr.offset + fr.length]
            where = "inline data"
        else:
            raw = os.pread(self._fd(snapshot), fr.length, fr.offset)
            where = "data file"
        if len(raw) != fr.length:
            raise CorruptStore(f"snapshot {snapshot}: {where} truncated at frame {index}")
        return raw

    def _inline(self, snapshot: str) -> bytes:
        data = self.inline.get(snapshot)
        if data is None:
            data = self.inline[snapshot] = inline_data(self.metas[snapshot])
        return data

    def _fd(self, snapshot: str) -> int:
        fd = self.files.get(snapshot)
        if fd is None:
            path = self.store.data_path(self.metas[snapshot])
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise CorruptStore(f"snapshot {snapshot}: data file {path} is missing") \
                    from None
            self.files[snapshot] = fd
        return fd

    def frame(self, snapshot: str, index: int, check: bool = True) -> bytes:
        key = (snapshot, index)
        hit = self.cache.get(key)
        if hit is not None:
            self.cache.move_to_end(key)
            return hit
        fr = self.metas[snapshot].frames[index]
        raw = self.raw_frame(snapshot, index)
        try:
            data = self.dctx.decompress(raw, max_output_size=fr.pages * PAGE_SIZE)
        except zstandard.ZstdError as e:
            raise CorruptStore(f"snapshot {snapshot}: frame {index} at byte {fr.offset}: "
                               f"{e}") from e
        if len(data) != fr.pages * PAGE_SIZE or (check and zlib.crc32(data) != fr.crc32):
            raise CorruptStore(f"snapshot {snapshot}: frame {index} at byte {fr.offset} "
                               "does not match its checksum")
        self.cache[key] = data
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return data


def _vma_file_name(v: Vma) -> str:
    return f"{v.start:016x}-{v.end:016x}.mem"


def materialize(store: Store, snapshot_id: str, out_dir: Path,
                progress: Progress | None = None) -> dict[str, Any]:
    """Write the memory of every captured mapping at `snapshot_id` into out_dir, plus
    index.json. Returns the index."""
    meta, pm, lineage = page_map(store, snapshot_id)
    metas = {m.id: m for m in lineage}
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} exists and is not empty: choose a new directory")
    make_private_dir(out_dir)
    reader = FrameReader(store, metas)
    captured = [v for v in meta.vmas if v.capture == "private"]
    total_bytes = sum(v.end - v.start for v in captured)
    done = 0
    index_vmas: list[dict[str, object]] = []
    missing = unsourced(meta, pm)
    try:
        for v in captured:
            name = _vma_file_name(v)
            path = out_dir / name
            sourced = [(s, e) for s, e, _ in pm.clip(v.start, v.end)]
            not_held = subtract([(v.start, v.end)], normalize(sourced))
            file_status = None
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            try:
                os.ftruncate(fd, v.end - v.start)
                if v.inode and v.path and not_held:
                    file_status = _fill_from_file(fd, v, not_held)
                for s, e, src in pm.clip(v.start, v.end):
                    if isinstance(src, DataRef):
                        frame = reader.frame(src.snapshot, src.frame)
                        off = s + src.delta
                        os.pwrite(fd, frame[off : off + (e - s)], s - v.start)
                    elif file_status == "filled":
                        os.pwrite(fd, bytes(e - s), s - v.start)
                os.fsync(fd)
            finally:
                os.close(fd)
            done += v.end - v.start
            if progress:
                progress(done, total_bytes)
            entry: dict[str, object] = {
                "start": v.start, "end": v.end, "perms": v.perms, "path": v.path,
                "offset": v.offset, "file": name,
            }
            if v.inode:
                entry["clean_file_pages"] = {
                    "ranges": [[s, e] for s, e in not_held],
                    "content": file_status,
                }
            gaps = intersect(missing, [(v.start, v.end)])
            if gaps:
                entry["unsourced_pages"] = [[s, e] for s, e in gaps]
            index_vmas.append(entry)
    finally:
        reader.close()
    index: dict[str, Any] = {
        "id": meta.id,
        "pid": meta.pid,
        "kind": meta.kind,
        "truncated": meta.truncated,
        "vmas": index_vmas,
        "not_captured": [
            {"start": v.start, "end": v.end, "perms": v.perms, "path": v.path,
             "reason": "shared mapping: content lives in the file or shared memory object"
             if v.capture == "shared" else "kernel-provided mapping"}
            for v in meta.vmas if v.capture != "private"
        ],
    }
    idx = out_dir / "index.json"
    fd = os.open(idx, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    with os.fdopen(fd, "w") as f:
        json.dump(index, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(out_dir)
    return index


def _fill_from_file(fd: int, v: Vma, spans: list[Span]) -> str:
    """Copy the mapped file's content for pages the snapshot does not hold. Returns
    "filled", or why not ("file missing", "file changed")."""
    assert v.path is not None
    try:
        src = os.open(v.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return f"not filled: {v.path}: {e.strerror}"
    try:
        st = os.fstat(src)
        if st.st_ino != v.inode or f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}" \
                != v.dev:
            return f"not filled: {v.path} is no longer the mapped file (inode changed)"
        for lo, hi in spans:
            data = os.pread(src, hi - lo, v.offset + (lo - v.start))  # short past EOF
            if data:
                os.pwrite(fd, data, lo - v.start)
    finally:
        os.close(src)
    return "filled"


def _lineage_in(metas: dict[str, SnapshotMeta], meta: SnapshotMeta) -> list[SnapshotMeta]:
    """Like Store.lineage, from already loaded metadata."""
    out = [meta]
    while out[-1].kind != "full":
        parent = out[-1].parent
        if parent is None or parent not in metas or len(out) > len(metas):
            raise CorruptStore(f"snapshot {meta.id}: its chain is broken at {out[-1].id}")
        out.append(metas[parent])
    out.reverse()
    return out


def inline_data(meta: SnapshotData) -> bytes:
    """The decoded data_inline of a snapshot."""
    assert meta.data_inline is not None
    try:
        return base64.b64decode(meta.data_inline, validate=True)
    except ValueError as e:
        raise CorruptStore(f"snapshot {meta.id}: data_inline is not base64: {e}") from e


def verify(store: Store, progress: Progress | None = None) -> tuple[int, list[str]]:
    """Check every snapshot: metadata, chain links, data files, every extent's checksum,
    and that every page holding content has a source. Returns (snapshots, problems)."""
    problems: list[str] = []
    metas: dict[str, SnapshotMeta] = {}
    for chain in store.chain_ids():
        try:
            store.chain_info(chain)
            for m in store.chain_snapshots(chain):
                metas[m.id] = m
        except (CorruptStore, UserError) as e:
            problems.append(str(e))
    total_bytes = sum(m.data_bytes for m in metas.values())
    done = 0
    reader = FrameReader(store, metas, cache=1)
    try:
        for m in metas.values():
            if m.kind == "delta":
                if m.parent is None or m.parent not in metas:
                    problems.append(f"{m.id}: parent {m.parent} is missing")
                    continue
                if metas[m.parent].chain != m.chain or metas[m.parent].seq >= m.seq:
                    problems.append(f"{m.id}: parent {m.parent} is not earlier in its chain")
            if m.data_inline is not None:
                try:
                    size = len(inline_data(m))
                except CorruptStore as e:
                    problems.append(str(e))
                    continue
                if size != m.data_bytes:
                    problems.append(f"{m.id}: inline data is {size} bytes, metadata says "
                                    f"{m.data_bytes}")
                    continue
            elif m.data_file is not None:
                path = store.data_path(m)
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    problems.append(f"{m.id}: data file {path} is missing")
                    continue
                if size != m.data_bytes:
                    problems.append(f"{m.id}: data file is {size} bytes, metadata says "
                                    f"{m.data_bytes}")
                    continue
            for i in range(len(m.frames)):
                try:
                    reader.frame(m.id, i)
                except CorruptStore as e:
                    problems.append(str(e))
                    break
            done += m.data_bytes
            if progress:
                progress(done, total_bytes)
            if not m.truncated:
                try:
                    # From the metadata already loaded: reloading each lineage from disk
                    # would make verify quadratic in chain length.
                    lineage = _lineage_in(metas, m)
                    gaps = unsourced(m, IntervalMap(resolve_sources(lineage)))
                    if gaps:
                        problems.append(f"{m.id}: {sum(e - s for s, e in gaps) // PAGE_SIZE} "
                                        f"pages hold content but no snapshot stored it")
                except CorruptStore as e:
                    problems.append(str(e))
    finally:
        reader.close()
    return len(metas), problems
