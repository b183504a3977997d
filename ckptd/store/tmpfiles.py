"""Who may still be writing each file in tmp/, and the removal of the rest.

A Store becomes an *owner* the first time it needs a temporary file: it creates
tmp/owner.<token>.lock and holds an exclusive flock on it until it is closed; its files
are named tmp/<token>.<name>. The kernel drops a flock when the last descriptor of its
open file goes, however the process ends, so a lock file that can be locked belongs to
an owner that is gone, and its files are garbage. Unlike a pid, this holds across PID
namespaces (a container and the host sharing one store) and is not fooled by a pid that
another process got since.

flock and not fcntl (POSIX) locks: a POSIX lock is dropped when the process closes *any*
descriptor of the file, which cleanup does after testing its own lock file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading

from ..errors import StoreError
from .fsutil import FILE_MODE

TOKEN_BYTES = 8  # 16 hex digits: no two owners draw the same one
_TOKEN = r"[0-9a-f]{16}"
_LOCK_NAME = re.compile(rf"owner\.({_TOKEN})\.lock")
_OWNED_NAME = re.compile(rf"({_TOKEN})\..+")
# Names from ckptd releases before owner locks: '<writer pid>.<data file name>'. A pid
# has at most 7 digits (pid_max is at most 2**22), so it is never taken for a token.
_PID_NAME = re.compile(r"([0-9]+)\..+")
# Making the lock file and locking it are two steps; a cleaner that locks it in between
# takes it for a dead owner's and removes it, and the owner starts again (rarely twice).
_OWNER_ATTEMPTS = 8


def pid_running(pid: str) -> bool:
    """Is a process with this (decimal) pid running, in our PID namespace?"""
    return os.path.exists(f"/proc/{pid}")


def lock_name(token: str) -> str:
    return f"owner.{token}.lock"


class TmpOwner:
    """A Store's ownership of its files in tmp/: one lock file and one flock for as long
    as the Store is open, taken on first need (a round whose data goes inline never
    needs it). Threads of a process share it through their Store."""

    def __init__(self, tmp_dir: str) -> None:
        self._tmp_dir = tmp_dir
        self._guard = threading.Lock()
        self.token: str | None = None
        self._fd = -1
        self._pid = 0  # the process that made the lock file (a forked child did not)

    def path_for(self, name: str) -> str:
        """Where this owner writes its temporary file `name` (owning first, if need be).
        The caller creates the file; a cleaner keeps it while this owner is open."""
        with self._guard:
            # One fstat per data file, no flock: the lock file may have been removed
            # behind our back (by hand, by a ckptd release before owner locks, or by
            # our parent if we are a forked child); a file named after it would have
            # no owner to protect it, so a new ownership is taken first.
            if self.token is None or os.fstat(self._fd).st_nlink == 0:
                self._take()
            return f"{self._tmp_dir}/{self.token}.{name}"

    def _take(self) -> None:
        self._let_go(unlink=False)
        for _ in range(_OWNER_ATTEMPTS):
            token = os.urandom(TOKEN_BYTES).hex()
            try:
                fd = os.open(f"{self._tmp_dir}/{lock_name(token)}",
                             os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            except FileExistsError:
                continue
            try:
                # Blocking: a cleaner holds it only while it removes the (no) files.
                fcntl.flock(fd, fcntl.LOCK_EX)
                kept = os.fstat(fd).st_nlink > 0
            except BaseException:
                os.close(fd)
                raise
            if kept:
                self.token, self._fd, self._pid = token, fd, os.getpid()
                return
            os.close(fd)  # a cleaner took it for a dead owner's: draw another
        raise StoreError(f"could not take a lock file in {self._tmp_dir} "
                         f"({_OWNER_ATTEMPTS} were removed as soon as they were made)")

    def release(self) -> None:
        """Stop owning: remove the lock file and close it. Files of this owner still in
        tmp/ become garbage for the next cleanup (writers remove their own first)."""
        with self._guard:
            self._let_go(unlink=True)

    def _let_go(self, unlink: bool) -> None:
        if self.token is None:
            return
        # Removed while still locked, so no cleaner sees it unlocked first. A forked
        # child shares the lock with its parent and leaves the file to it.
        if unlink and os.getpid() == self._pid:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self._tmp_dir}/{lock_name(self.token)}")
        os.close(self._fd)
        self.token, self._fd = None, -1


def remove_leftovers(tmp_dir: str) -> list[str]:
    """Remove from tmp/ what writers that are gone left: the files of owners whose lock
    file can be locked, or no longer exists, then their lock files; and files named
    after a pid (older releases) that is not running. Names of any other form are left
    alone: ckptd never writes them. Returns the names removed."""
    removed: list[str] = []
    tokens: set[str] = set()
    for name in os.listdir(tmp_dir):
        m = _LOCK_NAME.fullmatch(name) or _OWNED_NAME.fullmatch(name)
        if m is not None:
            tokens.add(m.group(1))
            continue
        m = _PID_NAME.fullmatch(name)
        if m is not None and not pid_running(m.group(1)):
            _remove(tmp_dir, name, removed)
    gone: dict[str, int] = {}  # owner token -> its lock, held by us (-1: no lock file)
    try:
        for token in tokens:
            fd = _lock_if_gone(tmp_dir, token)
            if fd is not None:
                gone[token] = fd
        if not gone:
            return removed
        # Listed again now that these owners are known to be gone: the first listing
        # may have missed files they made just before they died.
        for name in os.listdir(tmp_dir):
            m = _OWNED_NAME.fullmatch(name)
            if m is not None and m.group(1) in gone:
                _remove(tmp_dir, name, removed)
        # Their lock files last, still locked: an owner's files never outlive its lock
        # file, so a file without one is known to be garbage.
        for token, fd in gone.items():
            if fd >= 0:
                _remove(tmp_dir, lock_name(token), removed)
    finally:
        for fd in gone.values():
            if fd >= 0:
                os.close(fd)
    return removed


def _lock_if_gone(tmp_dir: str, token: str) -> int | None:
    """If the owner `token` is gone: its lock file's fd, locked by us, or -1 if it has no
    lock file (an owner makes it before its first file, and removes it last). None while
    the owner is alive."""
    try:
        # O_NONBLOCK: a name like a lock's is not trusted to be a file (no FIFO waits).
        fd = os.open(f"{tmp_dir}/{lock_name(token)}",
                     os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return -1
    except OSError:
        return None  # not a file we made (a symlink, say): whose it is, we cannot tell
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None  # its owner holds it (this Store's own lock included)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _remove(tmp_dir: str, name: str, removed: list[str]) -> None:
    try:
        os.unlink(f"{tmp_dir}/{name}")
    except (FileNotFoundError, IsADirectoryError):
        return  # another cleaner was first; or a directory, which ckptd never makes
    removed.append(name)
