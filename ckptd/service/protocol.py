"""The control protocol, sans-IO: bytes in, models out; models in, bytes out.

Framing is newline-delimited JSON (one UTF-8 JSON object per line, no raw newlines inside
it, since JSON escapes them). A message longer than MAX_MESSAGE bytes is rejected with a
"too-large" error and skipped up to its newline; the connection stays usable. See
docs/api.md for every operation.

Nothing here touches a socket, a file or the clock: the server feeds received bytes to a
FrameDecoder, hands each frame to parse_request, and writes what encode_reply returns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ..store.store import CHAIN_NAME, SNAPSHOT_ID
from .config import Duration, PolicyOverride, RetentionOverride

PROTOCOL_VERSION = 1
MAX_MESSAGE = 1 << 20  # bytes per request line, newline excluded

ErrorCode = Literal[
    "bad-json",        # the line is not a JSON object
    "bad-request",     # a known op with missing or invalid fields
    "unknown-op",      # no such operation
    "too-large",       # the line exceeded MAX_MESSAGE
    "timeout",         # a begun request was not finished within request_timeout
    "permission",      # SO_PEERCRED says this client may not do that
    "not-found",       # no such process, registration or snapshot
    "user-error",      # any other mistake the client can fix
    "gone",            # the process exited during the operation
    "busy",            # refused now, may work later (e.g. shutting down)
    "store-full",      # the store's filesystem is out of space or quota
    "internal",        # a bug or an environment failure; logged by the service
]

RequestId = int | str | None


def _snapshot_id(value: str) -> str:
    # The id becomes a path in the store: only the form ckptd gives ids passes.
    if SNAPSHOT_ID.fullmatch(value) is None:
        raise ValueError("not a snapshot id (ids look like 1234-1-5)")
    return value


def _chain_name(value: str) -> str:
    # The name becomes a path in the store: only the form ckptd gives chains passes.
    if CHAIN_NAME.fullmatch(value) is None:
        raise ValueError("not a chain name (chains look like 1234-1)")
    return value


SnapshotId = Annotated[str, AfterValidator(_snapshot_id)]
ChainName = Annotated[str, AfterValidator(_chain_name)]


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: RequestId = None


class PingReq(_Req):
    op: Literal["ping"]


# The bounds `ckptd register` puts on the same options (ckptd/cli.py): the socket takes
# no more than the command line. An interval of 1e300 s is finite, but the timer cannot
# sleep that long (and it never comes due).
MAX_INTERVAL = 365 * 86400.0
MAX_AGE = 100 * 365 * 86400.0


def _at_most(limit: float, text: str) -> AfterValidator:
    def check(value: float | None) -> float | None:
        if value is not None and value > limit:
            raise ValueError(f"too long: at most {text} ({limit:.0f} s)")
        return value
    return AfterValidator(check)


class RegisterRetention(RetentionOverride):
    keep_age: Annotated[Duration | None, _at_most(MAX_AGE, "36500d")] = None


class RegisterPolicy(PolicyOverride):
    """A PolicyOverride as `register` takes it: with the command line's bounds."""

    interval: Annotated[Duration | None, _at_most(MAX_INTERVAL, "365d")] = Field(
        default=None, gt=0)
    retention: RegisterRetention = Field(default_factory=lambda: RegisterRetention())


class RegisterReq(_Req):
    op: Literal["register"]
    pid: int = Field(gt=0)
    policy: RegisterPolicy = Field(default_factory=lambda: RegisterPolicy())


class UnregisterReq(_Req):
    op: Literal["unregister"]
    pid: int = Field(gt=0)


class ListReq(_Req):
    op: Literal["list"]


class StatusReq(_Req):
    op: Literal["status"]


class SnapshotNowReq(_Req):
    op: Literal["snapshot"]
    pid: int = Field(gt=0)
    tracker: Literal["auto", "uffd-wp", "hash"] | None = None
    fuzzy: bool | None = None
    max_pages: int | None = Field(default=None, ge=0)


class SnapshotsReq(_Req):
    op: Literal["snapshots"]
    pid: int | None = Field(default=None, gt=0)
    chain: ChainName | None = None


class ShowReq(_Req):
    op: Literal["show"]
    snapshot: SnapshotId


class MaterializeReq(_Req):
    op: Literal["materialize"]
    snapshot: SnapshotId
    out_dir: str = Field(min_length=1, description="absolute path on the service's host")


class VerifyReq(_Req):
    op: Literal["verify"]


class CompactReq(_Req):
    op: Literal["compact"]
    chain: ChainName
    upto: SnapshotId | None = None


class ReloadReq(_Req):
    op: Literal["reload"]


class MetricsReq(_Req):
    op: Literal["metrics"]


Request = Annotated[
    PingReq | RegisterReq | UnregisterReq | ListReq | StatusReq | SnapshotNowReq
    | SnapshotsReq | ShowReq | MaterializeReq | VerifyReq | CompactReq | ReloadReq
    | MetricsReq,
    Field(discriminator="op"),
]
_REQUEST = TypeAdapter(Request)
OPS: tuple[str, ...] = (
    "ping", "register", "unregister", "list", "status", "snapshot", "snapshots", "show",
    "materialize", "verify", "compact", "reload", "metrics",
)


class ProtocolError(Exception):
    """A request that cannot be served; becomes an error reply, never a dropped link."""

    def __init__(self, code: ErrorCode, message: str, request_id: RequestId = None) -> None:
        super().__init__(code, message)
        self.code: ErrorCode = code
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class Frame:
    data: bytes


@dataclass(frozen=True)
class Oversize:
    size: int  # bytes seen before giving up on the message


class FrameDecoder:
    """Splits a byte stream into lines, bounding each to `max_size` bytes."""

    def __init__(self, max_size: int = MAX_MESSAGE) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._skipping = False  # inside an oversized message, dropping up to its newline
        self._skipped = 0

    def feed(self, data: bytes) -> list[Frame | Oversize]:
        out: list[Frame | Oversize] = []
        self._buf += data
        while True:
            nl = self._buf.find(b"\n")
            if self._skipping:
                if nl < 0:
                    self._skipped += len(self._buf)
                    self._buf.clear()
                    return out
                del self._buf[: nl + 1]
                self._skipping = False
                continue
            if nl < 0:
                if len(self._buf) > self.max_size:
                    out.append(Oversize(len(self._buf)))
                    self._skipping = True
                    self._skipped = len(self._buf)
                    self._buf.clear()
                return out
            if nl > self.max_size:
                out.append(Oversize(nl))
            else:
                line = bytes(self._buf[:nl]).strip()
                if line:
                    out.append(Frame(line))
            del self._buf[: nl + 1]

    @property
    def pending(self) -> int:
        return len(self._buf)

    @property
    def in_message(self) -> bool:
        """Has a message begun that its newline has not ended yet (an oversized one
        being skipped included)? Blank space between messages does not count."""
        return self._skipping or bool(self._buf.strip())


def _peek_id(obj: Any) -> RequestId:
    if isinstance(obj, dict):
        rid = obj.get("id")
        if rid is None or (isinstance(rid, (int, str)) and not isinstance(rid, bool)):
            return rid
    return None


def parse_request(frame: bytes) -> Request:
    """Validate one frame into a request model, or raise ProtocolError."""
    try:
        obj = json.loads(frame)
    except RecursionError:
        # Nesting deeper than the interpreter's stack ('[' * 200000).
        raise ProtocolError("bad-json", "not JSON: nested too deeply") from None
    except ValueError as exc:
        # JSONDecodeError, UnicodeDecodeError, and an integer of more digits than int()
        # converts (4300).
        raise ProtocolError("bad-json", f"not JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad-json", "a request must be a JSON object")
    rid = _peek_id(obj)
    op = obj.get("op")
    if not isinstance(op, str):
        raise ProtocolError("bad-request", "missing 'op' (a string)", rid)
    if op not in OPS:
        raise ProtocolError(
            "unknown-op", f"unknown op {op[:64]!r}; known: {', '.join(OPS)}", rid
        )
    try:
        return _REQUEST.validate_python(obj)
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e["loc"][1:]) or "request"
        msg = e["msg"].removeprefix("Value error, ")
        try:
            got = f"{e.get('input')!r:.80}"
        except RecursionError:  # a deeply nested value in a field (JSON allows ~1000)
            got = "a deeply nested value"
        raise ProtocolError("bad-request", f"{op}: {where}: {msg} (got {got})", rid) from None
    except RecursionError:
        raise ProtocolError("bad-request", f"{op}: a value is nested too deeply", rid) \
            from None


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def encode_ok(request_id: RequestId, result: BaseModel | dict[str, Any] | None) -> bytes:
    if isinstance(result, BaseModel):
        body: Any = result.model_dump(mode="json")
    else:
        body = result if result is not None else {}
    return _dump({"id": request_id, "ok": True, "result": body})


def encode_error(request_id: RequestId, code: ErrorCode, message: str) -> bytes:
    return _dump({"id": request_id, "ok": False, "error": {"code": code, "message": message}})


def encode_protocol_error(err: ProtocolError) -> bytes:
    return encode_error(err.request_id, err.code, err.message)


def encode_request(op: str, request_id: RequestId = None, **fields: Any) -> bytes:
    """Client side: one request line. Fields that are None are left out."""
    body = {"id": request_id, "op": op, **{k: v for k, v in fields.items() if v is not None}}
    data = _dump(body)
    if len(data) - 1 > MAX_MESSAGE:
        raise ProtocolError("too-large", f"request of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


class Reply(BaseModel):
    """Client side: a parsed reply line."""

    model_config = ConfigDict(extra="forbid")
    id: RequestId = None
    ok: bool
    result: Any = None
    error: dict[str, str] | None = None


def parse_reply(frame: bytes) -> Reply:
    try:
        return Reply.model_validate_json(frame)
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"]
        raise ProtocolError("bad-json", f"malformed reply from service: {msg}") from None
