"""A target process for tests: threads that keep changing memory in every way ckptd must
follow (random writes, mmap, munmap, mremap, mprotect, MADV_DONTNEED, zero-fill).

Usage: python churn.py [--threads N] [--base-mib M] [--seed S]
Prints "ready" once the base region is populated, then churns until killed or until it
reads "stop" on stdin. On "pause"/"resume" it holds/releases its threads (for tests that
need a quiet moment); it answers each command with "ok".
"""

from __future__ import annotations

import argparse
import ctypes
import random
import sys
import threading
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]

PAGE = 4096
PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20
MREMAP_MAYMOVE = 1
MADV_DONTNEED = 4
MAP_FAILED = ctypes.c_void_p(-1).value


class Region:
    def __init__(self, addr: int, pages: int) -> None:
        self.addr = addr
        self.pages = pages
        self.prot = PROT_READ | PROT_WRITE


def mmap_pages(pages: int) -> int:
    addr = libc.mmap(None, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0)
    if addr in (None, MAP_FAILED):
        raise OSError(ctypes.get_errno(), "mmap")
    return int(addr)


class Churn:
    def __init__(self, base_mib: int, seed: int) -> None:
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()
        self.rng = random.Random(seed)
        base_pages = base_mib * 256
        self.base = Region(mmap_pages(base_pages), base_pages)
        pattern = (bytes(range(256)) * 16)[:PAGE]
        for i in range(base_pages):
            if i % 5 == 4:
                continue  # leave some pages unpopulated
            data = pattern if i % 3 else self.rng.randbytes(PAGE)
            ctypes.memmove(self.base.addr + i * PAGE, data, PAGE)
        self.regions: list[Region] = [self.base]

    def step(self, rng: random.Random) -> None:
        with self.lock:
            op = rng.random()
            writable = [r for r in self.regions if r.prot & PROT_WRITE]
            if op < 0.70 and writable:
                r = rng.choice(writable)
                page = rng.randrange(r.pages)
                n = rng.randrange(1, 64)
                off = rng.randrange(PAGE - n)
                ctypes.memmove(r.addr + page * PAGE + off, rng.randbytes(n), n)
            elif op < 0.74 and writable:
                r = rng.choice(writable)
                page = rng.randrange(r.pages)
                ctypes.memset(r.addr + page * PAGE, 0, PAGE)  # a zero page with content
            elif op < 0.80 and len(self.regions) < 40:
                pages = rng.randrange(1, 64)
                r = Region(mmap_pages(pages), pages)
                for i in range(0, pages, 2):
                    ctypes.memmove(r.addr + i * PAGE, rng.randbytes(32), 32)
                self.regions.append(r)
            elif op < 0.84 and len(self.regions) > 3:
                r = rng.choice(self.regions[1:])
                libc.munmap(r.addr, r.pages * PAGE)
                self.regions.remove(r)
            elif op < 0.88 and len(self.regions) > 1:
                r = rng.choice(self.regions[1:])
                new_pages = max(1, r.pages + rng.randrange(-8, 24))
                addr = libc.mremap(r.addr, r.pages * PAGE, new_pages * PAGE, MREMAP_MAYMOVE)
                if addr not in (None, MAP_FAILED):
                    r.addr, r.pages = int(addr), new_pages
                    if r.prot & PROT_WRITE:
                        ctypes.memmove(r.addr + (new_pages - 1) * PAGE, b"grown", 5)
            elif op < 0.94 and len(self.regions) > 1:
                r = rng.choice(self.regions[1:])
                r.prot = rng.choice([PROT_READ, PROT_NONE, PROT_READ | PROT_WRITE,
                                     PROT_READ | PROT_WRITE])
                libc.mprotect(r.addr, r.pages * PAGE, r.prot)
            else:
                r = rng.choice(self.regions)
                if r.prot & PROT_WRITE:
                    start = rng.randrange(r.pages)
                    n = min(r.pages - start, rng.randrange(1, 16))
                    libc.madvise(r.addr + start * PAGE, n * PAGE, MADV_DONTNEED)

    def run(self, seed: int) -> None:
        rng = random.Random(seed)
        while True:
            self.gate.wait()
            self.step(rng)
            if rng.random() < 0.01:
                time.sleep(0.001)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=3)
    ap.add_argument("--base-mib", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    churn = Churn(args.base_mib, args.seed)
    for i in range(args.threads):
        threading.Thread(target=churn.run, args=(args.seed * 100 + i,), daemon=True).start()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "stop":
            break
        if cmd == "pause":
            churn.gate.clear()
            churn.lock.acquire()
            churn.lock.release()
        elif cmd == "resume":
            churn.gate.set()
        print("ok", flush=True)


if __name__ == "__main__":
    main()
