"""Async file I/O for the service's own small files (aiofiles: the event loop never
blocks on the disk while writing them)."""

from __future__ import annotations

import os
from pathlib import Path

import aiofiles
import aiofiles.os

from ..store.fsutil import open_private
from ..store.writerid import writer_id

_fsync = aiofiles.os.wrap(os.fsync)


def _private_opener(path: str, flags: int) -> int:
    # 0600, and never through a symlink. Unlike fsutil.create_temp, a file already at
    # the name is written over ("wb": O_TRUNC), not replaced: the only caller writes in
    # the store's service/ directory, 0700 and ours (Store.open refuses a store another
    # user owns), where nobody else can put anything; and a FIFO put there by root is
    # how the tests make a save block, then fail, at a moment they choose.
    return open_private(path, flags | os.O_NOFOLLOW)


async def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file (0600), fsync, rename over `path`, fsync the
    directory: readers see the old content or the new, and it is durable on return."""
    tmp = path.with_name(f".{path.name}.{writer_id()}.tmp")
    try:
        async with aiofiles.open(tmp, "wb", opener=_private_opener) as f:
            await f.write(data)
            await f.flush()
            await _fsync(f.fileno())
        await aiofiles.os.rename(tmp, path)
    except BaseException:
        if await aiofiles.os.path.exists(tmp):
            await aiofiles.os.remove(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        await _fsync(dfd)
    finally:
        os.close(dfd)


async def read_text(path: Path) -> str:
    async with aiofiles.open(path, encoding="utf-8") as f:
        return await f.read()
