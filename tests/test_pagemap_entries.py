"""/proc/PID/pagemap entries on the real kernel: PrivatePresentCheck, the uffd-wp
tracker's quick test that a private file mapping's copied pages are all still copies."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import Target

from ckptd.kernel import abi, pagemap

PAGE = abi.PAGE_SIZE

# A private file mapping of 16 pages (copies made of the even ones) and a private
# mapping of /dev/zero of 4 pages (anonymous memory behind a device inode, the one
# private "file" mapping whose read faults map the shared zero page). Commands:
# "drop I" (MADV_DONTNEED), "read I" (load one byte), "write I", each on the file
# mapping; "zread I" / "zwrite I" / "zdrop I" on the /dev/zero one; "fork" starts a
# child that shares every page until it exits ("reap" waits for it).
CODE = """
import mmap, os, sys, time
f = open(sys.argv[1], 'r+b')
m = mmap.mmap(f.fileno(), 16 * 4096, flags=mmap.MAP_PRIVATE,
              prot=mmap.PROT_READ | mmap.PROT_WRITE)
for p in range(0, 16, 2):
    m[p * 4096] = 0x55
z = open('/dev/zero', 'r+b')
zm = mmap.mmap(z.fileno(), 4 * 4096, flags=mmap.MAP_PRIVATE,
               prot=mmap.PROT_READ | mmap.PROT_WRITE)
import ctypes
print('ready', flush=True)
print(ctypes.addressof(ctypes.c_char.from_buffer(m)),
      ctypes.addressof(ctypes.c_char.from_buffer(zm)), flush=True)
child = 0
for line in sys.stdin:
    cmd, i = (line.split() + ['0'])[:2]
    i = int(i) * 4096
    if cmd == 'drop':
        m.madvise(mmap.MADV_DONTNEED, i, 4096)
    elif cmd == 'read':
        m[i]
    elif cmd == 'write':
        m[i] = 0x66
    elif cmd == 'zread':
        zm[i]
    elif cmd == 'zwrite':
        zm[i] = 0x77
    elif cmd == 'zdrop':
        zm.madvise(mmap.MADV_DONTNEED, i, 4096)
    elif cmd == 'fork':
        child = os.fork()
        if child == 0:
            time.sleep(30)
            os._exit(0)
    elif cmd == 'reap':
        os.kill(child, 9)
        os.waitpid(child, 0)
    print('ok', flush=True)
"""


@pytest.fixture()
def target(tmp_path: Path) -> Target:
    backing = tmp_path / "backing.bin"
    backing.write_bytes(b"f" * 16 * PAGE)
    return Target([sys.executable, "-c", CODE, str(backing)])


def _addresses(t: Target) -> tuple[int, int]:
    file_base, zero_base = (int(x) for x in t.readline().split())
    return file_base, zero_base


def test_copies_hold_until_one_reverts_to_the_file(target: Target) -> None:
    with target as t:
        base, _ = _addresses(t)
        copies = [(base + p * PAGE, base + (p + 1) * PAGE) for p in range(0, 16, 2)]
        whole = [(base, base + 16 * PAGE)]
        with pagemap.Pagemap(t.pid) as pm:
            fd = pm.fd
            check = pagemap.PrivatePresentCheck(copies, whole)
            assert check.holds(fd)  # the odd pages in between (file pages) are not checked
            assert not pagemap.PrivatePresentCheck(whole, whole).holds(fd)
            # Dropped: the page is empty (the file shows through again).
            assert t.send("drop 4") == "ok"
            assert not check.holds(fd)
            # Read again: the file's page is mapped, present but not a copy.
            assert t.send("read 4") == "ok"
            assert not check.holds(fd)
            # Written again: a copy once more.
            assert t.send("write 4") == "ok"
            assert check.holds(fd)


def test_the_zero_page_and_shared_pages_do_not_count_as_copies(target: Target) -> None:
    with target as t:
        base, zbase = _addresses(t)
        with pagemap.Pagemap(t.pid) as pm:
            fd = pm.fd
            zpage = [(zbase, zbase + PAGE)]
            assert t.send("zwrite 0") == "ok"
            assert pagemap.PrivatePresentCheck(zpage, zpage).holds(fd)
            # Dropped and read: the shared zero page, which PAGEMAP_SCAN does not count
            # as content either.
            assert t.send("zdrop 0") == "ok"
            assert t.send("zread 0") == "ok"
            assert not pagemap.PrivatePresentCheck(zpage, zpage).holds(fd)
            # After a fork the copies are shared with the child: not this process's own.
            copies = [(base + p * PAGE, base + (p + 1) * PAGE) for p in range(0, 16, 2)]
            check = pagemap.PrivatePresentCheck(copies, [(base, base + 16 * PAGE)])
            assert check.holds(fd)
            assert t.send("fork") == "ok"
            assert not check.holds(fd)
            assert t.send("reap") == "ok"
            assert check.holds(fd)


def test_a_short_read_does_not_hold() -> None:
    """Once the process is gone, its pagemap reads nothing: ask in detail instead."""
    t = Target.python("print('ready', flush=True); input()")
    with pagemap.Pagemap(t.pid) as pm:
        fd = pm.fd
        t.kill()
        assert not pagemap.PrivatePresentCheck([(0x10000, 0x11000)],
                                               [(0x10000, 0x11000)]).holds(fd)


def test_spans_outside_the_ranges_are_refused() -> None:
    with pytest.raises(ValueError):
        pagemap.PrivatePresentCheck([(0x20000, 0x21000)], [(0x10000, 0x11000)])
