"""PAGEMAP_SCAN on the real kernel: exactly-once scans across partial results, and the
>512-region walk_end quirk."""

from __future__ import annotations

import os

import pytest
from helpers import Target, needs_root

from ckptd.kernel import abi, pagemap, ptrace, syscalls, uffd

pytestmark = needs_root

PAGE = abi.PAGE_SIZE

# A target with a private anonymous region; "w I J K..." writes those pages, "d I N"
# drops N pages from page I (MADV_DONTNEED), "p I N" touches (populates) them.
REGION_CODE = """
import ctypes, mmap, sys
m = mmap.mmap(-1, {pages} * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
print('ready', flush=True)
print(addr, flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == 'w':
        for a in args: m[int(a) * 4096] = (m[int(a) * 4096] + 1) % 256 or 1
    elif cmd == 'd':
        m.madvise(mmap.MADV_DONTNEED, int(args[0]) * 4096, int(args[1]) * 4096)
    print('ok', flush=True)
"""


class Region:
    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.t = Target.python(REGION_CODE.format(pages=pages))
        self.addr = int(self.t.readline())
        self.end = self.addr + pages * PAGE

    def write(self, pages: list[int]) -> None:
        for i in range(0, len(pages), 500):
            assert self.t.send("w " + " ".join(map(str, pages[i:i + 500]))) == "ok"

    def arm(self) -> int:
        """Install async write-protect on the region, the way the uffd-wp tracker does."""
        with ptrace.Freezer(self.t.pid) as fz:
            target_fd = fz.inject_syscall(abi.SYS_userfaultfd,
                                          abi.O_CLOEXEC | abi.O_NONBLOCK | abi.UFFD_USER_MODE_ONLY)
        assert target_fd >= 0
        pidfd = syscalls.pidfd_open(self.t.pid)
        fd = syscalls.pidfd_getfd(pidfd, target_fd)
        os.close(pidfd)
        uffd.api_handshake(fd)
        uffd.register_wp(fd, self.addr, self.end)
        uffd.write_protect(fd, self.addr, self.end)
        return fd

    def pages_of(self, regions: list[tuple[int, int, int]]) -> list[int]:
        out: list[int] = []
        for s, e, _ in regions:
            out.extend(range((s - self.addr) // PAGE, (e - self.addr) // PAGE))
        return out


@pytest.fixture
def region() -> Region:
    r = Region(4096)
    yield r  # type: ignore[misc]
    r.t.kill()


def test_more_than_512_regions_are_reported_exactly_once(region: Region) -> None:
    every_other = list(range(0, 4096, 2))
    region.write(every_other)  # 2048 separate one-page regions
    with pagemap.Pagemap(region.t.pid, vec_len=10000) as pm:
        # One call: more than the kernel's 512-entry buffer, so walk_end is stale.
        regions, walk_end = pm.call(region.addr, region.end, pagemap.DUMPABLE, 10000, 0)
        assert len(regions) == 2048
        # The scanner must not trust walk_end; its result is exact.
        res = pm.scan([(region.addr, region.end)], pagemap.DUMPABLE)
    assert region.pages_of(res.regions) == every_other
    assert res.pages == 2048
    # And with a small output vector, many calls, still each page exactly once.
    with pagemap.Pagemap(region.t.pid, vec_len=700) as pm:
        res = pm.scan([(region.addr, region.end)], pagemap.DUMPABLE)
    assert region.pages_of(res.regions) == every_other
    assert res.calls >= 3
    _ = walk_end


def test_get_and_clear_over_600_regions_is_exact(region: Region) -> None:
    fd = region.arm()
    try:
        pages = list(range(1, 4096, 3))  # 1365 separate regions
        region.write(pages)
        with pagemap.Pagemap(region.t.pid, vec_len=4096) as pm:
            first = pm.scan([(region.addr, region.end)], pagemap.WRITTEN_GET_AND_CLEAR)
            again = pm.scan([(region.addr, region.end)], pagemap.WRITTEN_GET_AND_CLEAR)
        assert region.pages_of(first.regions) == pages
        assert again.pages == 0 and again.regions == []
    finally:
        os.close(fd)


def test_bounded_output_loses_no_page(region: Region) -> None:
    """kernel-notes: 10 written pages, max_pages=4 -> 4; vec_len=2 -> 2 regions; the rest
    -> 4; then 0. Pages not returned stay written for the next call."""
    fd = region.arm()
    try:
        written = [3, 10, 11, 40, 41, 42, 100, 200, 300, 4000]
        region.write(written)
        seen: list[int] = []
        with pagemap.Pagemap(region.t.pid) as pm:
            q = pagemap.WRITTEN_GET_AND_CLEAR
            regions, _ = pm.call(region.addr, region.end, q, 4096, 4)
            assert sum((e - s) // PAGE for s, e, _ in regions) == 4
            seen += region.pages_of(regions)
            regions, _ = pm.call(region.addr, region.end, q, 2, 0)
            assert len(regions) == 2
            seen += region.pages_of(regions)
            rest = pm.scan([(region.addr, region.end)], q)
            seen += region.pages_of(rest.regions)
            assert pm.scan([(region.addr, region.end)], q).pages == 0
        assert sorted(seen) == written
        assert len(seen) == len(set(seen)), "a page was reported twice"
    finally:
        os.close(fd)


def test_scan_budget_resumes_where_it_stopped(region: Region) -> None:
    fd = region.arm()
    try:
        written = list(range(0, 4096, 5))  # 820 pages
        region.write(written)
        got: list[int] = []
        rounds = 0
        with pagemap.Pagemap(region.t.pid, vec_len=64) as pm:
            while True:
                res = pm.scan([(region.addr, region.end)], pagemap.WRITTEN_GET_AND_CLEAR,
                              max_pages=100)
                got += region.pages_of(res.regions)
                rounds += 1
                assert res.pages <= 100
                if not res.truncated:
                    break
        assert sorted(got) == written and len(got) == len(set(got))
        assert rounds == 9  # 820 pages at 100 a round
    finally:
        os.close(fd)


def test_markers_report_swapped_and_pagemap_tells_them_apart(region: Region) -> None:
    """A never-populated page under async write-protect shows as SWAPPED to PAGEMAP_SCAN;
    /proc/PID/pagemap (as root) shows it as a pte marker, not a swap entry."""
    region.write([0, 1, 2])
    fd = region.arm()
    try:
        with pagemap.Pagemap(region.t.pid) as pm:
            regions = pm.scan([(region.addr, region.end)], pagemap.DUMPABLE).regions
        present = [(s, e) for s, e, c in regions if c & abi.PAGE_IS_PRESENT]
        swapped = [(s, e) for s, e, c in regions if not c & abi.PAGE_IS_PRESENT]
        assert present == [(region.addr, region.addr + 3 * PAGE)]
        assert swapped == [(region.addr + 3 * PAGE, region.end)]
        content, empty = pagemap.split_swapped(region.t.pid, swapped)
        assert content == [] and empty == swapped
    finally:
        os.close(fd)


def test_probe_answers_with_a_reason() -> None:
    ok, why = pagemap.probe_scan(os.getpid(), abi.PAGE_IS_WRITTEN)
    assert ok and why == "supported"
    ok, why = pagemap.probe_scan(os.getpid(), 1 << 40)  # no such category
    assert not ok and "EINVAL" in why
