"""Shared test helpers: real target processes, ground truth read while frozen, and
byte-for-byte comparison of materialized snapshots."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from ckptd import cli  # imported here: a child that drops root may not read the stdlib
from ckptd.kernel import procfs
from ckptd.store import Store
from ckptd.store import reader as store_reader

TARGETS = Path(__file__).parent / "targets"
IS_ROOT = os.geteuid() == 0

needs_root = pytest.mark.skipif(
    not IS_ROOT, reason="needs root: ptrace, userfaultfd and pagemap of other processes"
)

GroundTruth = dict[tuple[int, int], bytes | None]

# A target with PAGE_WRITER_PAGES private anonymous pages, each first set to 1; on
# "w I J ..." it adds 1 to the first byte of pages I, J, ... and answers "ok".
PAGE_WRITER_PAGES = 64
PAGE_WRITER = f"""
import mmap, sys
m = mmap.mmap(-1, {PAGE_WRITER_PAGES} * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for p in range({PAGE_WRITER_PAGES}):
    m[p * 4096] = 1
print('ready', flush=True)
for line in sys.stdin:
    for p in line.split()[1:]:
        i = int(p) * 4096
        m[i] = (m[i] + 1) % 256
    print('ok', flush=True)
"""

# The start of a target program that maps memory through libc: `ctypes`, `sys` and a
# `libc` whose mmap, munmap, mprotect, mremap and sbrk take and return addresses.
LIBC_MM = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
for f in ("mmap", "mremap", "sbrk"):
    getattr(libc, f).restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                        ctypes.c_void_p]
libc.sbrk.argtypes = [ctypes.c_long]
"""


class Target:
    """A real child process speaking a line protocol on stdin/stdout."""

    def __init__(self, argv: Sequence[str], ready: str = "ready", **kw: object) -> None:
        self.proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            **kw,  # type: ignore[call-overload]
        )
        self.pid = self.proc.pid
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        if ready:
            line = self.readline()
            assert line.strip() == ready, f"target said {line!r}"

    @classmethod
    def python(cls, code: str, ready: str = "ready", **kw: object) -> Target:
        return cls([sys.executable, "-c", code], ready=ready, **kw)

    @classmethod
    def churn(cls, threads: int = 3, base_mib: int = 16, seed: int = 1) -> Target:
        return cls([sys.executable, str(TARGETS / "churn.py"), "--threads", str(threads),
                    "--base-mib", str(base_mib), "--seed", str(seed)])

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put("")

    def readline(self, timeout: float = 30.0) -> str:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"target {self.pid} said nothing for {timeout} s") from None

    def send(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.readline().strip()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def state(self) -> str:
        return procfs.process_state(self.pid)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def read_memory(pid: int, vmas: list[procfs.Mapping]) -> GroundTruth:
    """Every captured mapping's bytes, as the process sees them (call while frozen)."""
    out: GroundTruth = {}
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for m in vmas:
            if not m.private or m.special:
                continue
            try:
                data = os.pread(fd, m.size, m.start)
                out[(m.start, m.end)] = data if len(data) == m.size else None
            except OSError:
                out[(m.start, m.end)] = None  # e.g. a file mapping past EOF
    finally:
        os.close(fd)
    return out


class GroundTruthRecorder:
    """An Engine on_frozen hook that keeps the target's memory as of each snapshot."""

    def __init__(self) -> None:
        self.last: GroundTruth = {}

    def __call__(self, pid: int, vmas: list[procfs.Mapping]) -> None:
        self.last = read_memory(pid, vmas)


def assert_materializes_to(store: Store, snapshot_id: str, truth: GroundTruth,
                           out_dir: Path) -> int:
    """Materialize and compare every mapping byte for byte. Returns mappings compared."""
    index = store_reader.materialize(store, snapshot_id, out_dir)
    assert json.loads((out_dir / "index.json").read_text()) == index
    got_ranges = {(v["start"], v["end"]) for v in index["vmas"]}  # type: ignore[index, union-attr]
    assert got_ranges == set(truth), (
        f"{snapshot_id}: mappings differ: missing {sorted(set(truth) - got_ranges)[:3]} "
        f"extra {sorted(got_ranges - set(truth))[:3]}"
    )
    compared = 0
    for v in index["vmas"]:  # type: ignore[union-attr]
        data = (out_dir / v["file"]).read_bytes()
        assert len(data) == v["end"] - v["start"]
        want = truth[(v["start"], v["end"])]
        if want is None:
            continue
        if data != want:
            bad = [i for i in range(0, len(data), 4096) if data[i:i + 4096] != want[i:i + 4096]]
            raise AssertionError(
                f"{snapshot_id}: mapping {v['start']:#x}-{v['end']:#x} {v['perms']} "
                f"{v['path']}: {len(bad)} pages differ, first at {v['start'] + bad[0]:#x}"
            )
        compared += 1
    return compared


def run_cli(*args: str, env: dict[str, str] | None = None, user: int | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real `ckptd` command. With `user`, run ckptd's main() in a forked child that
    has dropped to that uid/gid first (the venv's interpreter may not be executable by
    other users)."""
    if user is not None:
        return _run_cli_as(user, list(args))
    return subprocess.run(
        [sys.executable, "-m", "ckptd", *args], capture_output=True, text=True,
        timeout=timeout, env={**os.environ, **(env or {})},
    )


def _run_cli_as(uid: int, args: list[str]) -> subprocess.CompletedProcess[str]:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - pytest replaced these
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            import logging

            logging.getLogger().handlers.clear()  # pytest's capture handlers
            code = cli.main(args)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        except BaseException:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
            os._exit(99)
    os.close(out_w)
    os.close(err_w)
    with os.fdopen(out_r) as fo, os.fdopen(err_r) as fe:
        stdout, stderr = fo.read(), fe.read()
    _, status = os.waitpid(child, 0)
    return subprocess.CompletedProcess(args, os.waitstatus_to_exitcode(status), stdout, stderr)


def wait_for(pred: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False
