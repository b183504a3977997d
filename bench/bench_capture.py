#!/usr/bin/env python3
"""Capture benchmark for issue 2 (section 11 and "Targets").

Spawns a real target (a small C program compiled here with gcc) that holds one
MAP_PRIVATE|MAP_ANONYMOUS region (1 GiB by default) filled with a mix of zero, text-like,
record-like and random pages, and measures with ckptd.engine.Engine:

  * incremental snapshots after 0.1%, 1%, 10% and 100% of the region's pages were written
    (scattered random pages, each really modified), R rounds each after a full snapshot;
  * full snapshots: cold (first snapshot of a fresh Engine) and warm (an Engine with
    retain_buffer_bytes=2 GiB that already holds its capture buffer);
  * a full-copy baseline: SIGSTOP, read every present page with process_vm_readv,
    SIGCONT, zstd level 1 in frames of 64 pages on 2 threads, write and fsync;
  * scattered 4 KiB reads: PageReader with process_vm_readv vs /proc/PID/mem;

then checks the numbers against the issue's targets, prints tables and (unless
--no-write-docs or --quick) rewrites the "## Capture" block of docs/benchmarks.md between
the <!-- capture:begin --> and <!-- capture:end --> markers.

Needs root (ptrace, userfaultfd in another process, /proc/PID/pagemap). Not part of CI.

    sudo .venv/bin/python bench/bench_capture.py            # full run, a few minutes
    sudo .venv/bin/python bench/bench_capture.py --quick    # smoke test, seconds
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import platform
import random
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import zstandard  # noqa: E402

from ckptd.engine import Engine  # noqa: E402
from ckptd.intervals import normalize  # noqa: E402
from ckptd.kernel import memread, pagemap, procfs  # noqa: E402
from ckptd.kernel.syscalls import process_vm_readv  # noqa: E402
from ckptd.store import SnapshotMeta, Store  # noqa: E402
from ckptd.track.base import capturable  # noqa: E402

PAGE = 4096
GIB = 1 << 30
MIB = 1 << 20
FRACTIONS = (0.001, 0.01, 0.1, 1.0)
# The baseline does what ckptd's writer does, without ckptd: same level, frame, threads.
BASELINE_ZSTD_LEVEL = 1
BASELINE_FRAME_PAGES = 64
BASELINE_THREADS = 2
IOV_MAX = 1024
WARM_RETAIN = 2 << 30
DOCS = REPO / "docs" / "benchmarks.md"
BEGIN = "<!-- capture:begin -->"
END = "<!-- capture:end -->"

DATA_MIX = (
    "per page, chosen by a hash of its index: 10% zero (populated, never written), "
    "35% text (log-like lines of words and numbers), 35% records (64-byte structs: ids, "
    "pointer-like values, small counters, doubles, short names), 20% random "
    "(incompressible). A write overwrites one 64-byte record at a random slot of the page "
    "(with a generation counter, so the page always changes)."
)

# --- the target --------------------------------------------------------------------------

TARGET_C = r"""
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>

#define PAGE 4096
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

static uint64_t rs;
static inline uint64_t rnd(void) { /* splitmix64 */
    uint64_t z = (rs += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static inline uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 33)) * 0xff51afd7ed558ccdull;
    z = (z ^ (z >> 33)) * 0xc4ceb9fe1a85ec53ull;
    return z ^ (z >> 33);
}

static const char *words[] = {
    "INFO", "DEBUG", "WARN", "ERROR", "request", "GET", "POST", "/api/v1/items",
    "/api/v1/users", "/healthz", "status=200", "status=404", "status=500", "user=",
    "session=", "latency_ms=", "cache", "hit", "miss", "connection", "closed", "opened",
    "timeout", "retry", "the", "of", "and", "to", "in", "for", "is", "on", "with", "page",
    "memory", "snapshot", "worker", "thread", "queue", "buffer", "flush", "commit",
    "transaction", "id=", "key=", "value=", "shard", "replica", "leader", "follower",
};
#define NWORDS (sizeof(words) / sizeof(words[0]))
static const char *names[] = {
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
};

struct rec { uint64_t id; uint64_t ptr; uint32_t a, b; double v; char name[32]; };

static void fill_text(char *p) {
    size_t n = 0;
    while (n < PAGE) {
        char tmp[64];
        int len;
        uint64_t r = rnd();
        if ((r & 7) == 0)
            len = snprintf(tmp, sizeof tmp, "%u ", (unsigned)(r >> 8) % 100000);
        else if ((r & 15) == 1)
            len = snprintf(tmp, sizeof tmp, "\n2026-11-25T%02u:%02u:%02u ",
                           (unsigned)(r >> 8) % 24, (unsigned)(r >> 16) % 60,
                           (unsigned)(r >> 24) % 60);
        else
            len = snprintf(tmp, sizeof tmp, "%s ", words[(r >> 8) % NWORDS]);
        if (n + len > PAGE) len = PAGE - n;
        memcpy(p + n, tmp, len);
        n += len;
    }
}

static void make_rec(struct rec *r, uint64_t id) {
    uint64_t x = rnd();
    memset(r, 0, sizeof *r);
    r->id = id;
    r->ptr = 0x7f3a00000000ull + ((x & 0xffff) << 4);
    r->a = (x >> 16) % 100;
    r->b = (x >> 24) % 7;
    r->v = (double)((x >> 32) % 100000) / 100.0;
    strcpy(r->name, names[(x >> 40) % 16]);
}

static void fill_records(char *p, uint64_t page) {
    struct rec *r = (struct rec *)p;
    for (unsigned i = 0; i < PAGE / sizeof *r; i++) make_rec(&r[i], page * 64 + i);
}

static void fill_random(char *p) {
    uint64_t *q = (uint64_t *)p;
    for (unsigned i = 0; i < PAGE / 8; i++) q[i] = rnd();
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    size_t size = strtoull(argv[1], NULL, 0);
    rs = strtoull(argv[2], NULL, 0);
    uint64_t seed = rs;
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    size_t npages = size / PAGE;
    char *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) { perror("mmap"); return 1; }
    madvise(m, size, MADV_NOHUGEPAGE); /* 4 KiB pages: what page tracking works with */
    if (madvise(m, size, MADV_POPULATE_WRITE) != 0) memset(m, 0, size);
    uint32_t *idx = malloc(npages * sizeof *idx);
    if (!idx) return 1;
    size_t kinds[4] = {0};
    for (size_t i = 0; i < npages; i++) {
        idx[i] = i;
        unsigned k = mix(i ^ (seed << 20)) % 100;
        char *p = m + i * PAGE;
        if (k < 10) { kinds[0]++; }
        else if (k < 45) { fill_text(p); kinds[1]++; }
        else if (k < 80) { fill_records(p, i); kinds[2]++; }
        else { fill_random(p); kinds[3]++; }
    }
    printf("ready %#lx %zu %zu %zu %zu %zu\n", (unsigned long)m, size, kinds[0], kinds[1],
           kinds[2], kinds[3]);
    fflush(stdout);
    char line[128];
    uint64_t gen = 0;
    while (fgets(line, sizeof line, stdin)) {
        if (line[0] == 'w') {
            size_t n = strtoull(line + 1, NULL, 0);
            if (n > npages) n = npages;
            struct timespec t0, t1;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            for (size_t k = 0; k < n; k++) { /* partial Fisher-Yates: n distinct pages */
                size_t j = k + rnd() % (npages - k);
                uint32_t t = idx[k]; idx[k] = idx[j]; idx[j] = t;
                char *p = m + (size_t)idx[k] * PAGE;
                struct rec r;
                make_rec(&r, ++gen);
                memcpy(p + (rnd() % (PAGE / sizeof r)) * sizeof r, &r, sizeof r);
            }
            clock_gettime(CLOCK_MONOTONIC, &t1);
            printf("ok %ld\n", (long)((t1.tv_sec - t0.tv_sec) * 1000000L
                                      + (t1.tv_nsec - t0.tv_nsec) / 1000));
            fflush(stdout);
        } else if (line[0] == 'q') {
            break;
        }
    }
    return 0;
}
"""


def build_target(workdir: Path) -> Path:
    if shutil.which("gcc") is None:
        sys.exit("bench_capture: gcc is needed to build the target program")
    src = workdir / "target.c"
    exe = workdir / "target"
    src.write_text(TARGET_C)
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(src)], check=True)
    return exe


class Target:
    """The C target: `w N` writes N distinct random pages, `q` quits."""

    def __init__(self, exe: Path, size: int, seed: int) -> None:
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([str(exe), str(size), str(seed)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.pid = self.proc.pid
        words = self._line().split()
        if not words or words[0] != "ready":
            self.kill()
            raise RuntimeError(f"target said {' '.join(words)!r}")
        self.addr = int(words[1], 16)
        self.size = int(words[2])
        self.kinds = [int(w) for w in words[3:7]]
        self.start_s = time.perf_counter() - t0

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"target {self.pid} exited (status {self.proc.poll()})")
        return line

    def write_pages(self, n: int) -> float:
        """Make the target modify n distinct random pages; returns its time in ms."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"w {n}\n")
        self.proc.stdin.flush()
        words = self._line().split()
        return int(words[1]) / 1e3

    @property
    def npages(self) -> int:
        return self.size // PAGE

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP the target (our child) for the duration, the way a plain copier freezes."""
    os.kill(pid, signal.SIGSTOP)
    os.waitpid(pid, os.WUNTRACED)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


# --- measurements ------------------------------------------------------------------------

@dataclass
class Sample:
    """One snapshot's figures (times in ms, sizes in bytes)."""

    kind: str
    pages_dirty: int
    bytes_read: int
    bytes_stored: int
    prepare_ms: float
    scan_ms: float
    freeze_ms: float
    read_ms: float
    compress_ms: float
    write_ms: float
    total_ms: float
    wall_ms: float  # Engine.snapshot() as its caller sees it

    @classmethod
    def of(cls, meta: SnapshotMeta, wall_ms: float) -> Sample:
        t, c = meta.timings, meta.counts
        return cls(meta.kind, c.pages_dirty, c.bytes_read, c.bytes_stored, t.prepare_ms,
                   t.scan_ms, t.freeze_ms, t.read_ms, t.compress_ms, t.write_ms, t.total_ms,
                   wall_ms)

    @property
    def read_gbs(self) -> float:
        return gbs(self.bytes_read, self.read_ms)

    @property
    def compress_gbs(self) -> float:
        return gbs(self.bytes_read, self.compress_ms)

    @property
    def e2e_gbs(self) -> float:
        return gbs(self.bytes_read, self.total_ms)


def gbs(nbytes: int, ms: float) -> float:
    return nbytes / (ms / 1e3) / 1e9 if ms > 0 else float("inf")


@dataclass
class Scenario:
    fraction: float
    pages_written: int
    samples: list[Sample] = field(default_factory=list)
    write_ms: list[float] = field(default_factory=list)  # the target's own time writing


@dataclass
class Baseline:
    bytes_read: int
    bytes_stored: int
    scan_ms: float
    copy_ms: float
    freeze_ms: float  # SIGSTOP sent .. SIGCONT sent: scan + copy
    compress_ms: float
    write_ms: float
    total_ms: float


@dataclass
class Micro:
    pages: int
    vm_readv_ms: list[float]
    proc_mem_ms: list[float]


@dataclass
class Results:
    size: int
    rounds: int
    kinds: list[int] = field(default_factory=list)
    target_start_s: list[float] = field(default_factory=list)
    scenarios: list[Scenario] = field(default_factory=list)
    cold: list[Sample] = field(default_factory=list)
    warm: list[Sample] = field(default_factory=list)
    baseline: list[Baseline] = field(default_factory=list)
    micro: list[Micro] = field(default_factory=list)
    other_cpu: float = 0.0  # fraction of all CPUs used by anything but this run
    steal_s: float = 0.0


def snapshot(engine: Engine, pid: int, want: str) -> Sample:
    t0 = time.perf_counter()
    meta = engine.snapshot(pid, tracker="uffd-wp")
    wall_ms = (time.perf_counter() - t0) * 1e3
    if meta.kind != want:
        raise RuntimeError(f"expected a {want} snapshot of {pid}, got {meta.kind} "
                           f"({meta.full_reason})")
    return Sample.of(meta, wall_ms)


def run_scenarios(res: Results, exe: Path, workdir: Path, log: Callable[[str], None]) -> None:
    """Per fraction: a fresh target and a fresh default Engine (what `ckptd snapshot` and
    `ckptd watch` use); its first snapshot is full (kept as a cold full sample), then
    `rounds` incremental ones, each after the target wrote the fraction."""
    for i, frac in enumerate(FRACTIONS):
        store_dir = workdir / f"store-scenario-{i}"
        store = Store.open(store_dir, create=True)
        with Target(exe, res.size, seed=100 + i) as t, Engine(store) as eng:
            res.target_start_s.append(t.start_s)
            res.kinds = t.kinds
            n = max(1, round(frac * t.npages))
            sc = Scenario(frac, n)
            full = snapshot(eng, t.pid, "full")
            res.cold.append(full)
            log(f"  {pct(frac):>5}: full (cold) {full.total_ms:8.1f} ms, "
                f"freeze {full.freeze_ms:6.1f} ms, wall {full.wall_ms:8.1f} ms")
            for r in range(res.rounds):
                sc.write_ms.append(t.write_pages(n))
                s = snapshot(eng, t.pid, "delta")
                if s.pages_dirty < n:
                    log(f"  WARNING: {n} pages written but only {s.pages_dirty} reported dirty")
                sc.samples.append(s)
                log(f"  {pct(frac):>5}: round {r + 1}/{res.rounds}: {n} pages written, "
                    f"freeze {s.freeze_ms:7.2f} ms, total {s.total_ms:8.2f} ms, "
                    f"wall {s.wall_ms:8.2f} ms")
            res.scenarios.append(sc)
        shutil.rmtree(store_dir, ignore_errors=True)


def run_warm_and_baselines(res: Results, exe: Path, workdir: Path, warm_samples: int,
                           baseline_rounds: int, log: Callable[[str], None]) -> None:
    """An Engine that keeps a 2 GiB capture buffer: one full snapshot to allocate it, then
    full snapshots of new targets (a process already tracked would get a delta). The last
    target also serves the baseline and the scattered-read comparison."""
    store_dir = workdir / "store-warm"
    store = Store.open(store_dir, create=True)
    with Engine(store, retain_buffer_bytes=WARM_RETAIN) as eng:
        for k in range(warm_samples + 1):
            with Target(exe, res.size, seed=200 + k) as t:
                res.target_start_s.append(t.start_s)
                s = snapshot(eng, t.pid, "full")
                label = "warm-up (allocates the buffer)" if k == 0 else "warm"
                log(f"  full {label}: {s.total_ms:8.1f} ms, freeze {s.freeze_ms:6.1f} ms, "
                    f"wall {s.wall_ms:8.1f} ms")
                if k > 0:
                    res.warm.append(s)
                if k < warm_samples:
                    continue
                for _ in range(baseline_rounds):
                    b = full_copy_baseline(t.pid, workdir)
                    res.baseline.append(b)
                    log(f"  baseline full copy: {b.total_ms:8.1f} ms, "
                        f"stopped {b.freeze_ms:6.1f} ms")
                for frac in (0.01, 0.1):
                    m = micro_scattered(t, frac, reps=max(3, res.rounds))
                    res.micro.append(m)
                    log(f"  scattered {pct(frac)} ({m.pages} pages): process_vm_readv "
                        f"{statistics.median(m.vm_readv_ms):.2f} ms, /proc/PID/mem "
                        f"{statistics.median(m.proc_mem_ms):.2f} ms")
    shutil.rmtree(store_dir, ignore_errors=True)


_tls = threading.local()


def _baseline_compress(chunk: memoryview) -> bytes:
    c = getattr(_tls, "cctx", None)
    if c is None:
        c = _tls.cctx = zstandard.ZstdCompressor(level=BASELINE_ZSTD_LEVEL, write_checksum=True)
    return c.compress(chunk)


_baseline_buf: mmap.mmap | None = None


def full_copy_baseline(pid: int, workdir: Path) -> Baseline:
    """What a checkpointer without incremental tracking does every time: stop, find the
    present pages, copy them all, continue, compress, write, fsync. The copy buffer is
    allocated and faulted in beforehand (like ckptd's warm buffer)."""
    global _baseline_buf
    maps = procfs.read_maps(pid)
    spans = normalize((m.start, m.end) for m in capturable(maps))
    want = sum(e - s for s, e in spans)
    if _baseline_buf is None or len(_baseline_buf) < want:
        _baseline_buf = memread.alloc_buffer(want, populate=True)
    buf = _baseline_buf
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    t0 = time.perf_counter()
    with stopped(pid):
        t_stopped = time.perf_counter()
        with pagemap.Pagemap(pid) as pm:
            runs = normalize((s, e) for s, e, _ in pm.scan(spans, pagemap.DUMPABLE).regions)
        t_scanned = time.perf_counter()
        nbytes = 0
        for i in range(0, len(runs), IOV_MAX):
            nbytes += _vm_readv_batch(pid, runs[i:i + IOV_MAX], base + nbytes)
        t_read = time.perf_counter()
    t_cont = time.perf_counter()
    view = memoryview(buf)
    step = BASELINE_FRAME_PAGES * PAGE
    out = workdir / "baseline.zst"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    stored = 0
    write_s = 0.0
    try:
        with ThreadPoolExecutor(BASELINE_THREADS) as ex:
            pending: list[Future[bytes]] = []

            def drain() -> None:
                nonlocal stored, write_s
                for f in pending:
                    frame = f.result()
                    tw = time.perf_counter()
                    os.write(fd, frame)
                    write_s += time.perf_counter() - tw
                    stored += len(frame)
                pending.clear()

            for off in range(0, nbytes, step):
                pending.append(ex.submit(_baseline_compress, view[off:min(off + step, nbytes)]))
                if len(pending) >= 64:
                    drain()
            drain()
        t_compressed = time.perf_counter()
        os.fsync(fd)
    finally:
        os.close(fd)
        view.release()
        out.unlink(missing_ok=True)
    t_end = time.perf_counter()
    return Baseline(
        bytes_read=nbytes, bytes_stored=stored,
        scan_ms=(t_scanned - t_stopped) * 1e3,
        copy_ms=(t_read - t_scanned) * 1e3,
        freeze_ms=(t_cont - t0) * 1e3,
        compress_ms=(t_compressed - t_cont - write_s) * 1e3,
        write_ms=(write_s + t_end - t_compressed) * 1e3,
        total_ms=(t_end - t0) * 1e3,
    )


def _vm_readv_batch(pid: int, runs: Sequence[tuple[int, int]], dest: int) -> int:
    total = sum(e - s for s, e in runs)
    remote = (ctypes.c_uint64 * (2 * len(runs)))()
    for i, (s, e) in enumerate(runs):
        remote[2 * i] = s
        remote[2 * i + 1] = e - s
    local = (ctypes.c_uint64 * 2)(dest, total)
    done = 0
    while done < total:  # a transfer may stop short; resume where it stopped
        got = process_vm_readv(pid, ctypes.addressof(local), 1, ctypes.addressof(remote),
                               len(runs))
        if got <= 0:
            raise OSError(f"process_vm_readv of {pid} read nothing")
        done += got
        if done < total:
            runs = _skip(runs, got)
            remote = (ctypes.c_uint64 * (2 * len(runs)))()
            for i, (s, e) in enumerate(runs):
                remote[2 * i] = s
                remote[2 * i + 1] = e - s
            local = (ctypes.c_uint64 * 2)(dest + done, total - done)
    return total


def _skip(runs: Sequence[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in runs:
        if n >= e - s:
            n -= e - s
            continue
        out.append((s + n, e))
        n = 0
    return out


def micro_scattered(t: Target, frac: float, reps: int) -> Micro:
    """Read `frac` of the region as scattered single 4 KiB runs (never merged) with
    ckptd's PageReader, process_vm_readv vs /proc/PID/mem, target stopped, warm buffer;
    both results are checked equal."""
    rng = random.Random(7)
    pages = sorted(rng.sample(range(t.npages), max(1, round(frac * t.npages))))
    runs = [(t.addr + p * PAGE, t.addr + (p + 1) * PAGE) for p in pages]
    bufs = {mode: memread.alloc_buffer(len(runs) * PAGE, populate=True)
            for mode in (True, False)}
    times: dict[bool, list[float]] = {True: [], False: []}
    with stopped(t.pid):
        for rep in range(reps):
            for mode in ((True, False) if rep % 2 == 0 else (False, True)):
                with memread.PageReader(t.pid, use_vm_readv=mode) as reader:
                    t0 = time.perf_counter()
                    reader.read_runs(runs, bufs[mode])
                    times[mode].append((time.perf_counter() - t0) * 1e3)
    crc = {mode: zlib.crc32(memoryview(b)[:len(runs) * PAGE]) for mode, b in bufs.items()}
    for b in bufs.values():
        b.close()
    if crc[True] != crc[False]:
        raise RuntimeError("process_vm_readv and /proc/PID/mem read different bytes")
    return Micro(len(runs), times[True], times[False])


# --- reporting ---------------------------------------------------------------------------

def pct(frac: float) -> str:
    return f"{frac * 100:g}%"


def fmt(v: float, digits: int = 1) -> str:
    if v == float("inf"):
        return "inf"
    return f"{v:.{digits}f}"


def agg(values: Sequence[float], digits: int = 1) -> str:
    """median (min-max)"""
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt(med, digits)
    return f"{fmt(med, digits)} ({fmt(min(values), digits)}-{fmt(max(values), digits)})"


def mib(n: float) -> float:
    return n / MIB


def digits_for(values: Sequence[float]) -> int:
    m = statistics.median(values) if values else 0
    return 2 if m < 10 else 1 if m < 1000 else 0


def table(header: Sequence[str], rows: Sequence[Sequence[str]], md: bool) -> str:
    if md:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(x[i])) for x in [header, *rows]) for i in range(len(header))]
    out = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                     for i, (h, w) in enumerate(zip(header, widths, strict=True)))]
    out.append("  ".join("-" * w for w in widths))
    for r in rows:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(out)


def metric_rows(cols: Sequence[tuple[str, list[Sample]]], base: list[Baseline]
                ) -> tuple[list[str], list[list[str]]]:
    """One row per metric, one column per scenario (plus the baseline)."""
    header = ["metric", *[c[0] for c in cols], "full copy (baseline)"]
    bt = [b.total_ms for b in base]
    bf = [b.freeze_ms for b in base]

    def row(name: str, get: Callable[[Sample], float], bget: Callable[[Baseline], float] | None,
            digits: int | None = None) -> list[str]:
        cells = [name]
        for _, ss in cols:
            vals = [get(s) for s in ss]
            cells.append(agg(vals, digits if digits is not None else digits_for(vals)))
        if bget is None:
            cells.append("-")
        else:
            vals = [bget(b) for b in base]
            cells.append(agg(vals, digits if digits is not None else digits_for(vals)))
        return cells

    rows = [
        row("pages dirty (reported)", lambda s: s.pages_dirty, None, 0),
        row("read MiB", lambda s: mib(s.bytes_read), lambda b: mib(b.bytes_read)),
        row("stored MiB", lambda s: mib(s.bytes_stored), lambda b: mib(b.bytes_stored)),
        row("scan ms", lambda s: s.scan_ms, lambda b: b.scan_ms),
        row("freeze ms", lambda s: s.freeze_ms, lambda b: b.freeze_ms),
        row("read ms", lambda s: s.read_ms, lambda b: b.copy_ms),
        row("read GB/s", lambda s: s.read_gbs, lambda b: gbs(b.bytes_read, b.copy_ms), 2),
        row("compress ms", lambda s: s.compress_ms, lambda b: b.compress_ms),
        row("compress GB/s", lambda s: s.compress_gbs,
            lambda b: gbs(b.bytes_read, b.compress_ms), 2),
        row("write+fsync ms", lambda s: s.write_ms, lambda b: b.write_ms),
        row("prepare ms", lambda s: s.prepare_ms, None),
        row("total ms", lambda s: s.total_ms, lambda b: b.total_ms),
        row("end-to-end GB/s", lambda s: s.e2e_gbs, lambda b: gbs(b.bytes_read, b.total_ms), 2),
        row("wall ms (snapshot() call)", lambda s: s.wall_ms, lambda b: b.total_ms),
        row("wall GB/s", lambda s: gbs(s.bytes_read, s.wall_ms),
            lambda b: gbs(b.bytes_read, b.total_ms), 2),
        row("wall - total ms (untimed)", lambda s: s.wall_ms - s.total_ms, None),
    ]
    if bt:
        mt, mf = statistics.median(bt), statistics.median(bf)
        rows.append(row("total / full copy", lambda s: s.total_ms / mt, None, 3))
        rows.append(row("wall / full copy", lambda s: s.wall_ms / mt, None, 3))
        rows.append(row("freeze / full-copy stop", lambda s: s.freeze_ms / mf, None, 3))
    return header, rows


@dataclass
class Check:
    name: str
    measured: float
    op: str  # "<=" or ">="
    limit: float
    unit: str

    @property
    def ok(self) -> bool:
        return self.measured <= self.limit if self.op == "<=" else self.measured >= self.limit

    def line(self) -> str:
        ratio = self.measured / self.limit
        return (f"{'PASS' if self.ok else 'MISS'}  {self.name}: {fmt(self.measured, 2)} "
                f"{self.unit} (target {self.op} {fmt(self.limit, 1)} {self.unit}; "
                f"measured/target {ratio:.2f})")


def checks(res: Results) -> list[Check]:
    out: list[Check] = []
    by = {sc.fraction: sc for sc in res.scenarios}
    med = statistics.median
    if 0.01 in by and by[0.01].samples:
        ss = by[0.01].samples
        out.append(Check("incremental, 1% written: total_ms (median)",
                         med([s.total_ms for s in ss]), "<=", 50, "ms"))
        out.append(Check("incremental, 1% written: wall time of Engine.snapshot() (median)",
                         med([s.wall_ms for s in ss]), "<=", 50, "ms"))
        out.append(Check("incremental, 1% written: freeze (median)",
                         med([s.freeze_ms for s in ss]), "<=", 15, "ms"))
    for frac in (0.01, 0.1):
        if frac in by and by[frac].samples:
            out.append(Check(f"scattered 4 KiB capture, {pct(frac)} written: read rate (median)",
                             med([s.read_gbs for s in by[frac].samples]), ">=", 2.0, "GB/s"))
    for label, ss in (("cold", res.cold), ("warm", res.warm)):
        if ss:
            out.append(Check(f"full snapshot, {label}: end to end, total_ms (median)",
                             med([s.e2e_gbs for s in ss]), ">=", 1.0, "GB/s"))
            out.append(Check(f"full snapshot, {label}: end to end, wall time (median)",
                             med([gbs(s.bytes_read, s.wall_ms) for s in ss]), ">=", 1.0,
                             "GB/s"))
            out.append(Check(f"full snapshot, {label}: freeze (median)",
                             med([s.freeze_ms for s in ss]), "<=", 400, "ms"))
    return out


def machine() -> dict[str, str]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
                break
    thp = "?"
    with suppress(OSError):
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "ckptd"],
                               capture_output=True, text=True, check=True).stdout.strip()
        rev += " (ckptd/ has uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        rev = "?"
    return {
        "date": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "thp": thp,
        "python": platform.python_version(),
        "zstandard": zstandard.__version__,
        "commit": rev,
    }


def report(res: Results, info: dict[str, str], command: str, md: bool,
           load: tuple[str, str]) -> str:
    out: list[str] = []

    def h(title: str) -> None:
        out.append(f"\n### {title}\n" if md else f"\n== {title} ==")

    size = f"{res.size / GIB:g} GiB" if res.size >= GIB else f"{res.size / MIB:g} MiB"
    npages = res.size // PAGE
    if md:
        out.append(f"Run {info['date']}.\n")
        out.append(f"- Machine: Linux {info['kernel']}, {info['cpus']} CPUs ({info['cpu']}), "
                   f"{info['memory']} RAM, THP `{info['thp']}`")
        out.append(f"- Software: Python {info['python']}, zstandard {info['zstandard']}, "
                   f"ckptd at {info['commit']}")
        out.append(f"- Command: `{command}`")
        out.append(f"- Load average before/after: {load[0]} / {load[1]}")
    else:
        out.append(f"date     {info['date']}")
        out.append(f"machine  Linux {info['kernel']}, {info['cpus']} CPUs ({info['cpu']}), "
                   f"{info['memory']} RAM, THP {info['thp']}")
        out.append(f"software Python {info['python']}, zstandard {info['zstandard']}, "
                   f"ckptd {info['commit']}")
        out.append(f"command  {command}")
        out.append(f"load     {load[0]} / {load[1]} (before / after)")
    kinds = res.kinds or [0, 0, 0, 0]
    prefix = "- " if md else ""
    out.append(
        f"{prefix}Target: a C process holding one {size} MAP_PRIVATE|MAP_ANONYMOUS region "
        f"({npages} pages of 4 KiB, MADV_NOHUGEPAGE), blocked in read() between "
        f"commands. Data: {DATA_MIX} Page mix here: {kinds[0]} zero, {kinds[1]} text, "
        f"{kinds[2]} records, {kinds[3]} random. Target start-up (fill) "
        f"{agg(res.target_start_s, 2)} s."
    )
    if res.cold:
        ratio = statistics.median([s.bytes_read / max(1, s.bytes_stored) for s in res.cold])
        out.append(f"{prefix}zstd-1 ratio of a full snapshot of this data: {ratio:.2f}")
    out.append(
        f"{prefix}Figures are median (min-max) over {res.rounds} rounds; GB/s = 1e9 bytes/s; "
        "read GB/s = bytes read / read_ms (the copy, inside the freeze); compress GB/s = "
        "bytes read / compress_ms (2 zstd threads, includes zero detection and CRC); "
        "end-to-end = bytes read / total_ms. Each scenario uses a fresh target and a fresh "
        "default `Engine(store)` (as `ckptd snapshot` does: retains at most 256 MiB of "
        "capture buffer), tracker uffd-wp; its first, full snapshot is reported under "
        "\"full, cold\"."
    )

    noise = (f"CPU used outside this run (other processes, kernel threads such as writeback) "
             f"during it: {res.other_cpu * 100:.0f}% of the machine; steal {res.steal_s:.1f} s.")
    if res.other_cpu > 0.15:
        noise += " The machine was busy: these figures are pessimistic."
    out.append(prefix + noise)

    h(f"Incremental snapshots of {size} (pages written between snapshots)")
    cols = [(f"{pct(sc.fraction)} ({sc.pages_written} p)", sc.samples) for sc in res.scenarios]
    header, rows = metric_rows(cols, res.baseline)
    out.append(table(header, rows, md))

    if res.scenarios and res.rounds > 1:
        out.append(f"\n{prefix}Wall ms of Engine.snapshot() by round (one chain per scenario, "
                   "after its full snapshot):")
        out.append(table(["scenario", *[f"round {r + 1}" for r in range(res.rounds)]],
                         [[pct(sc.fraction), *[fmt(x.wall_ms) for x in sc.samples]]
                          for sc in res.scenarios], md))

    h(f"Full snapshots of {size}")
    fcols = [("full, cold", res.cold), ("full, warm", res.warm)]
    fheader, frows = metric_rows(fcols, res.baseline)
    out.append(table(fheader, frows, md))
    out.append(
        f"\n{prefix}cold: first snapshot of a fresh default Engine (its prepare includes the "
        "userfaultfd injection and allocating + faulting in the capture buffer); "
        f"{len(res.cold)} samples. warm: `Engine(store, retain_buffer_bytes=2<<30)` that "
        f"already took a full snapshot of another {size} target, so its capture buffer is "
        f"allocated; {len(res.warm)} samples. Full-copy baseline: SIGSTOP, PAGEMAP_SCAN for "
        "present pages, process_vm_readv (1024 iovecs a call) into a pre-faulted buffer, "
        "SIGCONT, then zstd level 1 (write_checksum) in 64-page frames on 2 threads, write, "
        f"fsync; its \"freeze\" is SIGSTOP..SIGCONT; {len(res.baseline)} samples."
    )

    if res.micro:
        h("Scattered 4 KiB reads: PageReader(use_vm_readv=True) vs /proc/PID/mem")
        mrows = []
        for m in res.micro:
            nbytes = m.pages * PAGE
            v, p = statistics.median(m.vm_readv_ms), statistics.median(m.proc_mem_ms)
            mrows.append([f"{m.pages} pages ({mib(nbytes):.1f} MiB)",
                          f"{agg(m.vm_readv_ms, 2)} ms", f"{gbs(nbytes, v):.2f}",
                          f"{agg(m.proc_mem_ms, 2)} ms", f"{gbs(nbytes, p):.2f}",
                          f"{p / v:.2f}x"])
        out.append(table(["scattered single pages", "process_vm_readv", "GB/s",
                          "/proc/PID/mem", "GB/s", "vm_readv speed-up"], mrows, md))
        out.append(f"\n{prefix}Random distinct pages of the region, each its own run (not "
                   "merged), target stopped, buffer pre-faulted; alternating order; both "
                   "paths must read identical bytes.")

    h("Targets (issue 2)")
    cs = checks(res)
    if res.size != GIB:
        out.append(f"{prefix}(targets are defined for 1 GiB; at {size} they are indicative)")
    for c in cs:
        out.append(f"- {c.line()}" if md else c.line())
    return "\n".join(out)


def update_docs(path: Path, body: str) -> None:
    """Replace the text between the capture markers; keep everything else (other sections
    such as "## Service" belong to other scripts)."""
    block = f"{BEGIN}\n{body.strip()}\n{END}"
    text = path.read_text() if path.exists() else (
        "# Benchmarks\n\nResults of the scripts under bench/. Each section is rewritten by "
        "its script between its markers; edit outside them.\n"
    )
    i, j = text.find(BEGIN), text.find(END)
    if 0 <= i < j:
        text = text[:i] + block + text[j + len(END):]
    else:
        m = re.search(r"^## Capture[^\n]*\n", text, re.M)
        if m:
            nxt = re.search(r"^## ", text[m.end():], re.M)
            end = m.end() + nxt.start() if nxt else len(text)
            text = text[:m.end()] + "\n" + block + "\n\n" + text[end:]
        else:
            text = text.rstrip("\n") + "\n\n## Capture\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- main --------------------------------------------------------------------------------

def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGkmg]?)(?:i?[Bb])?\s*", s)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (e.g. 1G, 256M)")
    mult = {"": 1, "k": 1 << 10, "m": MIB, "g": GIB}[m.group(2).lower()]
    n = int(float(m.group(1)) * mult) // PAGE * PAGE
    if n < 16 * PAGE:
        raise argparse.ArgumentTypeError("size must be at least 64 KiB")
    return n


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine_cpu() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, steal seconds) since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(v) - v[3] - v[4]) / hz, v[7] / hz


def wait_idle(limit_s: float, log: Callable[[str], None]) -> None:
    """Wait (at most limit_s) until the machine has been nearly idle for 6 s: under 10% of
    its CPUs busy in each of three 2-second samples."""
    deadline = time.monotonic() + limit_s
    quiet = 0
    busy, _ = machine_cpu()
    while quiet < 3 and time.monotonic() < deadline:
        time.sleep(2)
        now, _ = machine_cpu()
        frac = (now - busy) / (2 * (os.cpu_count() or 1))
        busy = now
        quiet = quiet + 1 if frac < 0.10 else 0
        if quiet == 0:
            log(f"waiting for an idle machine: {frac * 100:.0f}% busy")
    if quiet < 3:
        log("the machine did not become idle; measuring anyway")


def own_cpu() -> float:
    """CPU seconds of this process and its waited-for children (targets, gcc)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=None,
                    help="target region size (default 1G; 64M with --quick)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="incremental rounds per scenario (default 5; 1 with --quick)")
    ap.add_argument("--warm", type=int, default=None,
                    help="warm full snapshots, each of a new target (default 2; 1 with --quick)")
    ap.add_argument("--baseline-rounds", type=int, default=None,
                    help="full-copy baseline repetitions (default 3; 1 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: small size, 1 round; never writes the docs")
    ap.add_argument("--no-write-docs", action="store_true",
                    help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                    help="first wait up to SECONDS for the machine to be idle (shared hosts)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where stores and the target binary go (default: a temp dir)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_capture: must run as root: it ptraces the target, injects userfaultfd() "
              "into it and reads its /proc/PID/pagemap (try: sudo .venv/bin/python "
              "bench/bench_capture.py)", file=sys.stderr)
        return 2
    size = args.size or (64 * MIB if args.quick else GIB)
    rounds = args.rounds or (1 if args.quick else 5)
    warm = args.warm if args.warm is not None else (1 if args.quick else 2)
    brounds = args.baseline_rounds or (1 if args.quick else 3)
    if rounds < 1 or warm < 1 or brounds < 1:
        ap.error("--rounds, --warm and --baseline-rounds must be at least 1")
    write_docs = not (args.no_write_docs or args.quick)

    command = shlex.join(sys.orig_argv)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    info = machine()  # before any wait: the ckptd code was imported just now
    if args.wait_idle > 0:
        wait_idle(args.wait_idle, log)
        info["date"] = machine()["date"]
    load_before = loadavg()
    busy0, steal0 = machine_cpu()
    own0 = own_cpu()
    t_start = time.perf_counter()

    workdir = Path(tempfile.mkdtemp(prefix="ckptd-bench-", dir=args.workdir))
    res = Results(size=size, rounds=rounds)
    try:
        exe = build_target(workdir)
        log(f"incremental scenarios ({size // MIB} MiB target, {rounds} rounds each)")
        run_scenarios(res, exe, workdir, log)
        log("warm full snapshots, full-copy baseline, scattered reads")
        run_warm_and_baselines(res, exe, workdir, warm, brounds, log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load = (load_before, loadavg())
    busy1, steal1 = machine_cpu()
    elapsed = time.perf_counter() - t_start
    res.other_cpu = max(0.0, (busy1 - busy0) - (own_cpu() - own0)) / (elapsed * (os.cpu_count()
                                                                             or 1))
    res.steal_s = steal1 - steal0
    log("done")

    stdout: IO[str] = sys.stdout
    print(report(res, info, command, md=False, load=load), file=stdout)
    if write_docs:
        update_docs(DOCS, report(res, info, command, md=True, load=load))
        print(f"\nwrote the capture section of {DOCS.relative_to(REPO)}", file=stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
