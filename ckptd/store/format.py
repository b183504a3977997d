"""The delta store's on-disk metadata, as pydantic models. docs/store-format.md is the
prose description of the same thing; the two must change together.

Version rule: FORMAT_VERSION changes whenever a reader of the previous version would
misread a file written by this one. Readers refuse any version they do not know
(READABLE_VERSIONS lists the ones they know).
"""

from __future__ import annotations

from typing import Final, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

FORMAT_NAME: Final = "ckptd-store"
FORMAT_VERSION = 4
# Version 1 had no `data_inline`; its files mean the same under version 2's reader.
# Version 3 added the chain floor (FLOOR.json): snapshot files below it are not part of
# the chain. Its snapshot files are laid out as version 2's.
# Version 4 lets a delta name the snapshot whose `vmas` it shares (`vmas_from`) instead
# of repeating them; a version 3 reader would take such a file's mappings as missing.
READABLE_VERSIONS: Final = (1, 2, 3, 4)
# The first version with chain floors. A store of an older version is upgraded to it
# (STORE.json `version`) before its first floor is written, so that an older ckptd,
# which would list the files below a floor, refuses the store instead.
FLOOR_VERSION: Final = 3
# Compressed data up to this size is kept in the metadata file itself (data_inline)
# instead of a data file: a small delta then costs one file creation and two fsyncs
# instead of two and four. An idle Python interpreter dirties 30-70 heap pages between
# rounds, 25-60 KiB compressed: such deltas fit.
INLINE_MAX_BYTES: Final = 64 << 10

TrackerName = Literal["uffd-wp", "hash"]
Kind = Literal["full", "delta"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoreInfo(_Model):
    """STORE.json: identifies the directory as a ckptd store."""

    format: Literal["ckptd-store"] = FORMAT_NAME
    version: int = FORMAT_VERSION
    created: float


class ChainInfo(_Model):
    """chains/<chain>/CHAIN.json: the process (one mm) a chain of snapshots belongs to."""

    format_version: int = FORMAT_VERSION
    chain: str
    pid: int
    start_time: int = Field(description="process start time, clock ticks since boot")
    mm_fingerprint: str = Field(description="stack/brk/arg/env addresses fixed at exec")
    comm: str
    exe: str | None
    cmdline: list[str]
    uid: int
    created: float


class ChainFloor(_Model):
    """chains/<chain>/FLOOR.json: the chain's snapshots with a `seq` below `floor` are
    retired. Compaction writes it once the new base at `floor` is published, so that it
    can remove the older files without a directory fsync after each one: whatever a
    crash leaves below the floor is never listed, restored or counted."""

    format_version: int = FORMAT_VERSION
    chain: str
    floor: int = Field(ge=1, description="the lowest seq that is part of the chain")
    created: float


class Vma(_Model):
    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str | None
    # How the snapshot treats this mapping's memory:
    #   "private": captured (anonymous or private file mapping; clean file pages excluded)
    #   "shared": MAP_SHARED; content lives in the file or shmem object, not captured
    #   "special": kernel-provided ([vdso], [vvar], ...), not captured
    capture: Literal["private", "shared", "special"]


class Frame(_Model):
    """One independent zstd frame in the data file: the pages of one or more extents,
    back to back (at most FRAME_PAGES pages)."""

    offset: int = Field(description="byte offset of the frame in the snapshot's data file")
    length: int = Field(description="compressed length of the frame in bytes")
    pages: int = Field(description="pages in the frame's uncompressed content")
    crc32: int = Field(description="zlib.crc32 of the frame's uncompressed content")


class Extent(_Model):
    """Contiguous non-zero pages of the process, stored inside one frame."""

    addr: int
    pages: int
    frame: int = Field(description="index into the snapshot's frames")
    skip: int = Field(description="pages of the frame's content that come before this extent")


class ZeroRun(_Model):
    """Contiguous pages whose content is all zero bytes (no data stored)."""

    addr: int
    pages: int


class Timings(_Model):
    prepare_ms: float = 0.0
    freeze_ms: float = 0.0
    scan_ms: float = 0.0
    read_ms: float = 0.0
    compress_ms: float = 0.0
    write_ms: float = 0.0
    total_ms: float = 0.0


class Counts(_Model):
    pages_dirty: int = Field(0, description="pages reported changed by the tracker")
    pages_read: int = 0
    pages_stored: int = Field(0, description="pages with data in this snapshot's file")
    pages_zero: int = 0
    pages_unchanged: int = Field(0, description="read but equal to the parent (hash tracker)")
    pages_present: int = Field(0, description="pages with content in the process at this time")
    bytes_read: int = 0
    bytes_stored: int = 0


class SnapshotHead(BaseModel):
    """The fields of a snapshot's metadata needed to extend its chain; parsing only these
    skips validating every extent of a large snapshot."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    format_version: int
    id: str
    chain: str
    seq: int
    parent: str | None
    kind: Kind
    tracker: TrackerName
    truncated: bool = False
    created: float
    counts: Counts
    present: list[tuple[int, int]]
    data_file: str | None


class SnapshotData(Protocol):
    """What reading a snapshot's pages needs (its page map, frames and data), and what
    walking its lineage needs. SnapshotMeta has it, and so does SnapshotPages."""

    @property
    def id(self) -> str: ...
    @property
    def chain(self) -> str: ...
    @property
    def seq(self) -> int: ...
    @property
    def parent(self) -> str | None: ...
    @property
    def kind(self) -> Kind: ...
    @property
    def present(self) -> list[tuple[int, int]]: ...
    @property
    def data_file(self) -> str | None: ...
    @property
    def data_inline(self) -> str | None: ...
    @property
    def frames(self) -> list[Frame]: ...
    @property
    def extents(self) -> list[Extent]: ...
    @property
    def zeros(self) -> list[ZeroRun]: ...


def _check_one_data_place(data_file: str | None, data_inline: str | None) -> None:
    if data_file is not None and data_inline is not None:
        raise ValueError("data_file and data_inline are both set; at most one may be")


class _SnapshotKey(_Model):
    """The first fields of a snapshot's metadata, shared by SnapshotMeta and
    SnapshotPages (same types and defaults in both)."""

    format_version: int = FORMAT_VERSION
    id: str
    chain: str
    seq: int
    parent: str | None
    kind: Kind


class SnapshotPages(_SnapshotKey):
    """The fields of a snapshot's metadata that folding it into a new base needs
    (SnapshotData). Compaction parses the snapshots it folds with this: validating their
    vmas, counts and timings was most of the cost of parsing a small delta, and none of
    them is read. Same types and defaults as SnapshotMeta, so whatever SnapshotMeta
    accepts, this accepts too."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    present: list[tuple[int, int]]
    data_file: str | None
    data_inline: str | None = None
    frames: list[Frame]
    extents: list[Extent]
    zeros: list[ZeroRun]

    @model_validator(mode="after")
    def _one_data_place(self) -> SnapshotPages:
        _check_one_data_place(self.data_file, self.data_inline)
        return self


class SnapshotMeta(_SnapshotKey):
    """chains/<chain>/snapshots/<id>.json: everything needed to restore this snapshot,
    given its ancestors."""

    full_reason: str | None = Field(None, description="why this is a full snapshot")
    pid: int
    created: float
    tracker: TrackerName
    tracker_reason: str = Field("", description="why this tracker was chosen")
    consistency: Literal["frozen", "fuzzy"]
    truncated: bool = Field(
        False, description="a page budget stopped capture early; the rest comes next round"
    )
    vmas: list[Vma] | None = Field(
        None, description="the process's mappings; null in a delta whose mappings are "
        "those of an earlier snapshot (vmas_from)")
    vmas_from: str | None = Field(
        None, description="(version 4) the id of the snapshot of this chain whose vmas "
        "are this delta's too; Store.get and Store.lineage resolve it")
    present: list[tuple[int, int]] = Field(
        description="[start, end) ranges of pages that hold content (not clean file pages, "
        "not unpopulated, not the zero page) at snapshot time"
    )
    data_file: str | None = Field(description="file name under data/, or null if no extents "
                                  "or the data is inline")
    data_inline: str | None = Field(
        None, description="the data itself, base64, when small (version 2); frames' offsets "
        "are into its decoded bytes")
    data_bytes: int
    frames: list[Frame]
    extents: list[Extent]
    zeros: list[ZeroRun]
    counts: Counts
    timings: Timings

    @model_validator(mode="after")
    def _one_data_place(self) -> SnapshotMeta:
        _check_one_data_place(self.data_file, self.data_inline)
        if (self.vmas is None) == (self.vmas_from is None):
            raise ValueError("exactly one of vmas and vmas_from must be set")
        if self.vmas_from is not None and self.kind != "delta":
            raise ValueError("vmas_from is set in a full snapshot, which must hold its vmas")
        return self

    @property
    def mappings(self) -> list[Vma]:
        """`vmas`, which Store.get and Store.lineage always resolve: an error if this
        metadata was parsed without that (a bug, not a store problem)."""
        if self.vmas is None:
            raise RuntimeError(f"snapshot {self.id}: vmas_from {self.vmas_from} not resolved")
        return self.vmas


_VMA_ROWS = TypeAdapter(list[Vma])


def vmas_json(vmas: list[Vma]) -> bytes:
    """The JSON of a snapshot's `vmas`, for `snapshot_json`."""
    return _VMA_ROWS.dump_json(vmas)


def snapshot_json(meta: SnapshotMeta, vmas: bytes | None = None) -> bytes:
    """The metadata file's content. `vmas`, when given, must be `vmas_json(meta.vmas)`:
    a process's mappings repeat from round to round, and their rows are most of the cost
    of serializing a small delta, so the writer keeps that JSON while they repeat. It
    goes first in the object; readers do not depend on key order."""
    if vmas is None or meta.vmas is None:
        return meta.model_dump_json().encode()
    rest = meta.model_dump_json(exclude={"vmas"}).encode()
    return b'{"vmas":' + vmas + b"," + rest[1:]
