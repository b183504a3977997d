"""What setting up write-protect tracking costs a process, once per process lifetime: the
uffd-wp tracker's arm() on a fresh idle Python target (freeze, the injected
userfaultfd(), a copy of the fd, the API handshake, thaw, the state file). Since the
injection runs in a forked child (ckptd/track/injector.py), the fork and the child's
exit are part of it; the CPU figure counts this process and its reaped children.

Optionally with a ballast of resident memory in this process (--ballast-mib), since a
fork copies the page tables of the forking process (the service holds about 110 MiB).

Run as root from the repository root (not part of CI):
  .venv/bin/python bench/bench_setup.py [--targets 20] [--ballast-mib 0]
  CKPTD_BENCH_REPO=/tmp/other-checkout .venv/bin/python bench/bench_setup.py  (compare)
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(os.environ.get("CKPTD_BENCH_REPO") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(REPO))

from ckptd.track import uffd_wp  # noqa: E402
from ckptd.track.base import TrackContext  # noqa: E402

IDLE_TARGET = "import time\nprint('ready', flush=True)\nwhile True:\n    time.sleep(1)\n"


def cpu_with_children() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=int, default=20, help="fresh targets, one arm each")
    ap.add_argument("--ballast-mib", type=int, default=0,
                    help="resident anonymous memory this process holds meanwhile")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_setup: run as root (ptrace and userfaultfd of another process)",
              file=sys.stderr)
        return 1
    ballast = None
    if args.ballast_mib:
        ballast = mmap.mmap(-1, args.ballast_mib << 20,
                            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for off in range(0, len(ballast), mmap.PAGESIZE):
            ballast[off] = 1
    walls: list[float] = []
    cpus: list[float] = []
    with tempfile.TemporaryDirectory(prefix="ckptd-bench-setup-") as tmp:
        for i in range(args.targets):
            t = subprocess.Popen([sys.executable, "-c", IDLE_TARGET],
                                 stdout=subprocess.PIPE, text=True)
            try:
                assert t.stdout is not None and t.stdout.readline().strip() == "ready"
                state = Path(tmp) / str(i)
                state.mkdir()
                tracker = uffd_wp.UffdWpTracker()
                ctx = TrackContext(pid=t.pid, state_dir=state, parent_present=None,
                                   parent_id=None, snapshot_id=f"{t.pid}-1-1", fuzzy=False,
                                   max_pages=0, privileged=True, start_time=None,
                                   authorize=None)
                c0, w0 = cpu_with_children(), time.perf_counter()
                tracker.arm(ctx)
                w1, c1 = time.perf_counter(), cpu_with_children()
                tracker.close()
                walls.append((w1 - w0) * 1e3)
                cpus.append((c1 - c0) * 1e3)
            finally:
                t.kill()
                t.wait()
    if ballast is not None:
        ballast.close()
    print(f"| {REPO} | {args.ballast_mib} MiB | {args.targets} | "
          f"{statistics.median(walls):.2f} ms | {statistics.median(cpus):.2f} ms | "
          f"{max(walls):.2f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
