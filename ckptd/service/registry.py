"""Registered processes: identity (PID + start time + a pidfd), policy overrides, and the
runtime counters the scheduler keeps. Persisted as one JSON file, written atomically.

A PID alone does not name a process: PIDs are reused. A registration holds a pidfd
(which always refers to the process it was opened for, and becomes readable when that
process exits) and the start time from /proc/PID/stat; a process is "the same one" when
both agree.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import CkptdError, TargetNotFound
from ..kernel import procfs
from .config import Policy, PolicyOverride

log = logging.getLogger("ckptd.service.registry")

REGISTRY_VERSION = 1
REGISTRY_FILE = "registrations.json"


class RegistrationRecord(BaseModel):
    """What survives a restart."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    pid: int
    start_time: int
    uid: int = Field(description="owner (real uid) of the process when registered")
    registered_by: int = Field(description="uid of the client that registered it")
    registered_gid: int | None = Field(
        default=None, description="gid of the client that registered it (None: written "
        "before it was recorded; the process's real gid at each round stands in)")
    registered_at: float
    comm: str = ""
    policy: PolicyOverride = Field(default_factory=lambda: PolicyOverride())
    last_snapshot: str | None = None


class RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: str = "ckptd-registrations"
    version: int = REGISTRY_VERSION
    registrations: list[RegistrationRecord] = Field(default_factory=list)


def read_start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat: start time in clock ticks since boot."""
    try:
        return procfs.start_time(pid)
    except (FileNotFoundError, ProcessLookupError):
        raise TargetNotFound(f"no process with PID {pid}") from None


def read_comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def open_process(pid: int, expect_start: int | None = None) -> tuple[int, int]:
    """Open a pidfd for `pid` and return (pidfd, start_time). The start time is read
    after the pidfd is open, by PID: it is the pidfd's process's if that process has not
    exited by the time the caller checks `pidfd_exited` (a PID is reused only once its
    process has exited and been reaped). Anything else read by PID in between is that
    process's too. With `expect_start`, raise TargetNotFound when the PID now belongs to
    another process."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise TargetNotFound(f"no process with PID {pid}") from None
    try:
        start = read_start_time(pid)
        if expect_start is not None and start != expect_start:
            raise TargetNotFound(
                f"PID {pid} now belongs to another process (start time {start}, "
                f"registered {expect_start})"
            )
    except BaseException:
        os.close(pidfd)
        raise
    return pidfd, start


def pidfd_exited(pidfd: int) -> bool:
    """True once the process behind `pidfd` has exited (pidfds poll readable then)."""
    import select

    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


@dataclass
class Registration:
    record: RegistrationRecord
    pidfd: int
    # Runtime state (not persisted).
    rounds: int = 0
    failures: int = 0
    overruns: int = 0
    truncated_rounds: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    last_snapshot_at: float | None = None
    last_duration: float | None = None
    last_error: str | None = None
    _policy_cache: tuple[PolicyOverride, Policy, Policy] | None = field(default=None,
                                                                        repr=False)
    next_due: float | None = None  # wall clock
    closed: bool = False
    # Set, on the loop, when an unregistration starts: a `register` of the PID is then
    # refused (busy) instead of updating a registration about to be dropped.
    unregistering: bool = False
    exited: bool = False  # ... because its process exited
    chain: str | None = None  # the chain of its latest snapshot (set by the round)
    snapshot_ids: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.record.pid

    def policy(self, defaults: Policy) -> Policy:
        """The effective policy. Asked several times per round; both inputs are
        immutable, so it is recomputed only when either object is replaced (a reload, a
        re-registration)."""
        cached = self._policy_cache
        if cached is not None and cached[0] is self.record.policy and cached[1] is defaults:
            return cached[2]
        pol = self.record.policy.apply(defaults)
        self._policy_cache = (self.record.policy, defaults, pol)
        return pol

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.pidfd)


class Registry:
    """In-memory registrations keyed by PID. Not thread-safe: used from the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.by_pid: dict[int, Registration] = {}

    def __len__(self) -> int:
        return len(self.by_pid)

    def get(self, pid: int) -> Registration | None:
        return self.by_pid.get(pid)

    def add(self, record: RegistrationRecord, pidfd: int) -> Registration:
        old = self.by_pid.get(record.pid)
        if old is not None:
            old.close()
        reg = Registration(record=record, pidfd=pidfd)
        self.by_pid[record.pid] = reg
        return reg

    def remove(self, pid: int) -> Registration | None:
        reg = self.by_pid.pop(pid, None)
        if reg is not None:
            reg.close()
        return reg

    def update(self, pid: int, **changes: object) -> None:
        reg = self.by_pid[pid]
        reg.record = reg.record.model_copy(update=changes)

    def to_bytes(self) -> bytes:
        doc = RegistryFile(registrations=[r.record for r in self.by_pid.values()])
        return doc.model_dump_json(indent=1).encode()

    def load_records(self) -> list[RegistrationRecord]:
        """Records from the file; none if there is no file. A file that cannot be parsed is
        an error (the operator must look at it), not an empty registry."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            doc = RegistryFile.model_validate_json(raw)
        except ValidationError as exc:
            raise CkptdError(
                f"{self.path}: cannot parse registrations: {exc.errors()[0]['msg']} "
                f"at {exc.errors()[0]['loc']}; move it aside to start without them"
            ) from None
        if doc.version != REGISTRY_VERSION:
            raise CkptdError(f"{self.path}: registrations version {doc.version} is unknown")
        return doc.registrations

    def restore(self) -> tuple[list[Registration], list[tuple[RegistrationRecord, str]]]:
        """Re-open every persisted registration whose process is still the same one.
        Returns (restored, [(gone record, why)])."""
        restored: list[Registration] = []
        gone: list[tuple[RegistrationRecord, str]] = []
        for rec in self.load_records():
            try:
                pidfd, _ = open_process(rec.pid, rec.start_time)
            except TargetNotFound as exc:
                gone.append((rec, str(exc)))
                continue
            restored.append(self.add(rec, pidfd))
        return restored, gone


def new_record(pid: int, start_time: int, uid: int, registered_by: int,
               policy: PolicyOverride, registered_gid: int | None = None
               ) -> RegistrationRecord:
    return RegistrationRecord(
        pid=pid, start_time=start_time, uid=uid, registered_by=registered_by,
        registered_gid=registered_gid, registered_at=time.time(), comm=read_comm(pid),
        policy=policy,
    )
