"""Logging that fits journald: one line per event, with a "<N>" syslog priority prefix
when stderr goes to the journal (systemd sets JOURNAL_STREAM, and INVOCATION_ID for any
unit), and a timestamp otherwise."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def under_systemd(env: dict[str, str] | None = None) -> bool:
    env = dict(os.environ) if env is None else env
    return bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"))


def priority(levelno: int) -> int:
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


class OneLineFormatter(logging.Formatter):
    """Folds multi-line messages and tracebacks into one line (" | " between lines), so
    one event is one journal entry."""

    def __init__(self, journal: bool) -> None:
        fmt = "%(name)s: %(message)s"
        if not journal:
            fmt = "%(asctime)s %(levelname)s " + fmt
        super().__init__(fmt)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\r", "").replace("\n", " | ")
        if self.journal:
            return f"<{priority(record.levelno)}>{text}"
        return text


def setup_logging(level: str, stream: TextIO | None = None,
                  env: dict[str, str] | None = None) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(OneLineFormatter(under_systemd(env)))
    root.addHandler(handler)
    root.setLevel(level.upper())


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
