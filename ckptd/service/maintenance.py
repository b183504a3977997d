"""Retention and compaction of a registered process's chain, run in the background.

Planning is a pure function over a few numbers per snapshot (`plan`); the work itself is
done by the store's compaction (ckptd/store/compact.py), which is crash-safe: a crash
leaves the old chain or the new one, both restorable.

Retention (per registration; 0 disables a limit; the newest snapshot is always kept):
  keep_last N      keep the N newest snapshots
  keep_age S       keep snapshots younger than S seconds
  max_bytes B      keep the newest snapshots whose stored bytes sum to at most B
A snapshot is dropped when any limit drops it. Dropping the oldest snapshots of a delta
chain means folding them into the oldest kept one, which becomes a full base.

Compaction bounds what restoring the newest snapshot costs, and is itself bounded so that
it costs a fixed fraction of what the rounds write (an amortization rule). Let P be the
pages of the newest full base (its stored + zero pages, at least COMPACT_FLOOR_PAGES) and
D the pages the deltas after it store (stored + zero, summed over the deltas). Compact when
  D >= compact_ratio * P                      (restore work: base plus deltas, pages), or
  base + deltas > compact_after snapshots     (restore reads: metadata files).
A compaction writes the new base, about P pages (frames it still uses whole are copied
unchanged, the rest is decompressed and compressed again). The fold point makes the
next compaction wait for fresh work: fold the older half of the chain by count, and
further if needed so that the deltas left after the new base store at most half the
page budget (compact_ratio * P / 2). After any compaction
the chain is therefore at most half-way to both triggers, so the next one needs at least
compact_ratio * P / 2 newly stored delta pages or compact_after / 2 new rounds. Per page
the rounds store, compaction rewrites at most about 2 / compact_ratio pages (write
amplification <= 1 + 2 / compact_ratio), and a restore reads at most (1 + compact_ratio)
times the base's pages from at most compact_after snapshot files. (Resolving the page
map to fold is linear in the pieces the folded snapshots stored, so CPU follows pages.)

Why not fold the older half by count alone: when the newest deltas are much larger than
the older ones (a burst of writes), folding the older half leaves the burst after the
new base, the page trigger still holds, and the chain compacts again round after round,
each time rewriting the whole base. Why not fold everything into the newest: compaction
drops the snapshots before its fold point, and keeping the newer half keeps recent
history for the same amortized cost within a factor of two.

The floor: a tiny process (a base of a few pages, or a truncated first snapshot with 0
pages) would otherwise compact on almost every round; with the floor its deltas must
store COMPACT_FLOOR_PAGES * compact_ratio pages first, and rewriting such a base is cheap.

Planning runs after every round, so its inputs are kept in memory (ChainTally): one
entry per snapshot of the chain, updated from the snapshot each round publishes, and the
running sums the triggers compare. After each round the service asks the tally whether
planning would find work (constant time) and starts a job only when it would;
the job re-reads the snapshots' heads if the chain's list of ids (the floor and one
listdir) no longer matches memory: at startup, or when another ckptd process changed the
chain. After its own compaction it re-reads only the new base's head.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from ..errors import CkptdError
from ..store import SnapshotMeta, Store, parse_snapshot_id
from ..store.compact import compact_chain
from ..store.format import Counts, Kind, SnapshotHead
from .config import Retention

log = logging.getLogger("ckptd.service.maintenance")

# A full base is taken to hold at least this many pages (1 MiB) when the page budget is
# computed, so that the deltas of a tiny process do not trigger compaction every round.
COMPACT_FLOOR_PAGES = 256


class EntryCounts(NamedTuple):
    """The part of a snapshot's Counts that an Entry keeps. A chain can hold hundreds of
    snapshots, and the whole pydantic model cost about 0.5 KiB each: 20 MiB for 100
    processes with chains of 256."""

    pages_stored: int
    pages_zero: int
    bytes_stored: int


class SnapInfo(Protocol):
    """What planning needs of one snapshot (SnapshotMeta, SnapshotHead and Entry have it)."""

    @property
    def id(self) -> str: ...
    @property
    def kind(self) -> Kind: ...
    @property
    def created(self) -> float: ...
    @property
    def counts(self) -> Counts | EntryCounts: ...


class Entry(NamedTuple):
    """One snapshot in a ChainTally. (A named tuple: one is made per round, and a frozen
    dataclass's __init__ costs several times more.)"""

    id: str
    kind: Kind
    created: float
    counts: EntryCounts

    @classmethod
    def of(cls, m: SnapshotHead | SnapshotMeta) -> Entry:
        c = m.counts
        return cls(m.id, m.kind, m.created,
                   EntryCounts(c.pages_stored, c.pages_zero, c.bytes_stored))


def restore_pages(c: Counts | EntryCounts) -> int:
    """Pages a restore applies from one snapshot: stored pages are decompressed and
    copied, zero runs are written. For a full base this is what compaction rewrites and
    a restore starts from; `pages_present` would also count pages a truncated snapshot
    left out, which neither reads."""
    return c.pages_stored + c.pages_zero


@dataclass(frozen=True)
class Plan:
    upto: str  # fold everything up to and including this snapshot into a base at it
    reason: str
    drops: int  # snapshots older than `upto` that go away


def plan(snaps: Sequence[SnapInfo], ret: Retention, now: float) -> Plan | None:
    """What to do with one chain (snapshots oldest first), or None."""
    n = len(snaps)
    if n <= 1:
        return None
    keep_from = 0
    reasons: list[str] = []
    if ret.keep_last and n > ret.keep_last:
        keep_from = n - ret.keep_last
        reasons.append(f"keep_last {ret.keep_last}")
    if ret.keep_age:
        young = next((i for i, m in enumerate(snaps) if now - m.created < ret.keep_age), n - 1)
        if young > keep_from:
            keep_from = young
            reasons.append(f"keep_age {ret.keep_age:g}s")
    if ret.max_bytes:
        used = 0
        for i in range(n - 1, -1, -1):
            used += snaps[i].counts.bytes_stored
            if used > ret.max_bytes:
                if i + 1 > keep_from:
                    keep_from = i + 1
                    reasons.append(f"max_bytes {ret.max_bytes}")
                break
    keep_from = min(keep_from, n - 1)
    if keep_from > 0:
        target = snaps[keep_from]
        return Plan(target.id, "retention: " + ", ".join(reasons), keep_from)
    return _compaction(snaps, ret)


def _compaction(snaps: Sequence[SnapInfo], ret: Retention) -> Plan | None:
    # The newest snapshot's lineage starts at the last full snapshot.
    n = len(snaps)
    base = max((i for i, m in enumerate(snaps) if m.kind == "full"), default=0)
    length = n - base
    base_pages = restore_pages(snaps[base].counts)
    budget = ret.compact_ratio * max(base_pages, COMPACT_FLOOR_PAGES)
    pages = [restore_pages(m.counts) for m in snaps[base + 1:]]
    delta_pages = sum(pages)
    if delta_pages >= budget:
        why = (f"the {length - 1} delta(s) since the base store {delta_pages} pages "
               f">= compact_ratio {ret.compact_ratio:g} x {base_pages} base pages")
    elif length > ret.compact_after:
        why = (f"restoring the newest needs {length} snapshots "
               f"(compact_after {ret.compact_after})")
    else:
        return None
    # Both triggers need at least one delta, so the fold point is past the base.
    upto = base + length // 2
    left = sum(pages[upto - base:])  # pages of the deltas after `upto`
    while left > budget / 2 and upto < n - 1:
        upto += 1
        left -= pages[upto - base - 1]
    return Plan(snaps[upto].id, "compaction: " + why, upto)


class ChainTally:
    """Planning inputs of one chain, kept between rounds so that a round does not parse
    every snapshot of the chain. Thread-safe: the event loop notes published snapshots
    while the maintenance thread plans.

    Besides the entries it keeps the sums `plan` starts from (bytes stored, the newest
    full base and the pages of the deltas after it), updated as snapshots are noted, so
    that `may_need_work`, asked after every round, costs the same for a chain of 250
    snapshots as for one of 2."""

    def __init__(self, chain: str) -> None:
        self.chain = chain
        self._lock = threading.Lock()
        self._entries: list[Entry] = []
        self._last_seq = -1
        self._bytes = 0  # bytes_stored, summed over the entries
        self._base = 0  # index of the newest full snapshot (0 if none, as in plan)
        self._base_pages = 0
        self._delta_pages = 0  # restore_pages summed over the entries after the base
        self.reloads = 0  # times the entries were re-read from disk (tests, debugging)

    def _set(self, entries: list[Entry]) -> None:
        # Under self._lock.
        self._entries = []
        self._bytes = self._base = self._base_pages = self._delta_pages = 0
        self._last_seq = -1
        for e in entries:
            self._append(e, parse_snapshot_id(e.id)[1])

    def _append(self, e: Entry, seq: int) -> None:
        # Under self._lock.
        i = len(self._entries)
        self._entries.append(e)
        self._last_seq = seq
        self._bytes += e.counts.bytes_stored
        pages = restore_pages(e.counts)
        if i == 0 or e.kind == "full":
            self._base, self._base_pages, self._delta_pages = i, pages, 0
        else:
            self._delta_pages += pages

    def note(self, meta: SnapshotMeta) -> None:
        """Record a snapshot this process just published on the chain."""
        if meta.chain != self.chain:
            return
        with self._lock:
            # Nothing loaded yet, or not the next snapshot: the next read finds the ids
            # changed and loads them all.
            if self._entries and self._last_seq < meta.seq:
                self._append(Entry.of(meta), meta.seq)

    def remembered(self) -> list[Entry] | None:
        """The entries in memory, unchecked against the disk (None: nothing loaded)."""
        with self._lock:
            return list(self._entries) if self._entries else None

    def may_need_work(self, ret: Retention, now: float) -> bool:
        """False when, by what is remembered, `plan` has nothing to do: the same answer
        as `plan(self.remembered(), ret, now) is None`, without walking the entries.
        True when nothing is remembered (only a job that reads the disk can tell)."""
        with self._lock:
            n = len(self._entries)
            if n == 0:
                return True
            if n == 1:
                return False
            # Retention (plan drops something as soon as any limit drops the oldest).
            if ret.keep_last and n > ret.keep_last:
                return True
            if ret.keep_age and now - self._entries[0].created >= ret.keep_age:
                return True
            if ret.max_bytes and self._bytes > ret.max_bytes:
                return True
            # Compaction (_compaction's two triggers).
            budget = ret.compact_ratio * max(self._base_pages, COMPACT_FLOOR_PAGES)
            return self._delta_pages >= budget or n - self._base > ret.compact_after

    def invalidate(self) -> None:
        with self._lock:
            self._set([])

    def folded(self, base: Entry) -> None:
        """A compaction rewrote `base` (read back from disk) as a full snapshot and
        removed the ones before it; the ones after it are untouched. Re-reading every
        head instead cost about a tenth of a compaction of a small process."""
        with self._lock:
            ids = [e.id for e in self._entries]
            if base.id not in ids:
                self._set([])  # not what was planned from: the next read reloads
                return
            self._set([base, *self._entries[ids.index(base.id) + 1:]])

    def entries(self, store: Store) -> list[Entry]:
        """The chain's snapshots, oldest first: from memory while the ids on disk are the
        ones remembered, else re-read from the snapshots' heads. (The ids are those at
        or above the chain's floor: files a crashed compaction left below it do not
        count.)"""
        floor, ids = store.listing(self.chain)
        with self._lock:
            if [e.id for e in self._entries] == ids:
                return list(self._entries)
        fresh = [Entry.of(store.head(i, floor)) for i in ids]
        with self._lock:
            self._set(fresh)
            self.reloads += 1
        return list(fresh)


def run(store: Store, chain: str, ret: Retention, now: float,
        tally: ChainTally | None = None) -> str | None:
    """Apply retention/compaction to one chain. Returns what was done, or None.
    Without a tally, every snapshot's head is read."""
    tally = tally if tally is not None and tally.chain == chain else ChainTally(chain)
    p = plan(tally.entries(store), ret, now)
    if p is None:
        return None
    try:
        result = compact_chain(store, chain, p.upto)
    except BaseException:
        tally.invalidate()  # unknown how far it got: the next job reads the disk
        raise
    try:
        tally.folded(Entry.of(store.head(p.upto)))
    except (CkptdError, OSError, ValueError):
        tally.invalidate()  # changed again underneath (another ckptd): read it all
    return f"{p.reason}: folded {p.drops} snapshot(s) into a base at {p.upto} ({result})"


def compact_now(store: Store, chain: str, upto: str | None) -> str:
    """Operator-requested compaction: up to `upto`, or the newest snapshot."""
    if upto is None:
        latest = store.latest(chain)
        if latest is None:
            return "chain has no snapshots"
        upto = latest.id
    return compact_chain(store, chain, upto)
