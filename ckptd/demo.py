"""`make demo`: track a busy process that knows nothing about ckptd.

Starts a workload (a child process writing into a few hundred MiB), takes a full snapshot
and several incremental ones, prints a table, then materializes the last snapshot and
checks it byte for byte against the workload's memory as read while it was frozen.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .engine import Engine
from .kernel import procfs
from .progress import human_bytes
from .store import Store
from .store import reader as store_reader

# The workload: a plain Python program with no knowledge of ckptd. It fills a private
# region with text-like and random data, then keeps rewriting a few pages at random.
WORKLOAD = r"""
import mmap, random, sys, time
size = int(sys.argv[1]) << 20
m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
rng = random.Random(42)
text = (b"checkpoint " * 400)[:4096]
for off in range(0, size, 4096):
    m[off:off + 4096] = text if rng.random() < 0.7 else rng.randbytes(4096)
print("ready", flush=True)
pages = size // 4096
while True:
    for _ in range(100):
        p = rng.randrange(pages) * 4096
        m[p:p + 64] = rng.randbytes(64)
    time.sleep(0.1)
"""


def _read_truth(pid: int, vmas: list[procfs.Mapping]) -> dict[tuple[int, int], bytes | None]:
    out: dict[tuple[int, int], bytes | None] = {}
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for m in vmas:
            if m.private and not m.special:
                try:
                    data = os.pread(fd, m.size, m.start)
                    out[(m.start, m.end)] = data if len(data) == m.size else None
                except OSError:
                    out[(m.start, m.end)] = None
    finally:
        os.close(fd)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ckptd-demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=384, help="workload size (default 384)")
    ap.add_argument("--snapshots", type=int, default=6, help="how many (default 6)")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between snapshots")
    ap.add_argument("--keep", action="store_true", help="keep the store and output")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="ckptd-demo-"))
    store = Store.open(work / "store", create=True)
    print(f"starting a {args.size_mib} MiB workload...", flush=True)
    child = subprocess.Popen([sys.executable, "-c", WORKLOAD, str(args.size_mib)],
                             stdout=subprocess.PIPE, text=True)
    ok = False
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            print("ckptd-demo: the workload failed to start", file=sys.stderr)
            return 1
        print(f"workload PID {child.pid} is running; ckptd tracks it without its "
              "cooperation\n")
        truth: dict[tuple[int, int], bytes | None] = {}

        def grab(pid: int, vmas: list[procfs.Mapping]) -> None:
            truth.clear()
            truth.update(_read_truth(pid, vmas))

        header = (f"{'snapshot':<12} {'kind':<5} {'tracker':<7} {'dirty pages':>11} "
                  f"{'read':>10} {'stored':>10} {'ratio':>6} {'freeze ms':>9} {'total ms':>9}")
        print(header)
        print("-" * len(header))
        last = None
        with Engine(store) as eng:
            for i in range(args.snapshots):
                if i:
                    time.sleep(args.interval)
                is_last = i == args.snapshots - 1
                meta = eng.snapshot(child.pid, on_frozen=grab if is_last else None)
                c, t = meta.counts, meta.timings
                ratio = c.bytes_read / c.bytes_stored if c.bytes_stored else 0.0
                print(f"{meta.id:<12} {meta.kind:<5} {meta.tracker:<7} {c.pages_dirty:>11} "
                      f"{human_bytes(c.bytes_read):>10} {human_bytes(c.bytes_stored):>10} "
                      f"{ratio:>6.1f} {t.freeze_ms:>9.1f} {t.total_ms:>9.1f}", flush=True)
                last = meta
        assert last is not None
        print("\n(the last row's freeze includes reading the whole workload a second time, "
              "as ground truth for the check below)")
        out = work / "materialized"
        t0 = time.perf_counter()
        index = store_reader.materialize(store, last.id, out)
        ms = (time.perf_counter() - t0) * 1e3
        compared = mismatched = 0
        for v in index["vmas"]:
            want = truth.get((v["start"], v["end"]))
            if want is None:
                continue
            compared += 1
            if (out / v["file"]).read_bytes() != want:
                mismatched += 1
                print(f"MISMATCH in {v['start']:#x}-{v['end']:#x} {v['path'] or ''}")
        total_mem = sum(v["end"] - v["start"] for v in index["vmas"])
        print(f"\nmaterialized {last.id} ({len(index['vmas'])} mappings, "
              f"{human_bytes(total_mem)}) in {ms:.0f} ms")
        count, problems = store_reader.verify(store)
        print(f"verify: {count} snapshots, {'; '.join(problems) or 'no problems'}")
        if mismatched or problems:
            print(f"FAILED: {mismatched} of {compared} mappings differ", file=sys.stderr)
            return 1
        print(f"OK: all {compared} mappings equal the workload's memory byte for byte")
        ok = True
        return 0
    finally:
        child.kill()
        child.wait()
        if args.keep or not ok:
            print(f"store and output kept in {work}")
        else:
            shutil.rmtree(work)


if __name__ == "__main__":
    sys.exit(main())
