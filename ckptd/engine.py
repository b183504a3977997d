"""The capture engine: takes snapshots of processes into a store, keeping per-process
tracking state (our userfaultfd copies, page hashes) between rounds.

Synchronous and thread-compatible per process; the service runs it in executors and never
runs two snapshots of one process at once (a chain lock also guards against other ckptd
processes).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field

from .capture import BufferPool, FrozenHook, Identity, PendingPublish, identify, take_snapshot
from .errors import (
    AddressSpaceReplaced,
    TargetGone,
    TrackerUnavailable,
    UserError,
    is_out_of_space,
    store_full,
)
from .kernel import procfs
from .kernel.syscalls import name_os_thread
from .store import ChainInfo, SnapshotMeta, Store
from .store.format import SnapshotHead
from .track import hash as hash_tracker
from .track import uffd_wp
from .track.base import Tracker

log = logging.getLogger(__name__)

TRACKERS = ("auto", "uffd-wp", "hash")
# A thread publishes its staged rounds once this many wait, even if it has more work: a
# group holds its rounds' locks and their compressed data until it is published.
MAX_STAGED = 32


def privileged() -> bool:
    """CAP_SYS_ADMIN in our effective set (needed to suspend seccomp and to read the swap
    type of /proc/PID/pagemap entries)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << 21))
    return False


@dataclass
class _Process:
    trackers: dict[str, Tracker] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Cached between rounds so a round does not re-read the store: the chain for this
    # process incarnation and the last snapshot we published in it.
    chain: ChainInfo | None = None
    last: SnapshotMeta | None = None
    ident: Identity | None = None
    files: procfs.ProcFiles | None = None  # kept /proc files, opened on first use

    def tracker(self, name: str) -> Tracker:
        t = self.trackers.get(name)
        if t is None:
            t = uffd_wp.UffdWpTracker() if name == "uffd-wp" else hash_tracker.HashTracker()
            self.trackers[name] = t
        return t

    def close(self) -> None:
        for t in self.trackers.values():
            t.close()
        self.trackers.clear()
        if self.files is not None:
            self.files.close()


@dataclass(frozen=True)
class PublishLater:
    """Asks Engine.snapshot for a group commit: the snapshot is staged, and published by
    the calling thread's next Engine.flush(), which then calls `published(meta)` or
    `failed(error)` (in that thread)."""

    published: Callable[[SnapshotMeta], object]
    failed: Callable[[Exception], object]


@dataclass
class _Staged:
    """A round waiting for its thread's flush, holding its process's and chain's locks."""

    proc: _Process
    pending: PendingPublish
    locks: ExitStack
    later: PublishLater


def _log_unexpected(e: Exception, what: str) -> None:
    """In an except clause of Engine.flush: an OSError is the round's failure, reported
    through its `later`; anything else is a bug, logged here with its traceback."""
    if not isinstance(e, OSError):
        log.exception(what)


class Engine:
    def __init__(self, store: Store, compress_threads: int | None = None,
                 retain_buffer_bytes: int = 256 << 20) -> None:
        self.store = store
        self.executor = ThreadPoolExecutor(
            max_workers=compress_threads or min(2, os.cpu_count() or 1),
            thread_name_prefix="ckptd-zstd", initializer=name_os_thread,
        )
        # One capture buffer per thread: the service snapshots processes concurrently.
        self._buffers = threading.local()
        self._staged = threading.local()  # per thread: list[_Staged], see flush()
        self._retain_buffer_bytes = retain_buffer_bytes
        self.privileged = privileged()
        for name in store.clean_tmp():
            log.info("removed tmp/%s, left by a ckptd that is gone", name)
        self._procs: dict[int, _Process] = {}
        self._lock = threading.Lock()
        self._uffd_probe: tuple[bool, str] | None = None

    def close(self) -> None:
        self.flush()
        for p in self._procs.values():
            p.close()
        self._procs.clear()
        self.executor.shutdown(wait=True)
        self.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def buffers(self) -> BufferPool:
        pool: BufferPool | None = getattr(self._buffers, "pool", None)
        if pool is None:
            pool = self._buffers.pool = BufferPool(self._retain_buffer_bytes)
        return pool

    def forget(self, pid: int) -> None:
        """Stop tracking `pid` (unregistered, or exited): undo what tracking set up in
        the process, and let go of its files and of what was kept for its chain."""
        with self._lock:
            p = self._procs.pop(pid, None)
        if p is not None:
            self._flush_before_waiting(p)
            with p.lock:  # after a round in flight, which may be publishing
                for t in p.trackers.values():
                    t.release()
                p.close()
                if p.chain is not None:
                    self.store.release_chain(p.chain.chain)

    def uffd_probe(self) -> tuple[bool, str]:
        if self._uffd_probe is None:
            self._uffd_probe = uffd_wp.probe()
        return self._uffd_probe

    def _chain_for(self, proc: _Process, ident: Identity) -> tuple[ChainInfo, str | None]:
        """The chain to extend, or a new one with the reason."""
        c = proc.chain
        if (c is not None and c.pid == ident.pid and c.start_time == ident.start_time
                and c.mm_fingerprint == ident.mm_fingerprint
                and self.store.chain_exists(c.chain)):
            return c, None
        proc.last = None
        if c is not None:
            # This process publishes nothing more in its old chain (an exec, or another
            # process with its PID): let go of what it kept for publishing there.
            self.store.release_chain(c.chain)
        chains = self.store.find_chain(ident.pid, ident.start_time)
        reason = None
        if chains:
            if chains[-1].mm_fingerprint == ident.mm_fingerprint:
                proc.chain = chains[-1]
                return chains[-1], None
            reason = "the process exec'd (new address space): new chain"
        proc.chain = self.store.create_chain({
            "pid": ident.pid, "start_time": ident.start_time,
            "mm_fingerprint": ident.mm_fingerprint, "comm": ident.comm, "exe": ident.exe,
            "cmdline": ident.cmdline, "uid": ident.uid,
        })
        return proc.chain, reason

    def _parent(self, proc: _Process, chain: ChainInfo) -> SnapshotHead | SnapshotMeta | None:
        """The chain's latest snapshot; from cache when nobody else changed the chain."""
        last = proc.last
        if (last is not None and last.chain == chain.chain
                and os.path.exists(self.store.snapshot_file(chain.chain, last.id))
                and not os.path.exists(
                    self.store.snapshot_file(chain.chain, f"{chain.chain}-{last.seq + 1}"))):
            # Still published, and nothing after it (ids only grow): two stats instead of
            # listing the chain. The chain's floor (FLOOR.json) need not be read: `last`
            # was at or above it when cached, so if another ckptd's compaction has put
            # it below it since, it published `last + 1` too, and compaction (and
            # clean_leftovers) removes the files below a floor oldest first: while
            # `last`'s file exists, so does the next one, and the chain is listed.
            return last
        floor, ids = self.store.listing(chain.chain)
        if not ids:
            return None
        if proc.last is not None and proc.last.id == ids[-1]:
            return proc.last
        return self.store.head(ids[-1], floor)

    def snapshot(
        self,
        pid: int,
        *,
        tracker: str = "auto",
        fuzzy: bool = False,
        max_pages: int = 0,
        on_frozen: FrozenHook | None = None,
        progress: Callable[[int], None] | None = None,
        start_time: int | None = None,
        authorize: Callable[[int], None] | None = None,
        later: PublishLater | None = None,
    ) -> SnapshotMeta:
        """Snapshot process `pid`. `start_time` (clock ticks since boot, from
        /proc/PID/stat): the process the caller means, where it checked who that is
        before (the service authorizes a client for a process): if `pid` is another
        process's now, TargetGone, and nothing is stored. `authorize(pid)`: raises if
        the round may not go on (the service's client could no longer ptrace the
        process); checked for a new identity (before a chain is made for it) and while
        the process is frozen (see capture.take_snapshot). `later`: stage the snapshot
        for this thread's next flush() (a group commit) instead of publishing it; the
        metadata returned is then not in the store yet."""
        if tracker not in TRACKERS:
            raise UserError(f"unknown tracker {tracker!r}: choose one of {', '.join(TRACKERS)}")
        if max_pages < 0:
            raise UserError("the page budget must be 0 (unbounded) or positive")
        try:
            return self._snapshot(pid, tracker, fuzzy, max_pages, on_frozen, progress,
                                  start_time, authorize, later)
        except OSError as e:
            if not is_out_of_space(e):
                raise
            # Outside a round's storing (which says more itself): a new chain, the
            # tracker's state file.
            raise store_full(self.store.root, e, f"the snapshot of process {pid} failed; "
                             "free space there or lower retention") from e

    def _snapshot(self, pid: int, tracker: str, fuzzy: bool, max_pages: int,
                  on_frozen: FrozenHook | None, progress: Callable[[int], None] | None,
                  start_time: int | None, authorize: Callable[[int], None] | None,
                  later: PublishLater | None) -> SnapshotMeta:
        with self._lock:
            proc = self._procs.setdefault(pid, _Process())
        if later is None:
            self.flush()  # published now, so after the rounds staged before it
        else:
            self._flush_before_waiting(proc)
        with ExitStack() as held:
            held.enter_context(proc.lock)
            if proc.files is None:
                proc.files = procfs.ProcFiles(pid)
            known = proc.ident
            ident = identify(pid, known, proc.files)
            if start_time is not None and ident.start_time != start_time:
                raise TargetGone(f"process {pid} exited, and its PID now belongs to another "
                                 "process; nothing was stored")
            new_image = known is None or (ident.start_time, ident.mm_fingerprint) != (
                known.start_time, known.mm_fingerprint)
            if authorize is not None and new_image:
                authorize(pid)  # an exec of a set-uid program: not even a new chain
            proc.ident = ident
            if known is not None and new_image:
                proc.files.reset()  # another process or address space: other files
            known_chain = proc.chain
            chain, chain_reason = self._chain_for(proc, ident)
            held.enter_context(self.store.lock_chain(chain.chain, self.flush))
            # The chain's lock is held from here.
            if chain is not known_chain:
                for name in self.store.clean_orphans(chain.chain):
                    log.info("chain %s: removed unpublished data %s", chain.chain, name)
                for name in self.store.clean_leftovers(chain.chain):
                    log.info("chain %s: removed %s, left by a ckptd that is gone",
                             chain.chain, name)
            # Under the lock: another ckptd may have added a snapshot.
            parent = self._parent(proc, chain)
            chosen, reason = self._choose(proc, tracker, ident)
            staged: list[PendingPublish] = []
            defer = staged.append if later is not None else None
            try:
                meta = self._take(proc, ident, chain, parent, chosen, reason, fuzzy,
                                  max_pages, chain_reason, on_frozen, progress,
                                  authorize, defer)
            except TrackerUnavailable as e:
                if tracker != "auto" or chosen.name == "hash":
                    raise UserError(f"tracker {chosen.name} cannot track PID {pid}: {e}") \
                        from e
                log.warning("pid %d: uffd-wp unavailable (%s); using the hash tracker",
                            pid, e)
                meta = self._take(proc, ident, chain, parent, proc.tracker("hash"),
                                  f"auto: uffd-wp unavailable: {e}", fuzzy,
                                  max_pages, chain_reason, on_frozen, progress,
                                  authorize, defer)
            if later is not None and staged:
                rounds = self._staged_list()
                rounds.append(_Staged(proc, staged[0], held.pop_all(), later))
                if len(rounds) >= MAX_STAGED:
                    self.flush()
            else:
                proc.last = meta
            return meta

    def _choose(self, proc: _Process, tracker: str, ident: Identity) -> tuple[Tracker, str]:
        if tracker == "hash":
            return proc.tracker("hash"), "requested"
        ok, why = self.uffd_probe()
        if not ok:
            if tracker == "uffd-wp":
                raise UserError(f"tracker uffd-wp is not available on this system: {why}")
            return proc.tracker("hash"), f"auto: uffd-wp unavailable: {why}"
        return proc.tracker("uffd-wp"), "requested" if tracker == "uffd-wp" else f"auto: {why}"

    def _take(self, proc: _Process, ident: Identity, chain: ChainInfo,
              parent: SnapshotHead | SnapshotMeta | None, tracker: Tracker, reason: str,
              fuzzy: bool,
              max_pages: int, chain_reason: str | None, on_frozen: FrozenHook | None,
              progress: Callable[[int], None] | None,
              authorize: Callable[[int], None] | None = None,
              defer: Callable[[PendingPublish], None] | None = None) -> SnapshotMeta:
        full_reason = chain_reason
        if parent is not None and parent.tracker != tracker.name:
            full_reason = full_reason or f"tracker changed from {parent.tracker} to {tracker.name}"
        def take() -> SnapshotMeta:
            return take_snapshot(
                self.store, ident, chain, parent, tracker, reason,
                fuzzy=fuzzy, max_pages=max_pages, privileged=self.privileged,
                buffers=self.buffers, executor=self.executor, full_reason=full_reason,
                on_frozen=on_frozen, progress=progress, proc_files=proc.files,
                authorize=authorize, defer=defer,
            )

        try:
            return take()
        except AddressSpaceReplaced as e:
            # The tracker has started over: taken again, the round is full, and reads
            # the new address space's maps.
            log.info("pid %d: %s; taking the snapshot again", ident.pid, e)
            if proc.files is not None:
                proc.files.reset()
            return take()

    # --- group commit -------------------------------------------------------------------

    def _staged_list(self) -> list[_Staged]:
        staged: list[_Staged] | None = getattr(self._staged, "rounds", None)
        if staged is None:
            staged = self._staged.rounds = []
        return staged

    def _flush_before_waiting(self, proc: _Process) -> None:
        """This thread's staged rounds hold their processes' locks: publish them before
        waiting for `proc`'s lock (ours, or another thread's that may wait for ours)."""
        staged = self._staged_list()
        if staged and (proc.lock.locked() or any(s.proc is proc for s in staged)):
            self.flush()

    def flush(self) -> None:
        """Publish the rounds this thread staged (snapshot with `later`) as one group: one
        filesystem sync makes all of their data and metadata durable, the renames publish
        them, and a second sync makes the renames durable. Each round's `later` hears how
        it ended; a sync that fails fails every round that was not yet listed. Never
        raises: whatever fails, every round of the group is ended (its locks released)."""
        staged = self._staged_list()
        if not staged:
            return
        batch = staged[:]
        staged.clear()
        try:
            self.store.sync()
        except Exception as e:
            _log_unexpected(e, f"publishing a group of {len(batch)} round(s): the sync failed")
            for s in batch:
                self._end_staged(s, e, listed=False)
            return
        listed: list[_Staged] = []
        for s in batch:
            try:
                s.pending.publish()
            except Exception as e:
                _log_unexpected(e, f"snapshot {s.pending.meta.id}: publishing it failed")
                # A failed rename publishes nothing; anything else, check what is there.
                renamed = not isinstance(e, OSError) and os.path.exists(s.pending.staged.path)
                self._end_staged(s, e, listed=renamed)
            else:
                listed.append(s)
        error: Exception | None = None
        try:
            self.store.sync()
        except Exception as e:
            _log_unexpected(e, f"publishing a group of {len(listed)} round(s): the second "
                            "sync failed")
            error = e  # listed, maybe not durable: reported, and the chain goes on
        for s in listed:
            self._end_staged(s, error, listed=True)

    def _end_staged(self, s: _Staged, error: Exception | None, listed: bool) -> None:
        """End one staged round: its tracker and cached state, its `later` callback,
        then its locks (so that whoever waits for the process, engine.forget, finds the
        round's bookkeeping done; the callback must not wait for another thread). Never
        raises: the other rounds of the group must end too."""
        meta = s.pending.meta
        outcome: Exception | None = None
        try:
            try:
                if listed:
                    s.proc.last = meta
                    s.pending.committed()
                else:
                    s.pending.abandoned()
            except Exception as e:
                log.exception("pid %d: ending the round of %s failed", meta.pid, meta.id)
                outcome = e
            if outcome is None and error is not None:
                what = ("was published, but making that durable failed" if listed
                        else "was not stored")
                if not isinstance(error, OSError):
                    outcome = error
                elif is_out_of_space(error):
                    outcome = store_full(self.store.root, error,
                                         f"snapshot {meta.id} {what}; free space there")
                else:
                    outcome = OSError(error.errno,
                                      f"snapshot {meta.id} {what}: {error.strerror}")
            try:
                if outcome is None:
                    s.later.published(meta)
                else:
                    s.later.failed(outcome)
            except Exception:
                log.exception("pid %d: the bookkeeping of %s failed", meta.pid, meta.id)
        finally:
            try:
                s.locks.close()
            except Exception:
                log.exception("pid %d: releasing the locks of %s failed", meta.pid, meta.id)
