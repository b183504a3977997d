"""One snapshot: identify -> arm -> (freeze -> harvest -> read -> thaw) -> select ->
compress -> commit.

The freeze covers only the scan and the copy: compression and fsync run after the thaw.
Nothing becomes visible in the store until the data is durable and the metadata is
published (Store.publish); any failure before that leaves no trace in the listing.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor
from contextlib import nullcontext
from dataclasses import dataclass

from .errors import (
    AccessRevoked,
    PermissionDenied,
    StoreFull,
    TargetBusy,
    TargetGone,
    TargetNotFound,
    UserError,
    is_out_of_space,
    store_full,
)
from .intervals import Span, intersect, normalize, subtract, total
from .kernel import abi, memread, procfs
from .kernel.ptrace import Freezer, ThreadBlocked
from .kernel.ptrace import TargetGone as PtraceTargetGone
from .store import ChainInfo, SnapshotMeta, Store
from .store.format import Counts, SnapshotHead, Timings, Vma, vmas_json
from .store.store import StagedFile
from .store.writer import FAST_ZSTD_LEVEL, SnapshotWriter
from .track.base import TrackContext, Tracker

log = logging.getLogger(__name__)

PF_KTHREAD = 0x00200000  # task flag in /proc/PID/stat field 9

FrozenHook = Callable[[int, list[procfs.Mapping]], None]


@dataclass
class Identity:
    pid: int
    start_time: int
    mm_fingerprint: str
    comm: str
    exe: str | None
    cmdline: list[str]
    uid: int
    # The pre-freeze view of the mappings, read on first use (a steady-state round of a
    # tracker that keeps its own history never needs it).
    _maps: list[procfs.Mapping] | None = None

    @property
    def maps(self) -> list[procfs.Mapping]:
        if self._maps is None:
            self._maps = procfs.read_maps(self.pid)
        return self._maps


def _stat_fields(pid: int, files: procfs.ProcFiles | None) -> list[str]:
    try:
        fields = files.stat_fields() if files is not None else procfs.read_stat_fields(pid)
    except (FileNotFoundError, ProcessLookupError):
        raise TargetNotFound(f"no process with PID {pid}") from None
    if fields[2] in ("Z", "X"):
        raise TargetNotFound(f"process {pid} has exited (zombie)")
    return fields


def identify(pid: int, known: Identity | None = None,
             files: procfs.ProcFiles | None = None) -> Identity:
    """Who is PID, with clear errors for the usual mistakes. With `known` (this process
    as identified before), one read of /proc/PID/stat confirms it is still the same
    process in the same address space, and the rest is reused. `files`: PID's kept
    /proc files, to read stat through."""
    if pid <= 0:
        raise UserError(f"{pid} is not a valid PID")
    if pid == os.getpid():
        raise UserError("ckptd cannot snapshot itself")
    fields = _stat_fields(pid, files)
    start = int(fields[21])
    if known is not None and known.pid == pid and known.start_time == start \
            and known.mm_fingerprint == procfs.fingerprint_of(fields):
        return Identity(pid, start, known.mm_fingerprint, fields[1], known.exe,
                        known.cmdline, known.uid)
    if int(fields[8]) & PF_KTHREAD:
        raise UserError(f"PID {pid} is a kernel thread: it has no user memory to snapshot")
    try:
        os.close(os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC))
        maps = procfs.read_maps(pid)
    except PermissionError:
        raise PermissionDenied(
            f"no permission to trace PID {pid}: run ckptd as root or as the process's owner"
        ) from None
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: it exited meanwhile
        raise TargetNotFound(f"no process with PID {pid}") from None
    if not maps:
        raise UserError(f"PID {pid} is a kernel thread: it has no user memory to snapshot")
    try:
        exe: str | None = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
        # Who may see the chain: the euid, or root for a non-dumpable process (set-uid,
        # PR_SET_DUMPABLE 0). Read from a file in /proc/PID: the directory itself keeps
        # the owner it had when first looked up (see service.auth.read_ownership).
        uid = os.stat(f"/proc/{pid}/status").st_uid
    except (FileNotFoundError, ProcessLookupError):
        raise TargetNotFound(f"no process with PID {pid}") from None
    return Identity(
        pid=pid,
        start_time=start,
        mm_fingerprint=procfs.fingerprint_of(fields),
        comm=fields[1],
        exe=exe,
        cmdline=cmdline,
        uid=uid,
        _maps=maps,
    )


class BufferPool:
    """Reuses one capture buffer: fresh memory costs a page fault per page (about 7 us
    on these machines), too much to pay inside the freeze."""

    def __init__(self, retain_bytes: int = 256 << 20) -> None:
        self.buf: mmap.mmap | None = None
        self.retain_bytes = retain_bytes

    def get(self, size: int) -> mmap.mmap:
        if self.buf is None or len(self.buf) < size:
            if self.buf is not None:
                self.buf.close()
            self.buf = memread.alloc_buffer(max(size, 1 << 20))
        return self.buf

    def ensure(self, size: int, margin: float = 1.25) -> None:
        """Make a populated buffer of at least `size` bytes ready, before freezing. A new
        one gets `margin` extra, for pages written between now and the freeze."""
        if self.buf is None or len(self.buf) < size:
            if self.buf is not None:
                self.buf.close()
            self.buf = memread.alloc_buffer(max(int(size * margin), 1 << 20), populate=True)

    def release(self) -> None:
        if self.buf is not None and len(self.buf) > self.retain_bytes:
            self.buf.close()
            self.buf = None


_VMA_MODELS: dict[procfs.Mapping, Vma] = {}


def vma_models(vmas: list[procfs.Mapping]) -> list[Vma]:
    """The metadata rows for `vmas`. Rows are immutable and mappings repeat from round to
    round, so each distinct mapping is validated once (the cache is bounded)."""
    cache = _VMA_MODELS
    out: list[Vma] = []
    for m in vmas:
        v = cache.get(m)
        if v is None:
            v = Vma(start=m.start, end=m.end, perms=m.perms, offset=m.offset, dev=m.dev,
                    inode=m.inode, path=m.path,
                    capture="special" if m.special else ("private" if m.private
                                                         else "shared"))
            if len(cache) >= 1 << 15:
                cache.clear()
            cache[m] = v
        out.append(v)
    return out


@dataclass(frozen=True)
class _FromMaps:
    """What a round derives from the mappings alone."""

    vmas: tuple[procfs.Mapping, ...]
    models: list[Vma]
    models_json: bytes  # format.vmas_json(models)
    unreadable: list[Span]


# The last round's _FromMaps per process: a process's mappings usually repeat, and then
# the rows, their JSON and the unreadable ranges are reused. Bounded.
_FROM_MAPS: dict[int, _FromMaps] = {}


def _from_maps(pid: int, vmas: list[procfs.Mapping]) -> _FromMaps:
    key = tuple(vmas)
    d = _FROM_MAPS.get(pid)
    if d is not None and d.vmas == key:  # mostly the same objects: compared by identity
        return d
    models = vma_models(vmas)
    d = _FromMaps(key, models, vmas_json(models),
                  normalize((m.start, m.end) for m in vmas if not m.readable))
    if len(_FROM_MAPS) >= 4096:
        _FROM_MAPS.clear()
    _FROM_MAPS[pid] = d
    return d


def take_snapshot(
    store: Store,
    ident: Identity,
    chain: ChainInfo,
    parent: SnapshotHead | SnapshotMeta | None,
    tracker: Tracker,
    tracker_reason: str,
    *,
    fuzzy: bool,
    max_pages: int,
    privileged: bool,
    buffers: BufferPool,
    executor: Executor,
    full_reason: str | None,
    on_frozen: FrozenHook | None = None,
    progress: Callable[[int], None] | None = None,
    proc_files: procfs.ProcFiles | None = None,
    authorize: Callable[[int], None] | None = None,
    defer: Callable[[PendingPublish], None] | None = None,
) -> SnapshotMeta:
    """`proc_files`: the process's kept /proc files (see procfs.ProcFiles), if the
    caller keeps them between rounds. `authorize`: see TrackContext; checked once the
    target is frozen, before its pages are scanned or read (and, fuzzy, after the read
    too: unfrozen, the process may change meanwhile). `defer`: stage the snapshot
    instead of publishing it, and hand what publishing it takes to `defer` (a group
    commit; see PendingPublish); the metadata returned is then not yet in the store."""
    pid = ident.pid
    t_start = time.perf_counter()
    # Without a parent: 1, or the chain's floor if compaction raised it (a chain whose
    # snapshots were all deleted by hand); a lower seq would not be listed.
    seq = parent.seq + 1 if parent else store.floor(chain.chain)
    snapshot_id = f"{chain.chain}-{seq}"
    ctx = TrackContext(
        pid=pid,
        state_dir=store.state_dir(chain.chain),
        parent_present=list(parent.present) if parent else None,
        parent_id=parent.id if parent else None,
        snapshot_id=snapshot_id,
        fuzzy=fuzzy,
        max_pages=max_pages,
        privileged=privileged,
        start_time=ident.start_time,
        authorize=authorize,
    )
    armed = tracker.arm(ctx)
    full_reason = full_reason or armed.full_reason
    if parent is None and full_reason is None:
        full_reason = "first snapshot of this process"
    full = full_reason is not None
    try:
        estimate = tracker.estimate(ctx, lambda: ident.maps, full)
    except OSError:
        estimate = 0  # only sizes the buffer; the snapshot itself will report problems
    if not full:
        _check_room(store, chain.chain, pid, (estimate + ROOM_SLACK_PAGES) * abi.PAGE_SIZE)
    buffers.ensure((estimate + 256) * abi.PAGE_SIZE)
    tracker.begin(ctx)
    t_prepared = time.perf_counter()

    reader = memread.PageReader(pid, tolerate_unmapped=fuzzy)
    try:
        freeze_ctx = nullcontext() if fuzzy else Freezer(pid, files=proc_files)
        t_freeze = time.perf_counter()
        with freeze_ctx:
            t_frozen = time.perf_counter()
            if authorize is not None:
                authorize(pid)
            vmas = proc_files.maps() if proc_files is not None else procfs.read_maps(pid)
            harvest = tracker.harvest(ctx, vmas, full)
            t_scanned = time.perf_counter()
            to_read = harvest.to_read
            nbytes = total(to_read)
            buf = buffers.get(nbytes)
            from_maps = _from_maps(pid, vmas)
            if on_frozen is not None:
                on_frozen(pid, vmas)  # tests and the demo read ground truth here
            t_hooked = time.perf_counter()
            reader.read_runs(to_read, buf, from_maps.unreadable)
            t_read = time.perf_counter()
        t_thawed = time.perf_counter()
        if fuzzy and authorize is not None:
            authorize(pid)
    except AccessRevoked:
        tracker.abandon(ctx)
        raise
    except (PtraceTargetGone, ProcessLookupError) as e:
        tracker.abandon(ctx)
        raise TargetGone(f"process {pid} exited during the snapshot; nothing was stored") from e
    except ThreadBlocked as e:
        tracker.abandon(ctx)
        raise TargetBusy(f"process {pid} not frozen: {e}; nothing was stored, the next "
                         "round tries again") from e
    except OSError as e:
        tracker.abandon(ctx)
        if e.errno in (errno.ESRCH, errno.ENOENT) or procfs.has_exited(pid):
            raise TargetGone(
                f"process {pid} exited during the snapshot; nothing was stored") from e
        raise
    finally:
        reader.close()

    view = memoryview(buf)[:nbytes]
    keep = tracker.select(ctx, to_read, view)
    # A tracker that decides after reading (hash) knows the changed pages only now.
    pages_dirty = sum(keep) if keep is not None and tracker.dirty_from_select \
        else harvest.pages_dirty
    present = harvest.present
    if reader.failed:
        # Unmapped while we read (fuzzy only): those pages are gone, not captured.
        gone = normalize(reader.failed)
        present = subtract(present, gone)
        keep = _drop_pages(to_read, keep, gone)
    vmas_from = None if full else _vmas_holder(store, chain.chain, parent, from_maps)
    writer = SnapshotWriter(store, chain.chain, snapshot_id, executor,
                            small_level=FAST_ZSTD_LEVEL)
    publishing = False  # set just before the commit point (Store.publish)
    try:
        writer.write_runs(to_read, buf, keep, progress)
        view.release()
        stored = writer.commit_data(durable=defer is None)
        stored_pages = writer.stored_pages
        zero_pages = sum(z.pages for z in writer.zeros)
        meta = SnapshotMeta(
            id=snapshot_id,
            chain=chain.chain,
            seq=seq,
            parent=None if full else (parent.id if parent else None),
            kind="full" if full else "delta",
            full_reason=full_reason,
            pid=pid,
            created=time.time(),
            tracker=tracker.name,  # type: ignore[arg-type]
            tracker_reason=tracker_reason,
            consistency="fuzzy" if fuzzy else "frozen",
            truncated=harvest.truncated,
            vmas=from_maps.models if vmas_from is None else None,
            vmas_from=vmas_from,
            present=present,
            data_file=stored.data_file,
            data_inline=stored.data_inline,
            data_bytes=stored.data_bytes,
            frames=writer.frames,
            extents=writer.extents,
            zeros=writer.zeros,
            # Validated: with pydantic-core, that is faster than model_construct.
            counts=Counts(
                pages_dirty=pages_dirty if not full else nbytes // abi.PAGE_SIZE,
                pages_read=nbytes // abi.PAGE_SIZE,
                pages_stored=stored_pages,
                pages_zero=zero_pages,
                pages_unchanged=(nbytes // abi.PAGE_SIZE) - stored_pages - zero_pages,
                pages_present=total(present) // abi.PAGE_SIZE,
                bytes_read=nbytes,
                bytes_stored=stored.data_bytes,
            ),
            timings=Timings(
                prepare_ms=(t_prepared - t_start) * 1e3,
                freeze_ms=0.0 if fuzzy else (t_thawed - t_freeze) * 1e3,
                scan_ms=(t_scanned - t_frozen) * 1e3,
                read_ms=(t_read - t_hooked) * 1e3,
                compress_ms=writer.compress_s * 1e3,
                write_ms=writer.write_s * 1e3,
                total_ms=(time.perf_counter() - t_start) * 1e3,
            ),
        )
        shared = (from_maps.vmas, vmas_from or snapshot_id)
        if defer is not None:
            staged = store.stage(meta, from_maps.models_json)
            meta = _resolved(meta, from_maps)
            defer(PendingPublish(store, meta, staged, writer, tracker, ctx, harvest.notes,
                                 shared))
            return meta
        publishing = True
        store.publish(meta, from_maps.models_json)
    except BaseException as e:
        if publishing and os.path.exists(store.snapshot_file(chain.chain, snapshot_id)):
            # The metadata was renamed into place, and only what follows the rename
            # (the directory fsync) failed or was interrupted: the snapshot is listed,
            # so its data (durable since commit_data) must stay, and the tracker's state
            # must say that this snapshot holds the pages the get-and-clear took.
            tracker.commit(ctx, snapshot_id)
        else:
            writer.abort()
            tracker.abandon(ctx)
            if isinstance(e, OSError) and is_out_of_space(e):
                raise store_full(
                    store.root, e, f"nothing was stored for process {pid}; free space "
                    "there or lower retention, and the next round stores what this one "
                    "could not") from e
        raise
    finally:
        buffers.release()
    tracker.commit(ctx, snapshot_id)
    _note_vmas(store, meta, shared)
    for note in harvest.notes:
        log.info("snapshot %s: %s", snapshot_id, note)
    return _resolved(meta, from_maps)


def _resolved(meta: SnapshotMeta, from_maps: _FromMaps) -> SnapshotMeta:
    """`meta` as Store.get returns it: with its vmas, whether or not its file shares
    them."""
    if meta.vmas is not None:
        return meta
    return meta.model_copy(update={"vmas": from_maps.models, "vmas_from": None})


def _vmas_holder(store: Store, chain: str, parent: SnapshotHead | SnapshotMeta | None,
                 from_maps: _FromMaps) -> str | None:
    """The snapshot whose `vmas` a delta on `parent` can share (format version 4), if
    this process published `parent` with the same mappings; else None (store them)."""
    noted = store.published_vmas.get(chain)
    if noted is None or parent is None or noted[0] != parent.id or noted[1] != from_maps.vmas:
        return None
    return noted[2]


def _note_vmas(store: Store, meta: SnapshotMeta, shared: tuple[object, str]) -> None:
    """`meta` is listed: the chain's next delta may share its vmas (see _vmas_holder)."""
    if len(store.published_vmas) >= 4096:
        store.published_vmas.clear()
    store.published_vmas[meta.chain] = (meta.id, *shared)


class PendingPublish:
    """A staged snapshot (take_snapshot with `defer`) and what ends its round: the owner
    calls Store.sync, then publish(), then Store.sync again and committed(); or, if any
    of that fails before publish() returned, abandoned(). The chain stays locked, and
    no other round of the process may run, until then."""

    def __init__(self, store: Store, meta: SnapshotMeta, staged: StagedFile,
                 writer: SnapshotWriter, tracker: Tracker, ctx: TrackContext,
                 notes: list[str], shared: tuple[object, str]) -> None:
        self.store, self.meta, self.staged, self.writer = store, meta, staged, writer
        self.tracker, self.ctx, self.notes = tracker, ctx, notes
        self.shared = shared  # for _note_vmas

    def publish(self) -> None:
        self.store.publish_staged(self.staged)

    def committed(self) -> None:
        """The snapshot is listed (whether or not the sync after its rename worked): its
        pages are the ones the get-and-clear took."""
        self.tracker.commit(self.ctx, self.meta.id)
        _note_vmas(self.store, self.meta, self.shared)
        for note in self.notes:
            log.info("snapshot %s: %s", self.meta.id, note)

    def abandoned(self) -> None:
        """Not published: nothing of it stays, and the next round is full."""
        try:
            self.store.discard_staged(self.staged)
            self.writer.abort()
        finally:
            self.tracker.abandon(self.ctx)


# A delta is refused before its get-and-clear unless the store's filesystem has room for
# its estimated pages uncompressed plus this (the metadata file, a burst of writes).
ROOM_SLACK_PAGES = 256


def _check_room(store: Store, chain: str, pid: int, needed: int) -> None:
    """Refuse a delta the store has no room for while that costs nothing: a delta that
    fails for lack of space after the get-and-clear has taken pages from the kernel's
    tracking that no snapshot holds, so the next round must be full, which needs more
    room still. Counts the space unprivileged users may use: ckptd leaves the
    filesystem's reserve to the system."""
    free = store.free_bytes(chain)
    if free < needed:
        raise StoreFull(
            f"the store {store.root} is out of space ({free >> 20} MiB free, a snapshot of "
            f"process {pid} may need {-(-needed >> 20)} MiB): nothing was taken; free "
            "space there or lower retention, and the next round stores what changed")


def _drop_pages(runs: list[Span], keep: list[bool] | None, gone: list[Span]) -> list[bool]:
    """Per-page keep flags for `runs` with the pages inside `gone` cleared."""
    flags: list[bool] = []
    i = 0
    for start, end in runs:
        lost = intersect([(start, end)], gone)
        for addr in range(start, end, abi.PAGE_SIZE):
            k = keep[i] if keep is not None else True
            if k and lost and any(s <= addr < e for s, e in lost):
                k = False
            flags.append(k)
            i += 1
    return flags
