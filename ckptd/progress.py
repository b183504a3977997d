"""Progress lines on a terminal; silent when stderr is not one."""

from __future__ import annotations

import sys
import time


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    def __init__(self, label: str, total: int = 0, enabled: bool | None = None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._last = 0.0
        self._shown = False

    def update(self, done: int, total: int | None = None) -> None:
        self.done = done
        if total is not None:
            self.total = total
        now = time.monotonic()
        if not self.enabled or now - self._last < 0.1:
            return
        self._last = now
        self._shown = True
        if self.total:
            pct = 100.0 * self.done / self.total
            msg = f"{self.label}: {pct:5.1f}% ({human_bytes(self.done)} of " \
                  f"{human_bytes(self.total)})"
        else:
            msg = f"{self.label}: {human_bytes(self.done)}"
        sys.stderr.write("\r\x1b[K" + msg)
        sys.stderr.flush()

    def add(self, n: int) -> None:
        self.update(self.done + n)

    def finish(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
