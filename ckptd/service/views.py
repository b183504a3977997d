"""Reply bodies: pure functions from service state and store metadata to JSON-ready
dicts (docs/api.md shows each)."""

from __future__ import annotations

import time
from typing import Any

from ..store.format import SnapshotMeta
from ..store.views import snapshot_summary
from .config import Policy
from .registry import Registration

__all__ = ["registration_view", "snapshot_detail", "snapshot_summary", "status_line"]


def snapshot_detail(m: SnapshotMeta) -> dict[str, Any]:
    """All metadata needed to plan a restore, without the (long) per-extent lists."""
    body = m.model_dump(mode="json", exclude={"frames", "extents", "zeros", "data_inline"})
    # The data itself is not restore metadata (and is the process's memory).
    body["data_inline"] = m.data_inline is not None
    body["frame_count"] = len(m.frames)
    body["extent_count"] = len(m.extents)
    body["zero_runs"] = len(m.zeros)
    return body


def registration_view(reg: Registration, policy: Policy,
                      now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    r = reg.record
    overrides = r.policy.model_dump(mode="json", exclude_none=True)
    if not overrides.get("retention"):
        overrides.pop("retention", None)
    return {
        "pid": r.pid,
        "comm": r.comm,
        "uid": r.uid,
        "start_time": r.start_time,
        "registered_at": r.registered_at,
        "registered_by": r.registered_by,
        "overrides": overrides,
        "policy": policy.model_dump(mode="json"),
        "rounds": reg.rounds,
        "failures": reg.failures,
        "overruns": reg.overruns,
        "truncated_rounds": reg.truncated_rounds,
        "in_flight": reg.in_flight,
        "max_in_flight": reg.max_in_flight,
        "last_snapshot": reg.snapshot_ids[-1] if reg.snapshot_ids else None,
        "last_snapshot_age": None if reg.last_snapshot_at is None else now - reg.last_snapshot_at,
        "last_duration": reg.last_duration,
        "last_error": reg.last_error,
        "next_in": None if reg.next_due is None else max(0.0, reg.next_due - now),
    }


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def status_line(registered: int, last_snapshot_at: float | None, now: float,
                full_store_rounds: int = 0) -> str:
    """The STATUS= text systemd shows: "3 processes, last snapshot 2 s ago", and how many
    rounds failed since the store ran out of space, while it is."""
    noun = "process" if registered == 1 else "processes"
    age = None if last_snapshot_at is None else now - last_snapshot_at
    line = f"{registered} {noun}, last snapshot {human_age(age)}"
    if full_store_rounds:
        line += f"; STORE FULL, {full_store_rounds} round(s) failed"
    return line
