"""Service configuration: pydantic models, embedded defaults, TOML loading.

Every setting has a default, so `ckptd serve` runs with no file at all. A bad file is
refused with one line that names the key, the bad value and what is allowed.
"""

from __future__ import annotations

import grp
import os
import re
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from ..errors import UserError
from ..store.store import ROOT_STORE

DEFAULT_CONFIG_PATH = Path("/etc/ckptd/ckptd.toml")
DEFAULT_STORE = ROOT_STORE  # the same as root's `ckptd` commands use
DEFAULT_SOCKET = Path("/run/ckptd/ckptd.sock")
# sockaddr_un.sun_path holds 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH = 107

TrackerChoice = Literal["auto", "uffd-wp", "hash"]
Consistency = Literal["frozen", "fuzzy"]
LogLevel = Literal["debug", "info", "warning", "error"]


class ConfigError(UserError):
    """The configuration file cannot be used; the message names the key and the fix."""


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# K, M, G, T and KiB, MiB, GiB, TiB are the same powers of 1024, as in the sizes ckptd
# prints and the command line takes. KB, MB, GB, TB are refused, not guessed: some read
# them as powers of 1000 (and ckptd did, before 2026-11-27).
_SIZE_SHIFT = {"": 0, "b": 0, "k": 10, "kib": 10, "m": 20, "mib": 20, "g": 30, "gib": 30,
               "t": 40, "tib": 40}
MAX_SIZE = 1 << 50  # 1024 TiB: more than any process's memory or any store's budget
_NUM_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*$")


def parse_duration(value: Any) -> Any:
    """Seconds as a number, or a string like "500ms", "30s", "5m", "2h", "7d"."""
    if isinstance(value, str):
        m = _NUM_UNIT.match(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in {*_DURATION_UNITS, ""}:
            raise ValueError("expected seconds or a duration like 500ms, 30s, 5m, 2h, 7d")
        return float(m.group(1)) * _DURATION_UNITS.get(unit or "s", 1.0)
    return value


def size_from_text(text: str) -> int:
    """Bytes from "8192", "512K", "64M" or "64MiB" (the same: powers of 1024), "1.5G",
    "1T". ValueError, saying what is wrong, for anything else: the command line and the
    config file read sizes alike."""
    m = _NUM_UNIT.match(text)
    unit = m.group(2).lower() if m else None
    if m is not None and unit in ("kb", "mb", "gb", "tb"):
        u = unit[0].upper()
        raise ValueError(f"{text!r} is ambiguous: write {m.group(1)}{u} or "
                         f"{m.group(1)}{u}iB (powers of 1024)")
    if m is None or unit not in _SIZE_SHIFT:
        raise ValueError(f"{text!r} is not a size (bytes, or e.g. 64M or 64MiB: K, M, G, "
                         "T are powers of 1024)")
    # Decimal, not float: exact for "1.5G", and a 400-digit number is not infinity.
    size = int(Decimal(m.group(1)) * (1 << _SIZE_SHIFT[unit or ""]))
    if size > MAX_SIZE:
        raise ValueError(f"{text[:40]!r} is too large (at most 1024T)")
    return size


def parse_size(value: Any) -> Any:
    """Bytes as an integer, or a string as size_from_text reads it."""
    return size_from_text(value) if isinstance(value, str) else value


# inf or nan would pass ge=0 (nan compares false both ways) and break the scheduler.
Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0, allow_inf_nan=False)]
Size = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class Retention(_Strict):
    """Which snapshots of a registered process to keep. 0 disables a limit; the newest
    snapshot is always kept."""

    keep_last: int = Field(default=0, ge=0, description="keep at most this many snapshots")
    keep_age: Duration = Field(default=0.0, description="drop snapshots older than this")
    max_bytes: Size = Field(
        default=0, description="drop the oldest beyond this many stored bytes"
    )
    compact_ratio: float = Field(
        default=1.0, gt=0, allow_inf_nan=False,
        description="compact when the deltas since the base store this many times the "
        "base's pages (at least 256 pages)",
    )
    compact_after: int = Field(
        default=256, ge=2,
        description="compact when restoring the newest needs more snapshots than this",
    )


class Policy(_Strict):
    """How one registered process is snapshotted (the [defaults] table)."""

    interval: Duration = Field(
        default=60.0, gt=0, description="seconds between snapshot starts"
    )
    jitter: float = Field(default=0.1, ge=0, le=0.5, allow_inf_nan=False,
                          description="fraction of interval, random")
    tracker: TrackerChoice = "auto"
    consistency: Consistency = "frozen"
    max_bytes_per_round: Size = Field(
        default=0, description="cap on bytes captured per round (0: none); the rest waits"
    )
    retention: Retention = Field(default_factory=lambda: Retention())


class RetentionOverride(_Strict):
    keep_last: int | None = Field(default=None, ge=0)
    keep_age: Duration | None = None
    max_bytes: Size | None = None
    compact_ratio: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    compact_after: int | None = Field(default=None, ge=2)


class PolicyOverride(_Strict):
    """What a registration sets for itself; None means "use the service default"."""

    interval: Duration | None = Field(default=None, gt=0)
    jitter: float | None = Field(default=None, ge=0, le=0.5, allow_inf_nan=False)
    tracker: TrackerChoice | None = None
    consistency: Consistency | None = None
    max_bytes_per_round: Size | None = None
    retention: RetentionOverride = Field(default_factory=lambda: RetentionOverride())

    def apply(self, defaults: Policy) -> Policy:
        """The effective policy: these overrides on top of the current defaults."""
        top = {k: v for k, v in self.model_dump(exclude={"retention"}).items() if v is not None}
        ret = {k: v for k, v in self.retention.model_dump().items() if v is not None}
        return defaults.model_copy(
            update={**top, "retention": defaults.retention.model_copy(update=ret)}
        )


def _check_listen(value: str) -> str:
    if value == "":
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError('expected "" or "HOST:PORT", e.g. "127.0.0.1:9469"')
    return value


class MetricsConfig(_Strict):
    enabled: bool = Field(
        default=True, description="serve the 'metrics' op on the control socket"
    )
    listen: Annotated[str, AfterValidator(_check_listen)] = Field(
        default="", description='also serve HTTP GET /metrics on "127.0.0.1:PORT" ("" = off)'
    )


def _check_socket(value: Path) -> Path:
    size = len(os.fsencode(value))
    if size > MAX_SOCKET_PATH:
        raise ValueError(f"a unix socket path holds at most {MAX_SOCKET_PATH} bytes, this "
                         f"one has {size}: choose a shorter one")
    return value


def _check_group(value: str) -> str:
    # Checked here, not only when the socket is bound: `serve --check` refuses it too.
    if value:
        try:
            grp.getgrnam(value)
        except KeyError:
            raise ValueError("no such group") from None
    return value


class ServiceSection(_Strict):
    store: Path = DEFAULT_STORE
    socket: Annotated[Path, AfterValidator(_check_socket)] = DEFAULT_SOCKET
    socket_group: Annotated[str, AfterValidator(_check_group)] = Field(
        default="", description="group owning the socket (mode 0660)")
    concurrency: int = Field(default=1, ge=1, le=64, description="snapshots running at once")
    log_level: LogLevel = "info"
    shutdown_grace: Duration = Field(
        default=20.0, description="on SIGTERM, wait this long for in-flight snapshots"
    )
    request_timeout: Duration = Field(
        default=30.0, gt=0,
        description="a client must finish a request it began, and take each reply, "
        "within this many seconds, or its connection is closed")
    max_registrations: int = Field(default=1024, ge=1)
    max_registrations_per_user: int | None = Field(
        default=None, ge=1,
        description="registrations one non-root user may hold (default: half of "
        "max_registrations), so that one user cannot take them all; root is not limited")
    batch_window: Duration = Field(
        default=0.1, le=1.0,
        description="round starts are rounded up to a multiple of this, so that rounds "
        "of many processes run back to back (0: off)",
    )
    group_commit: bool = Field(
        default=True,
        description="publish the timer rounds that run back to back with one "
        "filesystem sync (syncfs) for all, instead of two fsyncs each")


class ServiceConfig(_Strict):
    service: ServiceSection = Field(default_factory=lambda: ServiceSection())
    defaults: Policy = Field(default_factory=lambda: Policy())
    metrics: MetricsConfig = Field(default_factory=lambda: MetricsConfig())


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def describe_validation_error(err: ValidationError, source: str) -> str:
    """One line: where, which key, the bad value, and what is allowed."""
    first = err.errors()[0]
    key = _loc(first["loc"])
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{source}: unknown setting '{key}' (remove it, or check its spelling)"
    value = first.get("input")
    msg = first["msg"]
    if kind == "literal_error":
        allowed = (first.get("ctx") or {}).get("expected", "")
        msg = f"allowed: {allowed}"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    more = len(err.errors()) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {key} = {value!r} is invalid: {msg}{tail}"


def parse_config(text: str, source: str = "<config>") -> ServiceConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        return ServiceConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source)) from None


def load_config(path: Path | None) -> ServiceConfig:
    """Load `path`; with None, load the default path if it exists, else use defaults."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return ServiceConfig()
        path = DEFAULT_CONFIG_PATH
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (omit --config to use defaults)") from None
    except (PermissionError, IsADirectoryError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from None
    return parse_config(text, str(path))
