"""A target whose memory at any instant can be recomputed from one number.

Usage: python counter.py PAGES [WRITES_PER_SECOND]

It maps PAGES + 1 anonymous private pages. Page 0 is the header: its first 8 bytes hold
k, the number of steps completed. Step j (from 1) fills data page j % PAGES (page
1 + j % PAGES of the mapping) with the 64-bit little-endian value j, 512 times, and only
then stores j in the header. So when the header says k, data page p holds the latest
j <= k with j % PAGES == p (all zeros if there is none), except that the page of step
k + 1 may be part way through its fill: each of its words is the old value or k + 1.
`expected_page` computes this; a snapshot taken at any instant, frozen or not, must
restore exactly that.

Before each fill the target checks that the page still holds what it wrote there
last; if not (something changed its memory), it prints "corrupt ..." and exits 3.
It prints "ready ADDR PAGES" once mapped, and runs until killed.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import sys
import time

PAGE = 4096
WORDS = PAGE // 8
_Q = struct.Struct("<Q")


def fill(j: int) -> bytes:
    return _Q.pack(j) * WORDS


def expected_page(p: int, k: int, pages: int) -> int:
    """The step whose value data page `p` holds once the header says `k` (0: none)."""
    j = k - ((k - p) % pages)
    return j if j > 0 else 0


def main() -> None:
    pages = int(sys.argv[1])
    rate = float(sys.argv[2]) if len(sys.argv) > 2 else 1000.0
    region = mmap.mmap(-1, (pages + 1) * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
    print(f"ready {addr} {pages}", flush=True)
    burst = 8
    pause = burst / rate
    j = 0
    while True:
        for _ in range(burst):
            j += 1
            p = j % pages
            off = (1 + p) * PAGE
            before = j - pages
            want = fill(before) if before > 0 else bytes(PAGE)
            if region[off : off + PAGE] != want:
                print(f"corrupt page {p} at step {j}", flush=True)
                sys.exit(3)
            region[off : off + PAGE] = fill(j)
            region[0:8] = _Q.pack(j)
        time.sleep(pause)


if __name__ == "__main__":
    main()
