"""Durable, private file operations: the building blocks of the commit protocol."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def make_private_dir(path: Path) -> None:
    """mkdir -p with mode 0700 on every directory created; fix the mode if it exists."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != DIR_MODE:
        os.chmod(path, DIR_MODE)


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_private(path: Path | str, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC, FILE_MODE)


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
    # Plain strings: this runs once per snapshot, and Path objects cost more than the
    # syscalls on tmpfs.
    parent, name = os.path.split(os.fspath(path))
    fd = -1
    if reuse is not None:
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(reuse, os.O_WRONLY | os.O_CLOEXEC)
            tmp = reuse
    if fd < 0:
        tmp = os.path.join(parent, f".{name}.{os.getpid()}.tmp")
        fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
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
    os.rename(tmp, path)
    if durable:
        if dir_fd is not None:
            os.fsync(dir_fd)
        else:
            fsync_dir(parent)
