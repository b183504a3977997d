"""The command line and the store: clear errors, permissions, formats, budgets, verify."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

import pytest
from helpers import GroundTruthRecorder, Target, assert_materializes_to, needs_root, run_cli

from ckptd.engine import Engine
from ckptd.errors import StoreError, UserError
from ckptd.store import Store
from ckptd.store import reader as store_reader
from ckptd.store.format import INLINE_MAX_BYTES

SLEEPER = "import sys\nprint('ready', flush=True)\nsys.stdin.readline()\n"
NOBODY = 65534


def _one_line_error(r: object, code: int | None = None) -> str:
    stderr = r.stderr  # type: ignore[attr-defined]
    assert r.returncode != 0  # type: ignore[attr-defined]
    if code is not None:
        assert r.returncode == code, stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 or lines[0].startswith("usage:"), stderr
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
        # And a store it cannot write is explained too.
        r = run_cli("list", "--store", str(tmp_path), user=NOBODY)
        assert "no permission" in _one_line_error(r, 2)
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
    obj["format_version"] = 4
    p.write_text(json.dumps(obj))
    with pytest.raises(UserError, match="format version 4; this ckptd reads versions 1, 2, 3"):
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
