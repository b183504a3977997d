"""Writing one snapshot's page data: zero detection, extents, parallel zstd, fsync.

Compressed data of at most INLINE_MAX_BYTES stays in memory and is published inside the
metadata (data_inline): no data file at all. Larger data goes to tmp/ first; commit
fsyncs it, renames it into the chain's data/ directory, fsyncs that directory, and only
then is the metadata published (Store.publish), so a listed snapshot always has all of
its data on disk.
"""

from __future__ import annotations

import base64
import contextlib
import os
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import zstandard
from pydantic import TypeAdapter

from ..intervals import Span
from ..kernel.abi import PAGE_SIZE
from ..kernel.syscalls import start_writeback
from .format import INLINE_MAX_BYTES, Extent, Frame, ZeroRun
from .fsutil import fsync_dir, open_private
from .store import Store

# One zstd frame holds at most this many pages: restoring one page decompresses at most
# 256 KiB. Extents are cut at this length too.
FRAME_PAGES = 64
ZSTD_LEVEL = 1
# For a write small enough to compress in the caller's thread (the usual delta of a
# service round): there CPU per round matters more than a few per cent of size. Level
# -1 against level 1, measured here: 17 against 23 us per frame of small Python deltas
# for 3% more bytes, 89 against 147 us for 15 pages of a Python heap for 10% more.
# A writer choice: readers do not see it.
FAST_ZSTD_LEVEL = -1
BATCH_BYTES = 1 << 20
MAX_PENDING_BATCHES = 8
ZERO_PAGE = bytes(PAGE_SIZE)

_local = threading.local()
_FRAMES = TypeAdapter(list[Frame])
_EXTENTS = TypeAdapter(list[Extent])


@dataclass(frozen=True)
class StoredData:
    """Where a snapshot's compressed data ended up: the metadata fields that say so."""

    data_file: str | None    # name under data/, when the data went to a file
    data_inline: str | None  # base64 of the data, when it is small enough to inline
    data_bytes: int


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's compressor for `level` (contexts are reused, not shared)."""
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=True)
    return c


def _compress_frames(frames: list[list[memoryview]], level: int = ZSTD_LEVEL
                     ) -> list[tuple[bytes, int]]:
    """Each frame's chunks, concatenated, as one zstd frame; with its content's crc32."""
    c = _compressor(level)
    out = []
    for chunks in frames:
        if len(chunks) == 1:
            out.append((c.compress(chunks[0]), zlib.crc32(chunks[0])))
            continue
        crc = 0
        for chunk in chunks:
            crc = zlib.crc32(chunk, crc)
        out.append((c.compress(b"".join(chunks)), crc))
    return out


def zero_page_flags(buf: object, start: int, end: int) -> list[int]:
    """Offsets (relative to start) of all-zero pages in buf[start:end]. Most pages with
    data have a non-zero byte at one of three probes; only the rest are compared whole
    (a memcmp). mmap.find of a zero page was 4x slower."""
    view = memoryview(buf)  # type: ignore[arg-type]
    out: list[int] = []
    try:
        for pos in range(start, end, PAGE_SIZE):
            if view[pos] or view[pos + 2048] or view[pos + PAGE_SIZE - 1]:
                continue
            if view[pos : pos + PAGE_SIZE] == ZERO_PAGE:
                out.append(pos - start)
    finally:
        view.release()
    return out


class SnapshotWriter:
    def __init__(self, store: Store, chain: str, snapshot_id: str, executor: Executor,
                 small_level: int = ZSTD_LEVEL) -> None:
        """`small_level`: the zstd level for a write that fits one batch and is therefore
        compressed in the calling thread (capture uses FAST_ZSTD_LEVEL)."""
        self.store = store
        self.small_level = small_level
        self.chain = chain
        self.snapshot_id = snapshot_id
        self.executor = executor
        self.data_name = f"{snapshot_id}.{os.urandom(4).hex()}.zst"
        self.fd = -1  # opened once the data outgrows INLINE_MAX_BYTES
        self.tmp_path: str | None = None  # the file's path in tmp/, once it is made
        self.offset = 0
        self._held: list[bytes] = []  # compressed data not (yet) in a file
        self._file_made = False
        self._frame_rows: list[dict[str, int]] = []
        self._extent_rows: list[dict[str, int]] = []
        self._models: tuple[list[Frame], list[Extent]] | None = None
        self.zeros: list[ZeroRun] = []
        self.raw_frames = 0  # frames added already compressed (append_frame)
        self.compress_s = 0.0
        self.write_s = 0.0

    def write_runs(
        self,
        runs: list[Span],
        buf: object,
        keep: list[bool] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Store the pages of `runs`, laid back to back in `buf` (a mmap), skipping pages
        whose `keep` flag is False. Zero pages become ZeroRuns; the rest become extents,
        packed into frames of at most FRAME_PAGES pages (scattered single pages share a
        frame), compressed in parallel and written in order."""
        t0 = time.perf_counter()
        extents = self._plan(runs, buf, keep)
        view = memoryview(buf)  # type: ignore[arg-type]
        # Tasks of about BATCH_BYTES each: one task per small frame would cost more in
        # executor hand-offs than in compression.
        pending: list[tuple[list[list[tuple[int, int]]],
                            Future[list[tuple[bytes, int]]]]] = []
        frames: list[list[tuple[int, int]]] = []   # per frame: its extents (addr, pages)
        chunks: list[list[memoryview]] = []        # per frame: their bytes
        frame_pages = FRAME_PAGES
        size = 0
        for addr, pages, pos in extents:
            if frame_pages + pages > FRAME_PAGES:
                if size >= BATCH_BYTES:
                    pending.append((frames, self.executor.submit(_compress_frames, chunks)))
                    frames, chunks, size = [], [], 0
                    if len(pending) >= 2 * MAX_PENDING_BATCHES:
                        self._drain(pending[:MAX_PENDING_BATCHES], progress)
                        del pending[:MAX_PENDING_BATCHES]
                frames.append([])
                chunks.append([])
                frame_pages = 0
            frames[-1].append((addr, pages))
            chunks[-1].append(view[pos : pos + pages * PAGE_SIZE])
            frame_pages += pages
            size += pages * PAGE_SIZE
        if frames:
            if pending:
                pending.append((frames, self.executor.submit(_compress_frames, chunks)))
            else:
                # The whole write is one batch (the usual small delta): compress it here;
                # handing it to a thread and back costs more than compressing it.
                self._write_batch(frames, _compress_frames(chunks, self.small_level),
                                  progress)
        self._drain(pending, progress)
        del chunks
        view.release()
        self.compress_s += time.perf_counter() - t0 - self.write_s

    def _plan(self, runs: list[Span], buf: object, keep: list[bool] | None
              ) -> list[tuple[int, int, int]]:
        """Cut runs into extents (addr, pages, position in buf); record zero runs."""
        out: list[tuple[int, int, int]] = []
        step = FRAME_PAGES * PAGE_SIZE
        pos = 0
        page_index = 0
        view = memoryview(buf)  # type: ignore[arg-type]
        last = PAGE_SIZE - 1
        for start, end in runs:
            size = end - start
            if size == PAGE_SIZE and keep is None:
                # Scattered single pages are the common delta: no helper calls for them.
                if (view[pos] or view[pos + 2048] or view[pos + last]
                        or view[pos : pos + PAGE_SIZE] != ZERO_PAGE):
                    out.append((start, 1, pos))
                else:
                    self._add_zero(start)
                pos += PAGE_SIZE
                page_index += 1
                continue
            zero_rel = set(zero_page_flags(buf, pos, pos + size))
            if keep is None and not zero_rel:
                # Common case: no page to skip; cut the run straight into extents.
                for rel in range(0, size, step):
                    n = min(step, size - rel)
                    out.append((start + rel, n // PAGE_SIZE, pos + rel))
                pos += size
                page_index += size // PAGE_SIZE
                continue
            ext_addr = ext_pos = ext_pages = 0
            for rel in range(0, size, PAGE_SIZE):
                stored = keep is None or keep[page_index]
                page_index += 1
                is_zero = stored and rel in zero_rel
                if is_zero:
                    self._add_zero(start + rel)
                if not stored or is_zero or ext_pages == FRAME_PAGES:
                    if ext_pages:
                        out.append((ext_addr, ext_pages, ext_pos))
                        ext_pages = 0
                    if not stored or is_zero:
                        continue
                if ext_pages == 0:
                    ext_addr, ext_pos = start + rel, pos + rel
                ext_pages += 1
            if ext_pages:
                out.append((ext_addr, ext_pages, ext_pos))
            pos += size
        view.release()
        return out

    def _add_zero(self, addr: int) -> None:
        z = self.zeros
        if z and z[-1].addr + z[-1].pages * PAGE_SIZE == addr:
            z[-1] = ZeroRun(addr=z[-1].addr, pages=z[-1].pages + 1)
        else:
            z.append(ZeroRun(addr=addr, pages=1))

    def _drain(self, pending: list[tuple[list[list[tuple[int, int]]],
                                         Future[list[tuple[bytes, int]]]]],
               progress: Callable[[int], None] | None) -> None:
        for frames, fut in pending:
            self._write_batch(frames, fut.result(), progress)

    def _write_batch(self, frames: list[list[tuple[int, int]]],
                     compressed: list[tuple[bytes, int]],
                     progress: Callable[[int], None] | None) -> None:
        t = time.perf_counter()
        blob = b"".join(f for f, _ in compressed)
        self._emit(blob, writeback=True)
        self.write_s += time.perf_counter() - t
        for extents, (frame, crc) in zip(frames, compressed, strict=True):
            self._add_frame(extents, frame, crc)
            if progress:
                progress(sum(p for _, p in extents) * PAGE_SIZE)

    def _add_frame(self, extents: list[tuple[int, int]], frame: bytes, crc: int) -> None:
        # Plain rows now, models once at the end: validating a list in one call costs
        # half of building thousands of models one by one.
        index = len(self._frame_rows)
        skip = 0
        for addr, pages in extents:
            self._extent_rows.append({"addr": addr, "pages": pages, "frame": index,
                                      "skip": skip})
            skip += pages
        self._frame_rows.append({"offset": self.offset, "length": len(frame),
                                 "pages": skip, "crc32": crc})
        self.offset += len(frame)
        self._models = None

    def _build(self) -> tuple[list[Frame], list[Extent]]:
        if self._models is None:
            self._models = (_FRAMES.validate_python(self._frame_rows),
                            _EXTENTS.validate_python(self._extent_rows))
        return self._models

    @property
    def frames(self) -> list[Frame]:
        return self._build()[0]

    @property
    def extents(self) -> list[Extent]:
        return self._build()[1]

    @property
    def stored_pages(self) -> int:
        return sum(r["pages"] for r in self._extent_rows)

    def append_frame(self, extents: list[tuple[int, int]], frame: bytes, crc: int) -> None:
        """Add an already compressed frame whose content is the pages of `extents`
        (addr, pages), back to back in this order; `crc` is its content's crc32
        (compaction copies frames unchanged). The extents need not be in address order,
        neither among themselves nor with the frames written before."""
        t = time.perf_counter()
        self._emit(frame)
        self.write_s += time.perf_counter() - t
        self._add_frame(extents, frame, crc)
        self.raw_frames += 1

    def _emit(self, blob: bytes, writeback: bool = False) -> None:
        """Append `blob` (the next bytes of the data): kept in memory while all of the data
        fits inline; else written to the file, which first gets what was kept."""
        if self.fd < 0:
            if self.offset + len(blob) <= INLINE_MAX_BYTES:
                self._held.append(blob)
                return
            # Named by the store's owner lock, taken on the first such file: the
            # rounds whose data goes inline never touch tmp/.
            self.tmp_path = self.store.tmp_file(self.data_name)
            self.fd = open_private(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            self._file_made = True
            held, self._held = b"".join(self._held), []
            self._write(held)
        self._write(blob)
        if writeback:
            start_writeback(self.fd, self.offset, len(blob))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def finish_data(self, durable: bool = True) -> StoredData:
        """fsync the data file (still in tmp/), if there is one; `durable` False leaves
        that to the caller (a group commit's Store.sync)."""
        if self.fd < 0:
            if not self._held:
                return StoredData(None, None, 0)
            held = b"".join(self._held)
            return StoredData(None, base64.b64encode(held).decode("ascii"), len(held))
        t = time.perf_counter()
        if durable:
            os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        self.write_s += time.perf_counter() - t
        return StoredData(self.data_name, None, self.offset)

    def publish_data(self, durable: bool = True) -> None:
        """Move the finished data file into the chain's data/ directory, durably unless
        `durable` is False (see finish_data)."""
        if self._held or not self._frame_rows:
            return  # inline, or empty: nothing to move
        t = time.perf_counter()
        data_dir = self.store.chain_dir(self.chain) / "data"
        assert self.tmp_path is not None
        os.rename(self.tmp_path, data_dir / self.data_name)
        # data/ only: the new name must be durable before the metadata names it. If the
        # old name in tmp/ survives a crash, it is one more link to the same file, which
        # clean_tmp removes.
        if durable:
            fsync_dir(data_dir)
        self.write_s += time.perf_counter() - t

    def commit_data(self, durable: bool = True) -> StoredData:
        """Make the data durable under its final name (inline data becomes durable with
        the metadata that carries it). `durable` False: put it there only; the caller
        syncs the filesystem before publishing metadata that names it."""
        result = self.finish_data(durable)
        self.publish_data(durable)
        return result

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._file_made:
            assert self.tmp_path is not None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp_path)
            (self.store.chain_dir(self.chain) / "data" / self.data_name).unlink(missing_ok=True)
