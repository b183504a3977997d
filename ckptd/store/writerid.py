"""Who wrote a temporary file: `<pid>-<start>` in its name, the writer's pid and its start
time (clock ticks since boot, /proc/PID/stat field 22). Cleanup takes a file for a
leftover only when no running process has both: a pid alone would keep the leftovers of
a ckptd whose pid is in use again for good, as it always is for a service that runs as
PID 1 in a container and is restarted after a crash."""

from __future__ import annotations

import os

from ..kernel import procfs

_ours: tuple[int, str] | None = None  # (pid, its writer id), made once per process


def writer_id() -> str:
    """This process's `<pid>-<start>` (computed again in a forked child)."""
    global _ours
    pid = os.getpid()
    if _ours is None or _ours[0] != pid:
        _ours = (pid, f"{pid}-{procfs.start_time(pid)}")
    return _ours[1]


def writer_running(pid: str, start: str | None) -> bool:
    """Is the writer with this pid (and, when the name has it, this start time) still
    running in our PID namespace? Names of older releases carry the pid alone."""
    if start is None:
        return os.path.exists(f"/proc/{pid}")
    try:
        return procfs.start_time(int(pid)) == int(start)
    except (FileNotFoundError, ProcessLookupError):
        return False
