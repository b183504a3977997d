"""hash: no write tracking at all. Every snapshot reads every page that holds content and
stores only those whose BLAKE2b-128 digest differs from the parent's.

Needs nothing from the kernel beyond /proc/PID/mem and page presence (PAGEMAP_SCAN, or
/proc/PID/pagemap on older kernels). It costs a full read per snapshot, so it is the
fallback, never the default when uffd-wp works.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

from ..intervals import Span, normalize
from ..kernel import abi, pagemap
from ..kernel.procfs import Mapping
from ..store.fsutil import create_temp, fsync_dir
from .base import ArmResult, Harvest, TrackContext, Tracker, capturable

log = logging.getLogger(__name__)

STATE_FILE = "hashes.bin"
_MAGIC = b"CKPTHSH1"
_ENTRY = struct.Struct("<Q16s")


def probe() -> tuple[bool, str]:
    return True, "needs only /proc/PID/mem"


def _digest(page: memoryview) -> bytes:
    return hashlib.blake2b(page, digest_size=16).digest()


class HashTracker(Tracker):
    name = "hash"
    dirty_from_select = True

    def __init__(self) -> None:
        self.old: dict[int, bytes] = {}
        self.new: dict[int, bytes] = {}
        self.scan_ok: bool | None = None

    def arm(self, ctx: TrackContext) -> ArmResult:
        self.old, owner = _load(ctx.state_dir / STATE_FILE)
        self.new = {}
        if ctx.parent_id is None:
            return ArmResult("first snapshot of this process")
        if owner != ctx.parent_id:
            return ArmResult(f"no page hashes for the parent {ctx.parent_id}")
        return ArmResult(None)

    def estimate(self, ctx: TrackContext, vmas: Callable[[], list[Mapping]], full: bool
                 ) -> int:
        spans = normalize((m.start, m.end) for m in capturable(vmas()))
        if not pagemap.probe_scan(ctx.pid, abi.PAGE_IS_PRESENT)[0]:
            return sum(e - s for s, e in spans) // abi.PAGE_SIZE
        with pagemap.Pagemap(ctx.pid) as pm:
            return pm.scan(spans, pagemap.DUMPABLE).pages

    def harvest(self, ctx: TrackContext, vmas: list[Mapping], full: bool) -> Harvest:
        t0 = time.perf_counter()
        spans = normalize((m.start, m.end) for m in capturable(vmas))
        if self.scan_ok is None:
            self.scan_ok = pagemap.probe_scan(ctx.pid, abi.PAGE_IS_PRESENT)[0]
        if self.scan_ok:
            with pagemap.Pagemap(ctx.pid) as pm:
                regions = pm.scan(spans, pagemap.DUMPABLE).regions
            present = [(s, e) for s, e, c in regions if c & abi.PAGE_IS_PRESENT]
            swapped = normalize((s, e) for s, e, c in regions if not c & abi.PAGE_IS_PRESENT)
            if swapped:
                # Markers left by an earlier uffd-wp registration read as SWAPPED too.
                content, _ = pagemap.split_swapped(ctx.pid, swapped)
                present.extend(content)
            present = normalize(present)
        else:
            present = pagemap.dumpable_from_entries(ctx.pid, spans)
        if full:
            self.old = {}
        return Harvest(to_read=present, present=present,
                       scan_ms=(time.perf_counter() - t0) * 1e3)

    def select(self, ctx: TrackContext, runs: list[Span], data: memoryview) -> list[bool]:
        keep: list[bool] = []
        new = self.new = {}
        old = self.old
        pos = 0
        ps = abi.PAGE_SIZE
        for start, end in runs:
            for addr in range(start, end, ps):
                d = _digest(data[pos : pos + ps])
                new[addr] = d
                keep.append(old.get(addr) != d)
                pos += ps
        return keep

    def commit(self, ctx: TrackContext, snapshot_id: str) -> None:
        _save(ctx.state_dir / STATE_FILE, snapshot_id, self.new)
        self.old, self.new = self.new, {}

    def abandon(self, ctx: TrackContext) -> None:
        self.new = {}


def _load(path: Path) -> tuple[dict[int, bytes], str | None]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}, None
    try:
        if not raw.startswith(_MAGIC):
            raise ValueError("bad magic")
        n_id = int.from_bytes(raw[8:10], "little")
        owner = raw[10 : 10 + n_id].decode()
        body = memoryview(raw)[10 + n_id :]
        table = {addr: digest for addr, digest in _ENTRY.iter_unpack(body)}
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        # Torn or damaged: the next snapshot is simply full (arm() says why).
        log.warning("ignoring damaged page-hash state %s: %s", path, e)
        return {}, None
    return table, owner


def _save(path: Path, owner: str, table: dict[int, bytes]) -> None:
    ident = owner.encode()
    parts = [_MAGIC, len(ident).to_bytes(2, "little"), ident]
    parts.extend(_ENTRY.pack(a, d) for a, d in table.items())
    tmp = path.with_name(f".{path.name}.tmp")
    fd = create_temp(tmp)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(b"".join(parts))
            f.flush()
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(path.parent)
