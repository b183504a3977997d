"""Read runs of another process's pages into one buffer.

process_vm_readv takes up to 1024 remote ranges a call, which makes scattered 4 KiB pages
cheap; it cannot read mappings without PROT_READ, so those (and any range it fails on) go
through /proc/PID/mem, which reads with FOLL_FORCE.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from array import array
from collections.abc import Sequence

from ..intervals import covers
from . import abi, procfs
from .syscalls import process_vm_readv

Run = tuple[int, int]  # [start, end) in the target


def alloc_buffer(size: int, populate: bool = False) -> mmap.mmap:
    """An anonymous buffer of `size` bytes (>= 1), backed by transparent huge pages where
    possible so that filling it costs few page faults; `populate` faults it in now (after
    the huge-page advice, so the advice counts)."""
    size = max(size, abi.PAGE_SIZE)
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if size >= (2 << 20) and hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)
    if populate:
        try:
            buf.madvise(abi.MADV_POPULATE_WRITE)
        except OSError:  # before Linux 5.14: touch each page instead
            for off in range(0, size, abi.PAGE_SIZE):
                buf[off] = 0
    return buf


class PageReader:
    def __init__(self, pid: int, use_vm_readv: bool = True, tolerate_unmapped: bool = False
                 ) -> None:
        self.pid = pid
        self.mem_fd = -1  # /proc/PID/mem, opened on first need (most rounds never need it)
        self.use_vm_readv = use_vm_readv
        # A process that is not frozen may unmap memory between scan and read; then the
        # unreadable ranges are recorded in `failed` (and zero-filled) instead of raising.
        self.tolerate_unmapped = tolerate_unmapped
        self.failed: list[Run] = []

    def close(self) -> None:
        if self.mem_fd >= 0:
            os.close(self.mem_fd)
            self.mem_fd = -1

    def __enter__(self) -> PageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_runs(
        self, runs: Sequence[Run], buf: mmap.mmap, unreadable: Sequence[Run] = ()
    ) -> int:
        """Read `runs` back to back into `buf`. Runs inside any range of `unreadable`
        (mappings without PROT_READ; sorted) are read through /proc/PID/mem. Returns bytes
        read."""
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        offset = 0
        batch: list[Run] = []
        batch_offset = 0
        for run in runs:
            if not self.use_vm_readv or covers(unreadable, run):
                offset = self._flush(batch, base, batch_offset, buf)
                self._pread(run, buf, offset)
                offset += run[1] - run[0]
                batch, batch_offset = [], offset
                continue
            batch.append(run)
            offset += run[1] - run[0]
            if len(batch) == abi.IOV_MAX:
                self._flush(batch, base, batch_offset, buf)
                batch, batch_offset = [], offset
        self._flush(batch, base, batch_offset, buf)
        return offset

    def _flush(self, batch: list[Run], base: int, offset: int, buf: mmap.mmap) -> int:
        """process_vm_readv one batch into buf[offset:]. Returns the offset after it."""
        if not batch:
            return offset
        total = sum(e - s for s, e in batch)
        remote = array("Q")
        for s, e in batch:
            remote.append(s)
            remote.append(e - s)
        local = array("Q", (base + offset, total))
        r_addr, _ = remote.buffer_info()
        l_addr, _ = local.buffer_info()
        try:
            got = process_vm_readv(self.pid, l_addr, 1, r_addr, len(batch))
        except OSError:
            got = 0
        if got < total:
            # Partial transfer stops at the first failing range: finish with /proc/PID/mem.
            pos = offset
            done = got
            for s, e in batch:
                n = e - s
                if done >= n:
                    done -= n
                elif done > 0:
                    self._pread((s + done, e), buf, pos + done)
                    done = 0
                else:
                    self._pread((s, e), buf, pos)
                pos += n
        return offset + total

    def _pread(self, run: Run, buf: mmap.mmap, offset: int) -> None:
        start, end = run
        if self.mem_fd < 0:
            self.mem_fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        view = memoryview(buf)[offset : offset + (end - start)]
        got = 0
        try:
            while got < len(view):
                try:
                    n = os.preadv(self.mem_fd, [view[got:]], start + got)
                    if n <= 0:
                        raise OSError(errno.EIO, f"short read of {self.pid}'s memory at "
                                      f"{start + got:#x}")
                except OSError as e:
                    if not (self.tolerate_unmapped and e.errno in (errno.EIO, errno.EFAULT)):
                        raise
                    # Lose only what is unmapped now: the rest of the run may lie in a
                    # mapping that stays, whose pages this round is taken to hold.
                    resume = self._mapped_from(start + got, end) - start
                    view[got:resume] = bytes(resume - got)
                    self.failed.append((start + got, start + resume))
                    n = resume - got
                got += n
        finally:
            view.release()

    def _mapped_from(self, addr: int, end: int) -> int:
        """Where, after the page at `addr` that failed to read, memory in [addr, end) is
        mapped again now (`end` if nowhere). The failing page itself is always skipped, so
        a read that fails inside a mapping still advances."""
        after = addr + abi.PAGE_SIZE
        if after >= end:
            return end
        for m in procfs.read_maps(self.pid):
            if m.end > after and m.start < end:
                return max(m.start, after)
        return end


