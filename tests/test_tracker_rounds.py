"""The uffd-wp tracker's steady-state shortcuts, on the real kernel: one get-and-clear
ioctl across unmapped holes (never across a mapping), and rounds that reuse what they
derived from the parent and the plan, restoring byte for byte."""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path

import pytest
from helpers import (
    LIBC_MM,
    GroundTruthRecorder,
    Target,
    assert_materializes_to,
    needs_root,
)

from ckptd.engine import Engine
from ckptd.intervals import Span, normalize
from ckptd.kernel import abi, pagemap, procfs, ptrace, syscalls, uffd
from ckptd.store import Store
from ckptd.track import uffd_wp

pytestmark = needs_root

PAGE = abi.PAGE_SIZE
CHUNK = 16  # pages
U_SIZE = 70 << 20  # read-only and above MAX_READONLY_REGISTER: never registered

# [A][hole][B][U][C]: A, B and C read-write; the hole unmapped; U a read-only mapping
# that the tracker never registers. "w ADDR..." writes one byte at each address;
# "map" maps a new read-write chunk into the hole, "unmap" removes it again.
LAYOUT_CODE = LIBC_MM + f"""
P, C, U = {PAGE}, {CHUNK}, {U_SIZE}
PRIVATE_ANON, FIXED_NOREPLACE = 0x22, 0x100000
r = libc.mmap(None, 4 * C * P + U, 1, PRIVATE_ANON, -1, 0)
assert libc.mprotect(r, C * P, 3) == 0                          # A
assert libc.munmap(r + C * P, C * P) == 0                       # the hole
assert libc.mprotect(r + 2 * C * P, C * P, 3) == 0              # B
assert libc.mprotect(r + 3 * C * P + U, C * P, 3) == 0          # C (U stays read-only)
for a in (r, r + 2 * C * P, r + 3 * C * P + U):
    ctypes.memset(a, 0x5a, C * P)
print('ready', flush=True)
print(r, flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == 'w':
        for a in args:
            p = ctypes.c_ubyte.from_address(int(a))
            p.value = (p.value + 1) % 256
    elif cmd == 'map':
        got = libc.mmap(r + C * P, C * P, 3, PRIVATE_ANON | FIXED_NOREPLACE, -1, 0)
        assert got == r + C * P, got
        ctypes.memset(got, 0x77, C * P // 2)
    elif cmd == 'unmap':
        assert libc.munmap(r + C * P, C * P) == 0
    print('ok', flush=True)
"""


class Layout:
    def __init__(self) -> None:
        self.t = Target.python(LAYOUT_CODE)
        r = int(self.t.readline())
        c = CHUNK * PAGE
        self.a: Span = (r, r + c)
        self.hole: Span = (r + c, r + 2 * c)
        self.b: Span = (r + 2 * c, r + 3 * c)
        self.u: Span = (r + 3 * c, r + 3 * c + U_SIZE)
        self.c: Span = (r + 3 * c + U_SIZE, r + 4 * c + U_SIZE)

    def write(self, addrs: list[int]) -> None:
        assert self.t.send("w " + " ".join(map(str, addrs))) == "ok"


@pytest.fixture
def layout() -> Layout:
    lay = Layout()
    yield lay  # type: ignore[misc]
    lay.t.kill()


def _uffd_of(pid: int) -> int:
    """A userfaultfd of the target's address space, set up as the tracker does."""
    with ptrace.Freezer(pid) as fz:
        target_fd = fz.inject_syscall(abi.SYS_userfaultfd,
                                      abi.O_CLOEXEC | abi.O_NONBLOCK | abi.UFFD_USER_MODE_ONLY)
    assert target_fd >= 0
    pidfd = syscalls.pidfd_open(pid)
    try:
        fd = syscalls.pidfd_getfd(pidfd, target_fd)
    finally:
        os.close(pidfd)
    uffd.api_handshake(fd)
    return fd


def _pages(regions: list[tuple[int, int, int]]) -> list[int]:
    return [p for s, e, _ in regions for p in range(s, e, PAGE)]


def test_one_get_and_clear_across_a_hole_reports_the_same_pages(layout: Layout) -> None:
    fd = _uffd_of(layout.t.pid)
    try:
        for s, e in (layout.a, layout.b, layout.c):
            uffd.register_wp(fd, s, e)
            uffd.write_protect(fd, s, e)
        maps = procfs.read_maps(layout.t.pid)
        spans = normalize([layout.a, layout.b, layout.c])
        joined = uffd_wp._join_across_holes(spans, maps)
        # Only the hole joins; the unregistered U keeps B and C apart.
        assert joined == [(layout.a[0], layout.b[1]), layout.c]

        checked = uffd_wp._GET_AND_CLEAR_CHECKED
        wrote = sorted({layout.a[0], layout.a[0] + 5 * PAGE, layout.a[1] - PAGE,
                        layout.b[0], layout.b[0] + 9 * PAGE, layout.c[0] + 3 * PAGE})
        with pagemap.Pagemap(layout.t.pid) as pm:
            pm.scan(spans, checked)  # start clean
            layout.write(wrote)
            one = pm.scan(joined, checked)
            assert one.calls == 2
            assert _pages(one.regions) == wrote
            assert pm.scan(joined, checked).regions == []  # cleared: nothing twice
            # The same writes, one ioctl per span: the same answer.
            layout.write(wrote)
            per_span = pm.scan(spans, checked)
            assert per_span.calls == 3
            assert per_span.regions == one.regions
            # Why a mapping in between must keep spans apart: U is not registered.
            with pytest.raises(OSError) as e:
                pm.scan([(layout.b[0], layout.c[1])], checked)
            assert e.value.errno == errno.EPERM
    finally:
        os.close(fd)


def test_rounds_across_holes_and_unregistered_mappings_restore_exactly(
        layout: Layout, engine: Engine, store: Store, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deltas of a process whose registered mappings lie across a hole and around a
    mapping the tracker never registers, while a mapping comes and goes in the hole.
    Every round restores byte for byte, none trips CHECK_WPASYNC, and the steady-state
    get-and-clear scans A and B in one ioctl but never U."""
    g_and_c: list[Span] = []
    real_call = pagemap.Pagemap.call

    def call(self: pagemap.Pagemap, start: int, end: int, query: pagemap.Query,
             vec_len: int, max_pages: int) -> tuple[list[pagemap.Region], int]:
        if query.flags & abi.PM_SCAN_WP_MATCHING:
            g_and_c.append((start, end))
        return real_call(self, start, end, query, vec_len, max_pages)

    monkeypatch.setattr(pagemap.Pagemap, "call", call)  # counts; the kernel still answers
    caplog.set_level(logging.INFO, logger="ckptd")
    lay, rec = layout, GroundTruthRecorder()
    steps: list[tuple[str, list[int]] | None] = [
        None,
        ("w", [lay.a[0], lay.b[0] + PAGE, lay.c[1] - PAGE]),
        None,
        ("map", []),
        ("w", [lay.hole[0] + 2 * PAGE, lay.hole[1] - PAGE, lay.a[0] + 7 * PAGE]),
        None,
        ("unmap", []),
        ("w", [lay.b[0] + 3 * PAGE]),
        None,
    ]
    for i, step in enumerate(steps):
        if step is not None:
            cmd, addrs = step
            assert lay.t.send(" ".join([cmd, *map(str, addrs)])) == "ok"
        g_and_c.clear()
        meta = engine.snapshot(lay.t.pid, tracker="uffd-wp", on_frozen=rec)
        assert meta.kind == ("full" if i == 0 else "delta")
        assert_materializes_to(store, meta.id, rec.last, tmp_path / f"m{i}")
        if i and (step is None or step[0] == "w") and (i < 3 or i > 6):
            # A steady round with the hole empty: A and B in one range, U in none.
            assert any(s <= lay.a[0] and lay.b[1] <= e for s, e in g_and_c), g_and_c
            assert not any(s < lay.u[1] and lay.u[0] < e for s, e in g_and_c), g_and_c
    assert lay.t.alive()
    assert not any("no longer registered" in r.getMessage() for r in caplog.records)


# A region of 8 pages at a fixed address, each page filled with one byte value. It
# answers "same" (write every page back with the content it holds), "unmap", and "remap"
# (map the region again at the same address, with the same content as at the start).
SAME_CONTENT = """
import ctypes, sys
P, N = 4096, 8
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
base = libc.mmap(None, N * P, 3, 0x22, -1, 0)
def fill():
    for p in range(N):
        ctypes.memset(base + p * P, p + 1, P)
fill()
print("ready", flush=True)
print(base, flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "same":
        for p in range(N):
            page = ctypes.string_at(base + p * P, P)
            ctypes.memmove(base + p * P, page, P)
    elif cmd == "unmap":
        assert libc.munmap(base, N * P) == 0
    elif cmd == "remap":
        assert libc.mmap(base, N * P, 3, 0x22 | 0x10, -1, 0) == base
        fill()
    print("ok", flush=True)
"""


def test_pages_written_back_unchanged_are_not_stored_again(store: Store,
                                                           tmp_path: Path) -> None:
    """uffd-wp reports every page written, but a page written back with the content the
    parent holds is not stored again: the parent's copy stands for it. Only while the
    page stayed present: unmapped, then mapped again with the same content, it is stored
    again, since no snapshot in between holds it. Every snapshot restores byte for
    byte."""
    rec = GroundTruthRecorder()
    truths: dict[str, object] = {}
    with Target([sys.executable, "-c", SAME_CONTENT]) as t, Engine(store) as eng:
        base = int(t.readline())
        region = {base + p * abi.PAGE_SIZE for p in range(8)}

        def snap(cmd: str | None = None) -> set[int]:
            """Snapshot after `cmd`; the region's pages the snapshot stored."""
            if cmd is not None:
                assert t.send(cmd) == "ok"
            meta = eng.snapshot(t.pid, tracker="uffd-wp", on_frozen=rec)
            truths[meta.id] = rec.last
            stored = {e.addr + k * abi.PAGE_SIZE for e in meta.extents
                      for k in range(e.pages)}
            assert meta.counts.pages_dirty >= (8 if cmd in ("same", "remap") else 0)
            return stored & region

        assert snap() == region  # full
        assert snap("same") == region  # no copies yet after a full round
        assert snap("same") == set()  # written, unchanged: the parent's copies stand
        assert snap("same") == set()
        assert snap("unmap") == set()
        assert snap("remap") == region  # same content, but gone in between: stored
        assert snap("same") == set()
    for sid, truth in truths.items():
        assert_materializes_to(store, sid, truth, tmp_path / sid)
