"""JSON-ready views of store metadata, shared by the CLI and the service's replies."""

from __future__ import annotations

from typing import Any

from .format import SnapshotMeta


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
