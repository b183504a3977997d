"""Durable, private file operations: the building blocks of the commit protocol."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from .writerid import writer_id

DIR_MODE = 0o700
FILE_MODE = 0o600

# Access wanted, as in the permission bits of one class (and in access(2)).
MAY_READ, MAY_WRITE, MAY_EXEC = 4, 2, 1
MAX_SYMLINKS = 40  # as the kernel's path walk (ELOOP beyond)
PATH_MAX = 4096  # bytes of a path, its NUL included

# POSIX ACLs as the kernel stores them in the "system.posix_acl_access" attribute.
_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_ACL_HEADER = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")  # tag, perm, id
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20)


def make_dirs(path: Path | str) -> None:
    """mkdir -p, with mode 0700 on every directory it creates, parents included (mkdir -p
    and pathlib give parents the umask's mode: 0777 under umask 0, where anyone could
    rename what ckptd then puts inside away and plant their own)."""
    missing: list[str] = []
    p = os.path.abspath(path)
    while not os.path.lexists(p):
        missing.append(p)
        p = os.path.dirname(p)
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            continue  # made meanwhile by someone else: left as it is
        if stat.S_IMODE(os.lstat(d).st_mode) != DIR_MODE:  # a umask such as 0o277
            os.chmod(d, DIR_MODE)


def make_private_dir(path: Path, follow: bool = False, durable: bool = False) -> None:
    """make_dirs, then make `path` itself 0700. It must be a directory of the caller's
    own: another user's could have its entries swapped for symlinks that the caller
    would follow as itself (PermissionError otherwise). `path` must not be a symlink
    (OSError ELOOP), unless `follow` (a store root may be a link to the directory).
    durable=True: each directory created is also fsynced in its parent, so that its
    entry survives a power loss. A directory whose files are made durable (a store,
    the service's registrations) is lost with them if its own entry is not: fsyncing a
    file and its directory says nothing about that directory's name."""
    created: list[str] = []
    if durable:
        p = os.path.abspath(path)
        while not os.path.lexists(p):
            created.append(p)
            p = os.path.dirname(p)
    make_dirs(path)
    for d in reversed(created):  # the outermost first: each parent entry exists by then
        fsync_dir(os.path.dirname(d))
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ENOTDIR and os.path.islink(path):  # O_NOFOLLOW on a link
            raise OSError(errno.ELOOP, "a symbolic link, not a directory", str(path)) from e
        raise
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise PermissionError(errno.EPERM, f"owned by uid {st.st_uid}, not by uid "
                                  f"{os.geteuid()}", str(path))
        if stat.S_IMODE(st.st_mode) != DIR_MODE:
            os.fchmod(fd, DIR_MODE)
    finally:
        os.close(fd)


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_private(path: Path | str, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC, FILE_MODE)


def create_temp(path: Path | str, flags: int = os.O_WRONLY) -> int:
    """Create the temporary file `path` (0600) for writing, as a new file: never through
    a symlink, never into a file that was there. Its name is predictable (pid-based), so
    whatever is at it (a leftover of a writer that had our pid, or anything planted) is
    removed first; unlink removes a symlink itself, not its target."""
    for _ in range(2):
        try:
            return open_private(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return open_private(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW)


def atomic_write(path: Path | str, data: bytes, durable: bool = True,
                 reuse: str | None = None, dir_fd: int | None = None) -> None:
    """Write data to a temporary file, fsync it, rename it over `path`, fsync the directory.
    Readers see the old content or the new, never a mix; after return it is durable.
    durable=False skips the fsyncs: still atomic, and it survives the writer dying, but
    not the machine crashing (for state that a machine crash makes moot anyway).
    `reuse`: an existing file in the same directory, no longer needed, to use as the
    temporary file instead of creating one (see Store.retire_snapshot); if it is gone, a
    new file is created as usual. `dir_fd`: the directory of `path`, open, to fsync
    instead of opening it again."""
    tmp = write_temp(path, data, durable=durable, reuse=reuse)
    os.rename(tmp, path)
    if durable:
        if dir_fd is not None:
            os.fsync(dir_fd)
        else:
            fsync_dir(os.path.dirname(os.fspath(path)))


def write_temp(path: Path | str, data: bytes, durable: bool = True,
               reuse: str | None = None) -> str:
    """The first half of atomic_write: `data` in a temporary file next to `path` (or in
    `reuse`, see atomic_write), fsynced if `durable`; returns its path. The caller renames
    it over `path`, or removes it."""
    # Plain strings: this runs once per snapshot, and Path objects cost more than the
    # syscalls on tmpfs.
    parent, name = os.path.split(os.fspath(path))
    fd = -1
    if reuse is not None:
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(reuse, os.O_WRONLY | os.O_CLOEXEC)
            tmp = reuse
    if fd < 0:
        tmp = os.path.join(parent, f".{name}.{writer_id()}.tmp")
        fd = create_temp(tmp)
    try:
        view = memoryview(data)
        offset = 0
        while offset < len(data):
            offset += os.pwrite(fd, view[offset:], offset)
        if reuse is not None:
            os.ftruncate(fd, len(data))  # a reused file may be longer
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


# --- acting for another user -------------------------------------------------------------
#
# The service runs as root, and without CAP_SETUID (systemd/ckptd.service): it cannot
# take a client's credentials to open files. Where it acts on a path a non-root client
# named, it walks the path itself, one component at a time from "/", through O_PATH
# descriptors that never follow a symlink by themselves, and checks at each directory
# what the kernel would check for the client (search permission, by the permission
# bits and the POSIX ACL, for its uid and primary gid; supplementary groups are not
# known, so access they alone would give is refused). A symlink is read and its target
# walked the same way. What is found is then used through the descriptor: a path the
# client changes afterwards is never looked up again as root.


@dataclass(frozen=True)
class Owner:
    """A non-root user on whose behalf files are read and written."""

    uid: int
    gid: int


def parse_acl(raw: bytes) -> list[tuple[int, int, int]] | None:
    """(tag, perm, id) entries of a "system.posix_acl_access" value; None if malformed."""
    if len(raw) < _ACL_HEADER.size or (len(raw) - _ACL_HEADER.size) % _ACL_ENTRY.size:
        return None
    if _ACL_HEADER.unpack_from(raw)[0] != _ACL_VERSION:
        return None
    return [e for e in _ACL_ENTRY.iter_unpack(raw[_ACL_HEADER.size:])]


def may_access(st_mode: int, st_uid: int, st_gid: int, acl: bytes | None, uid: int,
               gid: int, want: int) -> bool:
    """Whether user `uid` with the single group `gid` gets `want` (MAY_* bits) on a file
    of this mode and owner, and this access ACL (None: none), as the kernel decides it
    (fs/namei.c acl_permission_check, fs/posix_acl.c posix_acl_permission) for a caller
    without capabilities."""
    if acl is None:
        if uid == st_uid:
            bits = st_mode >> 6
        elif gid == st_gid:
            bits = st_mode >> 3
        else:
            bits = st_mode
        return bits & want == want
    entries = parse_acl(acl)
    if entries is None:
        return False  # the kernel refuses such an ACL too (EINVAL): refuse
    mask = next((perm for tag, perm, _ in entries if tag == ACL_MASK), 7)
    found = False
    for tag, perm, eid in entries:
        if tag == ACL_USER_OBJ:
            if uid == st_uid:
                return perm & want == want
        elif tag == ACL_USER:
            if eid == uid:
                return perm & mask & want == want
        elif tag in (ACL_GROUP_OBJ, ACL_GROUP):
            if gid == (st_gid if tag == ACL_GROUP_OBJ else eid):
                found = True
                if perm & want == want:
                    return perm & mask & want == want
        elif tag == ACL_OTHER:
            return not found and perm & want == want
    return False


def _acl_of(fd: int) -> bytes | None:
    try:
        # Through /proc: an O_PATH descriptor has no xattr calls of its own.
        return os.getxattr(f"/proc/self/fd/{fd}", _ACL_XATTR)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return None
        raise


def check_access(fd: int, owner: Owner, want: int, where: str) -> os.stat_result:
    """Raise PermissionError (EACCES) unless `owner` has `want` on the file open at
    `fd`; `where` names it in the error. Returns its stat."""
    st = os.fstat(fd)
    if not may_access(st.st_mode, st.st_uid, st.st_gid, _acl_of(fd), owner.uid, owner.gid,
                      want):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), where)
    return st


def _open_path(name: str, dir_fd: int) -> int:
    return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def resolve_parent(path: str, owner: Owner) -> tuple[int, str, str]:
    """Walk the directories of absolute `path` (all but its last component) as `owner`
    would: returns an O_PATH descriptor of the directory that holds the last component
    (the caller closes it), that component, and the directory's path with symlinks
    resolved. `owner` may search every directory walked, that one included. Raises
    PermissionError (EACCES), FileNotFoundError, NotADirectoryError or OSError (ELOOP,
    too many symlinks), each naming the path as walked so far."""
    if not path.startswith("/"):
        raise ValueError(f"{path!r} is not absolute")
    if len(os.fsencode(path)) >= PATH_MAX:  # as the kernel: bounds the walk's work too
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), path[:80])
    head, _, last = path.rstrip("/").rpartition("/")
    pending = deque(head.split("/"))
    cur, where, links = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), "/", 0
    try:
        while True:
            check_access(cur, owner, MAY_EXEC, where)  # to look anything up in it
            while pending and pending[0] in ("", "."):
                pending.popleft()
            if not pending:
                return cur, last, where
            name = pending.popleft()
            try:
                nxt = _open_path(name, cur)
            except OSError as e:
                raise type(e)(e.errno, e.strerror, os.path.join(where, name)) from None
            st = os.fstat(nxt)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                try:
                    if links > MAX_SYMLINKS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                    target = os.readlink("", dir_fd=nxt)
                finally:
                    os.close(nxt)
                pending.extendleft(reversed(target.split("/")))
                if target.startswith("/"):
                    os.close(cur)
                    cur, where = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), "/"
                continue
            if not stat.S_ISDIR(st.st_mode):
                os.close(nxt)
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR),
                                         os.path.join(where, name))
            os.close(cur)
            cur = nxt
            where = os.path.dirname(where) if name == ".." else os.path.join(where, name)
    except BaseException:
        os.close(cur)
        raise


def open_as(path: str, owner: Owner) -> tuple[int, os.stat_result]:
    """Open the regular file at absolute `path` for reading if `owner` could: the path
    walked as resolve_parent does, the file itself may not be a symlink. Returns the
    descriptor (O_RDONLY) and its stat. Raises OSError (PermissionError: `owner` may not
    read it; EINVAL: not a regular file) otherwise."""
    parent, name, _ = resolve_parent(path, owner)
    try:
        if name in ("", ".", ".."):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        pfd = _open_path(name, parent)
    finally:
        os.close(parent)
    try:
        st = check_access(pfd, owner, MAY_READ, path)
        if not stat.S_ISREG(st.st_mode):
            # Opening a device or a FIFO for reading may block or act: never done.
            raise OSError(errno.EINVAL, "not a regular file", path)
        # Reopened through /proc: the very inode that was checked, never the path again.
        return os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC), st
    finally:
        os.close(pfd)
