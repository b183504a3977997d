"""PAGEMAP_SCAN on /proc/PID/pagemap: every matching region exactly once.

The ioctl may stop early for three reasons: the output vector is full (vec_len), the page
budget is used up (max_pages), or the walk finished. Linux 6.18 leaves `walk_end` stale
when one call returns more than 512 regions (it is only updated when the kernel's internal
512-entry buffer is flushed), so completion is decided from the counts instead:
fewer regions than vec_len and budget not reached means the range is done; otherwise the
next call starts at the end of the last region returned. Pages after that point were not
reported, so (with PM_SCAN_WP_MATCHING) they were not write-protected either, and are
reported by the next call: nothing is lost, nothing is reported twice.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import abi
from .syscalls import ioctl

Region = tuple[int, int, int]
"""(start, end exclusive, categories) as reported by the kernel."""

DEFAULT_VEC_LEN = 4096

# struct pm_scan_arg: twelve u64 fields in abi.PmScanArg's order (see docs/kernel.md).
_ARG = struct.Struct("=12Q")
assert _ARG.size == ctypes.sizeof(abi.PmScanArg)


@dataclass(frozen=True)
class Query:
    """Which pages match, in the kernel's terms (see docs/kernel.md)."""

    category_mask: int = 0
    category_inverted: int = 0
    category_anyof_mask: int = 0
    return_mask: int = 0
    flags: int = 0


# Pages worth dumping (CRIU's rule): present or swapped, not file-backed, not the zero page.
_NOT_FILE_NOT_ZERO = abi.PAGE_IS_PFNZERO | abi.PAGE_IS_FILE
DUMPABLE = Query(
    category_mask=_NOT_FILE_NOT_ZERO,
    category_inverted=_NOT_FILE_NOT_ZERO,
    category_anyof_mask=abi.PAGE_IS_PRESENT | abi.PAGE_IS_SWAPPED,
    return_mask=abi.PAGE_IS_PRESENT | abi.PAGE_IS_SWAPPED,
)
# Same, but only pages written since they were last write-protected, and write-protect them
# again in the same call: the atomic get-and-clear.
WRITTEN_GET_AND_CLEAR = Query(
    category_mask=_NOT_FILE_NOT_ZERO | abi.PAGE_IS_WRITTEN,
    category_inverted=_NOT_FILE_NOT_ZERO,
    category_anyof_mask=abi.PAGE_IS_PRESENT | abi.PAGE_IS_SWAPPED,
    return_mask=abi.PAGE_IS_WRITTEN,
    flags=abi.PM_SCAN_WP_MATCHING,
)
# The kernel's fast path (category_mask and return_mask exactly WRITTEN, nothing else):
# it only tests each pte's uffd-wp bit, about 7x cheaper than the general path, which
# classifies every page. It reports every pte without the bit: pages written since the
# last clear, and also none ptes (anonymous pages dropped since, e.g. by MADV_DONTNEED,
# which read back as zeros). The WP flag makes it the get-and-clear.
WRITTEN_FAST = Query(category_mask=abi.PAGE_IS_WRITTEN, return_mask=abi.PAGE_IS_WRITTEN)
WRITTEN_FAST_GET_AND_CLEAR = Query(
    category_mask=abi.PAGE_IS_WRITTEN,
    return_mask=abi.PAGE_IS_WRITTEN,
    flags=abi.PM_SCAN_WP_MATCHING,
)
# Ranges registered for async write-protect (a per-VMA property).
WP_ALLOWED = Query(
    category_mask=abi.PAGE_IS_WPALLOWED,
    return_mask=abi.PAGE_IS_WPALLOWED,
)
# The opposite: ranges of mappings that are *not* registered. The kernel skips a
# registered mapping whole at its per-mapping check, without walking its pages.
NOT_WP_ALLOWED = Query(
    category_mask=abi.PAGE_IS_WPALLOWED,
    category_inverted=abi.PAGE_IS_WPALLOWED,
    return_mask=abi.PAGE_IS_WPALLOWED,
)


@dataclass
class ScanResult:
    regions: list[Region] = field(default_factory=list)
    pages: int = 0
    calls: int = 0
    # True when the page budget stopped the scan before the end of the ranges; the
    # unreported pages keep their state for the next scan.
    truncated: bool = False
    # Address to resume from when truncated.
    resume_at: int | None = None


class Pagemap:
    """An open /proc/PID/pagemap. Needs ptrace-read access to PID."""

    def __init__(self, pid: int, vec_len: int = DEFAULT_VEC_LEN) -> None:
        self.pid = pid
        self.fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self._vec_len = vec_len
        self._vec = (abi.PageRegion * vec_len)()
        self._words = memoryview(self._vec).cast("B").cast("Q")
        # One argument struct, filled in place by one pack_into per call: building a
        # ctypes Structure from keywords cost about as much as the ioctl itself.
        self._arg = abi.PmScanArg()
        self._arg_bytes = memoryview(self._arg).cast("B")
        self._vec_addr = ctypes.addressof(self._vec)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def same_address_space(self) -> bool:
        """Whether the address space this file was opened on is still alive, which for a
        process we hold means it is still the process's own: an open pagemap keeps its
        address space's structure but not its memory, so after an exec (or exit) a read
        returns nothing where a live one returns an entry even for unmapped address 0.
        PAGEMAP_SCAN on such a file walks no mapping and reports nothing, without an
        error: a tracker that kept using it would take an exec'd process's pages for
        unwritten ones."""
        return len(os.pread(self.fd, 8, 0)) == 8

    def __enter__(self) -> Pagemap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, start: int, end: int, query: Query, vec_len: int, max_pages: int) -> tuple[
        list[Region], int
    ]:
        """One raw ioctl. Returns (regions, walk_end). vec_len <= the buffer size."""
        if vec_len > self._vec_len:
            raise ValueError("vec_len larger than the buffer")
        _ARG.pack_into(
            self._arg_bytes, 0, _ARG.size, query.flags, start, end, 0, self._vec_addr,
            vec_len, max_pages, query.category_inverted, query.category_mask,
            query.category_anyof_mask, query.return_mask,
        )
        n = ioctl(self.fd, abi.PAGEMAP_SCAN, self._arg)
        flat = self._words[: 3 * n].tolist()
        return list(zip(flat[0::3], flat[1::3], flat[2::3], strict=True)), self._arg.walk_end

    def scan(
        self,
        ranges: Iterable[tuple[int, int]],
        query: Query,
        max_pages: int = 0,
        vec_len: int | None = None,
    ) -> ScanResult:
        """Scan each [start, end) in order, reporting every matching region exactly once.

        max_pages bounds the total over all ranges (0 = unbounded). Adjacent regions with
        equal categories are merged.
        """
        vec_len = vec_len or self._vec_len
        result = ScanResult()
        out = result.regions
        for start, end in ranges:
            pos = start
            while pos < end:
                budget = max_pages - result.pages if max_pages else 0
                regions, _walk_end = self.call(pos, end, query, vec_len, budget)
                result.calls += 1
                got = 0
                for r_start, r_end, cats in regions:
                    got += (r_end - r_start) >> abi.PAGE_SHIFT
                    if out and out[-1][1] == r_start and out[-1][2] == cats:
                        out[-1] = (out[-1][0], r_end, cats)
                    else:
                        out.append((r_start, r_end, cats))
                result.pages += got
                if max_pages and result.pages >= max_pages:
                    result.truncated = True
                    result.resume_at = regions[-1][1] if regions else pos
                    return result
                if len(regions) < vec_len:
                    break  # the walk reached `end`; walk_end is not trusted (see above)
                pos = regions[-1][1]
        return result


def probe_scan(pid: int, category_mask: int) -> tuple[bool, str]:
    """Can this kernel do PAGEMAP_SCAN with these category bits? (False, reason) if not."""
    try:
        pm = Pagemap(pid, vec_len=16)
    except OSError as e:
        return False, f"cannot open /proc/{pid}/pagemap: {e.strerror}"
    try:
        pm.call(0, abi.PAGE_SIZE, Query(category_mask=category_mask, return_mask=category_mask),
                16, 0)
    except OSError as e:
        if e.errno == errno.ENOTTY:
            return False, "PAGEMAP_SCAN not supported by this kernel (ENOTTY; needs Linux 6.7+)"
        if e.errno == errno.EINVAL:
            return False, f"PAGEMAP_SCAN rejects category mask {category_mask:#x} (EINVAL)"
        return False, f"PAGEMAP_SCAN failed: {e.strerror}"
    finally:
        pm.close()
    return True, "supported"


# --- /proc/PID/pagemap entries (64-bit per page) -------------------------------------------
PM_PRESENT = 1 << 63
PM_SWAP = 1 << 62
PM_FILE = 1 << 61
PM_UFFD_WP = 1 << 57
PM_FRAME_MASK = (1 << 55) - 1
SWP_TYPE_MASK = 0x1F
# pte markers (uffd-wp on an unpopulated page) are swap entries of the last swap type.
SWP_PTE_MARKER = 31


def read_entries(pid: int, start: int, end: int) -> list[int]:
    """Raw /proc/PID/pagemap entries for [start, end)."""
    from array import array

    n = (end - start) >> abi.PAGE_SHIFT
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = bytearray()
        pos = (start >> abi.PAGE_SHIFT) * 8
        want = n * 8
        while len(raw) < want:
            chunk = os.pread(fd, want - len(raw), pos + len(raw))
            if not chunk:
                break
            raw += chunk
    finally:
        os.close(fd)
    arr = array("Q")
    arr.frombytes(bytes(raw[: len(raw) - len(raw) % 8]))
    return arr.tolist()


class PrivatePresentCheck:
    """Whether every page of some spans is still a present private page (anonymous, or a
    file page's copy-on-write copy) of this process alone, from /proc/PID/pagemap: a
    third to a half of the cost of a PAGEMAP_SCAN for presence, whose general path
    weighs each page's categories.

    Built once for spans that repeat from round to round. Each range is read with one
    pread, and only the top byte of each entry is looked at: bit 63 (present) and bit
    56 (mapped by this process only) set, bits 62 (swap-type) and 61 (file or shared
    page) clear, bits 60-58 always clear; bit 57 (uffd-wp) may be anything. Requiring
    bit 56 rules out the zero page (it has no page of its own, so it is never
    "exclusive"), which PAGEMAP_SCAN would not count as content; pages shared after a
    fork or by KSM fail too, and the caller then asks PAGEMAP_SCAN. The mask and the
    expected value of those bytes are precomputed as integers, so a check is one AND
    and one compare per range, whatever the number of spans. The flag bits read the
    same without CAP_SYS_ADMIN (only the frame bits read as zero)."""

    _TOP_MASK = 0xFD  # bits 63-58 and 56 of an entry
    _TOP_PRIVATE_PRESENT = 0x81  # present, exclusive; not swap-type, not file or shared

    def __init__(self, spans: Iterable[tuple[int, int]], ranges: Iterable[tuple[int, int]]
                 ) -> None:
        """`ranges`: sorted, disjoint, together covering `spans` (sorted, disjoint);
        the pages of a range outside `spans` are read but not checked."""
        span_list = list(spans)
        self.parts: list[tuple[int, int, int, int]] = []  # offset, bytes, mask, expected
        i = 0
        for lo, hi in ranges:
            mask = expected = 0
            while i < len(span_list) and lo <= span_list[i][0] and span_list[i][1] <= hi:
                s, e = span_list[i]
                first, count = (s - lo) >> abi.PAGE_SHIFT, (e - s) >> abi.PAGE_SHIFT
                ones = (1 << (8 * count)) - 1  # one byte per page
                mask |= (ones // 0xFF * self._TOP_MASK) << (8 * first)
                expected |= (ones // 0xFF * self._TOP_PRIVATE_PRESENT) << (8 * first)
                i += 1
            if mask:
                self.parts.append(((lo >> abi.PAGE_SHIFT) * 8,
                                   ((hi - lo) >> abi.PAGE_SHIFT) * 8, mask, expected))
        if i != len(span_list):
            raise ValueError("the ranges do not cover the spans")

    def holds(self, fd: int) -> bool:
        """True if every page of the spans is a present private page now. False if any
        is not, or the process's memory is gone (a short read): then ask in detail."""
        for offset, nbytes, mask, expected in self.parts:
            raw = os.pread(fd, nbytes, offset)
            if len(raw) != nbytes:
                return False
            if int.from_bytes(raw[7::8], "little") & mask != expected:
                return False
        return True


def _runs_where(start: int, flags: list[bool]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    run_start = -1
    for i, f in enumerate(flags):
        if f and run_start < 0:
            run_start = i
        elif not f and run_start >= 0:
            out.append((start + (run_start << abi.PAGE_SHIFT), start + (i << abi.PAGE_SHIFT)))
            run_start = -1
    if run_start >= 0:
        out.append((start + (run_start << abi.PAGE_SHIFT), start + (len(flags) << abi.PAGE_SHIFT)))
    return out


def split_swapped(pid: int, spans: Iterable[tuple[int, int]]) -> tuple[
    list[tuple[int, int]], list[tuple[int, int]]
]:
    """Split pages that PAGEMAP_SCAN reports as SWAPPED (and not present) into
    (may hold content, certainly empty).

    PAGEMAP_SCAN reports a uffd-wp pte marker (a never-populated page under async
    write-protect) as SWAPPED, like a real swap entry. /proc/PID/pagemap tells them apart by
    the swap type, but only to a reader with CAP_SYS_ADMIN (otherwise the frame bits read
    as 0): without it every page is returned as "may hold content", and reading it gives
    its true content either way (zeros for a marker)."""
    content: list[tuple[int, int]] = []
    empty: list[tuple[int, int]] = []
    for start, end in spans:
        entries = read_entries(pid, start, end)
        distinct = set(entries)
        is_marker = {
            v: bool(v & PM_SWAP) and not v & PM_PRESENT and (v & PM_FRAME_MASK) != 0
            and (v & SWP_TYPE_MASK) == SWP_PTE_MARKER
            for v in distinct
        }
        if all(is_marker.values()):
            empty.append((start, end))
        elif not any(is_marker.values()):
            content.append((start, end))
        else:
            flags = [is_marker[v] for v in entries]
            empty.extend(_runs_where(start, flags))
            content.extend(_runs_where(start, [not f for f in flags]))
    return content, empty


def dumpable_from_entries(pid: int, spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Pages worth dumping, from /proc/PID/pagemap alone (for kernels without
    PAGEMAP_SCAN): present or swapped, and not a file/shared page. The zero page cannot be
    told apart without PFNs, so it is included (it reads as zeros)."""
    out: list[tuple[int, int]] = []
    for start, end in spans:
        entries = read_entries(pid, start, end)
        flags = [
            bool(v & (PM_PRESENT | PM_SWAP)) and not v & PM_FILE
            and not (v & PM_SWAP and (v & SWP_TYPE_MASK) == SWP_PTE_MARKER
                     and v & PM_FRAME_MASK)
            for v in entries
        ]
        out.extend(_runs_where(start, flags))
    return out
