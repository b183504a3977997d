"""A store whose filesystem fills up: a round fails with StoreFull (one line from the
CLI, exit 74; the service's `store-full`), nothing half-written is listed, and once
there is room again the next snapshot restores byte for byte.

The store lives on a small tmpfs mounted for the test (root), filled with a file."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    GroundTruthRecorder,
    Target,
    assert_materializes_to,
    needs_root,
    run_cli,
)

from ckptd.cli import EXIT_STORE_FULL
from ckptd.engine import Engine
from ckptd.errors import StoreFull
from ckptd.service.daemon import error_code, failure_reason
from ckptd.service.views import status_line
from ckptd.store import Store
from ckptd.store.reader import verify

pytestmark = needs_root

# 4 MiB of private anonymous memory with random content (incompressible); each "write"
# gives `n` pages new random content.
WRITER = """
import mmap, os, random, sys
pages = 1024
m = mmap.mmap(-1, pages * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m[:] = os.urandom(pages * 4096)
rnd = random.Random(3)
print("ready", flush=True)
for line in sys.stdin:
    n = int(line)
    for _ in range(n):
        p = rnd.randrange(pages)
        m[p * 4096:(p + 1) * 4096] = os.urandom(4096)
    print("ok", flush=True)
"""


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(mnt: Path) -> Path:
    """Take every free byte of the filesystem with one file."""
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for chunk in (1 << 20, 4096):  # then the last partial megabyte
            while True:
                try:
                    os.write(fd, b"\xff" * chunk)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return filler


def tmp_leftovers(store: Store) -> list[str]:
    """Files in tmp/ other than the open Store's own owner lock."""
    return sorted(p.name for p in store.tmp_dir.iterdir()
                  if not (p.name.startswith("owner.") and p.name.endswith(".lock")))


def start_chain(engine: Engine, t: Target) -> None:
    engine.snapshot(t.pid)  # full
    for _ in range(2):  # deltas: the tracker's estimate now comes from the last one
        assert t.send("16") == "ok"
        engine.snapshot(t.pid)


@pytest.mark.parametrize("pages", [64, 2], ids=["data-file", "inline"])
def test_a_delta_is_refused_before_the_get_and_clear_and_the_chain_goes_on(
        small_fs: Path, tmp_path: Path, pages: int) -> None:
    """No room: the round is refused before it takes anything from the kernel, so the
    next round, once there is room, is still a delta, and it holds every page written
    since the last snapshot (those of the refused round too)."""
    store = Store.open(small_fs / "store", create=True)
    rec = GroundTruthRecorder()
    with Target.python(WRITER) as t, Engine(store) as engine:
        start_chain(engine, t)
        assert t.send(str(pages)) == "ok"
        listed = [m.id for m in store.list_snapshots()]
        filler = fill(small_fs)
        with pytest.raises(StoreFull, match="nothing was taken"):
            engine.snapshot(t.pid)
        assert [m.id for m in store.list_snapshots()] == listed
        assert tmp_leftovers(store) == []
        filler.unlink()
        assert t.send("8") == "ok"
        after = engine.snapshot(t.pid, on_frozen=rec)
        assert (after.kind, after.seq) == ("delta", len(listed) + 1)
        assert t.alive()
    assert_materializes_to(store, after.id, rec.last, tmp_path / "m")
    assert verify(store)[1] == []


def test_a_delta_that_runs_out_of_space_while_storing_leaves_nothing_and_the_next_is_exact(
        small_fs: Path, tmp_path: Path) -> None:
    """Room for the estimate but not for a burst of writes: the round fails after its
    get-and-clear. Nothing is listed or left in tmp/, and the next round (full: the
    pages the failed one took are tracked no more) restores byte for byte."""
    store = Store.open(small_fs / "store", create=True)
    rec = GroundTruthRecorder()
    with Target.python(WRITER) as t, Engine(store) as engine:
        start_chain(engine, t)
        listed = [m.id for m in store.list_snapshots()]
        filler = fill(small_fs)
        os.truncate(filler, filler.stat().st_size - (2 << 20))  # 2 MiB free
        assert t.send("2048") == "ok"  # about 3.5 MiB of new random pages
        with pytest.raises(StoreFull, match="nothing was stored"):
            engine.snapshot(t.pid)
        assert [m.id for m in store.list_snapshots()] == listed
        assert tmp_leftovers(store) == []
        filler.unlink()
        after = engine.snapshot(t.pid, on_frozen=rec)
        assert after.seq == len(listed) + 1
        assert t.alive()
    assert_materializes_to(store, after.id, rec.last, tmp_path / "m")
    assert verify(store)[1] == []


def test_cli_snapshot_on_a_full_store_is_one_line_and_exit_74(small_fs: Path) -> None:
    store_dir = small_fs / "store"
    with Target.python(WRITER) as t:
        r = run_cli("snapshot", str(t.pid), "--store", str(store_dir))
        assert r.returncode == 0, r.stderr
        assert t.send("64") == "ok"
        filler = fill(small_fs)
        r = run_cli("snapshot", str(t.pid), "--store", str(store_dir))
        assert r.returncode == EXIT_STORE_FULL, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "out of space" in lines[0], r.stderr
        assert "Traceback" not in r.stderr
        filler.unlink()
        r = run_cli("list", "--store", str(store_dir), "--json")
        assert r.returncode == 0, r.stderr
        assert len(json.loads(r.stdout)) == 1  # the failed round left nothing listed
        assert t.alive()


def test_the_service_reports_a_full_store_by_its_own_code() -> None:
    exc = StoreFull("the store /x is out of space")
    assert error_code(exc) == "store-full"
    assert failure_reason(exc) == "store_full"
    assert status_line(2, None, 0.0, full_store_rounds=5).endswith(
        "STORE FULL, 5 round(s) failed")
    assert "STORE FULL" not in status_line(2, None, 0.0)


def test_out_of_space_is_recognised_for_quota_too() -> None:
    from ckptd.errors import is_out_of_space
    assert is_out_of_space(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert is_out_of_space(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)))
    assert not is_out_of_space(OSError(errno.EIO, os.strerror(errno.EIO)))
    assert not is_out_of_space(ValueError("x"))


def test_the_service_says_once_that_the_store_is_full_and_goes_on(tmp_path: Path) -> None:
    """A full store fails every round: the service logs the first failure and the
    recovery, not each round, counts them (metrics, STATUS), and its rounds store again
    once there is room."""
    from test_service_support import Daemon, wait_for
    from test_service_support import Target as ServiceTarget

    store_dir = tmp_path / "store"  # the daemon's store: a small filesystem of its own
    store_dir.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs",
                    str(store_dir)], check=True)
    d = Daemon(tmp_path).start()
    t = ServiceTarget(pages=256)
    try:
        def proc() -> dict[str, Any]:
            return next(p for p in d.call("list")["processes"] if p["pid"] == t.pid)

        d.call("register", pid=t.pid, policy={"interval": 0.2, "jitter": 0})
        wait_for(lambda: int(proc()["rounds"]) >= 2, "rounds before the store fills")
        filler = fill(store_dir)
        wait_for(lambda: int(proc()["failures"]) >= 5, "rounds failing")
        assert "out of space" in str(proc()["last_error"])
        assert "STORE FULL" in d.call("status")["status"]
        assert 'ckptd_snapshot_failures_total{reason="store_full"}' in \
            d.call("metrics")["text"]
        rounds = int(proc()["rounds"])
        filler.unlink()
        t.fill(5)
        wait_for(lambda: int(proc()["rounds"]) >= rounds + 2, "rounds once there is room")
        assert "STORE FULL" not in d.call("status")["status"]
        log = d.log()
        said = [line for line in log.splitlines() if "ERROR" in line and "out of space" in line]
        assert len(said) == 1, said
        assert "the store has room again" in log
        assert d.call("verify")["problems"] == []
    finally:
        t.kill()
        d.kill()
        subprocess.run(["umount", "-l", str(store_dir)], check=True)
