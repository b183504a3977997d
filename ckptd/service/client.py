"""A blocking client for the control socket, for the CLI and for tests."""

from __future__ import annotations

import errno
import itertools
import os
import socket
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import (
    CkptdError,
    PermissionDenied,
    StoreFull,
    TargetBusy,
    TargetGone,
    TargetNotFound,
    UserError,
)
from . import protocol
from .config import DEFAULT_SOCKET

MAX_REPLY = 256 << 20


def default_socket() -> Path:
    env = os.environ.get("CKPTD_SOCKET")
    return Path(env) if env else DEFAULT_SOCKET


class ServiceUnavailable(UserError):
    pass


def _raise_for(code: str, message: str) -> None:
    if code == "not-found":
        raise TargetNotFound(message)
    if code == "permission":
        raise PermissionDenied(message)
    if code == "gone":
        raise TargetGone(message)
    if code == "busy":
        raise TargetBusy(message)  # refused now, may work later (the CLI exits 75)
    if code == "store-full":
        raise StoreFull(message)  # the CLI exits 74
    if code == "internal":
        raise CkptdError(f"the service failed: {message} (see its log)")
    raise UserError(message)


class Client:
    def __init__(self, path: Path | str | None = None, timeout: float | None = None) -> None:
        self.path = Path(path) if path is not None else default_socket()
        self._ids = itertools.count(1)
        self._buf = bytearray()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(self.path))
        except OSError as exc:
            self.sock.close()
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                raise ServiceUnavailable(
                    f"no ckptd service at {self.path}: start it with `ckptd serve` "
                    "(or `systemctl start ckptd`), or pass --socket PATH"
                ) from None
            if exc.errno == errno.EACCES:
                raise PermissionDenied(
                    f"no permission to connect to {self.path}: ask an administrator to add "
                    "you to the socket's group (service.socket_group)"
                ) from None
            # Not every OSError has a strerror ("AF_UNIX path too long" has none).
            raise UserError(f"cannot connect to {self.path}: {exc.strerror or exc}") from None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_reply(self) -> protocol.Reply:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                return protocol.parse_reply(line)
            if len(self._buf) > MAX_REPLY:
                raise CkptdError(f"reply from {self.path} exceeds {MAX_REPLY} bytes")
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise CkptdError(f"the service at {self.path} closed the connection")
            self._buf += chunk

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request; return its result, or raise the matching ckptd error."""
        rid = next(self._ids)
        self.send_raw(protocol.encode_request(op, rid, **fields))
        reply = self.read_reply()
        if not reply.ok:
            err = reply.error or {}
            _raise_for(err.get("code", "internal"), err.get("message", "unknown error"))
        if not isinstance(reply.result, dict):
            raise CkptdError(f"malformed reply to {op}: result is not an object")
        return reply.result


def try_service(socket_path: Path | str | None = None) -> Client | None:
    """A connected client if a ckptd service answers at the socket, None if there is no
    service (no socket, or nobody listening). A service the caller may not reach raises
    PermissionDenied: falling back to the store would fail anyway."""
    try:
        client = Client(socket_path, timeout=None)
    except ServiceUnavailable:
        return None
    try:
        client.call("ping")
    except BaseException:
        client.close()
        raise
    return client
