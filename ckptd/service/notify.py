"""The sd_notify protocol, spoken directly: one datagram of KEY=VALUE lines to the
AF_UNIX socket named by $NOTIFY_SOCKET ("@name" means the abstract namespace).

Without $NOTIFY_SOCKET every call is a no-op, so the service runs the same by hand.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("ckptd.service.notify")


def _address(raw: str) -> str | bytes:
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        self._address = _address(address) if address else None
        self._sock: socket.socket | None = None
        self.watchdog_usec = watchdog_usec
        if self._address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Notifier:
        env = dict(os.environ) if env is None else env
        watchdog = 0
        usec = env.get("WATCHDOG_USEC", "")
        wpid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and (not wpid or wpid == str(os.getpid())):
            watchdog = int(usec)
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    @property
    def watchdog_interval(self) -> float:
        """Seconds between WATCHDOG=1 pings (half the configured timeout), 0 if none."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else 0.0

    def send(self, **fields: str | int) -> bool:
        """Send one notification; False (logged) if the manager could not be reached."""
        if self._sock is None or self._address is None:
            return False
        msg = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            self._sock.sendto(msg, self._address)
        except OSError as exc:
            log.warning("sd_notify to %r failed: %s", self._address, exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def reloading(self) -> bool:
        return self.send(RELOADING=1)

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def stopping(self) -> bool:
        return self.send(STOPPING=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
