"""Retention and compaction of a registered process's chain, run in the background.

Planning is a pure function over the chain's snapshot metadata; the work itself is done
by the store's compaction (ckptd/store/compact.py), which is crash-safe: a crash leaves
the old chain or the new one, both restorable.

Retention (per registration; 0 disables a limit; the newest snapshot is always kept):
  keep_last N      keep the N newest snapshots
  keep_age S       keep snapshots younger than S seconds
  max_bytes B      keep the newest snapshots whose stored bytes sum to at most B
A snapshot is dropped when any limit drops it. Dropping the oldest snapshots of a delta
chain means folding them into the oldest kept one, which becomes a full base.

Compaction: when restoring the newest snapshot would need more than compact_after
snapshots (its full base and the deltas after it), the older half of them is folded into a
new base, so restore cost stays bounded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from ..store import SnapshotMeta, Store
from ..store.compact import compact_chain
from ..store.format import SnapshotHead
from .config import Retention

log = logging.getLogger("ckptd.service.maintenance")


@dataclass(frozen=True)
class Plan:
    upto: str  # fold everything up to and including this snapshot into a base at it
    reason: str
    drops: int  # snapshots older than `upto` that go away


def plan(snaps: Sequence[SnapshotHead | SnapshotMeta], ret: Retention, now: float
         ) -> Plan | None:
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
    # Chain length: the newest snapshot's lineage starts at the last full snapshot.
    base = max((i for i, m in enumerate(snaps) if m.kind == "full"), default=0)
    length = n - base
    if length > ret.compact_after:
        upto = base + length // 2
        return Plan(snaps[upto].id,
                    f"compaction: restoring the newest needs {length} snapshots "
                    f"(compact_after {ret.compact_after})", upto)
    return None


def run(store: Store, chain: str, ret: Retention, now: float) -> str | None:
    """Apply retention/compaction to one chain. Returns what was done, or None."""
    ids = store.snapshot_ids(chain)
    if (not ret.keep_age and not ret.max_bytes and len(ids) <= ret.compact_after
            and (not ret.keep_last or len(ids) <= ret.keep_last)):
        return None  # nothing can apply: no need to read any snapshot
    # Heads only: planning runs after every round and must not parse every extent of
    # every snapshot in the chain.
    p = plan([store.head(i) for i in ids], ret, now)
    if p is None:
        return None
    result = compact_chain(store, chain, p.upto)
    return f"{p.reason}: folded {p.drops} snapshot(s) into a base at {p.upto} ({result})"


def compact_now(store: Store, chain: str, upto: str | None) -> str:
    """Operator-requested compaction: up to `upto`, or the newest snapshot."""
    if upto is None:
        latest = store.latest(chain)
        if latest is None:
            return "chain has no snapshots"
        upto = latest.id
    return compact_chain(store, chain, upto)
