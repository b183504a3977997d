"""What a thread pays for waking up: the thread CPU of one read of /proc/PID/stat and of
/proc/PID/maps right after a sleep, against the same read repeated at once.

The service runs about 100 rounds a second for the `small` scenario, each after the
capture thread slept; this shows how much of a round's CPU is the wake-up itself (the
scheduler switching the thread in, cold caches and TLB), which no change to a round's
code removes. Only batching rounds (service.batch_window) amortizes it.

Run from the repository root (no root needed; the target is our own child):
  .venv/bin/python bench/bench_wakeup.py [--samples 300] [--sleep-ms 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

IDLE_TARGET = "import time\nwhile True:\n    time.sleep(1)\n"


def measure(fd: int, size: int, samples: int, sleep_s: float) -> tuple[float, float]:
    """Mean thread CPU (us) of the first read after a sleep, and of a second read."""
    first = second = 0
    for _ in range(samples):
        time.sleep(sleep_s)
        t0 = time.thread_time_ns()
        os.pread(fd, size, 0)
        t1 = time.thread_time_ns()
        os.pread(fd, size, 0)
        t2 = time.thread_time_ns()
        first += t1 - t0
        second += t2 - t1
    return first / samples / 1e3, second / samples / 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=300, help="reads of each kind")
    ap.add_argument("--sleep-ms", type=float, default=10.0,
                    help="sleep before each pair of reads (the service: 10 ms between rounds)")
    args = ap.parse_args()
    target = subprocess.Popen([sys.executable, "-c", IDLE_TARGET])
    try:
        time.sleep(0.3)
        stat = os.open(f"/proc/{target.pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        maps = os.open(f"/proc/{target.pid}/maps", os.O_RDONLY | os.O_CLOEXEC)
        print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
              f"{platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs")
        print("| file | first read after a sleep | the next read at once |")
        print("|---|---|---|")
        for name, fd, size in (("stat", stat, 4096), ("maps", maps, 1 << 16)):
            after_sleep, at_once = measure(fd, size, args.samples, args.sleep_ms / 1e3)
            print(f"| /proc/PID/{name} | {after_sleep:.1f} us | {at_once:.1f} us |")
        os.close(stat)
        os.close(maps)
    finally:
        target.kill()
        target.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
