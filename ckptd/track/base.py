"""The tracker interface: what changed in a process since its last snapshot.

Life of a tracker in one snapshot (see ckptd/capture.py):
  arm()       before the freeze: attach to or set up kernel state; may decide that this
              snapshot must be full (tracking lost, first snapshot)
  begin()     record, before any state is destroyed, which snapshot the state will match
  harvest()   while frozen (or not, with --fuzzy): which pages to read, which hold content
  select()    after the thaw: drop pages whose content did not change (hash tracker)
  commit()    after the snapshot is durable: persist what the next snapshot needs
  close()     release fds (never changes the target)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..intervals import Span
from ..kernel.procfs import Mapping

# Mappings larger than this are never write-protect registered when not writable: the
# kernel allocates page tables for the markers across the whole range, which would cost
# the target memory for big PROT_NONE reservations (JVM heaps, Go arenas).
MAX_READONLY_REGISTER = 64 << 20
# No mapping above this size is registered at all (ASan shadow, huge reservations).
MAX_REGISTER = 64 << 30


@dataclass
class TrackContext:
    pid: int
    state_dir: Path          # chain's tracker state directory (0700)
    parent_present: list[Span] | None  # pages with content at the parent snapshot
    parent_id: str | None
    snapshot_id: str         # the id this round publishes if it succeeds
    fuzzy: bool
    max_pages: int           # 0 = no bound on the get-and-clear
    privileged: bool         # CAP_SYS_ADMIN: can tell pte markers from swap entries
    start_time: int = 0      # the target's start time (with pid: which process this is)
    # Called with the pid while the target is frozen, before anything is done to it or
    # read from it; raises if the round may not go on (service.auth.still_allowed).
    authorize: Callable[[int], None] | None = None


@dataclass
class Harvest:
    to_read: list[Span]                      # normalized page ranges to copy
    present: list[Span]                      # normalized ranges holding content now
    pages_dirty: int = 0
    truncated: bool = False
    scan_ms: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class ArmResult:
    full_reason: str | None  # not None: this snapshot must be full (and why)


class Tracker(ABC):
    name: str
    # Whether the pages select() keeps are the snapshot's changed pages (pages_dirty):
    # true for a tracker that finds changes only by content. A write tracker reports
    # its written pages in Harvest.pages_dirty, and select() may drop some of them.
    dirty_from_select = False

    @abstractmethod
    def arm(self, ctx: TrackContext) -> ArmResult: ...

    @abstractmethod
    def estimate(self, ctx: TrackContext, vmas: Callable[[], list[Mapping]], full: bool
                 ) -> int:
        """Before the freeze: about how many pages harvest will ask to read (to size and
        pre-fault the capture buffer outside the freeze). `vmas` reads the mappings; a
        tracker that can estimate from its own history need not call it."""

    @abstractmethod
    def harvest(self, ctx: TrackContext, vmas: list[Mapping], full: bool) -> Harvest: ...

    def begin(self, ctx: TrackContext) -> None:  # noqa: B027
        """Called before harvest. A tracker whose harvest destroys state (get-and-clear)
        must record here that its state will match ctx.snapshot_id, so that a crash before
        that snapshot is published forces the next snapshot to be full."""

    def select(self, ctx: TrackContext, runs: list[Span], data: memoryview) -> list[bool] | None:
        """Per page of `runs` (in order), whether to store it. None = store all."""
        return None

    def commit(self, ctx: TrackContext, snapshot_id: str) -> None:  # noqa: B027
        """The snapshot is durable; save tracker state for the next one."""

    def abandon(self, ctx: TrackContext) -> None:  # noqa: B027
        """The snapshot failed after harvest: the next one must not rely on this one."""

    def release(self) -> None:  # noqa: B027
        """Undo in the target what tracking set up there, when nobody will snapshot it
        any more (unregistered); close() alone keeps it for a later ckptd."""

    def close(self) -> None:  # noqa: B027
        pass


def capturable(vmas: list[Mapping]) -> list[Mapping]:
    """Mappings whose private memory a snapshot holds."""
    return [m for m in vmas if m.private and not m.special]
