"""Who may do what: SO_PEERCRED identity and the ownership rule.

Rule: root (uid 0) may do anything. Any other user may act only on a process it owns
and could ptrace itself (the kernel's own check for a same-user, non-privileged tracer:
the target's real, effective and saved uids equal the caller's uid, its real, effective
and saved gids equal the caller's gid, and the target is dumpable), and may see only
snapshots whose chain was recorded with its uid.

The decision is a pure function over facts; read_ownership() gathers the facts from /proc.
Paths a non-root client names (materialize's out_dir, and the files its snapshots map)
are walked with its permissions by ckptd/store/fsutil.py.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import AccessRevoked, PermissionDenied, TargetNotFound

_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }


@dataclass(frozen=True)
class Peer:
    """The client process at the other end of the control socket, as the kernel saw it
    at connect() time."""

    pid: int
    uid: int
    gid: int

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def peer_credentials(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return Peer(pid=pid, uid=uid, gid=gid)


@dataclass(frozen=True)
class Ownership:
    """Facts about a target process that decide who may checkpoint it."""

    pid: int
    uids: tuple[int, int, int, int]  # real, effective, saved, filesystem
    gids: tuple[int, int, int, int]
    dumpable: bool  # /proc/PID is owned by the process's euid only when it is dumpable


def read_ownership(pid: int) -> Ownership:
    """Read a process's credentials from /proc. Raises TargetNotFound if it is gone."""
    try:
        uids: tuple[int, ...] = ()
        gids: tuple[int, ...] = ()
        with open(f"/proc/{pid}/status") as f:
            # The owner of a file in /proc/PID, not of /proc/PID itself: the kernel
            # refreshes the files' owners at each lookup, while the directory keeps the
            # owner it had when first looked up (Linux 6.18: still the user's after
            # PR_SET_DUMPABLE 0, so a non-dumpable process looked dumpable).
            st = os.fstat(f.fileno())
            for line in f:
                if line.startswith("Uid:"):
                    uids = tuple(int(x) for x in line.split()[1:5])
                elif line.startswith("Gid:"):
                    gids = tuple(int(x) for x in line.split()[1:5])
                    break
    except (FileNotFoundError, ProcessLookupError):
        raise TargetNotFound(f"no process with PID {pid}") from None
    if len(uids) != 4 or len(gids) != 4:
        raise TargetNotFound(f"PID {pid} has no credentials in /proc (a kernel thread?)")
    # A non-dumpable process's /proc/PID files belong to root (the kernel's
    # task_dump_owner), so the owner differing from the euid means "not dumpable".
    dumpable = st.st_uid == uids[1]
    return Ownership(pid, (uids[0], uids[1], uids[2], uids[3]),
                     (gids[0], gids[1], gids[2], gids[3]), dumpable)


def may_act_on_process(peer: Peer, target: Ownership) -> str | None:
    """None when `peer` may register/snapshot/unregister `target`; else the reason why not."""
    if peer.is_root:
        return None
    if any(u != peer.uid for u in target.uids[:3]):
        return f"PID {target.pid} belongs to another user"
    if any(g != peer.gid for g in target.gids[:3]):
        return (f"PID {target.pid} runs with other group ids (set-gid?), "
                "and you could not ptrace it")
    if not target.dumpable:
        return f"PID {target.pid} is not dumpable (set-uid, or prctl PR_SET_DUMPABLE 0)"
    return None


def may_see_chain(peer: Peer, chain_uid: int) -> bool:
    """Whether `peer` may see snapshots of a chain recorded for user `chain_uid`."""
    return peer.is_root or peer.uid == chain_uid


def check_process(peer: Peer, pid: int) -> Ownership:
    """Gather the facts and apply the rule; raise PermissionDenied with the reason."""
    own = read_ownership(pid)
    reason = may_act_on_process(peer, own)
    if reason is not None:
        raise PermissionDenied(f"{reason}: uid {peer.uid} may not act on it")
    return own


def still_allowed(uid: int, gid: int | None) -> Callable[[int], None] | None:
    """The check a round runs for a process that the client `uid`, `gid` was authorized
    for: None for root (nothing to re-check); else a function of the PID that raises
    AccessRevoked if that client could not ptrace the process now (`gid` None: a
    registration saved before the client's gid was recorded; the process's real gid
    stands in, so its effective and saved gids must still equal it). Authorization at `register` or
    `snapshot` time is not enough: the process may later make itself non-dumpable
    (PR_SET_DUMPABLE 0, as ssh-agent does to keep its keys from its own user) or exec a
    set-uid or set-gid program, and the root service must not go on capturing it for a
    user the kernel would refuse. The engine calls it while the process is frozen, when
    its credentials cannot change (docs/api.md, Authorization)."""
    if uid == 0:
        return None

    def check(pid: int) -> None:
        own = read_ownership(pid)
        reason = may_act_on_process(Peer(0, uid, own.gids[0] if gid is None else gid), own)
        if reason is not None:
            raise AccessRevoked(f"{reason}: uid {uid} may not ptrace it any more, so it "
                                "is not captured on its behalf")

    return check
