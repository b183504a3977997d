"""Reading the store: page maps, materializing memory, verifying integrity."""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import stat
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from ..errors import CorruptStore, PermissionDenied, UserError
from ..intervals import IntervalMap, Span, clip_to, intersect, normalize, subtract
from ..kernel.abi import PAGE_SIZE
from .format import SnapshotData, SnapshotMeta, Vma
from .fsutil import (
    DIR_MODE,
    FILE_MODE,
    MAY_EXEC,
    MAY_WRITE,
    Owner,
    check_access,
    make_dirs,
    open_as,
    resolve_parent,
)
from .store import Store, parse_snapshot_id

Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class DataRef:
    """Page content stored in `snapshot`'s data file: extent `extent`, inside frame
    `frame`. The byte offset of address A in the frame's content is A + `delta`."""

    snapshot: str
    extent: int
    frame: int
    delta: int


ZERO = "zero"
Source = DataRef | str  # DataRef, or ZERO


def page_map(store: Store, snapshot_id: str) -> tuple[SnapshotMeta, IntervalMap[Source],
                                                       list[SnapshotMeta]]:
    """For every page holding content at `snapshot_id`: where its content lives.
    Pages not in the map are absent (zeros in anonymous memory, the file's content in a
    private file mapping). Returns (meta, map, lineage)."""
    lineage = store.lineage(snapshot_id)
    return lineage[-1], IntervalMap(resolve_sources(lineage)), lineage


def resolve_sources(lineage: Sequence[SnapshotData]) -> list[tuple[int, int, Source]]:
    """The page map of the last snapshot of `lineage` (its full base first), as pieces.

    A page's content is in the newest snapshot of the lineage that stored it (or marked
    it zero), provided the page held content at every snapshot from that one on (a page
    dropped in between and not stored again is absent). Walked newest first, so each
    stored piece is looked at once: a bitmap of the pages already sourced by newer
    snapshots tells what an older piece still provides. Linear in the pieces stored, not
    in snapshots x pieces."""
    out: list[tuple[int, int, Source]] = []
    newer_present = lineage[-1].present
    valid = normalize(tuple(p) for p in newer_present)  # type: ignore[misc]
    claimed = _PageBitmap()
    for depth, meta in enumerate(reversed(lineage)):
        # Pages present in this snapshot and every newer one. `valid` is within the
        # newer snapshot's `present`, so the same `present` (usual between the rounds of
        # an idle process) leaves it as it is. Intersecting anyway was half of the time
        # resolving a chain of 86 small snapshots took.
        if meta.present != newer_present:
            valid = intersect(valid, normalize(tuple(p) for p in meta.present))  # type: ignore[misc]
            newer_present = meta.present
        if not valid:
            break
        last = depth == len(lineage) - 1  # nothing older reads `claimed` after this one
        pieces: list[tuple[int, int, Source]] = [
            (e.addr, e.addr + e.pages * PAGE_SIZE,
             DataRef(meta.id, i, e.frame, e.skip * PAGE_SIZE - e.addr))
            for i, e in enumerate(meta.extents)
        ]
        pieces.extend((z.addr, z.addr + z.pages * PAGE_SIZE, ZERO) for z in meta.zeros)
        for start, end, src in pieces:
            for vs, ve in clip_to(valid, start, end):
                for rs, re in claimed.unclaimed(vs, ve):
                    out.append((rs, re, src))
                if not last:
                    claimed.claim(vs, ve)
    return out


class _PageBitmap:
    """A set of pages as one byte per page, in chunks allocated on first use (memory
    proportional to the address ranges touched, not to the address space)."""

    SHIFT = 15  # pages per chunk: 2**15 (128 MiB of address space, 32 KiB of bitmap)

    def __init__(self) -> None:
        self.chunks: dict[int, bytearray] = {}

    def _chunks(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(chunk key, first page, end page) for each chunk [start, end) touches."""
        p, e = start // PAGE_SIZE, end // PAGE_SIZE
        while p < e:
            key = p >> self.SHIFT
            lim = min(e, (key + 1) << self.SHIFT)
            yield key, p, lim
            p = lim

    def claim(self, start: int, end: int) -> None:
        for key, p, lim in self._chunks(start, end):
            bm = self.chunks.get(key)
            if bm is None:
                bm = self.chunks[key] = bytearray(1 << self.SHIFT)
            base = key << self.SHIFT
            bm[p - base : lim - base] = b"\x01" * (lim - p)

    def unclaimed(self, start: int, end: int) -> list[Span]:
        """The parts of [start, end) not claimed, as address spans."""
        out: list[Span] = []
        for key, p, lim in self._chunks(start, end):
            bm = self.chunks.get(key)
            if bm is None:
                _add_span(out, p, lim)
                continue
            base = key << self.SHIFT
            i, stop = p - base, lim - base
            while i < stop:
                j = bm.find(1, i, stop)  # the next claimed page
                if j < 0:
                    j = stop
                if j > i:
                    _add_span(out, base + i, base + j)
                if j >= stop:
                    break
                k = bm.find(0, j, stop)  # the next unclaimed one
                i = stop if k < 0 else k
        return out


def _add_span(out: list[Span], first_page: int, end_page: int) -> None:
    s, e = first_page * PAGE_SIZE, end_page * PAGE_SIZE
    if out and out[-1][1] == s:
        out[-1] = (out[-1][0], e)
    else:
        out.append((s, e))


def unsourced(meta: SnapshotMeta, pm: IntervalMap[Source]) -> list[Span]:
    """Pages the snapshot says hold content but for which no snapshot stored any."""
    return subtract(normalize(tuple(p) for p in meta.present), pm.spans())  # type: ignore[misc]


class FrameReader:
    """Decompresses frames, keeping recent ones. Walking a page map in address order
    visits each snapshot's frames mostly in order (a capture's frames follow its
    addresses), so keeping about one frame per snapshot, and a few more, decompresses
    nearly every frame once; the default cache is sized so. A compacted base can break
    the order (a frame it copied whole may hold extents on both sides of pages of other
    frames): that costs at most a frame decompressed again, never a wrong page."""

    def __init__(self, store: Store, metas: Mapping[str, SnapshotData], cache: int = 0
                 ) -> None:
        self.store = store
        self.metas = metas
        self.files: dict[str, int] = {}
        self.inline: dict[str, bytes] = {}  # decoded data_inline, by snapshot
        self.cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self.cache_size = cache or len(metas) + 8
        self.dctx = zstandard.ZstdDecompressor()

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()

    def raw_frame(self, snapshot: str, index: int) -> bytes:
        """The compressed bytes of one frame, as stored."""
        meta = self.metas[snapshot]
        fr = meta.frames[index]
        if meta.data_inline is not None:
            raw = self._inline(snapshot)[fr.offset : fr.offset + fr.length]
            where = "inline data"
        else:
            raw = os.pread(self._fd(snapshot), fr.length, fr.offset)
            where = "data file"
        if len(raw) != fr.length:
            raise CorruptStore(f"snapshot {snapshot}: {where} truncated at frame {index}")
        return raw

    def _inline(self, snapshot: str) -> bytes:
        data = self.inline.get(snapshot)
        if data is None:
            data = self.inline[snapshot] = inline_data(self.metas[snapshot])
        return data

    def _fd(self, snapshot: str) -> int:
        fd = self.files.get(snapshot)
        if fd is None:
            path = self.store.data_path(self.metas[snapshot])
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise CorruptStore(f"snapshot {snapshot}: data file {path} is missing") \
                    from None
            self.files[snapshot] = fd
        return fd

    def open_files(self, snapshots: set[str]) -> None:
        """Open the data files of these snapshots now (those that have one): once open,
        a compaction that deletes them meanwhile does not matter."""
        for sid in snapshots:
            if self.metas[sid].data_file is not None:
                self._fd(sid)

    def frame(self, snapshot: str, index: int, check: bool = True) -> bytes:
        key = (snapshot, index)
        hit = self.cache.get(key)
        if hit is not None:
            self.cache.move_to_end(key)
            return hit
        fr = self.metas[snapshot].frames[index]
        raw = self.raw_frame(snapshot, index)
        try:
            data = self.dctx.decompress(raw, max_output_size=fr.pages * PAGE_SIZE)
        except zstandard.ZstdError as e:
            raise CorruptStore(f"snapshot {snapshot}: frame {index} at byte {fr.offset}: "
                               f"{e}") from e
        if len(data) != fr.pages * PAGE_SIZE or (check and zlib.crc32(data) != fr.crc32):
            raise CorruptStore(f"snapshot {snapshot}: frame {index} at byte {fr.offset} "
                               "does not match its checksum")
        self.cache[key] = data
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return data


def _vma_file_name(v: Vma) -> str:
    return f"{v.start:016x}-{v.end:016x}.mem"


# A materialize starts again when a compaction removes a data file it was about to read;
# this many times at most (each needs another compaction of the chain meanwhile).
_OPEN_ATTEMPTS = 8


def _open_sources(store: Store, snapshot_id: str
                  ) -> tuple[SnapshotMeta, IntervalMap[Source], FrameReader]:
    """The page map of `snapshot_id`, and a FrameReader with every data file it reads
    already open. A compaction of the chain meanwhile may have removed a file of the
    lineage just read (it raises the floor first): then read the lineage again."""
    chain, _ = parse_snapshot_id(snapshot_id)
    for _attempt in range(_OPEN_ATTEMPTS):
        floor = store.floor(chain)
        meta, pm, lineage = page_map(store, snapshot_id)
        reader = FrameReader(store, {m.id: m for m in lineage})
        try:
            reader.open_files({src.snapshot for _, _, src in pm if isinstance(src, DataRef)})
        except CorruptStore:
            reader.close()
            if store.floor(chain) > floor:
                continue
            raise
        return meta, pm, reader
    raise CorruptStore(f"the data of {snapshot_id} kept being removed while being read "
                       f"({_OPEN_ATTEMPTS} compactions meanwhile)")


# Failures to set up an output directory that the one asking can fix.
_OUT_DIR_ERRORS = {errno.EEXIST, errno.ENOTDIR, errno.ELOOP, errno.ENOENT, errno.EROFS,
                   errno.ENAMETOOLONG, errno.ENOSPC, errno.EDQUOT, errno.EISDIR}


def _out_dir_error(out_dir: str, e: OSError) -> Exception:
    """A user's error for a failure to create or open `out_dir`; `e` itself if not."""
    where = e.filename if isinstance(e.filename, str) and e.filename else out_dir
    if isinstance(e, PermissionError):
        return PermissionDenied(f"cannot create or open {out_dir}: {where}: {e.strerror}")
    if e.errno == errno.ELOOP and where == out_dir:
        return UserError(f"{out_dir} is a symbolic link: give the directory it points to")
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        if where == out_dir:
            return UserError(f"{out_dir} exists and is not a directory")
        return UserError(f"cannot create {out_dir}: {where} is not a directory")
    if e.errno == errno.ENOENT and where != out_dir:
        return UserError(f"{where} does not exist: create it first")
    if e.errno in _OUT_DIR_ERRORS:
        return UserError(f"cannot create or open {out_dir}: {where}: {e.strerror}")
    return e


def _open_out_dir(out_dir: str, owner: Owner | None) -> tuple[int, str]:
    """Create `out_dir` (or take it, if it is an empty directory) and open it. Returns
    its descriptor, through which everything is written, and its path with symlinks
    resolved. Without `owner` (the caller writes for itself), missing parents are
    created. With `owner`, the path is walked as that user would (fsutil.resolve_parent):
    the parent must exist and `owner` must be allowed to create entries in it, and the
    directory is handed to `owner`; an existing one must already belong to it. `out_dir`
    itself may not be a symlink either way."""
    parent = -1
    try:
        if owner is None:
            # Only the directories above out_dir: out_dir is opened without following.
            head, name = os.path.split(out_dir.rstrip("/"))
            head = head or ("/" if out_dir.startswith("/") else ".")
            make_dirs(head)  # 0700, whatever the umask
            parent = os.open(head, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            where = os.readlink(f"/proc/self/fd/{parent}")
        else:
            parent, name, where = resolve_parent(out_dir, owner)
            check_access(parent, owner, MAY_WRITE | MAY_EXEC, where)
        if name in ("", ".", ".."):
            raise UserError(f"out_dir {out_dir!r} does not name a new or empty directory")
        try:
            try:
                os.mkdir(name, DIR_MODE, dir_fd=parent)
                created = True
            except FileExistsError:
                created = False
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=parent)
        except OSError as e:
            code = e.errno
            if code == errno.ENOTDIR:  # O_DIRECTORY | O_NOFOLLOW on a symlink says so
                with contextlib.suppress(OSError):
                    if stat.S_ISLNK(os.lstat(name, dir_fd=parent).st_mode):
                        code = errno.ELOOP
            raise OSError(code, os.strerror(code or 0), out_dir) from None  # named in full
    except OSError as e:
        raise _out_dir_error(out_dir, e) from e
    finally:
        if parent >= 0:
            os.close(parent)
    try:
        st = os.fstat(fd)
        if os.listdir(fd):
            raise UserError(f"{out_dir} exists and is not empty: choose a new directory")
        mine = st.st_uid == os.geteuid()
        # Not `owner`'s: taken only if just made (ours, and empty). The name may have been
        # swapped since mkdir, but only for a directory `owner` may move there.
        if owner is not None and st.st_uid != owner.uid and not (created and mine):
            raise PermissionDenied(f"{out_dir} is not owned by uid {owner.uid}")
        # The mode is set only on a directory of our own: without CAP_FOWNER (the systemd
        # unit has none) that is all we may chmod. An existing one of `owner`'s keeps it.
        if mine and stat.S_IMODE(st.st_mode) != DIR_MODE:
            os.fchmod(fd, DIR_MODE)
        if owner is not None and mine:
            os.fchown(fd, owner.uid, owner.gid)  # last: then it is no longer ours
    except BaseException:
        os.close(fd)
        raise
    return fd, os.path.join(where, name)


def _create(name: str, dir_fd: int, owner: Owner | None, flags: int) -> int:
    """A new file in the output directory: never an existing one, never through a
    symlink; handed to `owner` if given."""
    fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 FILE_MODE, dir_fd=dir_fd)
    if owner is not None:
        try:
            os.fchown(fd, owner.uid, owner.gid)
        except BaseException:
            os.close(fd)
            raise
    return fd


def materialize(store: Store, snapshot_id: str, out_dir: Path,
                progress: Progress | None = None) -> dict[str, Any]:
    """Write the memory of every captured mapping at `snapshot_id` into out_dir (new, or
    an empty directory; missing parents are created), plus index.json. Returns the
    index."""
    return materialize_to(store, snapshot_id, str(out_dir), None, progress)[0]


def materialize_to(store: Store, snapshot_id: str, out_dir: str, owner: Owner | None,
                   progress: Progress | None = None) -> tuple[dict[str, Any], str]:
    """materialize, on behalf of `owner` if given (a user that cannot read the store):
    out_dir is created and opened as _open_out_dir says, and every file written is
    handed to `owner`; the clean pages of a file mapping are filled from the file only
    if `owner` may read it (fsutil.open_as). Returns the index and out_dir with symlinks
    resolved."""
    meta, pm, reader = _open_sources(store, snapshot_id)
    try:
        dfd, resolved = _open_out_dir(out_dir, owner)
        try:
            index = _write(meta, pm, reader, dfd, owner, progress)
        finally:
            os.close(dfd)
    finally:
        reader.close()
    return index, resolved


def _write(meta: SnapshotMeta, pm: IntervalMap[Source], reader: FrameReader, dfd: int,
           owner: Owner | None, progress: Progress | None) -> dict[str, Any]:
    captured = [v for v in meta.mappings if v.capture == "private"]
    total_bytes = sum(v.end - v.start for v in captured)
    done = 0
    index_vmas: list[dict[str, object]] = []
    missing = unsourced(meta, pm)
    # No later than the freeze: `created` is taken at the end of the round.
    taken = meta.created - meta.timings.total_ms / 1e3
    for v in captured:
        name = _vma_file_name(v)
        sourced = [(s, e) for s, e, _ in pm.clip(v.start, v.end)]
        not_held = subtract([(v.start, v.end)], normalize(sourced))
        file_status = None
        fd = _create(name, dfd, owner, os.O_RDWR)
        try:
            os.ftruncate(fd, v.end - v.start)
            if v.inode and v.path and not_held:
                file_status = _fill_from_file(fd, v, not_held, owner, taken)
            for s, e, src in pm.clip(v.start, v.end):
                if isinstance(src, DataRef):
                    frame = reader.frame(src.snapshot, src.frame)
                    off = s + src.delta
                    os.pwrite(fd, frame[off : off + (e - s)], s - v.start)
                elif file_status is not None and file_status.startswith("filled"):
                    os.pwrite(fd, bytes(e - s), s - v.start)
            os.fsync(fd)
        finally:
            os.close(fd)
        done += v.end - v.start
        if progress:
            progress(done, total_bytes)
        entry: dict[str, object] = {
            "start": v.start, "end": v.end, "perms": v.perms, "path": v.path,
            "offset": v.offset, "file": name,
        }
        if v.inode:
            entry["clean_file_pages"] = {
                "ranges": [[s, e] for s, e in not_held],
                "content": file_status,
            }
        gaps = intersect(missing, [(v.start, v.end)])
        if gaps:
            entry["unsourced_pages"] = [[s, e] for s, e in gaps]
        index_vmas.append(entry)
    index: dict[str, Any] = {
        "id": meta.id,
        "pid": meta.pid,
        "kind": meta.kind,
        "truncated": meta.truncated,
        "vmas": index_vmas,
        "not_captured": [
            {"start": v.start, "end": v.end, "perms": v.perms, "path": v.path,
             "reason": "shared mapping: content lives in the file or shared memory object"
             if v.capture == "shared" else "kernel-provided mapping"}
            for v in meta.mappings if v.capture != "private"
        ],
    }
    fd = _create("index.json", dfd, owner, os.O_WRONLY)
    with os.fdopen(fd, "w") as f:
        json.dump(index, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.fsync(dfd)
    return index


def _open_backing(v: Vma, owner: Owner | None) -> tuple[int, os.stat_result]:
    """The mapped file at v.path, open for reading, and its stat; for `owner`, only if
    that user may read it."""
    assert v.path is not None
    if owner is not None:
        return open_as(v.path, owner)
    # O_PATH first: a device or FIFO at that path is never opened for reading.
    pfd = os.open(v.path, os.O_PATH | os.O_CLOEXEC)
    try:
        st = os.fstat(pfd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", v.path)
        return os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC), st
    finally:
        os.close(pfd)


def _fill_from_file(fd: int, v: Vma, spans: list[Span], owner: Owner | None,
                    taken: float) -> str:
    """Copy the mapped file's content for pages the snapshot does not hold. Returns
    "filled", "filled, but ..." when the file was modified after `taken` (the snapshot's
    time), or why not ("not filled: ..."). For `owner`, a file that user may not read
    (now: it may have mapped it through a descriptor it was given, or before its
    permissions changed) is not read."""
    assert v.path is not None
    try:
        src, st = _open_backing(v, owner)
    except OSError as e:
        if owner is not None and isinstance(e, PermissionError):
            return f"not filled: {v.path}: uid {owner.uid} may not read it"
        return f"not filled: {v.path}: {e.strerror}"
    try:
        if st.st_ino != v.inode or f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}" \
                != v.dev:
            return f"not filled: {v.path} is no longer the mapped file (inode changed)"
        for lo, hi in spans:
            data = os.pread(src, hi - lo, v.offset + (lo - v.start))  # short past EOF
            if data:
                os.pwrite(fd, data, lo - v.start)
    finally:
        os.close(src)
    if st.st_mtime > taken:
        # The snapshot does not hold these pages, only the file does, and it changed
        # since (same inode): say so rather than pass the new content off as the old.
        # (File times come from a coarse clock: a change within a clock tick, a few ms,
        # after the snapshot may go unnoticed.)
        return (f"filled, but {v.path} was modified after the snapshot: these pages are "
                "its content now, which may differ from the memory at the snapshot")
    return "filled"


def _lineage_in(metas: dict[str, SnapshotMeta], meta: SnapshotMeta) -> list[SnapshotMeta]:
    """Like Store.lineage, from already loaded metadata (a parent must be an earlier
    snapshot of the same chain, as there)."""
    out = [meta]
    while out[-1].kind != "full":
        child = out[-1]
        parent = metas.get(child.parent) if child.parent is not None else None
        if (parent is None or parent.chain != child.chain or parent.seq >= child.seq
                or len(out) > len(metas)):
            raise CorruptStore(f"snapshot {meta.id}: its chain is broken at {child.id}")
        out.append(parent)
    out.reverse()
    return out


def inline_data(meta: SnapshotData) -> bytes:
    """The decoded data_inline of a snapshot."""
    assert meta.data_inline is not None
    try:
        return base64.b64decode(meta.data_inline, validate=True)
    except ValueError as e:
        raise CorruptStore(f"snapshot {meta.id}: data_inline is not base64: {e}") from e


def verify(store: Store, progress: Progress | None = None) -> tuple[int, list[str]]:
    """Check every snapshot: metadata, chain links, data files, every extent's checksum,
    and that every page holding content has a source. Returns (snapshots, problems)."""
    problems: list[str] = []
    metas: dict[str, SnapshotMeta] = {}
    for chain in store.chain_ids():
        try:
            store.chain_info(chain)
            for m in store.chain_snapshots(
                    chain, unresolved=lambda _m, e: problems.append(str(e))):
                metas[m.id] = m
        except (CorruptStore, UserError) as e:
            problems.append(str(e))
    total_bytes = sum(m.data_bytes for m in metas.values())
    done = 0
    reader = FrameReader(store, metas, cache=1)
    try:
        for m in metas.values():
            if m.kind == "delta":
                if m.parent is None or m.parent not in metas:
                    problems.append(f"{m.id}: parent {m.parent} is missing")
                    continue
                if metas[m.parent].chain != m.chain or metas[m.parent].seq >= m.seq:
                    problems.append(f"{m.id}: parent {m.parent} is not earlier in its chain")
            if m.data_inline is not None:
                try:
                    size = len(inline_data(m))
                except CorruptStore as e:
                    problems.append(str(e))
                    continue
                if size != m.data_bytes:
                    problems.append(f"{m.id}: inline data is {size} bytes, metadata says "
                                    f"{m.data_bytes}")
                    continue
            elif m.data_file is not None:
                path = store.data_path(m)
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    problems.append(f"{m.id}: data file {path} is missing")
                    continue
                if size != m.data_bytes:
                    problems.append(f"{m.id}: data file is {size} bytes, metadata says "
                                    f"{m.data_bytes}")
                    continue
            for i in range(len(m.frames)):
                try:
                    reader.frame(m.id, i)
                except CorruptStore as e:
                    problems.append(str(e))
                    break
            done += m.data_bytes
            if progress:
                progress(done, total_bytes)
            if not m.truncated:
                try:
                    # From the metadata already loaded: reloading each lineage from disk
                    # would make verify quadratic in chain length.
                    lineage = _lineage_in(metas, m)
                    gaps = unsourced(m, IntervalMap(resolve_sources(lineage)))
                    if gaps:
                        problems.append(f"{m.id}: {sum(e - s for s, e in gaps) // PAGE_SIZE} "
                                        f"pages hold content but no snapshot stored it")
                except CorruptStore as e:
                    problems.append(str(e))
    finally:
        reader.close()
    return len(metas), problems
