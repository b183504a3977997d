"""Shared helpers for the service tests: a real `ckptd serve` subprocess with a temporary
store and socket, real target processes, and raw socket clients. (No tests here.)"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ckptd.kernel import procfs
from ckptd.service.client import Client

PYTHON = sys.executable
ROOT = os.geteuid() == 0
NOT_ROOT_REASON = "needs root: ptrace and userfaultfd on other processes"

# A target: a private anonymous mapping whose content the test controls over stdin.
#   "fill SEED FIRST COUNT" writes pattern(SEED, page) to pages FIRST..FIRST+COUNT-1
#   "rand FIRST COUNT"     writes random bytes there (incompressible)
#   "tick"                  starts a thread that writes one page every 50 ms
# Each command answers "ok". On start it prints "ADDR PAGES".
TARGET = textwrap.dedent(r'''
    import ctypes, mmap, os, sys, threading, time
    pages = int(sys.argv[1])
    if len(sys.argv) > 2:
        uid = int(sys.argv[2])
        os.setgroups([]); os.setgid(uid); os.setuid(uid)
        ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: setuid cleared it
    m = mmap.mmap(-1, pages * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    print(addr, pages, flush=True)
    def pattern(seed, page):
        return (b"%08d:%08d:" % (seed, page)) * 227 + bytes(4096 - 18 * 227)
    def tick():
        i = 0
        while True:
            m[(i % pages) * 4096] = (i % 251) + 1
            i += 1
            time.sleep(0.05)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "fill":
            seed, first, count = map(int, cmd[1:])
            for p in range(first, first + count):
                m[p * 4096:(p + 1) * 4096] = pattern(seed, p)
        elif cmd[0] == "rand":
            first, count = map(int, cmd[1:])
            step = 4096 * 4096
            for off in range(first * 4096, (first + count) * 4096, step):
                end = min(off + step, (first + count) * 4096)
                m[off:end] = os.urandom(end - off)
        elif cmd[0] == "tick":
            threading.Thread(target=tick, daemon=True).start()
        print("ok", flush=True)
''')


def pattern(seed: int, page: int) -> bytes:
    return (b"%08d:%08d:" % (seed, page)) * 227 + bytes(4096 - 18 * 227)


class Target:
    def __init__(self, pages: int, uid: int | None = None) -> None:
        args = [PYTHON, "-c", TARGET, str(pages)]
        if uid is not None:
            args.append(str(uid))
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        assert self.proc.stdout is not None
        addr, n = self.proc.stdout.readline().split()
        self.addr = int(addr)
        self.pages = int(n)
        self.pid = self.proc.pid

    def cmd(self, text: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def fill(self, seed: int, first: int = 0, count: int | None = None) -> None:
        self.cmd(f"fill {seed} {first} {self.pages - first if count is None else count}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def state(self) -> dict[str, str]:
        return procfs.read_status(self.pid)


@contextlib.contextmanager
def targets(n: int, pages: int, uid: int | None = None) -> Iterator[list[Target]]:
    ts: list[Target] = []
    try:
        for _ in range(n):
            ts.append(Target(pages, uid))
        yield ts
    finally:
        for t in ts:
            t.kill()


def write_config(path: Path, store: Path, sock: Path, extra: str = "",
                 interval: str = "1h", log_level: str = "debug") -> Path:
    path.write_text(textwrap.dedent(f'''
        [service]
        store = "{store}"
        socket = "{sock}"
        log_level = "{log_level}"
        {extra}
        [defaults]
        interval = "{interval}"
    '''))
    return path


class Daemon:
    """A real `python -m ckptd serve` process."""

    def __init__(self, tmp: Path, config_extra: str = "", interval: str = "1h",
                 env: dict[str, str] | None = None, config_text: str | None = None,
                 log_level: str = "debug", nofile: tuple[int, int] | None = None) -> None:
        self.tmp = tmp
        self.nofile = nofile  # RLIMIT_NOFILE (soft, hard) to start the daemon with
        self.store = tmp / "store"
        self.socket = tmp / "run" / "ckptd.sock"
        self.config = tmp / "ckptd.toml"
        if config_text is not None:
            self.config.write_text(config_text)
        else:
            write_config(self.config, self.store, self.socket, config_extra, interval,
                         log_level)
        self.log_path = tmp / f"daemon-{int(time.monotonic() * 1e6)}.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> Daemon:
        self.log_path = self.tmp / f"daemon-{int(time.monotonic() * 1e6)}.log"
        self.log_file = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "ckptd", "serve", "--config", str(self.config)],
            stdout=self.log_file, stderr=subprocess.STDOUT, env=self.env,
            cwd=str(Path(__file__).resolve().parent.parent),
            preexec_fn=None if self.nofile is None else self._limit_files,
        )
        if wait:
            self.wait_ready()
        return self

    def _limit_files(self) -> None:
        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, self.nofile)

    def wait_ready(self, bound: float = 60.0) -> None:
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            try:
                with Client(self.socket) as c:
                    c.call("ping")
                return
            except Exception:
                time.sleep(0.05)
        raise AssertionError(f"daemon not ready:\n{self.log()}")

    def client(self) -> Client:
        return Client(self.socket)

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        with self.client() as c:
            return c.call(op, **fields)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, bound: float = 120.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(bound)
        self.log_file.close()
        return rc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(Exception):
            self.log_file.close()


def wait_for(pred: Callable[[], Any], what: str, bound: float = 60.0,
             step: float = 0.05) -> Any:
    """Poll until pred() is truthy; the bound only prevents a hang (not a timing check)."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"gave up waiting for: {what}")


def raw_exchange(sock_path: Path, payloads: list[bytes], replies: int) -> list[dict[str, Any]]:
    """Send raw bytes, read `replies` reply lines."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(str(sock_path))
    for p in payloads:
        s.sendall(p)
    buf = b""
    out: list[dict[str, Any]] = []
    while len(out) < replies:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf and len(out) < replies:
            line, buf = buf.split(b"\n", 1)
            out.append(json.loads(line))
    s.close()
    return out


def as_user(uid: int, gid: int, fn: Callable[[], Any]) -> Any:
    """Run fn() in a forked child with these credentials; return its JSON-able result.
    A real non-root client: SO_PEERCRED reports this uid to the service."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            try:
                result: Any = {"ok": fn()}
            except Exception as exc:
                result = {"error": type(exc).__name__, "message": str(exc)}
            os.write(w, json.dumps(result).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert status == 0 and data, "as_user child failed"
    return json.loads(data)
