"""The uffd-wp tracker when a process remaps memory between rounds, on the real kernel."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import GroundTruthRecorder, Target, assert_materializes_to, needs_root

from ckptd.engine import Engine
from ckptd.intervals import Span, intersect, normalize
from ckptd.kernel import abi, procfs
from ckptd.store import Store

pytestmark = needs_root

PAGE = abi.PAGE_SIZE
AREA = 4096  # pages of the work area
BASE = 4096  # pages of a static, populated region that a delta must not read again

# A work area at a known address, carved out of a large PROT_NONE reservation (larger
# than the tracker's read-only registration limit, so never registered, and nothing else
# is placed there). Commands take page offsets into the area:
#   map A B PROT      mmap [A, B) with MAP_FIXED_NOREPLACE
#   unmap A B         munmap [A, B)
#   prot A B PROT     mprotect [A, B)
#   fill A B BYTE     memset pages [A, B)
#   w A...            add one to a byte of each page A
#   grow A B C        mremap [A, B) to [A, C) in place
#   move A B C        mremap [A, B) to C (MREMAP_MAYMOVE | MREMAP_FIXED)
#   brk N             extend the heap by N pages with sbrk and fill them with 0x5b
#   base              print the static region's address
TARGET = f"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
for f in ("mmap", "mremap", "sbrk"):
    getattr(libc, f).restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                        ctypes.c_void_p]
libc.sbrk.argtypes = [ctypes.c_long]
P, AREA, BASE = {PAGE}, {AREA}, {BASE}
PRIVATE_ANON, FIXED, NOREPLACE = 0x22, 0x10, 0x100000
base = libc.mmap(None, BASE * P, 3, PRIVATE_ANON, -1, 0)
for i in range(BASE):
    ctypes.memset(base + i * P, 1 + i % 250, P)
r = libc.mmap(None, AREA * P + (256 << 20), 0, PRIVATE_ANON, -1, 0)
assert libc.mmap(r, AREA * P, 0, PRIVATE_ANON | FIXED, -1, 0) == r
assert libc.munmap(r, AREA * P) == 0  # the work area: a hole in the reservation
print('ready', flush=True)
print(r, flush=True)
for line in sys.stdin:
    cmd, *a = line.split()
    n = [int(x) for x in a]
    if cmd == 'map':
        got = libc.mmap(r + n[0] * P, (n[1] - n[0]) * P, n[2], PRIVATE_ANON | NOREPLACE, -1, 0)
        assert got == r + n[0] * P, got
    elif cmd == 'unmap':
        assert libc.munmap(r + n[0] * P, (n[1] - n[0]) * P) == 0
    elif cmd == 'prot':
        assert libc.mprotect(r + n[0] * P, (n[1] - n[0]) * P, n[2]) == 0
    elif cmd == 'fill':
        ctypes.memset(r + n[0] * P, n[2], (n[1] - n[0]) * P)
    elif cmd == 'w':
        for x in n:
            p = ctypes.c_ubyte.from_address(r + x * P + 7)
            p.value = (p.value + 1) % 256
    elif cmd == 'grow':
        got = libc.mremap(r + n[0] * P, (n[1] - n[0]) * P, (n[2] - n[0]) * P, 0, None)
        assert got == r + n[0] * P, got
    elif cmd == 'move':
        got = libc.mremap(r + n[0] * P, (n[1] - n[0]) * P, (n[1] - n[0]) * P, 3,
                          r + n[2] * P)
        assert got == r + n[2] * P, got
    elif cmd == 'brk':
        old = libc.sbrk(n[0] * P)
        assert old != ctypes.c_void_p(-1).value
        ctypes.memset(old, 0x5b, n[0] * P)
        print(old, flush=True)
        continue
    elif cmd == 'base':
        print(base, flush=True)
        continue
    print('ok', flush=True)
"""


class Area:
    """The work area of a TARGET process."""

    def __init__(self) -> None:
        self.t = Target.python(TARGET)
        self.r = int(self.t.readline())

    def do(self, *cmds: str) -> None:
        for cmd in cmds:
            assert self.t.send(cmd) == "ok", cmd

    def span(self, a: int, b: int) -> Span:
        return (self.r + a * PAGE, self.r + b * PAGE)

    def lines(self) -> list[tuple[Span, str]]:
        """The mappings inside the work area: (span, perms)."""
        lo, hi = self.span(0, AREA)
        return [((m.start, m.end), m.perms) for m in procfs.read_maps(self.t.pid)
                if m.start < hi and m.end > lo]


@pytest.fixture
def area() -> Iterator[Area]:
    a = Area()
    yield a
    a.t.kill()


def test_pages_a_fuzzy_round_failed_to_read_are_read_again(
        area: Area, engine: Engine, store: Store, tmp_path: Path) -> None:
    """In a fuzzy round the process runs on while ckptd reads. Memory unmapped then cannot
    be read and is left out of the snapshot, and with it the rest of the read run: here
    the pages of a mapping B that stays, right after an unmapped A. B was registered and
    write-protected in that round, so no get-and-clear reports its pages later; the next
    delta must read them again rather than take their absence from the parent."""
    rec = GroundTruthRecorder()
    full = engine.snapshot(area.t.pid, tracker="uffd-wp")
    assert full.kind == "full"
    area.do("map 0 16 3", "fill 0 16 65", "map 16 48 3", "fill 16 48 66")
    b = area.span(16, 48)

    def unmap_a(pid: int, vmas: list[procfs.Mapping]) -> None:
        area.do("unmap 0 16")  # after the harvest, before the read

    fuzzy = engine.snapshot(area.t.pid, tracker="uffd-wp", fuzzy=True, on_frozen=unmap_a)
    assert fuzzy.consistency == "fuzzy"
    assert not intersect(normalize(fuzzy.present), [b]), "B's pages were read after all"
    final = engine.snapshot(area.t.pid, tracker="uffd-wp", on_frozen=rec)
    assert final.kind == "delta" and final.consistency == "frozen"
    assert intersect(normalize(final.present), [b]) == [b]
    assert_materializes_to(store, final.id, rec.last, tmp_path / "m")
