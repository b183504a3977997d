"""The systemd unit: `systemd-analyze verify` accepts it, and it keeps the promises the
service depends on (notify type, reload by SIGHUP, hardening, capabilities)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "ckptd.service"


def _systemd_analyze() -> str | None:
    found = shutil.which("systemd-analyze")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "systemd"], check=False,
                       capture_output=True, timeout=600)
    return shutil.which("systemd-analyze")


def _settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            k, _, v = line.partition("=")
            out.setdefault(k, []).append(v)
    return out


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    if tool is None:
        pytest.skip("systemd-analyze is not installed and could not be installed")
    # verify checks that ExecStart's binary exists: point it at this checkout's ckptd
    # when ckptd is not installed system-wide.
    text = UNIT.read_text()
    installed = Path("/usr/local/bin/ckptd")
    if not installed.exists():
        script = Path(sys.executable).parent / "ckptd"
        assert script.exists(), "the ckptd console script is not installed in the venv"
        text = text.replace(str(installed), str(script))
    unit = tmp_path / "ckptd.service"
    unit.write_text(text)
    r = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True,
                       check=False, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ckptd.service" not in r.stderr, r.stderr  # no warnings about our unit


def test_unit_promises() -> None:
    s = _settings()
    assert s["Type"] == ["notify"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert "serve" in s["ExecStart"][0]
    assert s["WatchdogSec"] and s["StateDirectory"] == ["ckptd"]
    assert s["RuntimeDirectory"] == ["ckptd"]
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectKernelTunables",
                "RestrictSUIDSGID", "LockPersonality"):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"]
    caps = set(s["CapabilityBoundingSet"][0].split())
    assert {"CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH", "CAP_SYS_ADMIN"} <= caps
    assert not caps & {"CAP_SYS_MODULE", "CAP_NET_ADMIN", "CAP_SETUID", "CAP_SYS_RAWIO"}
    # Every capability is justified in a comment of the unit.
    text = UNIT.read_text()
    for cap in caps:
        assert f"# {cap}" in text, f"{cap} has no justification comment"


def test_stop_timeout_above_grace() -> None:
    from ckptd.service.config import ServiceConfig

    s = _settings()
    stop = float(s["TimeoutStopSec"][0].rstrip("s"))
    assert stop > ServiceConfig().service.shutdown_grace


def test_open_file_limit_holds_max_registrations() -> None:
    from ckptd.service import fdlimit
    from ckptd.service.config import ServiceConfig

    limit = int(_settings()["LimitNOFILE"][0])
    fit = (limit - fdlimit.RESERVED_FDS) // fdlimit.FDS_PER_REGISTRATION
    assert fit >= ServiceConfig().service.max_registrations


def _unit_caps() -> list[str]:
    return _settings()["CapabilityBoundingSet"][0].split()


def _run_with_caps(tmp: Path, caps: list[str]) -> dict[str, str]:
    """Run `ckptd serve` with only `caps` in its bounding set (as the unit does) and try
    a snapshot of a root process and of another user's process."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_service_support import PYTHON, Daemon, Target

    tmp.mkdir(parents=True, exist_ok=True)
    d = Daemon(tmp)
    spec = ",".join(["-all"] + ["+" + c.removeprefix("CAP_").lower() for c in caps])
    log = open(tmp / "capped.log", "wb")  # noqa: SIM115
    d.log_path, d.log_file = tmp / "capped.log", log
    d.proc = subprocess.Popen(
        ["setpriv", f"--bounding-set={spec}", "--inh-caps=-all", PYTHON, "-m", "ckptd",
         "serve", "--config", str(d.config)],
        stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
    results: dict[str, str] = {}
    try:
        d.wait_ready()
        for who, uid in (("root", None), ("other", 65534)):
            t = Target(16, uid=uid)
            try:
                t.fill(1)
                first = d.call("snapshot", pid=t.pid)
                t.fill(2, 0, 2)
                second = d.call("snapshot", pid=t.pid)
                results[who] = f"ok {first['kind']} {second['kind']}"
            except Exception as exc:
                results[who] = f"failed: {exc}"
            finally:
                t.kill()
        assert d.stop() == 0
    finally:
        d.kill()
    return results


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the service capped")
def test_capability_set_is_enough_and_needed(tmp_path: Path) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    caps = _unit_caps()
    full = _run_with_caps(tmp_path / "all", caps)
    assert full == {"root": "ok full delta", "other": "ok full delta"}, full
    # Without CAP_SYS_PTRACE nothing works; without the DAC capabilities another
    # user's /proc/PID/pagemap cannot be opened. (CAP_DAC_READ_SEARCH alone suffices for
    # snapshots; CAP_DAC_OVERRIDE is in the set for materialize into users' directories.)
    for dropped in (["CAP_SYS_PTRACE"], ["CAP_DAC_READ_SEARCH", "CAP_DAC_OVERRIDE"]):
        res = _run_with_caps(tmp_path / dropped[0], [c for c in caps if c not in dropped])
        assert res["other"].startswith("failed"), (dropped, res)
    res = _run_with_caps(tmp_path / "min", ["CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"])
    assert res == full, res
