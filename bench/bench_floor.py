"""The floor under a round of `small`: ckptd's Engine against the least work a round of
this design needs, over the same targets and in alternating windows of the same run.

A steady-state round of an idle Python process must at least: read /proc/PID/stat (is it
still the same process), mark the tracker state (before the get-and-clear), freeze the
process, read its /proc/PID/maps, get-and-clear the written pages, copy them, thaw, drop
the pages whose content did not change, compress the rest, write the metadata (mappings,
present pages, extents), fsync it, rename it into place and fsync the directory.
`MinimalRound` does exactly that and nothing else: no check of the plan, the chain, other
writers, an exec or file pages that reverted; no pydantic; one metadata file reused for
every round. Its snapshots are not a store anyone could read. It measures what the
syscalls and the least Python around them cost on this machine.

Both kinds of round get-and-clear the same userfaultfd, so the engine's deltas in this run
miss the pages a minimal round took; only the CPU figures mean anything. The windows
alternate (engine, minimal, engine, ...) because this VM's speed drifts within minutes:
compare the two figures of one pair.

Run as root from the repository root:
  .venv/bin/python bench/bench_floor.py                 (100 targets, 3 pairs of 30 s)
  .venv/bin/python bench/bench_floor.py --targets 20 --window 10 --pairs 1
  .venv/bin/python bench/bench_floor.py --log   (also the minimal round with a log)
"""

from __future__ import annotations

import argparse
import base64
import json
import mmap
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_service import TARGET  # noqa: E402

from ckptd.engine import Engine  # noqa: E402
from ckptd.intervals import Span, normalize, union  # noqa: E402
from ckptd.kernel import abi, memread, pagemap, procfs  # noqa: E402
from ckptd.kernel.ptrace import Freezer  # noqa: E402
from ckptd.store import Store  # noqa: E402
from ckptd.store.format import vmas_json  # noqa: E402
from ckptd.track.uffd_wp import _GET_AND_CLEAR_CHECKED  # noqa: E402  (the checked get-and-clear)

USER_SPACE = (0, (1 << 47) - abi.PAGE_SIZE)  # TASK_SIZE on x86_64 (4-level paging)


class MinimalRound:
    """The least a frozen steady-state round of one process does (see the module doc)."""

    def __init__(self, pid: int, directory: Path, vmas: bytes, present: list[Span],
                 buf: mmap.mmap, phases: Counter[str]) -> None:
        self.pid = pid
        self.phases = phases
        self.buf = buf
        self.stat_fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        self.pm = pagemap.Pagemap(pid)
        # The engine's rounds registered the process's memory: scan what is registered.
        self.ranges = normalize((s, e) for s, e, _ in
                                self.pm.scan([USER_SPACE], pagemap.WP_ALLOWED).regions)
        directory.mkdir(mode=0o700)
        self.dir = str(directory)
        self.state_fd = os.open(f"{self.dir}/state", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC,
                                0o600)
        self.names = (f"{self.dir}/.spare", f"{self.dir}/meta.json")
        Path(self.names[0]).write_bytes(b" " * 20000)
        self.vmas = vmas
        self.present = present
        self.copies: dict[int, bytes] = {}
        self.seq = 0
        self.maps = b""
        self.identity: tuple[bytes, ...] = ()
        self.cctx = zstandard.ZstdCompressor(level=-1, write_checksum=True)
        self.log = False  # publish by appending to a log instead (see _append)
        self.log_fd = -1

    def close(self) -> None:
        os.close(self.stat_fd)
        os.close(self.state_fd)
        if self.log_fd >= 0:
            os.close(self.log_fd)
        self.pm.close()

    def __call__(self) -> None:
        clock, acc = time.thread_time_ns, self.phases
        t0 = clock()
        raw = os.pread(self.stat_fd, 4096, 0)
        fields = raw.rpartition(b")")[2].split()
        # start time and the exec fingerprint: what identify compares each round
        self.identity = (fields[19], fields[25], fields[44], fields[45], fields[47])
        self.seq += 1
        snapshot_id = f"{self.pid}-{self.seq}"
        t1 = clock()
        acc["stat"] += t1 - t0
        os.pwrite(self.state_fd,
                  json.dumps({"synced_with": snapshot_id}).encode().ljust(511) + b"\n", 0)
        t2 = clock()
        acc["state"] += t2 - t1
        freezer = Freezer(self.pid)
        freezer.freeze()
        try:
            t3 = clock()
            acc["freeze"] += t3 - t2
            maps = procfs.read_file(f"/proc/{self.pid}/maps")
            if maps != self.maps:
                self.maps = maps
            t4 = clock()
            acc["maps"] += t4 - t3
            written = [(s, e) for s, e, _ in
                       self.pm.scan(self.ranges, _GET_AND_CLEAR_CHECKED).regions]
            t5 = clock()
            acc["get-and-clear"] += t5 - t4
            reader = memread.PageReader(self.pid)
            nbytes = reader.read_runs(written, self.buf)
            reader.close()
            t6 = clock()
            acc["copy"] += t6 - t5
        finally:
            freezer.thaw()
        t7 = clock()
        acc["thaw"] += t7 - t6
        view = memoryview(self.buf)
        known, copies, changed, pos = self.copies, {}, [], 0
        for start, end in written:
            for addr in range(start, end, abi.PAGE_SIZE):
                page = bytes(view[pos : pos + abi.PAGE_SIZE])
                pos += abi.PAGE_SIZE
                if known.get(addr) != page:
                    changed.append((addr, page))
                copies[addr] = page
        view.release()
        self.copies = copies
        data = b"".join(page for _, page in changed)
        frame = self.cctx.compress(data) if data else b""
        crc = zlib.crc32(data)
        t8 = clock()
        acc["unchanged filter + compress"] += t8 - t7
        self.present = union(self.present, written)
        rest = json.dumps({
            "format_version": 3, "id": snapshot_id, "seq": self.seq,
            "parent": f"{self.pid}-{self.seq - 1}", "kind": "delta",
            "present": self.present, "data_inline": base64.b64encode(frame).decode(),
            "frames": [{"offset": 0, "length": len(frame), "pages": len(changed),
                        "crc32": crc}],
            "extents": [{"addr": a, "pages": 1, "frame": 0, "skip": i}
                        for i, (a, _) in enumerate(changed)],
            "zeros": [], "counts": {"pages_read": nbytes >> abi.PAGE_SHIFT,
                                    "pages_stored": len(changed)},
            "created": time.time()}).encode()
        meta = b'{"vmas":' + self.vmas + b"," + rest[1:]
        t9 = clock()
        acc["metadata JSON"] += t9 - t8
        if self.log:
            self._append(meta)
        else:
            self._replace(meta)

    def _replace(self, meta: bytes) -> None:
        """ckptd's commit: a reused file, fsync, rename into place, directory fsync."""
        clock, acc = time.thread_time_ns, self.phases
        t0 = clock()
        spare, final = self.names
        fd = os.open(spare, os.O_WRONLY | os.O_CLOEXEC)
        os.pwrite(fd, meta, 0)
        os.ftruncate(fd, len(meta))
        os.fsync(fd)
        os.close(fd)
        t1 = clock()
        acc["write + fsync"] += t1 - t0
        os.rename(spare, final)
        dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        os.fsync(dir_fd)
        os.close(dir_fd)
        self.names = (final, spare)  # next round writes into the other name
        acc["rename + directory fsync"] += clock() - t1
        acc["rounds"] += 1

    def _append(self, meta: bytes) -> None:
        """The alternative the store format does not have: one record (length, crc32,
        JSON) appended to a per-process log that stays open, then fdatasync."""
        t0 = time.thread_time_ns()
        if self.log_fd < 0:
            self.log_fd = os.open(f"{self.dir}/log", os.O_WRONLY | os.O_CREAT | os.O_APPEND
                                  | os.O_CLOEXEC, 0o600)
        os.write(self.log_fd, struct.pack("<QI", len(meta), zlib.crc32(meta)) + meta)
        os.fdatasync(self.log_fd)
        self.phases["append + fdatasync"] += time.thread_time_ns() - t0
        self.phases["rounds"] += 1


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_window(rounds: dict[int, Callable[[], object]], seconds: float) -> tuple[float, float]:
    """Each process's round once a second, ten at a time every 100 ms (as the service's
    batch window spaces them). Returns (CPU share of one core, CPU us per round)."""
    pids = list(rounds)
    c0, w0, done = cpu_seconds(), time.monotonic(), 0
    while time.monotonic() - w0 < seconds:
        start = time.monotonic()
        for k, pid in enumerate(pids):
            if k % 10 == 0:
                time.sleep(max(0.0, start + (k // 10) * 0.1 - time.monotonic()))
            rounds[pid]()
            done += 1
        time.sleep(max(0.0, start + 1.0 - time.monotonic()))
    cpu, wall = cpu_seconds() - c0, time.monotonic() - w0
    return 100 * cpu / wall, 1e6 * cpu / max(done, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=int, default=100, help="idle Python processes")
    ap.add_argument("--window", type=float, default=30.0, help="seconds per window")
    ap.add_argument("--pairs", type=int, default=3, help="engine/minimal window pairs")
    ap.add_argument("--log", action="store_true",
                    help="a third window per pair: the minimal round publishing by an "
                    "append and fdatasync to a per-process log instead of the rename")
    ap.add_argument("--store-dir", default=None, help="parent directory of the stores")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (ptrace of the targets)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="ckptd-floor-", dir=args.store_dir))
    targets: list[subprocess.Popen[str]] = []
    minimal: dict[int, MinimalRound] = {}
    try:
        for _ in range(args.targets):
            t = subprocess.Popen([sys.executable, "-c", TARGET, "64", "0"],
                                 stdout=subprocess.PIPE, text=True)
            targets.append(t)
            assert t.stdout is not None and t.stdout.readline().strip() == "ready"
        phases: Counter[str] = Counter()
        buf = memread.alloc_buffer(1 << 20, populate=True)
        with Engine(Store.open(tmp / "store", create=True)) as engine:
            last = {}
            for _ in range(3):  # a full snapshot, then deltas: tracking is set up
                for t in targets:
                    last[t.pid] = engine.snapshot(t.pid)
            for pid, meta in last.items():
                minimal[pid] = MinimalRound(pid, tmp / f"minimal-{pid}", vmas_json(meta.vmas),
                                            list(meta.present), buf, phases)
            engine_rounds: dict[int, Callable[[], object]] = {
                pid: (lambda p=pid: engine.snapshot(p)) for pid in last}
            minimal_rounds: dict[int, Callable[[], object]] = dict(minimal)
            log_cols = " minimal, log CPU | per round | engine / minimal, log |" if args.log \
                else ""
            print("| pair | engine CPU | engine per round | minimal CPU | minimal per round "
                  "| engine / minimal |" + log_cols)
            print("|---|---|---|---|---|---|" + ("---|---|---|" if args.log else ""))
            for pair in range(1, args.pairs + 1):
                e_cpu, e_round = run_window(engine_rounds, args.window)
                phases.clear()
                m_cpu, m_round = run_window(minimal_rounds, args.window)
                rename_phases = phases.copy()
                row = (f"| {pair} | {e_cpu:.1f}% | {e_round:.0f} us | {m_cpu:.1f}% | "
                       f"{m_round:.0f} us | {e_round / m_round:.2f} |")
                if args.log:
                    phases.clear()
                    for m in minimal.values():
                        m.log = True
                    l_cpu, l_round = run_window(minimal_rounds, args.window)
                    for m in minimal.values():
                        m.log = False
                    row += f" {l_cpu:.1f}% | {l_round:.0f} us | {e_round / l_round:.2f} |"
                print(row, flush=True)
                for label, counts in (("minimal", rename_phases),
                                      ("minimal, log", phases if args.log else None)):
                    if counts:
                        n = counts.pop("rounds", 1)
                        print(f"  {label} round by phase (thread CPU, us): " + ", ".join(
                            f"{k} {v / n / 1e3:.0f}" for k, v in counts.items()),
                            file=sys.stderr, flush=True)
    finally:
        for m in minimal.values():
            m.close()
        for t in targets:
            t.kill()
            t.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
