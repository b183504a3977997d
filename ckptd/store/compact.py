"""Compaction: fold the oldest snapshots of a chain into a new full base.

compact_chain(store, chain, upto) rewrites snapshot `upto` as a full snapshot holding
every page its page map sources (same id, same content, same `present`), then removes
the snapshots before it. Snapshots after `upto` are untouched: their lineage now stops
at the new base.

Crash safety, step by step (docs/store-format.md has the full protocol):
  1. The new base's data is written to tmp/ and fsynced, without the chain lock, so
     snapshots are never blocked by the copying.
  2. Under the chain lock: rename the data into data/ and fsync; publish the new
     metadata of `upto` over the old (atomic rename). Before this point the old chain is
     intact; after it, `upto` restores on its own.
  3. Raise the chain's floor to `upto` (FLOOR.json, atomic and durable): from then on
     readers skip the older snapshots' files. Then remove those files, oldest first,
     with no directory fsync: whatever a crash leaves of them is below the floor.
  4. Delete data files nothing refers to (a crash leaves them for clean_orphans).
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

from ..errors import UserError, is_out_of_space, store_full
from ..intervals import IntervalMap
from ..kernel.abi import PAGE_SIZE
from ..kernel.syscalls import name_os_thread
from .format import FORMAT_VERSION, Counts, SnapshotData
from .fsutil import FILE_MODE
from .reader import DataRef, FrameReader, Source, resolve_sources
from .store import Store, parse_snapshot_id
from .writer import SnapshotWriter

log = logging.getLogger(__name__)

WINDOW_BYTES = 8 << 20  # pages re-compressed per step: bounds compaction's memory (the
# service runs it next to the snapshot rounds, within their memory budget)


def compact_chain(store: Store, chain: str, upto: str) -> str:
    """Fold every snapshot of `chain` up to and including `upto` into a full base at
    `upto`. Returns a one-line summary."""
    upto_chain, _ = parse_snapshot_id(upto)
    if upto_chain != chain:
        raise UserError(f"snapshot {upto} is not in chain {chain}")
    lock_fd = os.open(store.chain_dir(chain) / "compact.lock",
                      os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # one compaction per chain at a time
        return _compact(store, chain, upto)
    except OSError as e:
        if not is_out_of_space(e):
            raise
        # Whichever step failed, the chain is restorable (the steps above are ordered for
        # any failure, not only crashes): only the room for the new base is missing.
        raise store_full(store.root, e, f"the compaction of chain {chain} needs room for "
                         "the new base; free space there") from e
    finally:
        os.close(lock_fd)


def _compact(store: Store, chain: str, upto: str) -> str:
    # Only `upto` is parsed in full (it is rewritten with model_copy); the snapshots it
    # folds are parsed only as far as their pages: their vmas cost most of a full parse.
    meta, lineage = store.fold_lineage(upto)
    pm = IntervalMap(resolve_sources(lineage))
    # Ids only: parsing every snapshot of the chain would cost more than the folding.
    older = [i for i in store.snapshot_ids(chain) if parse_snapshot_id(i)[1] < meta.seq]
    new_meta = meta
    copied = ""
    if meta.kind != "full":
        metas = {m.id: m for m in lineage}
        reader = FrameReader(store, metas)
        executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckptd-compact",
                                      initializer=name_os_thread)
        writer = SnapshotWriter(store, chain, meta.id, executor)
        try:
            _rewrite(pm, metas, reader, writer, lineage[0].id)
            stored = writer.finish_data()
        except BaseException:
            writer.abort()
            raise
        finally:
            reader.close()
            executor.shutdown()
        new_meta = meta.model_copy(update={
            "format_version": FORMAT_VERSION,
            "kind": "full",
            "parent": None,
            "full_reason": f"compacted: folded {len(lineage) - 1} earlier snapshot(s) "
                           f"from {lineage[0].id}",
            "data_file": stored.data_file,
            "data_inline": stored.data_inline,
            "data_bytes": stored.data_bytes,
            "frames": writer.frames,
            "extents": writer.extents,
            "zeros": writer.zeros,
            "counts": Counts.model_validate({
                **meta.counts.model_dump(),
                "pages_stored": sum(e.pages for e in writer.extents),
                "pages_zero": sum(z.pages for z in writer.zeros),
                "bytes_stored": stored.data_bytes,
            }),
        })
        copied = f" ({writer.raw_frames} of {len(writer.frames)} frames copied unchanged)"
    with store.lock_chain(chain):
        if new_meta is not meta:
            writer.publish_data()
            store.publish(new_meta)
        # Every file below `upto`: the listed older snapshots, and what a crash left
        # below the floor before.
        below = [i for i in store.snapshot_files(chain) if parse_snapshot_id(i)[1] < meta.seq]
        if below and meta.seq > store.floor(chain):
            store.raise_floor(chain, meta.seq)
        # Oldest first, so that the files left below the floor are always the newest
        # ones: while a cached parent's file exists, so does the next (Engine._parent).
        for old_id in below:
            store.retire_snapshot(chain, old_id)  # unlinked, or kept as a spare
        removed = store.clean_orphans(chain)
    return (f"{upto} is now a full base{copied}; removed {len(older)} older snapshot(s) and "
            f"{len(removed)} data file(s)")


def _whole_frames(pm: IntervalMap[Source], metas: Mapping[str, SnapshotData]
                  ) -> dict[tuple[str, int], list[tuple[int, int]]]:
    """The source frames (snapshot, frame index) whose every page the page map still
    takes from them, each with its extents (addr, pages) in content order: these frames
    can be copied unchanged.

    An extent is whole when the pieces sourced from it cover all of its pages (the
    page map's pieces do not overlap, and each lies inside the extent its DataRef
    names). A frame is whole when all of its extents are, and they tile its content
    (skips 0, p0, p0+p1, ... up to its `pages`) as the format requires; a frame that
    breaks that rule is recompressed instead."""
    live: dict[tuple[str, int], int] = {}  # (snapshot, extent index): bytes sourced
    for start, end, src in pm:
        if isinstance(src, DataRef):
            key = (src.snapshot, src.extent)
            live[key] = live.get(key, 0) + (end - start)
    frames: dict[tuple[str, int], list[tuple[int, int, int]] | None] = {}
    for sid in {sid for sid, _ in live}:
        for i, e in enumerate(metas[sid].extents):
            key = (sid, e.frame)
            exts = frames.get(key, [])
            if exts is None:
                continue  # a part of this frame is not sourced from it
            if live.get((sid, i)) == e.pages * PAGE_SIZE:
                exts.append((e.skip, e.addr, e.pages))
                frames[key] = exts
            else:
                frames[key] = None
    out: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for key, exts in frames.items():
        if exts is None:
            continue
        exts.sort()
        skip = 0
        for s, _, pages in exts:
            if s != skip:
                break
            skip += pages
        else:
            if skip == metas[key[0]].frames[key[1]].pages:
                out[key] = [(addr, pages) for _, addr, pages in exts]
    return out


def _rewrite(pm: IntervalMap[Source], metas: Mapping[str, SnapshotData],
             reader: FrameReader, writer: SnapshotWriter, base: str) -> None:
    """Copy every sourced page into the writer: frames the page map uses whole, raw
    (their compressed bytes unchanged, with all of their extents); pages of the other
    frames, and zero runs, re-compressed through bounded window buffers.

    A raw frame goes out when the walk (in address order) meets its first page. Its
    other extents may lie further on, past pages of other frames, so the new base's
    extents are in frame order but not always in address order.

    When the deltas mostly rewrote the same pages, the pages they hold go into frames
    of their own, and the old `base`'s pages that did not change into others (see
    _keep_apart)."""
    whole = _whole_frames(pm, metas)
    copied: set[tuple[str, int]] = set()
    apart = _keep_apart(pm, metas, base)
    size = WINDOW_BYTES // 2 if apart else WINDOW_BYTES
    # [cold (from `base`, or zero), hot]; one window for both when not kept apart.
    windows = [_Window(size), _Window(size)] if apart else [_Window(size)]

    try:
        for start, end, src in pm:
            hot = False
            if isinstance(src, DataRef):
                key = (src.snapshot, src.frame)
                extents = whole.get(key)
                if extents is not None:
                    # The windows keep filling across raw frames (no flush): frames'
                    # order in the data does not matter, and the windows' pages pack
                    # into fuller frames.
                    if key not in copied:
                        copied.add(key)
                        writer.append_frame(extents, reader.raw_frame(*key),
                                            metas[src.snapshot].frames[src.frame].crc32)
                    continue
                hot = apart and src.snapshot != base
            w = windows[hot]
            pos = start
            while pos < end:
                if w.used == size:
                    w.flush(writer)
                n = min(end - pos, size - w.used)
                if isinstance(src, DataRef):
                    # zstd verifies each frame's own content checksum while
                    # decompressing; the extra CRC pass was a sixth of compaction's CPU.
                    frame = reader.frame(src.snapshot, src.frame, check=False)
                    off = pos + src.delta
                    w.put(pos, frame[off : off + n])
                else:
                    w.put(pos, bytes(n))
                pos += n
        for w in windows:
            w.flush(writer)
    finally:
        for w in windows:
            w.close()


def _keep_apart(pm: IntervalMap[Source], metas: Mapping[str, SnapshotData],
                base: str) -> bool:
    """Should the pages written since the old `base` go into frames of their own?

    A page that changed is likely to change again, and the next compaction must compress
    again every frame that such a page leaves partly used. When a process keeps writing
    the same few pages, packing them among unchanged ones keeps those frames partial
    compaction after compaction (for an idle Python process: 182 pages compressed again
    each time, against 15 kept apart). But each page kept apart cuts a run of unchanged
    pages, so its frame gets one more extent, and when writes land on new pages each
    time (random writes to a large heap) the frames go partial anyway: keeping apart
    would only multiply the extents, and with them the base's metadata and page map.

    The deltas tell which case this is: apart when the pages they stored add up to at
    least twice the pages that are still theirs in the page map, that is when most
    writes were rewrites of pages written before."""
    stored = sum(e.pages for sid, m in metas.items() if sid != base for e in m.extents)
    live = sum(end - start for start, end, src in pm
               if isinstance(src, DataRef) and src.snapshot != base) // PAGE_SIZE
    return live > 0 and stored >= 2 * live


class _Window:
    """Pages on their way to re-compression, laid back to back, with their addresses."""

    def __init__(self, size: int) -> None:
        self.buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.runs: list[tuple[int, int]] = []
        self.used = 0

    def put(self, addr: int, data: bytes) -> None:
        n = len(data)
        self.buf[self.used : self.used + n] = data
        if self.runs and self.runs[-1][1] == addr:
            self.runs[-1] = (self.runs[-1][0], addr + n)
        else:
            self.runs.append((addr, addr + n))
        self.used += n

    def flush(self, writer: SnapshotWriter) -> None:
        if self.runs:
            writer.write_runs(self.runs, self.buf)
        self.runs, self.used = [], 0

    def close(self) -> None:
        self.buf.close()
