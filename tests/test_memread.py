"""Reading a running process's pages when part of a run was unmapped meanwhile (fuzzy
rounds): only the unmapped pages are lost, never the mapped pages after them."""

from __future__ import annotations

import pytest
from helpers import Target, needs_root

from ckptd.kernel import memread, procfs
from ckptd.kernel.abi import PAGE_SIZE

# Maps 8 pages, page i filled with byte i + 1, prints the address; then on "unmap A N"
# unmaps N pages at page A.
EIGHT_PAGES = r"""
import ctypes, mmap, sys
libc = ctypes.CDLL(None)
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
m = mmap.mmap(-1, 8 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(8):
    m[i * 4096:(i + 1) * 4096] = bytes([i + 1]) * 4096
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
print('ready', flush=True)
print(addr, flush=True)
for line in sys.stdin:
    _, first, n = line.split()
    libc.munmap(addr + int(first) * 4096, int(n) * 4096)
    print('ok', flush=True)
"""


@needs_root
@pytest.mark.parametrize("use_vm_readv", [True, False])
@pytest.mark.parametrize(("first", "count"), [(0, 3), (3, 2), (6, 2)])
def test_only_the_unmapped_pages_of_a_run_are_lost(use_vm_readv: bool, first: int,
                                                   count: int) -> None:
    with Target.python(EIGHT_PAGES) as t:
        addr = int(t.readline())
        assert t.send(f"unmap {first} {count}") == "ok"
        buf = memread.alloc_buffer(8 * PAGE_SIZE)
        reader = memread.PageReader(t.pid, use_vm_readv=use_vm_readv, tolerate_unmapped=True)
        try:
            got = reader.read_runs([(addr, addr + 8 * PAGE_SIZE)], buf)
        finally:
            reader.close()
        assert got == 8 * PAGE_SIZE
        gone = (addr + first * PAGE_SIZE, addr + (first + count) * PAGE_SIZE)
        assert reader.failed == [gone]
        for i in range(8):
            page = buf[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
            want = bytes(PAGE_SIZE) if first <= i < first + count else bytes([i + 1]) * PAGE_SIZE
            assert page == want, f"page {i}"
        assert t.alive()


@needs_root
def test_a_frozen_read_of_unmapped_memory_still_fails() -> None:
    with Target.python(EIGHT_PAGES) as t:
        addr = int(t.readline())
        assert t.send("unmap 0 8") == "ok"
        buf = memread.alloc_buffer(8 * PAGE_SIZE)
        reader = memread.PageReader(t.pid, use_vm_readv=False)
        try:
            with pytest.raises(OSError):
                reader.read_runs([(addr, addr + PAGE_SIZE)], buf)
        finally:
            reader.close()


def test_read_maps_follows_changes_and_hands_out_fresh_lists() -> None:
    """read_maps reuses the last parse while the maps text repeats (procfs memo), yet every
    call returns a new list, and a change shows at once. A child of ours, idle between
    commands (our own process's maps change whenever one of its threads allocates): no
    root needed."""
    with Target.python(EIGHT_PAGES) as t:
        addr = int(t.readline())
        first = procfs.read_maps(t.pid)
        second = procfs.read_maps(t.pid)
        assert first == second and first is not second
        assert any(v.start <= addr < v.end for v in first)
        second.clear()  # a caller's list is its own
        assert procfs.read_maps(t.pid) == first
        assert t.send("unmap 0 8") == "ok"
        now = procfs.read_maps(t.pid)
        assert now != first
        assert not any(v.start <= addr < v.end for v in now)
