"""Readers for /proc/PID files: maps, status, stat, fds."""

from __future__ import annotations

import os
from dataclasses import dataclass

# Kernel-provided special mappings that are not process memory to checkpoint.
SPECIAL_MAPPINGS = frozenset({"[vvar]", "[vdso]", "[vsyscall]", "[vvar_vclock]", "[uprobes]"})


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str  # "rwxp" style, as in /proc/PID/maps
    offset: int
    dev: str
    inode: int
    path: str | None

    def __hash__(self) -> int:
        # Cached: mappings are dict keys every round (vma_models), and the generated hash
        # would hash all seven fields each time. Equality stays field by field.
        h: int | None = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.start, self.end, self.perms, self.offset, self.dev, self.inode,
                      self.path))
            object.__setattr__(self, "_hash", h)
        return h

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def private(self) -> bool:
        return self.perms[3] == "p"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def special(self) -> bool:
        return self.path in SPECIAL_MAPPINGS

    @property
    def file_backed(self) -> bool:
        return self.inode != 0


# Parsed lines of /proc/PID/maps, by their bytes: a process's lines rarely change between
# rounds, and parsing them dominates reading the file. Bounded; Mapping is immutable.
_PARSED: dict[bytes, Mapping] = {}
_PARSED_MAX = 1 << 15


def read_file(path: str) -> bytes:
    """A whole /proc file, with plain os calls: open() would add an fstat, an isatty
    ioctl and two lseeks per file, which add up at one round per process per second."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _pread_all(fd)
    finally:
        os.close(fd)


# The last maps text of each process and its parse: between rounds the whole file is
# usually unchanged, and then even the per-line lookups are skipped. Bounded, and only
# for files of ordinary size (a process with tens of thousands of mappings is not kept).
_LAST_MAPS: dict[int, tuple[bytes, list[Mapping]]] = {}
_LAST_MAPS_MAX = 4096
_LAST_MAPS_MAX_BYTES = 256 << 10


def read_maps(pid: int) -> list[Mapping]:
    """The mappings of PID, in address order (a new list each call)."""
    return parse_maps(pid, read_file(f"/proc/{pid}/maps"))


def parse_maps(pid: int, data: bytes) -> list[Mapping]:
    """The mappings in `data`, the content of PID's /proc/PID/maps (a new list each
    call)."""
    last = _LAST_MAPS.get(pid)
    if last is not None and last[0] == data:
        return list(last[1])
    parsed = _PARSED
    out: list[Mapping] = []
    for line in data.splitlines():
        m = parsed.get(line)
        if m is None:
            m = _parse_maps_line(line)
            if len(parsed) >= _PARSED_MAX:
                parsed.clear()
            parsed[line] = m
        out.append(m)
    if len(data) <= _LAST_MAPS_MAX_BYTES:
        if len(_LAST_MAPS) >= _LAST_MAPS_MAX:
            _LAST_MAPS.clear()
        _LAST_MAPS[pid] = (data, out)
    return list(out)


def _parse_maps_line(raw: bytes) -> Mapping:
    parts = raw.decode("utf-8", "surrogateescape").split(None, 5)
    lo, hi = parts[0].split("-")
    return Mapping(
        start=int(lo, 16),
        end=int(hi, 16),
        perms=parts[1],
        offset=int(parts[2], 16),
        dev=parts[3],
        inode=int(parts[4]),
        path=parts[5] if len(parts) > 5 else None,
    )


def _pread_all(fd: int) -> bytes:
    """A /proc file's whole content through an fd kept open (pread from offset 0 makes
    the kernel generate it afresh). Read until EOF: a seq_file hands out about a page per
    call."""
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, 65536, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _split_stat(raw: bytes) -> list[str]:
    text = raw.decode("utf-8", "surrogateescape")
    # comm may contain spaces and parentheses: split around the last ')'.
    head, _, tail = text.rpartition(")")
    pid_s, _, comm = head.partition(" (")
    return [pid_s, comm, *tail.split()]


class ProcFiles:
    """/proc/PID/stat and /proc/PID/maps of one process, kept open between its rounds.
    A steady-state round of a small process is mostly system calls: through kept files it
    reads each with preads instead of open, reads and close, and learns from stat that the
    process has one thread instead of listing /proc/PID/task.

    A kept stat file stays bound to its process: once that process is reaped, reads fail
    with ESRCH, also when the PID has been reused, and then the file is opened again by
    path (which finds the new process, or nothing). A kept maps file stays bound to the
    address space it was opened on, as a kept pagemap is: after an exec it reads empty,
    and is opened again; `reset` drops both when the caller learns of a new address
    space another way. Not thread-safe: one user at a time (the engine's per-process
    lock)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._stat_fd = -1
        self._maps_fd = -1

    def _open_and_read(self, name: str) -> tuple[int, bytes]:
        """Open /proc/PID/<name> by path and read it whole: (the fd to keep, content)."""
        fd = os.open(f"/proc/{self.pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return fd, _pread_all(fd)
        except BaseException:
            os.close(fd)
            raise

    def stat_fields(self) -> list[str]:
        """As read_stat_fields. FileNotFoundError if there is no process PID."""
        if self._stat_fd >= 0:
            try:
                # /proc/PID/stat is one record, generated whole: a short read is all of it.
                raw = os.pread(self._stat_fd, 4096, 0)
                if 0 < len(raw) < 4096:
                    return _split_stat(raw)
            except ProcessLookupError:
                pass  # our process was reaped; PID may be another one now
            self._close_stat()
        self._stat_fd, raw = self._open_and_read("stat")
        return _split_stat(raw)

    def maps(self) -> list[Mapping]:
        """As read_maps."""
        if self._maps_fd >= 0:
            try:
                data = _pread_all(self._maps_fd)
                if data:  # a live address space always has mappings
                    return parse_maps(self.pid, data)
            except ProcessLookupError:
                pass
            self._close_maps()
        self._maps_fd, data = self._open_and_read("maps")
        return parse_maps(self.pid, data)

    def _close_stat(self) -> None:
        if self._stat_fd >= 0:
            os.close(self._stat_fd)
            self._stat_fd = -1

    def _close_maps(self) -> None:
        if self._maps_fd >= 0:
            os.close(self._maps_fd)
            self._maps_fd = -1

    def reset(self) -> None:
        """Forget the kept files (the next read opens them again)."""
        self._close_stat()
        self._close_maps()

    close = reset


# /proc/PID/stat field 20 (proc(5) numbering): the number of threads.
STAT_NUM_THREADS = 19


def read_status(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def read_stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat, 1-based numbering as in proc(5) (index 0 is the pid)."""
    return _split_stat(read_file(f"/proc/{pid}/stat"))


def process_state(pid: int) -> str:
    """One-letter state from /proc/PID/stat (R, S, D, T, t, Z, ...)."""
    return read_stat_fields(pid)[2]


def has_exited(pid: int) -> bool:
    """Has this process (or thread id) exited: gone, or a zombie or dead task not yet
    reaped?"""
    try:
        return process_state(pid) in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def start_time(pid: int) -> int:
    """Start time in clock ticks since boot; with the pid, identifies a process."""
    return int(read_stat_fields(pid)[21])


def mm_fingerprint(pid: int) -> str:
    """Addresses the kernel fixes at exec (stack, brk, args, env). They change when the
    process execs (a new mm), and stay put otherwise."""
    return fingerprint_of(read_stat_fields(pid))


def fingerprint_of(stat_fields: list[str]) -> str:
    """mm_fingerprint from already-read /proc/PID/stat fields."""
    # 28 startstack, 47 start_brk, 48 arg_start, 50 env_start (proc(5) numbering).
    return ":".join(stat_fields[i] for i in (27, 46, 47, 49))


def thread_ids(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def fd_targets(pid: int) -> dict[int, str]:
    out: dict[int, str] = {}
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            out[int(name)] = os.readlink(f"{base}/{name}")
        except FileNotFoundError:
            continue
    return out


def fdinfo(pid: int, fd: int) -> dict[str, str]:
    """/proc/PID/fdinfo/FD as {field: value} (the text after the first colon, stripped)."""
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        return {k.strip(): v.strip() for k, sep, v in (line.partition(":") for line in f)
                if sep}


def fd_flags(pid: int, fd: int) -> int:
    flags = fdinfo(pid, fd).get("flags")
    if flags is None:
        raise ValueError(f"no flags in /proc/{pid}/fdinfo/{fd}")
    return int(flags, 8)


def userfaultfd_fds(pid: int) -> list[int]:
    return sorted(fd for fd, t in fd_targets(pid).items() if t == "anon_inode:[userfaultfd]")


def uffd_vma_flags(pid: int) -> list[tuple[int, int, set[str]]]:
    """VMAs whose VmFlags show userfaultfd registration (um, uw, ui) in /proc/PID/smaps."""
    out: list[tuple[int, int, set[str]]] = []
    start = end = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0] if line.strip() else ""
            if "-" in first and not first.endswith(":"):
                lo, hi = first.split("-")
                start, end = int(lo, 16), int(hi, 16)
            elif first == "VmFlags:":
                flags = set(line.split()[1:]) & {"um", "uw", "ui"}
                if flags:
                    out.append((start, end, flags))
    return out
