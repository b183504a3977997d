"""Compaction benchmark: CPU of resolving a page map, folding half a chain, and verify.

A Python target maps 256 MiB (MAP_PRIVATE|MAP_ANONYMOUS) and rewrites random pages
(10% of them per second, in ticks of 0.1 s); the benchmark takes N snapshots 0.1 s
apart (about 650 written pages each), then measures in this process:
  page_map   resolving where every page of the newest snapshot lives
  compact    folding the older half of the chain into a new base (compact_chain)
  verify     ckptd verify of the store

With --steady, it measures instead what the service's compactions cost a small process
in the steady state: 6 idle Python targets (the `small` targets of bench_service.py) are
snapshotted 33 times, 0.05 s apart, then each chain is compacted up to its newest but one;
six such cycles, each printing the CPU of a compaction (this process, zstd threads
included), the pages it compressed again and the frames it copied raw.

With --small-chain, it measures the metadata side of one small process's chain as the
service builds it: one idle Python target snapshotted 257 times, 0.01 s apart (the
count at which the service first compacts it), then: the mean size of a delta's metadata
file, the CPU of reading the newest snapshot's lineage (what materialize, show and
verify read), of materializing it, and of folding the older half of the chain into a
new base. Repeat it alternately with another checkout (--also) to compare.

Run as root from the repository root (not part of CI):
  .venv/bin/python bench/bench_compaction.py --snapshots 60
  .venv/bin/python bench/bench_compaction.py --steady
  .venv/bin/python bench/bench_compaction.py --small-chain [--also /tmp/other-checkout]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# CKPTD_BENCH_REPO: measure another checkout's ckptd with this script (--also).
REPO = Path(os.environ.get("CKPTD_BENCH_REPO") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_service import TARGET  # noqa: E402

from ckptd.engine import Engine  # noqa: E402
from ckptd.store import SnapshotMeta, Store, reader  # noqa: E402
from ckptd.store.compact import compact_chain  # noqa: E402


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def steady(store_dir: str, targets: int = 6, rounds: int = 33, cycles: int = 6) -> None:
    from ckptd.store import writer

    recompressed = 0
    write_runs = writer.SnapshotWriter.write_runs

    def counting(self: writer.SnapshotWriter, runs: list[tuple[int, int]], *a: object,
                 **k: object) -> None:
        nonlocal recompressed
        recompressed += sum(e - s for s, e in runs) // 4096
        write_runs(self, runs, *a, **k)  # type: ignore[arg-type]

    writer.SnapshotWriter.write_runs = counting  # type: ignore[method-assign]
    tmp = Path(tempfile.mkdtemp(prefix="ckptd-bench-", dir=store_dir))
    procs = [subprocess.Popen([sys.executable, "-c", TARGET, "64", "0"],
                              stdout=subprocess.PIPE, text=True) for _ in range(targets)]
    try:
        for t in procs:
            assert t.stdout is not None and t.stdout.readline().strip() == "ready"
        store = Store.open(tmp / "store", create=True)
        print("| cycle | CPU per compaction | pages compressed again | frames copied raw |")
        print("|---|---|---|---|")
        with Engine(store) as engine:
            for cycle in range(cycles):
                for _ in range(rounds):
                    for t in procs:
                        engine.snapshot(t.pid)
                    time.sleep(0.05)
                recompressed = 0
                c0 = cpu()
                summaries = [compact_chain(store, c, store.snapshot_ids(c)[-2])
                             for c in store.chain_ids()]
                c1 = cpu()
                raw = [tuple(map(int, m.split("(")[1].split(" frames")[0].split(" of ")))
                       for m in summaries if "frames copied" in m]
                print(f"| {cycle} | {1e3 * (c1 - c0) / targets:.1f} ms | "
                      f"{recompressed / targets:.0f} | {sum(r for r, _ in raw) / targets:.0f} "
                      f"of {sum(n for _, n in raw) / targets:.0f} |", flush=True)
    finally:
        for t in procs:
            t.kill()
            t.wait()
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _chain(store_dir: str, target_args: list[str], count: int, gap: float
           ) -> Iterator[tuple[Path, subprocess.Popen[str], Store, SnapshotMeta]]:
    """A target (bench_service's TARGET with `target_args`) snapshotted `count` times,
    `gap` seconds apart, into a new store: (directory, target, store, newest)."""
    tmp = Path(tempfile.mkdtemp(prefix="ckptd-bench-", dir=store_dir))
    target = subprocess.Popen([sys.executable, "-c", TARGET, *target_args],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert target.stdout is not None and target.stdout.readline().strip() == "ready"
        store = Store.open(tmp / "store", create=True)
        with Engine(store) as engine:
            for _ in range(count):
                meta = engine.snapshot(target.pid)
                time.sleep(gap)
        yield tmp, target, store, meta
    finally:
        target.kill()
        target.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def small_chain(store_dir: str) -> None:
    """See --small-chain in the module doc; prints one table row."""
    with _chain(store_dir, ["64", "0"], 257, 0.01) as (tmp, _, store, meta):
        ids = store.snapshot_ids(meta.chain)
        sizes = [store.snapshot_path(i).stat().st_size for i in ids[1:]]
        c0 = cpu()
        store.lineage(ids[-1])
        c1 = cpu()
        reader.materialize(store, ids[-1], tmp / "out")
        c2 = cpu()
        compact_chain(store, meta.chain, ids[128])
        c3 = cpu()
        print(f"| {REPO} | {sum(sizes) / len(sizes) / 1024:.1f} KiB | "
              f"{1e3 * (c1 - c0):.1f} ms | {1e3 * (c2 - c1):.1f} ms | "
              f"{1e3 * (c3 - c2):.1f} ms |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snapshots", type=int, default=60)
    ap.add_argument("--store-dir", default="/var/tmp")
    ap.add_argument("--steady", action="store_true",
                    help="steady-state compactions of small processes (see above)")
    ap.add_argument("--small-chain", action="store_true",
                    help="metadata size and read costs of a small process's chain")
    ap.add_argument("--also", default=None, metavar="CHECKOUT",
                    help="--small-chain: alternate three runs with this other checkout")
    ap.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (ptrace of the target)", file=sys.stderr)
        return 2
    if args.steady:
        steady(args.store_dir)
        return 0
    if args.small_chain:
        if args.once:
            small_chain(args.store_dir)
            return 0
        print("| checkout | delta metadata file | lineage of the newest (129) | "
              "materialize it | fold 128 into a base |")
        print("|---|---|---|---|---|")
        # Each run in a fresh interpreter, the checkouts alternating: the VM drifts.
        for _ in range(3):
            for checkout in [REPO] + ([Path(args.also)] if args.also else []):
                subprocess.run([sys.executable, str(Path(__file__).resolve()),
                                "--small-chain", "--once", "--store-dir", args.store_dir],
                               cwd=checkout, check=True,
                               env={**os.environ, "CKPTD_BENCH_REPO": str(checkout)})
        return 0
    with _chain(args.store_dir, ["65536", "0.1"], args.snapshots, 0.1) as (
            _, target, store, meta):
        target.kill()
        c0 = cpu()
        _, pm, _ = reader.page_map(store, meta.id)
        c1 = cpu()
        upto = f"{meta.chain}-{args.snapshots // 2}"
        summary = compact_chain(store, meta.chain, upto)
        c2 = cpu()
        count, problems = reader.verify(store)
        c3 = cpu()
        assert not problems, problems
        print(f"| {args.snapshots} snapshots of 256 MiB | page map {c1 - c0:.2f} s "
              f"({len(pm)} pieces) | fold {args.snapshots // 2} into a base {c2 - c1:.2f} s | "
              f"verify {count} snapshots {c3 - c2:.2f} s |")
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
