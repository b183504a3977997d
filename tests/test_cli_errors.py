"""The command line's contract, run as a real subprocess: a mistake is one line on stderr
and a non-zero exit (no usage block, no traceback), --help teaches with examples, success
is quiet, sizes and durations mean the same in every command, and an explicit --socket is
never silently replaced by the store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Target, needs_root, run_cli
from test_service_support import Daemon, targets

from ckptd.store import Store

SLEEPER = "import sys\nprint('ready', flush=True)\nsys.stdin.readline()\n"
# Writes one byte into each of 64 pages per request: a delta of at least 64 pages.
WRITER = """
import mmap, sys
m = mmap.mmap(-1, 64 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
print('ready', flush=True)
for line in sys.stdin:
    for i in range(0, 64 * 4096, 4096): m[i] = (m[i] + 1) % 250 + 1
    print('ok', flush=True)
"""
NOBODY = 65534


def one_line(r: subprocess.CompletedProcess[str], code: int) -> str:
    """The exit code is `code`, stdout is empty, stderr is one line starting with
    "ckptd" and without a traceback or a usage block; returns that line."""
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "usage:" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptd"), r.stderr
    assert r.stdout == "", r.stdout
    return lines[0]


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp_path is not)."""
    d = Path(tempfile.mkdtemp(prefix="ckptd-cli-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# --- C (with A, B, F): argparse mistakes are one line ---------------------------------

@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["snapshot", "abc"],
         "ckptd snapshot: error: argument PID: 'abc' is not a PID (a positive integer) "
         "(see 'ckptd snapshot --help')"),
        (["frobnicate"], "ckptd: error: argument COMMAND: invalid choice: 'frobnicate'"),
        ([], "ckptd: error: the following arguments are required: COMMAND (see 'ckptd --help')"),
        (["snapshot", "1", "--tracker", "magic"],
         "ckptd snapshot: error: argument --tracker: invalid choice: 'magic'"),
        (["watch", "1", "--interval", "0"],
         "ckptd watch: error: argument --interval: '0' must be greater than 0 "
         "(see 'ckptd watch --help')"),
        (["register", "1", "--interval", "abc"],
         "ckptd register: error: argument --interval: 'abc' is not a duration"),
        (["list", "--bogus"],
         "ckptd list: error: unrecognized arguments: --bogus (see 'ckptd list --help')"),
        (["list", "--store", "/x", "--socket", "/y"],
         "ckptd list: error: argument --socket: not allowed with argument --store"),
        (["watch", "1", "--interval", "1", "--count", "-1"],
         "ckptd watch: error: argument --count: '-1' is not a whole number >= 0"),
        # A: sizes that are not finite, or absurd.
        (["snapshot", "1", "--max-bytes", "inf"],
         "ckptd snapshot: error: argument --max-bytes: 'inf' is not a size"),
        (["snapshot", "1", "--max-bytes", "1e400"],
         "ckptd snapshot: error: argument --max-bytes: '1e400' is not a size"),
        (["snapshot", "1", "--max-bytes", "9" * 400],
         # (the echo is cut to 40 characters)
         f"ckptd snapshot: error: argument --max-bytes: '{'9' * 40}' is too large"),
        (["snapshot", "1", "--max-bytes", "2048T"],
         "ckptd snapshot: error: argument --max-bytes: '2048T' is too large (at most 1024T)"),
        (["snapshot", "1", "--max-bytes", "lots"],
         "ckptd snapshot: error: argument --max-bytes: 'lots' is not a size"),
        # G: MB could be read as 10^6 or 2^20: refused, not guessed.
        (["snapshot", "1", "--max-bytes", "64MB"],
         "ckptd snapshot: error: argument --max-bytes: '64MB' is ambiguous: write 64M or "
         "64MiB (powers of 1024)"),
        # B: intervals that are not finite, or absurd.
        (["watch", "1", "--interval", "inf"],
         "ckptd watch: error: argument --interval: 'inf' is not a duration"),
        (["watch", "1", "--interval", "1e300"],
         "ckptd watch: error: argument --interval: '1e300' is not a duration"),
        (["watch", "1", "--interval", "9" * 400],
         f"ckptd watch: error: argument --interval: '{'9' * 400}' is too long (at most 365d)"),
        (["watch", "1", "--interval", "400d"],
         "ckptd watch: error: argument --interval: '400d' is too long (at most 365d)"),
        (["register", "1", "--interval", "inf"],
         "ckptd register: error: argument --interval: 'inf' is not a duration"),
        (["register", "1", "--keep-age", "9" * 400],
         "is too long (at most 36500d)"),
        # F: register's old --max-bytes is refused, naming both meanings (and is not
        # taken as an abbreviation of --max-bytes-per-round).
        (["register", "1", "--max-bytes", "5G"],
         "ckptd register: error: --max-bytes is not an option of ckptd register: use "
         "--keep-bytes SIZE (retention: bytes kept for this process) or "
         "--max-bytes-per-round SIZE (cap per snapshot)"),
    ],
)
def test_usage_mistake_is_one_line(tmp_path: Path, args: list[str], line: str) -> None:
    r = run_cli(*args, env={"CKPTD_STORE": str(tmp_path / "s"),
                            "CKPTD_SOCKET": str(tmp_path / "no.sock")})
    assert line in one_line(r, 2)
    assert not (tmp_path / "s").exists()


def test_interval_takes_durations_like_register(tmp_path: Path) -> None:
    """B: watch --interval accepts 500ms/5s/2m as register does (the parsing fails
    later, on the PID, not on the interval)."""
    for interval in ("0.2", "500ms", "5s", "2m", "1h", "7d"):
        r = run_cli("watch", "999999999", "--interval", interval,
                    "--store", str(tmp_path / "s"))
        assert one_line(r, 2) == "ckptd: error: no process with PID 999999999", interval


# --- D: --help teaches ----------------------------------------------------------------

COMMANDS = ("snapshot", "watch", "list", "show", "materialize", "verify", "serve",
            "register", "unregister", "status", "ps")


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_help_has_examples(cmd: str) -> None:
    r = run_cli(cmd, "--help")
    assert r.returncode == 0 and r.stderr == ""
    assert f"usage: ckptd {cmd}" in r.stdout
    _, sep, examples = r.stdout.partition("\nexamples:\n")
    assert sep, r.stdout
    assert f"  ckptd {cmd}" in examples, r.stdout


def test_top_help_lists_every_command() -> None:
    r = run_cli("--help")
    assert r.returncode == 0 and "examples:" in r.stdout
    for cmd in COMMANDS:
        assert cmd in r.stdout


def test_register_help_names_the_retention_budget_unambiguously() -> None:
    """F: --keep-bytes is the retention budget, --max-bytes-per-round the cap per round;
    the old --max-bytes is not offered."""
    out = run_cli("register", "--help").stdout
    assert "--keep-bytes SIZE" in out and "--max-bytes-per-round SIZE" in out
    assert "--max-bytes " not in out and "--max-bytes\n" not in out


# --- I: a failed snapshot or watch leaves no store, and watch prints no header ---------

def test_failed_snapshot_creates_no_store(tmp_path: Path) -> None:
    store = tmp_path / "s"
    r = run_cli("snapshot", "999999999", "--store", str(store))
    assert one_line(r, 2) == "ckptd: error: no process with PID 999999999"
    # The default store ($CKPTD_STORE here) is not created either.
    r = run_cli("snapshot", "999999999", env={"CKPTD_STORE": str(store)})
    assert one_line(r, 2) == "ckptd: error: no process with PID 999999999"
    r = run_cli("watch", "999999999", "--interval", "1", "--store", str(store))
    assert one_line(r, 2) == "ckptd: error: no process with PID 999999999"  # no header
    assert not store.exists()


@needs_root
def test_untraceable_target_creates_no_default_store(open_tmp: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A user who may not trace the target gets 13 and no ~/.local/state/ckptd."""
    home = open_tmp / "state"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    monkeypatch.setenv("XDG_STATE_HOME", str(home))  # nobody's default store: home/ckptd
    monkeypatch.delenv("CKPTD_STORE", raising=False)
    # No service: the default socket must not answer.
    monkeypatch.setenv("CKPTD_SOCKET", str(open_tmp / "no.sock"))
    with Target.python(SLEEPER) as t:
        for cmd in (["snapshot", str(t.pid)], ["watch", str(t.pid), "--interval", "1s"]):
            r = run_cli(*cmd, user=NOBODY)
            assert one_line(r, 13) == (f"ckptd: error: no permission to trace PID {t.pid}: "
                                       "run ckptd as root or as the process's owner")
        assert t.alive()
    assert list(home.iterdir()) == []


@needs_root
def test_watch_prints_its_header_then_one_line_per_snapshot(tmp_path: Path) -> None:
    with Target.python(SLEEPER) as t:
        r = run_cli("watch", str(t.pid), "--interval", "100ms", "--count", "2",
                    "--store", str(tmp_path / "s"))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and lines[0].split()[:2] == ["id", "kind"]
    assert lines[1].split()[:2] == [f"{t.pid}-1-1", "full"]
    assert lines[2].split()[:2] == [f"{t.pid}-1-2", "delta"]


# --- G: sizes are powers of 1024, with or without "iB" ---------------------------------

@needs_root
def test_size_suffixes_are_powers_of_1024(tmp_path: Path) -> None:
    """--max-bytes 8K and 8KiB both cap a snapshot at 2 pages; 1K (less than a page) at
    1 page, not "no limit"."""
    store = str(tmp_path / "s")
    with Target.python(WRITER) as t:
        assert run_cli("snapshot", str(t.pid), "--store", store).returncode == 0
        for size, pages in (("8K", 2), ("8KiB", 2), ("8k", 2), ("8192", 2), ("1K", 1),
                            ("0.5K", 1)):
            assert t.send("write") == "ok"
            r = run_cli("snapshot", str(t.pid), "--store", store, "--max-bytes", size,
                        "--json")
            assert r.returncode == 0, r.stderr
            snap = json.loads(r.stdout)
            assert snap["truncated"] and snap["pages_dirty"] == pages, (size, snap)
            # Let the pages this budget left go, so the next round starts clean.
            r = run_cli("snapshot", str(t.pid), "--store", store)
            assert r.returncode == 0, r.stderr


# --- H: an explicit --socket is never replaced by the store ---------------------------

def test_explicit_socket_that_does_not_answer_is_an_error(tmp_path: Path) -> None:
    store = tmp_path / "s"
    Store.open(store, create=True)
    sock = tmp_path / "nothing.sock"
    want = (f"ckptd: error: no ckptd service answers at {sock}: start it with `ckptd "
            "serve`, fix --socket, or use --store DIR to work on a store directly")
    for cmd in (["list"], ["verify"], ["show", "1-1-1"], ["snapshot", "999999999"],
                ["materialize", "1-1-1", "-o", str(tmp_path / "out")]):
        # Even with $CKPTD_STORE naming a store: the flag is the more explicit choice.
        r = run_cli(*cmd, "--socket", str(sock), env={"CKPTD_STORE": str(store)})
        assert one_line(r, 2) == want, cmd
    # The default socket ($CKPTD_SOCKET) still falls back to the store.
    r = run_cli("list", "--json", env={"CKPTD_STORE": str(store),
                                       "CKPTD_SOCKET": str(sock)})
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr
    r = run_cli("list", "--store", str(store), "--json", env={"CKPTD_SOCKET": str(sock)})
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr


# --- E, F, J: against a real service ---------------------------------------------------

@pytest.fixture
def service(open_tmp: Path) -> Iterator[Daemon]:
    d = Daemon(open_tmp, config_extra='socket_group = "nogroup"').start()
    try:
        yield d
    finally:
        d.kill()


@needs_root
def test_register_and_unregister_are_quiet(service: Daemon) -> None:
    sock = str(service.socket)
    with targets(1, 16) as (t,):
        r = run_cli("register", str(t.pid), "--interval", "1h", "--socket", sock)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
        r = run_cli("register", str(t.pid), "--interval", "2h", "--socket", sock)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", "")  # an update too
        r = run_cli("unregister", str(t.pid), "--socket", sock)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
        # --json still reports.
        r = run_cli("register", str(t.pid), "--socket", sock, "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["pid"] == t.pid
        r = run_cli("unregister", str(t.pid), "--socket", sock, "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["unregistered"] is True
        r = run_cli("unregister", str(t.pid), "--socket", sock)
        assert "is not registered" in one_line(r, 2)


@needs_root
def test_register_sizes_and_retention_budget(service: Daemon) -> None:
    """F and G: --keep-bytes is retention.max_bytes, --max-bytes-per-round the policy's
    max_bytes_per_round, and 64M means 64 MiB there too."""
    sock = str(service.socket)
    with targets(1, 16) as (t,):
        r = run_cli("register", str(t.pid), "--interval", "5m", "--keep-bytes", "10G",
                    "--max-bytes-per-round", "64M", "--keep-age", "7d", "--socket", sock,
                    "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["overrides"] == {
            "interval": 300.0, "max_bytes_per_round": 64 << 20,
            "retention": {"max_bytes": 10 << 30, "keep_age": 7 * 86400.0}}
        r = run_cli("register", str(t.pid), "--max-bytes-per-round", "64MiB",
                    "--keep-bytes", "1.5GiB", "--socket", sock, "--json")
        assert json.loads(r.stdout)["overrides"] == {
            "max_bytes_per_round": 64 << 20, "retention": {"max_bytes": 3 << 29}}


@needs_root
def test_show_goes_through_the_service(service: Daemon) -> None:
    """J: a user who cannot read the service's store shows its own snapshot through the
    service, as list and materialize do."""
    sock = str(service.socket)
    with targets(1, 16, uid=NOBODY) as (t,):
        r = run_cli("snapshot", str(t.pid), "--socket", sock, user=NOBODY)
        assert r.returncode == 0, r.stderr
        sid = r.stdout.strip()
        assert sid == f"{t.pid}-1-1"
        r = run_cli("show", sid, "--socket", sock, "--json", user=NOBODY)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        shown = json.loads(r.stdout)
        assert shown["id"] == sid and shown["pid"] == t.pid and shown["lineage"] == [sid]
        assert shown["vmas"] and shown["kind"] == "full"
        # page_map is the service's to send (null when it does not).
        assert shown["page_map"] is None or shown["page_map"]
        r = run_cli("show", sid, "--socket", sock, user=NOBODY)
        assert r.returncode == 0 and f"restore needs: {sid}" in r.stdout, r.stderr
        # The store itself is not readable by that user.
        r = run_cli("show", sid, "--store", str(service.store), user=NOBODY)
        assert "no permission" in one_line(r, 13)
        # Another id is answered as missing, in one line.
        r = run_cli("show", "1-1-1", "--socket", sock, user=NOBODY)
        assert "no snapshot" in one_line(r, 2)


# --- K: the error's class decides the exit code -----------------------------------------

@needs_root
def test_store_permission_error_exits_13(tmp_path: Path) -> None:
    """README: 13 for no permission. The CLI exits with the error's exit_code, which the
    store's permission error carries (a StoreError that is a PermissionDenied)."""
    Store.open(tmp_path / "s", create=True)
    for cmd in (["list"], ["verify"], ["show", "1-1-1"]):
        r = run_cli(*cmd, "--store", str(tmp_path / "s"), user=NOBODY)
        assert "no permission to use the store" in one_line(r, 13), cmd
