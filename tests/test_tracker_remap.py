"""The uffd-wp tracker when a process remaps memory between rounds, on the real kernel.

Registration belongs to a kernel mapping (VMA). Memory registered in one round can be
split or merged by mprotect, grown in place, unmapped and replaced by new memory at an
overlapping address, moved by mremap, or joined by a brk extension. When the mappings
changed, the tracker asks the kernel in one probe which of those that overlap memory it
registered before are still registered. The first tests check that probe and the kernel
facts it relies on; the next runs Engine rounds through all of these changes and restores
every one byte for byte without falling back to reading every page; the last covers
pages a fuzzy round could not read because memory was unmapped under it."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    LIBC_MM,
    GroundTruthRecorder,
    Target,
    assert_materializes_to,
    needs_root,
)
from test_tracker_rounds import _uffd_of

from ckptd.engine import Engine
from ckptd.intervals import Span, intersect, normalize
from ckptd.kernel import abi, pagemap, procfs, uffd
from ckptd.store import Store
from ckptd.track import uffd_wp

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
TARGET = LIBC_MM + f"""
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


def _registered_per_smaps(pid: int, lo: int, hi: int) -> list[Span]:
    """The mappings in [lo, hi) whose VmFlags carry `uw` (registered for write-protect):
    the kernel's own answer, independent of PAGEMAP_SCAN."""
    out: list[Span] = []
    cur: Span | None = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                s, e = (int(x, 16) for x in head.split("-"))
                cur = (s, e)
            elif (head == "VmFlags:" and cur is not None and cur[0] < hi and cur[1] > lo
                  and "uw" in line.split()[1:]):
                out.append(cur)
    return normalize(out)


def test_the_probe_finds_exactly_the_unregistered_mappings(area: Area) -> None:
    """NOT_WP_ALLOWED over a range reports the mappings that are not registered, whole,
    and nothing of the registered ones, after each kind of change; smaps agrees. Also the
    facts the tracker's plan relies on: mprotect keeps the registration of both parts, an
    in-place mremap growth keeps it (and its new tail reports WRITTEN), new memory mapped
    over unmapped registered memory is not registered, and mremap does not move it."""
    pid = area.t.pid
    lo, hi = area.span(0, AREA)
    fd = _uffd_of(pid)

    def register(a: int, b: int) -> None:
        uffd.register_wp(fd, *area.span(a, b))
        uffd.write_protect(fd, *area.span(a, b))

    def check(expect_unregistered: list[Span] | None) -> list[Span]:
        registered = _registered_per_smaps(pid, lo, hi)
        with pagemap.Pagemap(pid) as pm:
            unreg = normalize((s, e) for s, e, _ in pm.scan([(lo, hi)],
                                                            pagemap.NOT_WP_ALLOWED).regions)
        mapped = normalize(span for span, _ in area.lines())
        if expect_unregistered is not None:
            assert unreg == normalize(expect_unregistered), (area.lines(), registered)
        # smaps agrees: every mapping is either registered or reported, not both.
        assert normalize([*registered, *unreg]) == mapped
        assert not intersect(registered, unreg)
        return unreg

    try:
        area.do("map 0 1024 3", "fill 0 512 17")
        register(0, 1024)
        check([])
        # mprotect splits: three mappings, all registered, pages keep their state.
        area.do("prot 256 512 1")
        assert len(area.lines()) == 3
        check([])
        area.do("w 100 700")
        with pagemap.Pagemap(pid) as pm:
            got = pm.scan([area.span(0, 1024)], uffd_wp._GET_AND_CLEAR_CHECKED)
        assert [(s, e) for s, e, _ in got.regions] == [area.span(100, 101),
                                                        area.span(700, 701)]
        # The tail unmapped, new memory mapped over part of it and beyond: not registered;
        # the registered part in front of it still is.
        area.do("unmap 768 1024", "map 896 1280 3", "fill 896 900 34")
        check([area.span(896, 1280)])
        # Grown in place: still registered; the tail reports WRITTEN (none entries).
        area.do("grow 512 768 832")
        check([area.span(896, 1280)])
        with pagemap.Pagemap(pid) as pm:
            got = pm.scan([area.span(0, 832)], uffd_wp._GET_AND_CLEAR_CHECKED)
        assert [(s, e) for s, e, _ in got.regions] == [area.span(768, 832)]
        # Moved: registration does not follow (no UFFD_FEATURE_EVENT_REMAP).
        area.do("move 512 832 2048")
        check([area.span(896, 1280), area.span(2048, 2368)])
        with pagemap.Pagemap(pid) as pm, pytest.raises(OSError):
            pm.scan([area.span(2048, 2368)], uffd_wp._GET_AND_CLEAR_CHECKED)
        # A registered mapping never written to, moved right next to a registered one
        # with the same flags: on 6.18 the kernel merges them and then drops the
        # registration of the merged whole, the neighbour included, whose pages keep
        # their write-protect bits. The neighbour's bounds change, so the tracker asks
        # about it; the probe must then agree with smaps.
        area.do("map 3000 3064 3", "map 3200 3264 3", "fill 3200 3264 9")
        register(3000, 3064)
        register(3200, 3264)
        area.do("move 3000 3064 3136")
        unreg = check(None)
        assert area.span(3200, 3264) not in [span for span, _ in area.lines()] or \
            not intersect(unreg, [area.span(3200, 3264)])
    finally:
        os.close(fd)


def test_brk_growth_is_a_new_unregistered_mapping(area: Area) -> None:
    """sbrk past a registered heap: the kernel does not merge the extension into the
    registered mapping (their flags differ), so the new part is a mapping of its own,
    which overlaps nothing registered: new memory to the tracker."""
    pid = area.t.pid
    heap = next(m for m in procfs.read_maps(pid) if m.path == "[heap]")
    fd = _uffd_of(pid)
    try:
        uffd.register_wp(fd, heap.start, heap.end)
        uffd.write_protect(fd, heap.start, heap.end)
        int(area.t.send("brk 64"))
        heaps = [(m.start, m.end) for m in procfs.read_maps(pid) if m.path == "[heap]"]
        assert heaps[0] == (heap.start, heap.end) and heaps[1][0] == heap.end, heaps
        assert _registered_per_smaps(pid, heap.start, heaps[-1][1]) == [heaps[0]]
    finally:
        os.close(fd)


def test_a_mapping_that_grows_down_stays_registered() -> None:
    """A stack (MAP_GROWSDOWN) that grows is the same mapping with a lower start: still
    registered, and the new page reports WRITTEN, so the tracker keeps it tracked."""
    code = LIBC_MM + """
room = libc.mmap(None, 1 << 24, 0, 0x22, -1, 0)
assert libc.munmap(room, 1 << 24) == 0
GROWSDOWN, FIXED = 0x100, 0x10
a = libc.mmap(room + (1 << 23), 16 * 4096, 3, 0x22 | GROWSDOWN | FIXED, -1, 0)
ctypes.memset(a, 1, 16 * 4096)
print('ready', flush=True)
print(a, flush=True)
sys.stdin.readline()
ctypes.memset(a - 4096, 2, 4096)  # below the mapping: it grows down by a page
print('ok', flush=True)
sys.stdin.readline()
"""
    with Target.python(code) as t:
        a = int(t.readline())
        fd = _uffd_of(t.pid)
        try:
            uffd.register_wp(fd, a, a + 16 * PAGE)
            uffd.write_protect(fd, a, a + 16 * PAGE)
            assert t.send("grow") == "ok"
            assert (a - PAGE, a + 16 * PAGE) in [(m.start, m.end)
                                                 for m in procfs.read_maps(t.pid)]
            assert _registered_per_smaps(t.pid, a - PAGE, a) == [(a - PAGE, a + 16 * PAGE)]
            with pagemap.Pagemap(t.pid) as pm:
                lo = a - 64 * PAGE
                assert pm.scan([(lo, a + 16 * PAGE)], pagemap.NOT_WP_ALLOWED).regions == []
                got = pm.scan([(a - PAGE, a + 16 * PAGE)], uffd_wp._GET_AND_CLEAR_CHECKED)
                assert [(s, e) for s, e, _ in got.regions] == [(a - PAGE, a)]
        finally:
            os.close(fd)


def _read_all_notes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "every page was read" in r.getMessage()]


def test_remapping_rounds_are_deltas_not_full_reads(
        area: Area, engine: Engine, store: Store, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Rounds of a process that unmaps and maps memory at overlapping addresses with other
    bounds, splits and merges it with mprotect, grows it in place, moves it, and extends
    its heap with brk. Every round restores byte for byte (new memory at an old address
    shows its own content, not the old one), no round falls back to reading every page
    (the static BASE pages are never read again), and memory that stays registered
    through a change is tracked, not captured whole."""
    caplog.set_level(logging.INFO, logger="ckptd")
    rec = GroundTruthRecorder()
    area.do("map 0 2048 3", "fill 0 2048 17", "map 2048 4096 0")
    # (commands, most pages the round may read: None when only "not everything")
    steps: list[tuple[list[str], int | None]] = [
        ([], None),
        # Replaced by new memory with other bounds, partly written: captured whole (1536
        # pages of 0x22, the rest zeros: the old 0x11 content must not show through).
        (["unmap 0 2048", "map 0 256 0", "map 256 1792 3", "map 1792 2048 0",
          "fill 256 1792 34", "w 1700"], None),
        ([], 400),  # quiet: the new memory is tracked now
        (["prot 800 900 1", "w 300 1000 1700"], 400),  # split by mprotect: still tracked
        (["prot 800 900 3", "w 850"], 400),  # merged again
        # Grown in place over the guard: tracked; the 256-page tail reads as zeros.
        (["unmap 1792 2048", "grow 256 1792 2048", "w 2000"], 700),
        # Moved: not registered at its new place, captured whole.
        (["unmap 2048 4096", "move 256 2048 2304", "map 256 2304 0"], None),
        ([], 400),
        # Replaced by an identical mapping (the case the checked get-and-clear is for),
        # while other mappings changed too: the probe finds it, no round reads everything.
        (["unmap 2304 4096", "map 2304 4096 3", "fill 2400 2410 51", "unmap 0 256",
          "map 0 128 3", "w 5"], None),
        (["map 192 256 3"], 400),  # a small new mapping, never written to
        # ... moved next to the registered mapping at 2304, which loses its registration
        # with it on 6.18 (see above): captured whole with its new neighbour.
        (["move 192 256 2240", "fill 2500 2501 68"], None),
        ([], 400),
    ]
    for i, (cmds, most) in enumerate(steps):
        area.do(*cmds)
        caplog.clear()
        meta = engine.snapshot(area.t.pid, tracker="uffd-wp", on_frozen=rec)
        assert meta.kind == ("full" if i == 0 else "delta")
        assert_materializes_to(store, meta.id, rec.last, tmp_path / f"m{i}")
        if i == 0:
            continue
        assert not _read_all_notes(caplog), (i, cmds)
        c = meta.counts
        assert c.pages_read + BASE <= c.pages_present, (i, cmds, c)
        if most is not None:
            assert c.pages_read <= most, (i, cmds, c)
    # And a brk extension: new memory, then tracked once registered.
    caplog.clear()
    int(area.t.send("brk 300"))
    meta = engine.snapshot(area.t.pid, tracker="uffd-wp", on_frozen=rec)
    assert_materializes_to(store, meta.id, rec.last, tmp_path / "brk")
    assert not _read_all_notes(caplog)
    assert 300 <= meta.counts.pages_read <= meta.counts.pages_present - BASE, meta.counts
    quiet = engine.snapshot(area.t.pid, tracker="uffd-wp", on_frozen=rec)
    assert_materializes_to(store, quiet.id, rec.last, tmp_path / "brk-quiet")
    assert not _read_all_notes(caplog)
    assert quiet.counts.pages_read <= 400, quiet.counts
    assert area.t.alive()


def test_pages_a_fuzzy_round_failed_to_read_are_read_again(
        area: Area, engine: Engine, store: Store, tmp_path: Path) -> None:
    """In a fuzzy round the process runs on while ckptd reads. Memory unmapped then cannot
    be read and is left out of the snapshot, but only that memory: the pages of a mapping
    B that stays, right after an unmapped A in the same read run, are kept (the reader
    resumes where the run is mapped again). B was registered and write-protected in that
    round, so no get-and-clear reports its pages later; had they been dropped, the next
    delta would have to read them again (the tracker's second line of defence,
    `_lost_in_parent`). Either way the next frozen delta restores byte for byte."""
    rec = GroundTruthRecorder()
    full = engine.snapshot(area.t.pid, tracker="uffd-wp")
    assert full.kind == "full"
    area.do("map 0 16 3", "fill 0 16 65", "map 16 48 3", "fill 16 48 66")
    b = area.span(16, 48)

    def unmap_a(pid: int, vmas: list[procfs.Mapping]) -> None:
        area.do("unmap 0 16")  # after the harvest, before the read

    fuzzy = engine.snapshot(area.t.pid, tracker="uffd-wp", fuzzy=True, on_frozen=unmap_a)
    assert fuzzy.consistency == "fuzzy"
    assert intersect(normalize(fuzzy.present), [b]) == [b], "B's pages were dropped"
    assert not intersect(normalize(fuzzy.present), [area.span(0, 16)]), "A is gone"
    final = engine.snapshot(area.t.pid, tracker="uffd-wp", on_frozen=rec)
    assert final.kind == "delta" and final.consistency == "frozen"
    assert intersect(normalize(final.present), [b]) == [b]
    assert_materializes_to(store, final.id, rec.last, tmp_path / "m")
