"""Service benchmark: ckptd's own CPU and memory while it holds many registrations.

Scenarios (issue 3, section 10):
  big    10 processes of 256 MiB, each writing 1% of its pages per second, 1 s interval
  small  100 small processes, 1 s interval
  small-engine  the small scenario with an Engine in-process, no service (what the
         service itself adds is the difference). By default the 100 snapshots of a
         second run back to back; with --spread they are spaced over the second as the
         service's timers space them, which costs the engine itself more CPU per
         snapshot (caches go cold in between), so compare the service with both
  aio    registry persistence through aiofiles vs. a plain executor call (the service's
         only async file I/O; snapshot data is written by the engine's threads)

Run as root from the repository root:
  .venv/bin/python bench/bench_service.py big --duration 60
  .venv/bin/python bench/bench_service.py small --duration 60
  .venv/bin/python bench/bench_service.py aio
  .venv/bin/python bench/bench_service.py small --also /tmp/other-checkout  (side by side)
Targets: big < 25% of one core on average, no overruns; small < 15%; RSS < 150 MiB plus
the snapshot in flight.

For the steady state of `small`, measure past each chain's first compaction (at 257
snapshots; then one every 128 rounds): --warmup 280 --duration 256.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ckptd.service.client import Client  # noqa: E402

TARGET = textwrap.dedent(r'''
    import mmap, os, random, sys, time
    pages, rate = int(sys.argv[1]), float(sys.argv[2])
    m = mmap.mmap(-1, pages * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for p in range(pages):
        m[p * 4096] = 1
    print("ready", flush=True)
    per_tick = max(1, int(pages * rate / 10)) if rate else 0
    rnd = random.Random(os.getpid())
    while True:
        time.sleep(0.1 if rate else 1.0)
        for _ in range(per_tick):
            p = rnd.randrange(pages)
            m[p * 4096 : p * 4096 + 8] = os.urandom(8)
''')

CLK = os.sysconf("SC_CLK_TCK")


def _stat_cpu(path: str) -> tuple[str, float, float]:
    """(comm, utime, stime in seconds) from a /proc .../stat file."""
    with open(path) as f:
        raw = f.read()
    head, _, tail = raw.rpartition(")")
    fields = tail.split()
    return head.partition("(")[2], int(fields[11]) / CLK, int(fields[12]) / CLK


def cpu_seconds(pid: int) -> float:
    _, user, system = _stat_cpu(f"/proc/{pid}/stat")
    return user + system


def thread_cpu(pid: int) -> dict[str, tuple[float, float]]:
    """(user, system) CPU seconds per thread name (threads of one pool share a name
    prefix). The split matters on this VM: the system part (fsync, TLB-flush IPIs,
    ptrace) is what drifts with the host's load."""
    out: dict[str, tuple[float, float]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm, user, system = _stat_cpu(f"/proc/{pid}/task/{tid}/stat")
        except FileNotFoundError:
            continue
        name = comm.rstrip("_0123456789")
        u, s = out.get(name, (0.0, 0.0))
        out[name] = (u + user, s + system)
    return out


def rss_kib(pid: int) -> tuple[int, int]:
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


class _Daemon:
    """One ckptd service from the checkout `repo`, with its own store, socket and
    targets."""

    def __init__(self, repo: Path, tmp: Path, concurrency: int, extra_defaults: str) -> None:
        self.repo, self.tmp = repo, tmp
        self.sock = tmp / "ckptd.sock"
        cfg = tmp / "ckptd.toml"
        cfg.write_text(f'[service]\nstore = "{tmp / "store"}"\nsocket = "{self.sock}"\n'
                       f'log_level = "warning"\nconcurrency = {concurrency}\n'
                       '[defaults]\ninterval = 1\n' + extra_defaults)
        self.targets: list[subprocess.Popen[str]] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "ckptd", "serve", "--config",
                                      str(cfg)], cwd=str(repo))

    def start_targets(self, n: int, pages: int, rate: float) -> None:
        for _ in range(n):
            t = subprocess.Popen([sys.executable, "-c", TARGET, str(pages), str(rate)],
                                 stdout=subprocess.PIPE, text=True)
            self.targets.append(t)
            assert t.stdout is not None and t.stdout.readline().strip() == "ready"

    def register(self) -> None:
        for _ in range(600):
            try:
                Client(self.sock).close()
                break
            except Exception:
                time.sleep(0.05)
        with Client(self.sock) as c:
            for t in self.targets:
                c.call("register", pid=t.pid)

    def status(self) -> dict[str, Any]:
        with Client(self.sock) as c:
            return c.call("status")

    def stop(self) -> None:
        try:
            self.proc.terminate()
            self.proc.wait(60)
        finally:
            for t in self.targets:
                t.kill()
                t.wait()
            shutil.rmtree(self.tmp, ignore_errors=True)


def run_scenario(n: int, pages: int, rate: float, duration: float, warmup: float,
                 concurrency: int = 1, extra_defaults: str = "",
                 store_parent: str | None = None, repos: list[Path] | None = None) -> None:
    """With several `repos`, one service per checkout runs at the same time, each with
    its own `n` targets, and all are measured over the same window: on a VM whose speed
    drifts by more than a change's effect within the hour, that compares them fairly
    (the absolute figures are then those of two services sharing the machine)."""
    daemons: list[_Daemon] = []
    try:
        for repo in repos or [REPO]:
            tmp = Path(tempfile.mkdtemp(prefix="ckptd-bench-", dir=store_parent))
            daemons.append(_Daemon(repo, tmp, concurrency, extra_defaults))
        for d in daemons:
            d.start_targets(n, pages, rate)
        for d in daemons:
            d.register()
        time.sleep(warmup)  # first (full) snapshots
        s0 = [d.status() for d in daemons]
        c0 = [cpu_seconds(d.proc.pid) for d in daemons]
        t0 = [thread_cpu(d.proc.pid) for d in daemons]
        w0 = time.monotonic()
        peak = [0] * len(daemons)
        while time.monotonic() - w0 < duration:
            time.sleep(1)
            peak = [max(p, rss_kib(d.proc.pid)[0]) for p, d in zip(peak, daemons, strict=True)]
        c1 = [cpu_seconds(d.proc.pid) for d in daemons]
        t1 = [thread_cpu(d.proc.pid) for d in daemons]
        w1 = time.monotonic()
        wall = w1 - w0
        for i, d in enumerate(daemons):
            s1 = d.status()
            with Client(d.sock) as c:
                procs = c.call("list")["processes"]
            _, hwm = rss_kib(d.proc.pid)
            snaps = s1["snapshots"] - s0[i]["snapshots"]
            overruns = s1["overruns"] - s0[i]["overruns"]
            size = f"{pages * 4 // 1024} MiB" if pages >= 256 else f"{pages * 4} KiB"
            label = f" ({d.repo})" if repos else ""
            print(f"| {n} x {size} mapped, {rate:.0%}/s written{label} | {wall:.0f} s | "
                  f"{100 * (c1[i] - c0[i]) / wall:.1f}% | {snaps / wall:.1f} | {overruns} | "
                  f"{peak[i] / 1024:.0f} MiB | {hwm / 1024:.0f} MiB | "
                  f"{sum(p['failures'] for p in procs)} |")
            rows = []
            for k, (user1, sys1) in t1[i].items():
                user0, sys0 = t0[i].get(k, (0.0, 0.0))
                user, system = (user1 - user0) / wall, (sys1 - sys0) / wall
                rows.append((user + system, user, system, k))
            print("  by thread (user + system): " + ", ".join(
                f"{k} {100 * v:.1f}% ({100 * u:.1f} + {100 * sy:.1f})"
                for v, u, sy, k in sorted(rows, reverse=True) if v >= 0.001), file=sys.stderr)
    finally:
        for d in daemons:
            d.stop()


def run_engine_only(n: int, pages: int, duration: float, warmup: float,
                    store_parent: str, spread: bool = False) -> None:
    """The "small" scenario without the service: one Engine in this process snapshots
    each target once per second, one after the other. The difference to the service's
    figure is the cost of the service itself (event loop, threads, scheduling)."""
    import resource

    from ckptd.engine import Engine
    from ckptd.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="ckptd-bench-", dir=store_parent))
    targets = []
    try:
        for _ in range(n):
            t = subprocess.Popen([sys.executable, "-c", TARGET, str(pages), "0"],
                                 stdout=subprocess.PIPE, text=True)
            assert t.stdout is not None and t.stdout.readline().strip() == "ready"
            targets.append(t)
        with Engine(Store.open(tmp / "store", create=True)) as engine:
            for t in targets:
                engine.snapshot(t.pid)
            time.sleep(warmup)

            def cpu() -> float:
                r = resource.getrusage(resource.RUSAGE_SELF)
                return r.ru_utime + r.ru_stime

            c0, w0, rounds = cpu(), time.monotonic(), 0
            while time.monotonic() - w0 < duration:
                start = time.monotonic()
                for k, t in enumerate(targets):
                    if spread:  # the k-th snapshot starts k/n of the second in
                        time.sleep(max(0.0, start + k / n - time.monotonic()))
                    engine.snapshot(t.pid)
                    rounds += 1
                time.sleep(max(0.0, 1.0 - (time.monotonic() - start)))
            c1, w1 = cpu(), time.monotonic()
        size = f"{pages * 4} KiB"
        how = "spread over the second" if spread else "back to back"
        print(f"| {n} x {size} mapped, engine only (no service, {how}) | {w1 - w0:.0f} s | "
              f"{100 * (c1 - c0) / (w1 - w0):.1f}% | {rounds / (w1 - w0):.1f} | - | - | - | 0 |")
    finally:
        for t in targets:
            t.kill()
            t.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def bench_aio(count: int) -> None:
    from ckptd.service import aio
    from ckptd.store.fsutil import atomic_write

    tmp = Path(tempfile.mkdtemp(prefix="ckptd-bench-aio-"))
    data = b"x" * 20_000  # about 100 registrations

    async def main() -> tuple[float, float, float]:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        for _ in range(count):
            await aio.atomic_write(tmp / "a.json", data)
        t1 = time.perf_counter()
        for _ in range(count):
            await loop.run_in_executor(None, atomic_write, tmp / "b.json", data)
        t2 = time.perf_counter()
        # Loop responsiveness while persisting: worst delay of a 1 ms ticker.
        worst = 0.0

        async def ticker() -> None:
            nonlocal worst
            while True:
                a = loop.time()
                await asyncio.sleep(0.001)
                worst = max(worst, loop.time() - a - 0.001)

        tk = asyncio.create_task(ticker())
        for _ in range(count):
            await aio.atomic_write(tmp / "a.json", data)
        tk.cancel()
        return (t1 - t0) / count, (t2 - t1) / count, worst

    import uvloop
    a, e, worst = uvloop.run(main())
    print(f"| registry persist (20 kB, fsync) | aiofiles {a * 1e3:.2f} ms | "
          f"executor {e * 1e3:.2f} ms | worst loop stall with aiofiles {worst * 1e3:.2f} ms |")
    shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=["big", "small", "small-engine", "aio"])
    ap.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds before measuring")
    ap.add_argument("--concurrency", type=int, default=1,
                    help="the service's [service] concurrency (default 1, its default)")
    ap.add_argument("--store-dir", default="/var/tmp",
                    help="where to create the store (default /var/tmp, on the same "
                    "filesystem as the service's /var/lib/ckptd)")
    ap.add_argument("--compact-after", type=int, default=None,
                    help="override [defaults.retention] compact_after (default: the service's)")
    ap.add_argument("--compact-ratio", type=float, default=None,
                    help="override [defaults.retention] compact_ratio (default: the service's);"
                         " with a huge --compact-after, a huge ratio turns compaction off")
    ap.add_argument("--spread", action="store_true",
                    help="small-engine: space the snapshots over each second as the "
                    "service's timers do, instead of back to back")
    ap.add_argument("--also", action="append", default=[], metavar="CHECKOUT",
                    help="big/small: also run the service of this other checkout (a "
                    "`git archive` copy with a .venv link, say) over the same window, "
                    "with its own targets, to compare the two; may be repeated")
    ap.add_argument("--settle", type=float, default=65.0,
                    help="seconds to wait before starting (default 65): ext4 without a "
                    "journal, as on our VM, makes each file creation skip inodes freed "
                    "in the last 60 s (5 minutes while their block is dirty), so a test "
                    "run or an earlier benchmark's cleanup would be billed to ckptd")
    args = ap.parse_args()
    repos = [REPO, *(Path(p).resolve() for p in args.also)] if args.also else None
    for repo in repos or []:
        if not (repo / "ckptd" / "__main__.py").is_file():
            print(f"--also {repo}: not a ckptd checkout (no ckptd/__main__.py)", file=sys.stderr)
            return 2
    ret = {k: v for k, v in (("compact_after", args.compact_after),
                             ("compact_ratio", args.compact_ratio)) if v}
    extra = ("[defaults.retention]\n" + "".join(f"{k} = {v}\n" for k, v in ret.items())
             if ret else "")
    if args.scenario != "aio" and args.settle > 0:
        time.sleep(args.settle)
    if args.scenario == "aio":
        bench_aio(200)
        return 0
    if os.geteuid() != 0:
        print("run as root (ptrace of the targets)", file=sys.stderr)
        return 2
    print("| scenario | measured | ckptd CPU (one core) | snapshots/s | overruns | "
          "peak RSS | VmHWM | failures |")
    print("|---|---|---|---|---|---|---|---|")
    if args.scenario == "big":
        run_scenario(10, 65536, 0.01, args.duration, args.warmup, args.concurrency,
                     extra, args.store_dir, repos)
    elif args.scenario == "small-engine":
        run_engine_only(100, 64, args.duration, args.warmup, args.store_dir, args.spread)
    else:
        run_scenario(100, 64, 0.0, args.duration, args.warmup, args.concurrency,
                     extra, args.store_dir, repos)
    return 0


if __name__ == "__main__":
    sys.exit(main())
