"""The command line and the store: clear errors, permissions, formats, budgets, verify."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    GroundTruth,
    GroundTruthRecorder,
    Target,
    assert_materializes_to,
    needs_root,
    run_cli,
)

from ckptd.engine import Engine
from ckptd.errors import CorruptStore, PermissionDenied, StoreError, UnknownSnapshot, UserError
from ckptd.store import SnapshotMeta, Store, default_store_path, fsutil, parse_snapshot_id
from ckptd.store import reader as store_reader
from ckptd.store.compact import compact_chain
from ckptd.store.format import INLINE_MAX_BYTES
from ckptd.store.fsutil import Owner

SLEEPER = "import sys\nprint('ready', flush=True)\nsys.stdin.readline()\n"
NOBODY = 65534


def _one_line_error(r: object, code: int | None = None) -> str:
    stderr = r.stderr  # type: ignore[attr-defined]
    assert r.returncode != 0  # type: ignore[attr-defined]
    if code is not None:
        assert r.returncode == code, stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr
    # Exactly one line: also for argparse's mistakes (no usage block before it).
    assert len(stderr.splitlines()) == 1 and not stderr.startswith("usage:"), stderr
    return str(stderr)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["snapshot", "abc"], "is not a PID"),
        (["snapshot", "-5"], "PID"),
        (["snapshot", "999999999"], "no process with PID 999999999"),
        (["snapshot", "1", "--tracker", "magic"], "invalid choice"),
        (["watch", "1", "--interval", "0"], "must be greater than 0"),
        (["snapshot", "1", "--max-bytes", "lots"], "is not a size"),
        (["show", "not-an-id"], "is not a snapshot id"),
        (["show", "1-1-1"], "no snapshot '1-1-1'"),
        (["materialize", "1-1-1", "-o", "/tmp/x"], "no snapshot"),
    ],
)
def test_user_mistakes_get_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    Store.open(tmp_path / "s", create=True)
    r = run_cli(*args, "--store", str(tmp_path / "s"))
    err = _one_line_error(r, 2)
    assert message in err


def test_missing_store_is_explained(tmp_path: Path) -> None:
    r = run_cli("list", "--store", str(tmp_path / "nowhere"))
    assert "no store at" in _one_line_error(r, 2)
    r = run_cli("verify", env={"CKPTD_STORE": str(tmp_path / "nowhere")})
    assert "no store at" in _one_line_error(r, 2)


def test_help_teaches() -> None:
    r = run_cli("--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "materialize" in r.stdout
    for cmd in ("snapshot", "watch", "list", "show", "materialize", "verify"):
        r = run_cli(cmd, "--help")
        assert r.returncode == 0 and "--store" in r.stdout, cmd


@needs_root
def test_snapshot_list_show_materialize_verify_via_cli(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    with Target.python(SLEEPER) as t:
        r = run_cli("snapshot", str(t.pid), "--store", store)
        assert r.returncode == 0 and r.stderr == ""
        first = r.stdout.strip()
        assert first == f"{t.pid}-1-1"
        r = run_cli("snapshot", str(t.pid), "--store", store, "--json")
        snap = json.loads(r.stdout)
        for key in ("id", "pid", "parent", "kind", "pages", "bytes_stored", "freeze_ms",
                    "total_ms"):
            assert key in snap
        assert snap["kind"] == "delta" and snap["parent"] == first and snap["pid"] == t.pid
        r = run_cli("watch", str(t.pid), "--interval", "0.2", "--count", "2", "--store", store)
        assert r.returncode == 0 and len(r.stdout.splitlines()) == 3, r.stderr
    listing = json.loads(run_cli("list", "--store", store, "--json").stdout)
    assert [s["id"] for s in listing] == [f"{t.pid}-1-{i}" for i in (1, 2, 3, 4)]
    shown = json.loads(run_cli("show", first, "--store", store, "--json").stdout)
    assert shown["lineage"] == [first] and shown["page_map"] and shown["unsourced"] == []
    assert all(p["source"] in (first, "zero") for p in shown["page_map"])
    text = run_cli("show", snap["id"], "--store", store).stdout
    assert "page map" in text and f"restore needs: {first} -> {snap['id']}" in text
    out = tmp_path / "out"
    r = run_cli("materialize", first, "-o", str(out), "--store", store)
    assert r.returncode == 0 and r.stdout == "", r.stderr
    index = json.loads((out / "index.json").read_text())
    assert index["id"] == first and index["pid"] == t.pid
    for v in index["vmas"]:
        assert set(v) >= {"start", "end", "perms", "path", "file"}
        assert (out / v["file"]).stat().st_size == v["end"] - v["start"]
        if v["path"] and v["path"].startswith("/") and v["clean_file_pages"]["ranges"]:
            assert v["clean_file_pages"]["content"] == "filled"
    r = run_cli("materialize", first, "-o", str(out), "--store", store)
    assert "not empty" in _one_line_error(r, 2)
    assert run_cli("verify", "--store", store).returncode == 0


@needs_root
def test_store_is_private(engine: Engine, store: Store) -> None:
    with Target.python(SLEEPER) as t:
        meta = engine.snapshot(t.pid)
    for path in [store.root, *store.root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.is_dir():
            assert mode == 0o700, path
        else:
            assert mode == 0o600, path
    assert meta.data_file is not None


@needs_root
def test_non_root_user_cannot_snapshot_roots_process(tmp_path: Path) -> None:
    # Under /tmp (world-traversable), owned by nobody: only the ptrace check can refuse.
    home = Path(tempfile.mkdtemp(prefix="ckptd-nobody-"))
    try:
        os.chown(home, NOBODY, NOBODY)
        with Target.python(SLEEPER) as t:
            r = run_cli("snapshot", str(t.pid), "--store", str(home / "s"), user=NOBODY)
            err = _one_line_error(r, 13)
            assert "no permission to trace" in err
            assert t.alive()
        # And a store it cannot write is explained too, with README's 13 for no permission.
        r = run_cli("list", "--store", str(tmp_path), user=NOBODY)
        assert "no permission" in _one_line_error(r, 13)
    finally:
        shutil.rmtree(home)


@needs_root
def test_verify_catches_corruption_and_missing_parents(engine: Engine, store: Store) -> None:
    with Target.python(SLEEPER) as t:
        base = engine.snapshot(t.pid)
        delta = engine.snapshot(t.pid)
    assert store_reader.verify(store) == (2, [])
    path = store.data_path(base)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    count, problems = store_reader.verify(store)
    assert count == 2 and problems and base.id in problems[0]
    r = run_cli("verify", "--store", str(store.root))
    assert r.returncode == 1 and base.id in r.stderr
    store.snapshot_path(base.id).unlink()
    _, problems = store_reader.verify(store)
    assert any(f"{delta.id}: parent {base.id} is missing" in p for p in problems)


def test_unknown_format_version_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "s"
    Store.open(root, create=True)
    info = json.loads((root / "STORE.json").read_text())
    info["version"] = 99
    (root / "STORE.json").write_text(json.dumps(info))
    with pytest.raises(StoreError, match="format version 99"):
        Store.open(root)
    r = run_cli("list", "--store", str(root))
    assert "version 99" in _one_line_error(r, 2)


@needs_root
def test_snapshot_metadata_with_unknown_version_is_refused(engine: Engine,
                                                           store: Store) -> None:
    with Target.python(SLEEPER) as t:
        meta = engine.snapshot(t.pid)
    p = store.snapshot_path(meta.id)
    obj = json.loads(p.read_text())
    obj["format_version"] = 5
    p.write_text(json.dumps(obj))
    with pytest.raises(UserError, match="format version 5; this ckptd reads versions 1, 2, 3, 4"):
        store.get(meta.id)


# Writes N pages per request, through raw fds: the interpreter's own writes stay few, so
# a small request makes a delta of a few dozen pages.
WRITER = """
import mmap, os
m = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, 64 << 20, 4096): m[i:i + 8] = i.to_bytes(8, 'little')
print('ready', flush=True)
while True:
    n = int(os.read(0, 64))
    for i in range(0, n * 4096, 4096): m[i + 100:i + 116] = os.urandom(16)
    os.write(1, b'ok\\n')
"""


@needs_root
def test_small_delta_lives_in_its_metadata(engine: Engine, store: Store, tmp_path: Path
                                           ) -> None:
    """A delta whose compressed data fits INLINE_MAX_BYTES has no data file; a large
    snapshot still has one; both restore byte for byte, and verify checks the inline
    data."""
    rec = GroundTruthRecorder()
    with Target.python(WRITER) as t:
        base = engine.snapshot(t.pid)
        assert t.send("3") == "ok"
        delta = engine.snapshot(t.pid, on_frozen=rec)
        truth = rec.last
        assert t.send("4000") == "ok"  # 16 random bytes in each of 4000 pages
        big = engine.snapshot(t.pid)
    assert base.data_file is not None and base.data_inline is None
    assert delta.data_file is None and delta.data_inline is not None
    assert delta.counts.pages_stored >= 3
    assert 0 < delta.data_bytes <= INLINE_MAX_BYTES
    assert big.data_file is not None and big.data_inline is None
    assert big.data_bytes > INLINE_MAX_BYTES
    assert sorted(p.name for p in (store.chain_dir(delta.chain) / "data").iterdir()) \
        == sorted([base.data_file, big.data_file])
    assert store.get(delta.id) == delta
    assert_materializes_to(store, delta.id, truth, tmp_path / "m")
    assert store_reader.verify(store) == (3, [])
    # A damaged byte inside the inline data is found by verify.
    p = store.snapshot_path(delta.id)
    obj = json.loads(p.read_text())
    raw = bytearray(base64.b64decode(obj["data_inline"]))
    raw[len(raw) // 2] ^= 0xFF
    obj["data_inline"] = base64.b64encode(bytes(raw)).decode()
    p.write_text(json.dumps(obj))
    _, problems = store_reader.verify(store)
    assert len(problems) == 1 and delta.id in problems[0]
    obj["data_inline"] = "not base64!"
    p.write_text(json.dumps(obj))
    _, problems = store_reader.verify(store)
    assert len(problems) == 1 and "not base64" in problems[0]


@needs_root
def test_version_1_snapshots_still_restore(engine: Engine, store: Store, tmp_path: Path
                                           ) -> None:
    """Version 1 files (no data_inline: every delta's data in a data file) are read the
    same as before."""
    rec = GroundTruthRecorder()
    with Target.python(WRITER) as t:
        base = engine.snapshot(t.pid)
        assert t.send("5") == "ok"
        delta = engine.snapshot(t.pid, on_frozen=rec)
        truth = rec.last
    assert delta.data_inline is not None
    # Rewrite both files as version 1 would have written them.
    data_name = f"{delta.id}.v1.zst"
    (store.chain_dir(delta.chain) / "data" / data_name).write_bytes(
        base64.b64decode(delta.data_inline))
    for meta, update in ((base, {}), (delta, {"data_file": data_name})):
        p = store.snapshot_path(meta.id)
        obj = json.loads(p.read_text())
        obj.pop("data_inline")
        obj.update(format_version=1, **update)
        p.write_text(json.dumps(obj))
    got = store.get(delta.id)
    assert got.format_version == 1 and got.data_file == data_name and got.data_inline is None
    assert store_reader.verify(store) == (2, [])
    assert_materializes_to(store, delta.id, truth, tmp_path / "m")


@needs_root
def test_page_budget_truncates_and_the_rest_comes_next_round(engine: Engine, store: Store,
                                                            tmp_path: Path) -> None:
    code = """
import mmap, sys
m = mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
print('ready', flush=True)
for line in sys.stdin:
    for i in range(0, 16 << 20, 8192): m[i] = (m[i] + 1) % 250 + 1
    print('ok', flush=True)
"""
    rec = GroundTruthRecorder()
    with Target.python(code) as t:
        engine.snapshot(t.pid)
        assert t.send("write 2048 pages") == "ok"
        budget = 300
        rounds = []
        while True:
            meta = engine.snapshot(t.pid, max_pages=budget, on_frozen=rec)
            rounds.append(meta)
            assert meta.counts.pages_dirty <= budget
            if not meta.truncated:
                break
            assert len(rounds) < 20
    assert all(m.truncated for m in rounds[:-1]) and not rounds[-1].truncated
    # Every written page was captured in some round, none twice, and none lost.
    assert sum(m.counts.pages_dirty for m in rounds) >= 2048
    assert_materializes_to(store, rounds[-1].id, rec.last, tmp_path / "m")
    assert store_reader.verify(store)[1] == []


@needs_root
def test_two_processes_get_separate_chains(engine: Engine, store: Store) -> None:
    with Target.python(SLEEPER) as a, Target.python(SLEEPER) as b:
        ma = engine.snapshot(a.pid)
        mb = engine.snapshot(b.pid)
        assert ma.chain != mb.chain
        assert engine.snapshot(a.pid).parent == ma.id
    assert {c for c in store.chain_ids()} == {ma.chain, mb.chain}


def test_engine_rejects_bad_arguments(engine: Engine) -> None:
    with pytest.raises(UserError, match="unknown tracker"):
        engine.snapshot(1, tracker="nope")
    with pytest.raises(UserError, match="itself"):
        engine.snapshot(os.getpid())
    with pytest.raises(UserError, match="budget"):
        engine.snapshot(1, max_pages=-1)


@needs_root
def test_kernel_thread_is_refused(engine: Engine) -> None:
    kthreadd = 2
    assert Path(f"/proc/{kthreadd}").exists()
    with pytest.raises(UserError, match="kernel thread"):
        engine.snapshot(kthreadd)
    _ = time


@needs_root
def test_data_left_by_a_crash_before_publish_is_cleaned(store: Store) -> None:
    """A writer that died after renaming its data into place but before publishing the
    metadata leaves an unreferenced data file; the next writer on the chain removes it
    and nothing listed is affected."""
    with Target.python(SLEEPER) as t:
        with Engine(store) as eng:
            meta = eng.snapshot(t.pid)
        data_dir = store.chain_dir(meta.chain) / "data"
        orphan = data_dir / f"{meta.chain}-2.deadbeef.zst"
        orphan.write_bytes(store.data_path(meta).read_bytes())
        with Engine(store) as eng:
            nxt = eng.snapshot(t.pid)
    assert not orphan.exists()
    assert {m.id for m in store.list_snapshots()} == {meta.id, nxt.id}
    assert store_reader.verify(store) == (2, [])


# Pid 1 of a new PID namespace (`unshare --pid --fork`): starts the writer (argv[3])
# with the pid argv[2] in this namespace, a pid no process has in the test's.
NAMESPACE_INIT = """
import subprocess, sys
with open("/proc/sys/kernel/ns_last_pid", "w") as f:
    f.write(str(int(sys.argv[2]) - 1))
sys.exit(subprocess.run([sys.executable, "-c", sys.argv[3], sys.argv[1]]).returncode)
"""
# A writer in the middle of a round: its data is in tmp/, written through the real
# SnapshotWriter; it prints its pid as it sees it and as the test's namespace does (this
# /proc was mounted there), and waits.
HALF_WRITTEN = """
import os, sys, zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from ckptd.store import Store
from ckptd.store.writer import SnapshotWriter
store = Store.open(Path(sys.argv[1]))
frame = os.urandom(1 << 17)  # more than goes inline: a data file in tmp/
w = SnapshotWriter(store, "1-1", "1-1-1", ThreadPoolExecutor(1))
w.append_frame([(1 << 20, 32)], frame, zlib.crc32(frame))
print("ready", os.getpid(), os.readlink("/proc/self"), flush=True)
sys.stdin.readline()
"""


def _pid_nobody_has() -> int:
    top = int(Path("/proc/sys/kernel/pid_max").read_text()) - 1
    return next(p for p in range(top, 300, -1) if not os.path.exists(f"/proc/{p}"))


@needs_root
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_tmp_of_a_writer_in_another_pid_namespace_stays_until_it_dies(store: Store) -> None:
    """A ckptd in a container and one on the host share a store: each sees the other's
    pid as something else. A writer's temporary file stays while the writer lives,
    whatever its pid means here, and goes with its lock file once it is killed."""
    ns_pid = _pid_nobody_has()
    with Target(["unshare", "--pid", "--fork", sys.executable, "-c", NAMESPACE_INIT,
                 str(store.root), str(ns_pid), HALF_WRITTEN], ready="") as t:
        word, seen_as, host_pid = t.readline().split()
        assert word == "ready" and int(seen_as) == ns_pid and int(host_pid) != ns_pid
        assert not os.path.exists(f"/proc/{ns_pid}")  # here, that pid is nobody's
        written = sorted(os.listdir(store.tmp_dir))
        assert [n for n in written if n.endswith(".zst")], written
        Engine(store).close()  # an engine start cleans tmp/
        store.clean_tmp()
        assert sorted(os.listdir(store.tmp_dir)) == written
        os.kill(int(host_pid), signal.SIGKILL)
        assert t.proc.wait(30) != 0
    assert sorted(store.clean_tmp()) == written
    assert os.listdir(store.tmp_dir) == []


def test_tmp_files_of_older_releases_follow_the_pid_rule(store: Store) -> None:
    """Files named after their writer's pid (ckptd before owner locks) stay while that
    pid runs and go once it does not; an owner's file whose lock file is gone, and a
    lock file nobody holds, go with it; names ckptd never writes, and directories, stay."""
    done = subprocess.Popen(["true"])  # its pid: one that has just ended
    done.wait()
    tmp = store.tmp_dir
    live_old = f"{os.getpid()}.1-1-1.0123abcd.zst"
    dead_old = f"{done.pid}.1-1-2.0123abcd.zst"
    ownerless = "00112233445566ff.1-1-3.0123abcd.zst"
    unlocked_lock = "owner.8899aabbccddeeff.lock"
    unlocked_file = "8899aabbccddeeff.1-1-4.0123abcd.zst"
    foreign = ["notes.txt", "owner.xyz.lock", "ABCDEF0123456789.x.zst"]
    for name in [live_old, dead_old, ownerless, unlocked_lock, unlocked_file, *foreign]:
        (tmp / name).write_bytes(b"x")
    (tmp / "5.a-directory").mkdir()
    assert not os.path.exists(f"/proc/{done.pid}")
    assert sorted(store.clean_tmp()) == sorted([dead_old, ownerless, unlocked_lock,
                                                unlocked_file])
    assert sorted(os.listdir(tmp)) == sorted([live_old, "5.a-directory", *foreign])


def test_an_owner_whose_lock_file_was_removed_owns_anew(store: Store) -> None:
    """A lock file removed behind its owner's back (by hand, or by an older ckptd's
    cleanup) protects nothing: the owner's next file gets a new token and lock file.
    A cleanup in the owner's own process keeps the owner's files."""
    first = Path(store.tmp_file("1-1-1.00000000.zst"))
    first.write_bytes(b"x")
    token = first.name.split(".")[0]
    lock = store.tmp_dir / f"owner.{token}.lock"
    assert store.tmp_file("1-1-2.00000000.zst") == f"{store.tmp_dir}/{token}.1-1-2.00000000.zst"
    assert store.clean_tmp() == [] and first.exists() and lock.exists()
    lock.unlink()
    second = Path(store.tmp_file("1-1-3.00000000.zst"))
    second.write_bytes(b"x")
    new_token = second.name.split(".")[0]
    assert new_token != token and (store.tmp_dir / f"owner.{new_token}.lock").exists()
    assert store.clean_tmp() == [first.name]  # the file nobody owns any more
    store.close()
    assert store.clean_tmp() == [second.name]
    assert os.listdir(store.tmp_dir) == []


@needs_root
def test_one_owner_lock_per_store_not_per_round(engine: Engine, store: Store) -> None:
    """The owner lock is taken by the first round with a data file and kept: rounds
    after it add no lock file, no flock, no descriptor; closing the engine gives it up.
    A round whose data goes inline never takes it."""
    def locks() -> list[str]:
        return [n for n in os.listdir(store.tmp_dir) if n.startswith("owner.")]

    def fds_on(name: str) -> int:
        target, n = str(store.tmp_dir / name), 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # the fd of the listing itself
                n += os.readlink(f"/proc/self/fd/{fd}") == target
        return n

    with Target.python(WRITER) as t:
        assert engine.snapshot(t.pid).data_file is not None  # the full base
        assert len(locks()) == 1
        store.close()  # gives it up; the engine goes on with the store as before
        assert locks() == []
        assert t.send("3") == "ok"
        assert engine.snapshot(t.pid).data_file is None
        assert locks() == []  # its data went inline: tmp/ untouched, no owner taken
        seen = set()
        for _ in range(3):
            assert t.send("4000") == "ok"
            assert engine.snapshot(t.pid).data_file is not None
            seen.add(tuple(locks()))
    assert len(seen) == 1 and len(lock := next(iter(seen))) == 1, seen
    assert fds_on(lock[0]) == 1
    assert [n for n in os.listdir(store.tmp_dir) if not n.startswith("owner.")] == []
    engine.close()
    assert os.listdir(store.tmp_dir) == []


def test_metadata_with_kept_vma_json_is_the_same_document() -> None:
    """snapshot_json with the mappings' JSON kept from an earlier round writes the same
    document as a plain dump (only the key order differs), and it parses back equal."""
    from ckptd.store.format import SnapshotMeta, snapshot_json, vmas_json

    meta = SnapshotMeta.model_validate({
        "id": "41-1-7", "chain": "41-1", "seq": 7, "parent": "41-1-6", "kind": "delta",
        "pid": 41, "created": 1.5, "tracker": "uffd-wp", "consistency": "frozen",
        "vmas": [
            {"start": 4096, "end": 16384, "perms": "rw-p", "offset": 0, "dev": "00:00",
             "inode": 0, "path": None, "capture": "private"},
            {"start": 1 << 47, "end": (1 << 47) + 4096, "perms": "r--p", "offset": 8192,
             "dev": "fe:00", "inode": 12, "path": "/lib/x \"q\" (deleted)",
             "capture": "private"},
        ],
        "present": [[4096, 8192]], "data_file": None, "data_inline": "AAAA",
        "data_bytes": 3, "frames": [{"offset": 0, "length": 3, "pages": 1, "crc32": 5}],
        "extents": [{"addr": 4096, "pages": 1, "frame": 0, "skip": 0}], "zeros": [],
        "counts": {"pages_read": 1}, "timings": {"total_ms": 0.5},
    })
    kept = vmas_json(meta.vmas)
    spliced = snapshot_json(meta, kept)
    assert json.loads(spliced) == json.loads(snapshot_json(meta))
    assert SnapshotMeta.model_validate_json(spliced) == meta
    assert json.loads(spliced)["vmas"][1]["path"] == "/lib/x \"q\" (deleted)"


# --- names from outside, and what the store's files may say --------------------------


def test_ids_and_chain_names_are_checked_before_any_path(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s", create=True)
    # A chain a user could plant outside the store, that a lax check would reach.
    outside = tmp_path / "y-1"
    outside.mkdir()
    (outside / "CHAIN.json").write_text("{}")
    for bad in ("../../../../tmp/x-1-5", "1-1-1/../../2-1-1", "1-1-1\n", "\u0661-1-1",
                "1-1-" + "1" * 21, "1-1", "a-1-1", "", " 1-1-1"):
        with pytest.raises(UnknownSnapshot, match="is not a snapshot id"):
            parse_snapshot_id(bad)
        with pytest.raises(UnknownSnapshot, match="is not a snapshot id"):
            store.get(bad)
        with pytest.raises(UnknownSnapshot, match="is not a snapshot id"):
            store.lineage(bad)
    assert parse_snapshot_id("12-3-40") == ("12-3", 40)
    traversal = os.path.relpath(outside, store.chains_dir)
    assert traversal.endswith("/y-1")
    for bad in (traversal, "../y-1", "1-1/..", "1", "1-1-1", ".", "", "1-1\n"):
        for use in (store.chain_info, store.floor, store.listing, store.snapshot_files,
                    store.chain_dir, store.chain_exists, store.latest,
                    store.chain_snapshots, lambda c: store.lock_chain(c).__enter__()):
            with pytest.raises(UnknownSnapshot, match="is not a chain name"):
                use(bad)
    with pytest.raises(UnknownSnapshot):
        compact_chain(store, traversal, f"{traversal}-1")
    assert sorted(os.listdir(outside)) == ["CHAIN.json"]  # no compact.lock, no lock
    # Only what is named like a chain is one.
    junk = store.chains_dir / "junk"
    junk.mkdir()
    (junk / "CHAIN.json").write_text("{}")
    assert store.chain_ids() == [] and store.list_snapshots() == []


def _forge(store: Store, snapshot_id: str, as_id: str | None = None, **fields: object
           ) -> Path:
    """Write snapshot_id's metadata, changed by `fields`, as the file of `as_id`."""
    doc = json.loads(store.snapshot_path(snapshot_id).read_bytes())
    doc.update(fields)
    path = store.snapshot_path(as_id or snapshot_id)
    path.write_text(json.dumps(doc))
    return path


@needs_root
def test_a_snapshot_file_must_be_the_snapshot_it_names(engine: Engine, store: Store) -> None:
    with Target.python(SLEEPER) as a, Target.python(SLEEPER) as b:
        a1, a2 = engine.snapshot(a.pid), engine.snapshot(a.pid)
        b1, b2 = engine.snapshot(b.pid), engine.snapshot(b.pid)
    assert a2.parent == a1.id and b2.parent == b1.id
    # A file copied under another name of the chain is not that snapshot.
    fake = f"{a1.chain}-{a2.seq + 5}"
    path = _forge(store, a2.id, fake)
    for read in (store.get, store.head, store.pages, store.lineage):
        with pytest.raises(CorruptStore, match=f"describes snapshot '{a2.id}'"):
            read(fake)
    with pytest.raises(CorruptStore):
        store.chain_snapshots(a1.chain)
    path.unlink()
    # A delta whose parent is in another chain (another process's memory), or not
    # earlier in its own, or not an id at all: the walk refuses it as damage.
    for parent, why in ((a1.id, f"not an earlier snapshot of chain {b1.chain}"),
                        (b2.id, "not an earlier snapshot"),
                        ("../../../../tmp/x-1-1", "which is not a snapshot id")):
        _forge(store, b2.id, parent=parent)
        with pytest.raises(CorruptStore, match=why):
            store.lineage(b2.id)
        with pytest.raises(CorruptStore, match=why):
            store.fold_lineage(b2.id)
        with pytest.raises(CorruptStore):
            store_reader.materialize(store, b2.id, Path(tempfile.mkdtemp()) / "out")
        assert any(b2.id in p for p in store_reader.verify(store)[1])
    _forge(store, b2.id, parent=b1.id)
    assert [m.id for m in store.lineage(b2.id)] == [b1.id, b2.id]
    assert store_reader.verify(store) == (4, [])


def _churned_chain(store: Store, n: int) -> tuple[str, list[str], dict[str, GroundTruth]]:
    rec = GroundTruthRecorder()
    truths: dict[str, GroundTruth] = {}
    with Target.churn(threads=2, base_mib=8, seed=5) as t, Engine(store) as eng:
        for _ in range(n):
            time.sleep(0.03)
            meta = eng.snapshot(t.pid, on_frozen=rec)
            truths[meta.id] = rec.last
    return meta.chain, list(truths), truths


class _RacedStore(Store):
    """A store whose reader meets a real compaction of the chain (by another Store, as
    the service's background job) at the worst moment: right after `method` returns."""

    method = ""
    race: Callable[[], object] | None = None

    def _after(self, name: str) -> None:
        if self.method == name and self.race is not None:
            race, self.race = self.race, None
            race()

    def listing(self, chain: str) -> tuple[int, list[str]]:
        out = super().listing(chain)
        self._after("listing")
        return out

    def get(self, snapshot_id: str, floor: int | None = None) -> SnapshotMeta:
        out = super().get(snapshot_id, floor)
        self._after("get")
        return out

    def lineage(self, snapshot_id: str) -> list[SnapshotMeta]:
        out = super().lineage(snapshot_id)
        self._after("lineage")
        return out


@needs_root
def test_readers_survive_a_compaction_meanwhile(store: Store, tmp_path: Path) -> None:
    chain, ids, truths = _churned_chain(store, 8)
    raced = _RacedStore.open(store.root)
    assert isinstance(raced, _RacedStore)

    def compact(upto: str) -> Callable[[], object]:
        return lambda: compact_chain(Store.open(store.root), chain, upto)

    # Listed, then retired before being read: left out, not an error.
    raced.method, raced.race = "listing", compact(ids[2])
    assert [m.id for m in raced.chain_snapshots(chain)] == ids[2:]
    raced.method, raced.race = "listing", compact(ids[4])
    assert [m.id for m in raced.list_snapshots()] == ids[4:]
    # The snapshot read, then its parents retired (it became a full base): walked again.
    raced.method, raced.race = "get", compact(ids[5])
    assert [m.id for m in raced.lineage(ids[6])] == ids[5:7]
    # The lineage read, then its data files removed: read again, same bytes.
    raced.method, raced.race = "lineage", compact(ids[7])
    assert_materializes_to(raced, ids[7], truths[ids[7]], tmp_path / "out")
    assert raced.race is None  # each race did run
    # A listed snapshot at or above the floor that vanishes is damage, not a race.
    listed = raced.snapshot_path(ids[7])
    raced.method, raced.race = "listing", listed.unlink
    with pytest.raises(CorruptStore, match="vanished while being listed"):
        raced.chain_snapshots(chain)


# --- opening the store ------------------------------------------------------------------


def test_store_in_the_way_of_a_file(tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("not a store")
    for root in (afile, afile / "store"):
        with pytest.raises(StoreError, match="is in the way") as ei:
            Store.open(root, create=True)
        assert ei.value.exit_code == 2 and "\n" not in str(ei.value)
    with pytest.raises(StoreError, match="not a ckptd store"):
        Store.open(afile)


@needs_root
def test_no_permission_for_the_store_is_a_permission_error() -> None:
    from test_service_support import as_user

    private = Path(tempfile.mkdtemp(prefix="ckptd-private-"))  # 0700, root's
    try:
        Store.open(private / "store", create=True)

        def open_it() -> dict[str, object]:
            try:
                Store.open(private / "store")
            except PermissionDenied as e:
                return {"store_error": isinstance(e, StoreError), "code": e.exit_code,
                        "message": str(e)}
            return {}

        got = as_user(NOBODY, NOBODY, open_it)["ok"]
        assert got["store_error"] and got["code"] == 13
        assert "no permission to use the store" in got["message"]
    finally:
        shutil.rmtree(private)


@needs_root
def test_roots_default_store_is_the_services(monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptd.service.config import DEFAULT_STORE, ServiceConfig

    monkeypatch.delenv("CKPTD_STORE", raising=False)
    assert default_store_path() == Path("/var/lib/ckptd/store")
    assert default_store_path() == DEFAULT_STORE == ServiceConfig().service.store


# --- paths a non-root user names --------------------------------------------------------


def _acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


@needs_root
def test_paths_are_walked_with_the_users_permissions() -> None:
    nobody = Owner(NOBODY, NOBODY)
    base = Path(tempfile.mkdtemp(prefix="ckptd-walk-"))
    try:
        os.chmod(base, 0o755)
        private, pub = base / "private", base / "pub"
        private.mkdir(mode=0o700)
        pub.mkdir(mode=0o755)
        for d, text in ((private, b"secret"), (pub, b"public")):
            (d / "f").write_bytes(text)
            os.chmod(d / "f", 0o644)
        (base / "link").symlink_to(private)  # root would follow it into private/
        (base / "rel").symlink_to("pub")
        (base / "loop").symlink_to("loop")
        (pub / "flink").symlink_to(pub / "f")

        def read(path: Path) -> bytes:
            fd, _ = fsutil.open_as(str(path), nobody)
            with os.fdopen(fd, "rb") as f:
                return f.read()

        assert read(pub / "f") == b"public"
        assert read(base / "rel" / "f") == b"public"
        assert read(base / "pub" / ".." / "rel" / "." / "f") == b"public"
        for denied in (private / "f", base / "link" / "f"):
            with pytest.raises(PermissionError):
                read(denied)
        with pytest.raises(OSError, match="Too many levels of symbolic links"):
            read(base / "loop" / "f")
        for not_regular in (pub / "flink", pub):  # the last component is never followed
            with pytest.raises(OSError, match="not a regular file"):
                read(not_regular)
        with pytest.raises(FileNotFoundError):
            read(base / "nothing" / "f")
        with pytest.raises(OSError, match="File name too long"):  # (Path drops "/.")
            fsutil.open_as(str(pub) + "/." * 2100 + "/f", nobody)
        parent, name, where = fsutil.resolve_parent(str(base / "rel" / "new"), nobody)
        os.close(parent)
        assert (name, where) == ("new", str(pub))
        # POSIX ACLs decide as the kernel does: a named entry opens private/ to nobody,
        # another shuts pub/ to it although "other" may search it.
        os.setxattr(private, "system.posix_acl_access",
                    _acl((1, 7, 0), (2, 5, NOBODY), (4, 0, 0), (0x10, 5, 0), (0x20, 0, 0)))
        assert read(private / "f") == b"secret"
        os.setxattr(pub, "system.posix_acl_access",
                    _acl((1, 7, 0), (2, 0, NOBODY), (4, 5, 0), (0x10, 5, 0), (0x20, 5, 0)))
        with pytest.raises(PermissionError):
            read(pub / "f")
    finally:
        shutil.rmtree(base)


@needs_root
def test_materialize_output_directory(engine: Engine, store: Store, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with Target.python(SLEEPER) as t:
        sid = engine.snapshot(t.pid).id
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(UserError, match="exists and is not a directory"):
        store_reader.materialize(store, sid, afile)
    with pytest.raises(UserError, match="not a directory"):
        store_reader.materialize(store, sid, afile / "sub")
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    (tmp_path / "link").symlink_to(empty)
    with pytest.raises(UserError, match="is a symbolic link"):
        store_reader.materialize(store, sid, tmp_path / "link")
    full = tmp_path / "full"
    full.mkdir(mode=0o755)
    (full / "keep").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        store_reader.materialize(store, sid, full)
    assert stat.S_IMODE(empty.stat().st_mode) == stat.S_IMODE(full.stat().st_mode) == 0o755
    assert os.listdir(empty) == [] and os.listdir(full) == ["keep"]
    monkeypatch.chdir(tmp_path)  # the command line passes relative paths
    index = store_reader.materialize(store, sid, Path("rel/out"))
    assert (tmp_path / "rel" / "out" / "index.json").exists() and index["id"] == sid
    assert stat.S_IMODE((tmp_path / "rel" / "out").stat().st_mode) == 0o700
    index = store_reader.materialize(store, sid, empty)
    assert sorted(os.listdir(empty)) == sorted(
        ["index.json", *(v["file"] for v in index["vmas"])])


def test_a_new_store_and_the_service_directory_are_durable_in_their_parents(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every snapshot is fsynced with its directory, but that keeps nothing if the
    store's own directory entry is lost in a power loss: creating a store (and its
    missing parents) fsyncs the parent of each directory it creates, and so does the
    service for service/, where registrations.json lives."""
    from ckptd.service import daemon

    synced: list[str] = []
    real = fsutil.fsync_dir

    def record(path: Path | str) -> None:
        synced.append(os.fspath(path))
        real(path)

    monkeypatch.setattr(fsutil, "fsync_dir", record)
    root = tmp_path / "a" / "store"
    Store.open(root, create=True)
    assert {str(tmp_path), str(tmp_path / "a")} <= set(synced)
    synced.clear()
    daemon._private_dir(root / "service")
    assert str(root) in synced
