"""Error types. A UserError's message is one line telling what is wrong and what to do;
the CLI prints it without a traceback. Anything else is an internal failure and is logged
with its context."""

from __future__ import annotations

import errno

# errnos saying the store's filesystem has no room left: space, or the user's quota.
OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class CkptdError(Exception):
    """Base for errors ckptd raises on purpose. `exit_code`: what the CLI exits with
    (README.md lists them); 70 (EX_SOFTWARE) unless a subclass says otherwise."""

    exit_code = 70


class UserError(CkptdError):
    """A mistake the user can fix (bad PID, missing store, unknown id, no permission)."""

    exit_code = 2


class TargetNotFound(UserError):
    pass


class PermissionDenied(UserError):
    exit_code = 13


class AccessRevoked(PermissionDenied):
    """The process was authorized for a non-root client, but that client could no longer
    ptrace it (it became non-dumpable, or set-uid/set-gid by exec): nothing of it may be
    captured on that client's behalf any more."""


class StoreError(UserError):
    """The store is missing, of an unknown version, or not usable."""


class UnknownSnapshot(UserError):
    pass


class TargetGone(CkptdError):
    """The target exited while a snapshot was being taken; nothing was published."""

    exit_code = 3


class TargetBusy(CkptdError):
    """Refused now, may work later: the target could not be frozen (a thread stayed in
    uninterruptible sleep; nothing was published, and the next round tries again), or
    the service answered `busy`."""

    exit_code = 75  # EX_TEMPFAIL


class StoreFull(CkptdError):
    """The store's filesystem ran out of space or quota. Nothing half-written became
    visible, and the next round that can write stores everything the failed one did not
    (a full snapshot, if the tracker lost track). An operational condition, not a bug:
    reported in one line, and a watch or the service goes on trying."""

    exit_code = 74  # EX_IOERR


def is_out_of_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in OUT_OF_SPACE


def store_full(root: object, exc: OSError, consequence: str) -> StoreFull:
    """The StoreFull for `exc`, an out-of-space error writing the store at `root`:
    one line saying so, then `consequence` (what failed, and what to do)."""
    return StoreFull(f"the store {root} is out of space ({exc.strerror}): {consequence}")


class AddressSpaceReplaced(CkptdError):
    """The target exec'd during a round, keeping its address layout (ASLR off): what the
    tracker held belongs to the old address space. Nothing was published, the tracker
    has started over, and the engine takes the round again, as a full snapshot."""


class TrackerUnavailable(CkptdError):
    """A tracker cannot work on this target/kernel; the reason says why."""


class CorruptStore(CkptdError):
    """Data on disk does not match its checksum or metadata."""

    exit_code = 4
