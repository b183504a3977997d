"""JSON-ready views of store metadata, shared by the CLI and the service's replies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import reader
from .format import SnapshotMeta
from .store import Store


def snapshot_summary(m: SnapshotMeta) -> dict[str, Any]:
    """One snapshot in a line of JSON: what `ckptd snapshot --json` and `list --json` print."""
    return {
        "id": m.id, "pid": m.pid, "chain": m.chain, "seq": m.seq, "parent": m.parent,
        "kind": m.kind,
        "full_reason": m.full_reason, "tracker": m.tracker,
        "tracker_reason": m.tracker_reason, "consistency": m.consistency,
        "truncated": m.truncated, "created": m.created,
        "pages": m.counts.pages_read, "pages_dirty": m.counts.pages_dirty,
        "pages_stored": m.counts.pages_stored, "pages_zero": m.counts.pages_zero,
        "pages_present": m.counts.pages_present,
        "bytes_read": m.counts.bytes_read, "bytes_stored": m.counts.bytes_stored,
        "freeze_ms": round(m.timings.freeze_ms, 3), "scan_ms": round(m.timings.scan_ms, 3),
        "read_ms": round(m.timings.read_ms, 3), "compress_ms": round(m.timings.compress_ms, 3),
        "write_ms": round(m.timings.write_ms, 3), "total_ms": round(m.timings.total_ms, 3),
    }


@dataclass(frozen=True)
class PageMapView:
    """Where the content of each page of a snapshot lives, as `ckptd show` prints it."""

    meta: SnapshotMeta
    lineage: list[str]  # the snapshots a restore reads, the full base first
    # {"start", "end", "source"}: adjacent ranges with the same source are one row;
    # source is the id of the snapshot that stored the content, or "zero".
    page_map: list[dict[str, Any]]
    unsourced: list[list[int]]  # [start, end]: content no snapshot stored (damage)


def page_map_view(store: Store, snapshot_id: str) -> PageMapView:
    """The page map of `snapshot_id`. One function for `ckptd show --store` and the
    service's `show` reply, so that both print the same."""
    meta, pm, lineage = reader.page_map(store, snapshot_id)
    rows: list[dict[str, Any]] = []
    for start, end, src in pm:
        label = src.snapshot if isinstance(src, reader.DataRef) else str(src)
        # Adjacent pieces of one frame, or of frames of one snapshot, read as one range.
        if rows and rows[-1]["end"] == start and rows[-1]["source"] == label:
            rows[-1]["end"] = end
        else:
            rows.append({"start": start, "end": end, "source": label})
    missing = [[s, e] for s, e in reader.unsourced(meta, pm)]
    return PageMapView(meta, [m.id for m in lineage], rows, missing)
