"""SIGKILL at random instants, with real processes: a `ckptd watch` at 100 ms and a
compactor that keeps folding the chain, both killed over and over while a target
writes a pattern whose content at any instant follows from one counter
(tests/targets/counter.py).

After every kill: the store verifies clean, every listed snapshot restores the target's
region exactly as the counter it holds says it must be, the counters grow with the
snapshots' seq, the newest snapshot materializes whole, and the target is alive, not
held, and still finds its memory as it left it. The first snapshot of the next watch is
a delta exactly when the tracker state the kill left (uffd-wp.json, or hashes.bin for
the hash tracker) names the chain's newest snapshot
(docs/store-format.md, "What a crash leaves"), and, delta or full, it restores the
region exactly: a delta against state that claims a sync the store does not have would
miss the pages the lost round took, and the region would show older values.

Power loss is not simulated; see the crash tables in docs/store-format.md.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import IS_ROOT, TARGETS
from test_service_support import Daemon, wait_for

from ckptd.kernel.abi import PAGE_SIZE
from ckptd.store import Store
from ckptd.store import reader as store_reader
from ckptd.store.reader import DataRef, FrameReader

pytestmark = [pytest.mark.root, pytest.mark.skipif(
    not IS_ROOT, reason="needs root: ptrace, userfaultfd and pagemap of other processes")]

sys.path.insert(0, str(TARGETS))
from counter import WORDS, expected_page  # noqa: E402

PAGES = 2048  # data pages of the target: 8 MiB
RATE = 600  # steps a second: a page is rewritten every ~3.4 s, far longer than a restart

# Keeps folding the chain into its newest or second newest snapshot, as the service's
# compaction does, in its own process so that it can be killed on its own.
COMPACTOR = """
import random, sys, time
from pathlib import Path
from ckptd.store import Store
from ckptd.store.compact import compact_chain
store = Store.open(Path(sys.argv[1]))
rng = random.Random(int(sys.argv[2]))
while True:
    for chain in store.chain_ids():
        ids = store.snapshot_ids(chain)
        if len(ids) >= 3:
            compact_chain(store, chain, ids[-rng.randint(1, 2)])
    time.sleep(rng.uniform(0.0, 0.2))
"""


@dataclass
class Seen:
    """What the checks have learnt so far."""

    # Per listed snapshot: the files it was checked with, and the counter it holds.
    checked: dict[str, tuple[object, int]] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)  # first snapshots of a watch
    compactions_killed: int = 0


def _region(store: Store, sid: str, addr: int, size: int) -> bytes:
    """The bytes of [addr, addr + size) at snapshot `sid`, from the store alone."""
    meta, pm, lineage = store_reader.page_map(store, sid)
    assert any(v.start == addr and v.end == addr + size for v in meta.vmas), \
        f"{sid}: the target's region is not one of its mappings"
    out = bytearray(size)
    reader = FrameReader(store, {m.id: m for m in lineage})
    try:
        for s, e, src in pm.clip(addr, addr + size):
            if isinstance(src, DataRef):
                frame = reader.frame(src.snapshot, src.frame)
                out[s - addr : e - addr] = frame[s + src.delta : e + src.delta]
    finally:
        reader.close()
    return bytes(out)


def check_region(data: bytes, pages: int, where: str) -> int:
    """Check the region against the counter in its header; return the counter."""
    (k,) = struct.unpack_from("<Q", data, 0)
    in_flight = (k + 1) % pages
    for p in range(pages):
        want = expected_page(p, k, pages)
        words = struct.unpack_from(f"<{WORDS}Q", data, (1 + p) * PAGE_SIZE)
        if p == in_flight:
            bad = [w for w in words if w not in (want, k + 1)]
        else:
            bad = [w for w in words if w != want]
        assert not bad, (f"{where}: counter {k}, data page {p} holds {bad[0]} where "
                         f"{want} belongs ({len(bad)} words)")
    return k


def _synced_with(store: Store, chain: str, tracker: str) -> str | None:
    """The snapshot the tracker state names: a delta may follow it and nothing else."""
    if tracker == "hash":
        try:
            raw = (store.state_dir(chain) / "hashes.bin").read_bytes()
        except FileNotFoundError:
            return None
        return raw[10 : 10 + int.from_bytes(raw[8:10], "little")].decode()
    path = store.state_dir(chain) / "uffd-wp.json"
    try:
        return json.loads(path.read_text()).get("synced_with")  # type: ignore[no-any-return]
    except FileNotFoundError:
        return None


def _target_ok(pid: int, addr: int) -> None:
    """Alive, not held by a tracer, and still counting."""
    with open(f"/proc/{pid}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    assert state not in ("t", "T", "Z", "X"), f"target in state {state}"
    with open(f"/proc/{pid}/status") as f:
        tracer = next(line for line in f if line.startswith("TracerPid:"))
    assert tracer.split()[1] == "0", f"target still traced: {tracer.strip()}"
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        first = struct.unpack("<Q", os.pread(fd, 8, addr))[0]
        deadline = time.monotonic() + 5
        while struct.unpack("<Q", os.pread(fd, 8, addr))[0] == first:
            assert time.monotonic() < deadline, "target stopped counting"
            time.sleep(0.01)
    finally:
        os.close(fd)


def check_store(root: Path, chain: str, addr: int, seen: Seen, out: Path) -> str:
    """Everything the store must hold after a kill. Returns the newest id."""
    store = Store.open(root)
    count, problems = store_reader.verify(store)
    assert problems == [] and count >= 1, problems
    floor, ids = store.listing(chain)
    assert ids, "no snapshot listed"
    size = (PAGES + 1) * PAGE_SIZE
    last_k = -1
    for sid in ids:
        meta = store.get(sid, floor)
        # A compaction rewrites a snapshot as a full base: check it again then.
        key = (meta.kind, meta.data_file, meta.data_bytes, tuple(meta.frames))
        known = seen.checked.get(sid)
        if known is None or known[0] != key:
            k = check_region(_region(store, sid, addr, size), PAGES, sid)
            assert known is None or known[1] == k, f"{sid} changed counter on compaction"
            seen.checked[sid] = (key, k)
        k = seen.checked[sid][1]
        assert k >= last_k, f"{sid}: counter {k} below its predecessor's {last_k}"
        last_k = k
    # The newest restores whole, every mapping (what `ckptd materialize` writes).
    store_reader.materialize(store, ids[-1], out)
    shutil.rmtree(out)
    return ids[-1]


def _kill(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    proc.kill()
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out, err


def _start_counter() -> subprocess.Popen[str]:
    """The counter target (tests/targets/counter.py); wait for it with _counter_ready."""
    return subprocess.Popen([sys.executable, str(TARGETS / "counter.py"), str(PAGES),
                             str(RATE)], stdout=subprocess.PIPE, text=True)


def _counter_ready(target: subprocess.Popen[str]) -> int:
    """Wait for the counter target's "ready" line; the address of its pages."""
    assert target.stdout is not None
    word, addr_s, _ = target.stdout.readline().split()
    assert word == "ready"
    return int(addr_s)


def _run(tmp_path: Path, seconds: float, seed: int, tracker: str = "uffd-wp") -> Seen:
    rng = random.Random(seed)
    root = tmp_path / "store"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    target = _start_counter()
    seen = Seen()
    try:
        addr, pid = _counter_ready(target), target.pid
        chain = f"{pid}-1"
        expect: tuple[str, str] | None = None  # (next id, its kind) after a kill
        deadline = time.monotonic() + seconds
        iteration = 0
        while time.monotonic() < deadline or iteration < 4:
            iteration += 1
            watch = subprocess.Popen(
                [sys.executable, "-m", "ckptd", "watch", str(pid), "--interval", "100ms",
                 "--store", str(root), "--json", "--tracker", tracker],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            compactor = None
            if iteration > 1 and rng.random() < 0.8:
                compactor = subprocess.Popen(
                    [sys.executable, "-c", COMPACTOR, str(root), str(rng.randrange(1 << 30))],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            # The first watch must get its full snapshot out; later ones die anywhere,
            # from before their first round to well into a run.
            time.sleep(2.0 if iteration == 1 else rng.uniform(0.15, 1.6))
            procs = [p for p in (watch, compactor) if p is not None]
            rng.shuffle(procs)
            lines = []
            for p in procs:
                rc, out, err = _kill(p)
                if p is compactor:
                    assert rc == -signal.SIGKILL, f"compactor failed:\n{err}"
                    seen.compactions_killed += 1
                else:
                    assert rc == -signal.SIGKILL, f"watch failed:\n{err}"
                    assert "Traceback" not in err, err
                    lines = [json.loads(line) for line in out.splitlines() if line]
                time.sleep(rng.uniform(0.0, 0.05))
            if expect is not None and lines and lines[0]["id"] == expect[0]:
                # The first round after the kill: delta exactly when the state named the
                # newest snapshot; either way its content is checked below.
                assert lines[0]["kind"] == expect[1], (lines[0], expect)
                seen.kinds[expect[1]] = seen.kinds.get(expect[1], 0) + 1
            assert target.poll() is None, f"target exited {target.returncode}"
            _target_ok(pid, addr)
            newest = check_store(root, chain, addr, seen, tmp_path / "out")
            seq = int(newest.rsplit("-", 1)[1])
            synced = _synced_with(Store.open(root), chain, tracker)
            expect = (f"{chain}-{seq + 1}", "delta" if synced == newest else "full")
        # Leftovers of the killed processes go with the next writer's first round.
        r = subprocess.run([sys.executable, "-m", "ckptd", "snapshot", str(pid), "--store",
                            str(root), "--tracker", tracker], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        check_store(root, chain, addr, seen, tmp_path / "out")
        store = Store.open(root)
        assert os.listdir(store.tmp_dir) == []
        assert [n for n in os.listdir(store.chain_dir(chain) / "snapshots")
                if n.startswith(".")] == []
        with store.lock_chain(chain):
            assert store.clean_orphans(chain) == []
        r = subprocess.run([sys.executable, "-m", "ckptd", "verify", "--store", str(root)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert target.poll() is None
        _target_ok(pid, addr)
        print(f"{iteration} kills, {len(seen.checked)} snapshots checked, first rounds "
              f"after a kill: {seen.kinds}, compactions killed: {seen.compactions_killed}")
        return seen
    finally:
        target.kill()
        target.wait()
        out = target.stdout.read() if target.stdout else ""
        assert "corrupt" not in out, out


def _seconds(share: float) -> float:
    """This test's part of CKPTD_STRESS_SECONDS (default 40: the three tests together)."""
    return float(os.environ.get("CKPTD_STRESS_SECONDS", "40")) * share


def test_sigkill_of_watch_and_compaction_at_random_instants(tmp_path: Path) -> None:
    """About 15 s by default. For a longer run (a bench-style soak), set
    CKPTD_STRESS_SECONDS, and CKPTD_STRESS_SEED for another sequence of kills."""
    seen = _run(tmp_path, _seconds(0.375), seed=int(os.environ.get("CKPTD_STRESS_SEED", "1")))
    assert len(seen.checked) > 20
    assert seen.compactions_killed > 3


def test_sigkill_with_the_hash_tracker(tmp_path: Path) -> None:
    """The same with the hash tracker, whose state (hashes.bin) is written after the
    commit point, not before the harvest: about 8 s by default."""
    seen = _run(tmp_path, _seconds(0.2), seed=int(os.environ.get("CKPTD_STRESS_SEED", "1")) + 1,
                tracker="hash")
    assert len(seen.checked) > 10


def test_sigkill_of_the_service_at_random_instants(tmp_path: Path) -> None:
    """The service, registered at 100 ms with a retention that compacts about every
    round (snapshots then publish through the spares compaction keeps), killed at random
    instants and started again: its registration comes back from registrations.json,
    and the store holds what it must after every kill. About 12 s by default."""
    seconds = _seconds(0.3)
    rng = random.Random(int(os.environ.get("CKPTD_STRESS_SEED", "1")))
    d = Daemon(tmp_path, log_level="info")
    target = _start_counter()
    seen = Seen()
    try:
        addr, pid = _counter_ready(target), target.pid
        chain = f"{pid}-1"
        d.start()
        d.call("register", pid=pid, policy={
            "interval": "100ms", "jitter": 0.0,
            "retention": {"keep_last": 6, "compact_after": 3}})
        deadline = time.monotonic() + seconds
        kills = 0
        # Until enough snapshots were checked, too: how many are listed at each kill
        # depends on timing (retention keeps 6), and a run of early kills checks fewer.
        while (time.monotonic() < deadline or kills < 4 or len(seen.checked) <= 20) \
                and time.monotonic() < deadline + 4 * seconds:
            time.sleep(2.0 if kills == 0 else rng.uniform(0.1, 1.5))
            d.kill()
            kills += 1
            assert "Traceback" not in d.log(), d.log()
            assert target.poll() is None, f"target exited {target.returncode}"
            _target_ok(pid, addr)
            check_store(d.store, chain, addr, seen, tmp_path / "out")
            regs = json.loads((d.store / "service" / "registrations.json").read_text())
            assert [r["pid"] for r in regs["registrations"]] == [pid]
            d.start()
            assert [p["pid"] for p in d.call("list")["processes"]] == [pid]
        # A round of the last start: it removes what the killed ones left.
        wait_for(lambda: d.call("list")["processes"][0]["rounds"] >= 2, "rounds")
        assert d.stop() == 0
        check_store(d.store, chain, addr, seen, tmp_path / "out")
        store = Store.open(d.store)
        assert os.listdir(store.tmp_dir) == []
        assert [n for n in os.listdir(store.chain_dir(chain) / "snapshots")
                if n.startswith(".")] == []
        print(f"{kills} kills, {len(seen.checked)} snapshots checked")
        assert len(seen.checked) > 20
    finally:
        d.kill()
        target.kill()
        target.wait()
        out = target.stdout.read() if target.stdout else ""
        assert "corrupt" not in out, out


def test_sigkill_of_the_service_during_group_commits(tmp_path: Path) -> None:
    """Three processes due at the same instants, so that the service publishes their
    rounds as groups (service.group_commit): killed at random instants, between staging
    and the syncs as often as anywhere, every listed snapshot of every chain must still
    be whole, and each chain must go on after a restart. About 8 s by default."""
    seconds = _seconds(0.2)
    rng = random.Random(int(os.environ.get("CKPTD_STRESS_SEED", "1")) + 7)
    d = Daemon(tmp_path, log_level="info")
    targets = [_start_counter() for _ in range(3)]
    seen = {t.pid: Seen() for t in targets}
    try:
        addrs = {t.pid: _counter_ready(t) for t in targets}
        d.start()
        for t in targets:
            # Same interval, no jitter, due times rounded to the batch window: together.
            d.call("register", pid=t.pid, policy={
                "interval": "100ms", "jitter": 0.0,
                "retention": {"keep_last": 6, "compact_after": 3}})
        deadline = time.monotonic() + seconds
        kills = 0
        while (time.monotonic() < deadline or kills < 4
               or min(len(s.checked) for s in seen.values()) <= 5) \
                and time.monotonic() < deadline + 4 * seconds:
            time.sleep(2.0 if kills == 0 else rng.uniform(0.1, 1.0))
            d.kill()
            kills += 1
            assert "Traceback" not in d.log(), d.log()
            for t in targets:
                assert t.poll() is None, f"target exited {t.returncode}"
                _target_ok(t.pid, addrs[t.pid])
                check_store(d.store, f"{t.pid}-1", addrs[t.pid], seen[t.pid],
                            tmp_path / "out")
            d.start()
        wait_for(lambda: all(p["rounds"] >= 2 for p in d.call("list")["processes"]),
                 "rounds")
        assert d.stop() == 0
        for t in targets:
            check_store(d.store, f"{t.pid}-1", addrs[t.pid], seen[t.pid], tmp_path / "out")
        store = Store.open(d.store)
        assert os.listdir(store.tmp_dir) == []
        for t in targets:
            assert [n for n in os.listdir(store.chain_dir(f"{t.pid}-1") / "snapshots")
                    if n.startswith(".")] == []
        checked = sum(len(s.checked) for s in seen.values())
        print(f"{kills} kills, {checked} snapshots checked")
        assert all(len(s.checked) > 5 for s in seen.values())
    finally:
        d.kill()
        for t in targets:
            t.kill()
            t.wait()
            out = t.stdout.read() if t.stdout else ""
            assert "corrupt" not in out, out
