"""What publishing small snapshots costs, three ways: one at a time as Store.publish does
(write, fsync, rename, fsync of the directory), the same with the directory fsync
replaced by one syncfs per batch, and the group commit the service uses (write all of a
batch, syncfs, rename all, syncfs; see docs/store-format.md, commit protocol).

It measures the calling thread's CPU and the whole machine's busy time (from
/proc/stat), so that work moved to kernel threads (writeback) would show. Files of
`--size` bytes in `--dirs` directories, one per directory and batch, `--batches`
batches 10 ms apart, each way in turn, `--rounds` times.

Run from the repository root, on the filesystem to measure (no root needed):
  .venv/bin/python bench/bench_publish.py [--where /var/tmp] [--size 20000]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ckptd.kernel.syscalls import syncfs


def busy_ticks() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4]  # all but idle and iowait


class Dirs:
    def __init__(self, root: str, n: int, data: bytes) -> None:
        self.root, self.data = root, data
        self.dirs = [f"{root}/c{i}" for i in range(n)]
        self.fds = []
        for d in self.dirs:
            os.mkdir(d)
            self.fds.append(os.open(d, os.O_RDONLY | os.O_DIRECTORY))
            with open(f"{d}/spare", "wb") as f:
                f.write(data)

    def write(self, d: str, fsync: bool) -> None:
        fd = os.open(f"{d}/spare", os.O_WRONLY)
        try:
            os.pwrite(fd, self.data, 0)
            os.ftruncate(fd, len(self.data))
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def put_back(self) -> None:
        for d in self.dirs:  # undo the renames, for the next batch
            os.rename(f"{d}/snap", f"{d}/spare")

    def one_at_a_time(self) -> None:
        for d, fd in zip(self.dirs, self.fds, strict=True):
            self.write(d, fsync=True)
            os.rename(f"{d}/spare", f"{d}/snap")
            os.fsync(fd)

    def dir_fsync_deferred(self) -> None:
        for d in self.dirs:
            self.write(d, fsync=True)
            os.rename(f"{d}/spare", f"{d}/snap")
        syncfs(self.fds[0])

    def group(self) -> None:
        for d in self.dirs:
            self.write(d, fsync=False)
        syncfs(self.fds[0])
        for d in self.dirs:
            os.rename(f"{d}/spare", f"{d}/snap")
        syncfs(self.fds[0])


def run(dirs: Dirs, way: Callable[[], None], batches: int) -> tuple[float, float, float]:
    """Per file: thread CPU (us) and machine busy time (us); per batch: wall (ms)."""
    spent = 0.0
    b0, c0 = busy_ticks(), time.thread_time_ns()
    for _ in range(batches):
        w = time.perf_counter()
        way()
        spent += time.perf_counter() - w
        t = time.thread_time_ns()
        dirs.put_back()
        c0 += time.thread_time_ns() - t  # not counted in thread CPU (it is in machine busy)
        time.sleep(0.01)
    c1, b1 = time.thread_time_ns(), busy_ticks()
    files = batches * len(dirs.dirs)
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    return (c1 - c0) / files / 1e3, (b1 - b0) * tick_us / files, spent / batches * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--where", default="/var/tmp", help="a directory on the filesystem to test")
    ap.add_argument("--size", type=int, default=20000, help="bytes per file")
    ap.add_argument("--dirs", type=int, default=10, help="files per batch")
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="ckptd-publish-", dir=args.where)
    try:
        dirs = Dirs(root, args.dirs, os.urandom(args.size))
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, "
              f"{platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs; "
              f"{args.where}; {args.dirs} files of {args.size} bytes a batch")
        print("| way | round | thread CPU per file | machine busy per file | wall per batch |")
        print("|---|---|---|---|---|")
        ways = [("one at a time (Store.publish)", dirs.one_at_a_time),
                ("directory fsync deferred to one syncfs", dirs.dir_fsync_deferred),
                ("group commit (two syncfs)", dirs.group)]
        for r in range(args.rounds):
            for name, way in ways:
                cpu, busy, wall = run(dirs, way, args.batches)
                print(f"| {name} | {r + 1} | {cpu:.0f} us | {busy:.0f} us | {wall:.2f} ms |",
                      flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
