"""The store directory: chains of snapshots, listed by their published metadata.

Layout (docs/store-format.md is the full description):
  STORE.json                        store identity and format version
  tmp/                              files being written, and their writers' owner locks
                                    (tmpfiles.py); garbage once the owner is gone
  chains/<chain>/CHAIN.json         the process this chain belongs to
  chains/<chain>/FLOOR.json         snapshots below this seq are retired (after compaction)
  chains/<chain>/snapshots/<id>.json  published snapshot metadata (the commit point)
  chains/<chain>/data/<file>.zst    page data: independent zstd frames
  chains/<chain>/state/             tracker state for the next snapshot (not needed to restore)
  chains/<chain>/lock               flock()ed by whoever writes to the chain
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError

from ..errors import CorruptStore, PermissionDenied, StoreError, UnknownSnapshot
from ..kernel.syscalls import syncfs
from .format import (
    FLOOR_VERSION,
    FORMAT_NAME,
    READABLE_VERSIONS,
    ChainFloor,
    ChainInfo,
    SnapshotData,
    SnapshotHead,
    SnapshotMeta,
    SnapshotPages,
    StoreInfo,
    snapshot_json,
    vmas_json,
)
from .fsutil import FILE_MODE, atomic_write, fsync_dir, make_private_dir, write_temp
from .tmpfiles import TmpOwner, remove_leftovers
from .writerid import writer_id, writer_running

# Names that come from outside (requests, the command line) and become paths in the
# store: nothing else may reach a path, so a name like '../../tmp/x-1' cannot lead the
# service outside the store. Each number is at most 20 digits (a 64-bit counter), so
# that int() of it never meets Python's limit on digits.
CHAIN_NAME = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
SNAPSHOT_ID = re.compile(r"([0-9]{1,20}-[0-9]{1,20})-([0-9]{1,20})")
# The root user's default store: the service's (its StateDirectory=ckptd holds it), so
# that root's `ckptd list` finds the service's snapshots while the service is stopped.
ROOT_STORE = Path("/var/lib/ckptd/store")

# A data file's name as SnapshotWriter chooses it: '<snapshot id>.<8 hex>.zst'. Only the
# snapshot with that id may refer to it, which is what lets clean_orphans skip parsing.
_DATA_NAME = re.compile(r"([0-9]+-[0-9]+-[0-9]+)\.[0-9a-f]{8}\.zst")

# Spare metadata files (see retire_snapshot): at most this many per chain, each at most
# this large (a spare keeps its old content, and so its blocks, until it is reused).
SPARES_PER_CHAIN = 64
SPARE_MAX_BYTES = 256 << 10
_spare_numbers = itertools.count()  # spare names are never reused within a process
# Leftovers in snapshots/ of a writer that died: a spare, or atomic_write's temporary.
# `<pid>-<start>` (writerid.py), or `<pid>` alone from older releases.
_WRITER = r"([0-9]+)(?:-([0-9]+))?"
_LEFTOVER = re.compile(rf"\.spare\.{_WRITER}\.[0-9]+|\..+\.{_WRITER}\.tmp")
# atomic_write's temporary of FLOOR.json, in the chain's directory.
_FLOOR_LEFTOVER = re.compile(rf"\.FLOOR\.json\.{_WRITER}\.tmp")

_Subset = TypeVar("_Subset", SnapshotHead, SnapshotPages)
# A walk back to the full base starts again when a compaction retires a parent under it;
# this many times at most (each needs another compaction of the chain meanwhile).
_WALK_ATTEMPTS = 8
# How a snapshot file that capture wrote begins (format.snapshot_json puts `vmas` first).
_VMAS_FIRST = b'{"vmas":'
_Walked = TypeVar("_Walked", bound=SnapshotData)


def default_store_path() -> Path:
    env = os.environ.get("CKPTD_STORE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return ROOT_STORE
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "ckptd"


def _check_version(kind: str, where: Path | str, version: object) -> None:
    if version is None:
        # Every writer records it: a file without one was not written by ckptd whole.
        raise CorruptStore(f"{where} records no format version, which every file "
                           "ckptd writes does: it is damaged (run `ckptd verify`)")
    if version not in READABLE_VERSIONS:
        known = ", ".join(str(v) for v in READABLE_VERSIONS)
        raise StoreError(
            f"{where} is {kind} format version {version}; this ckptd reads versions "
            f"{known}: use a ckptd release that matches the store"
        )


def parse_snapshot_id(snapshot_id: str) -> tuple[str, int]:
    """'<pid>-<n>-<seq>' -> (chain '<pid>-<n>', seq). Anything else (ASCII digits only)
    is refused: the id becomes a path in the store."""
    m = SNAPSHOT_ID.fullmatch(snapshot_id)
    if m is None:
        raise UnknownSnapshot(
            f"{snapshot_id[:80]!r} is not a snapshot id (ids look like 1234-1-5); "
            "see `ckptd list`"
        )
    return m.group(1), int(m.group(2))


def check_chain_name(chain: str) -> str:
    """`chain` if it is a chain name ('<pid>-<n>'), else UnknownSnapshot: the name
    becomes a path in the store."""
    if CHAIN_NAME.fullmatch(chain) is None:
        raise UnknownSnapshot(f"{chain[:80]!r} is not a chain name (chains look like 1234-1)")
    return chain


class StorePermissionDenied(StoreError, PermissionDenied):
    """No permission to use the store: a StoreError with PermissionDenied's exit code."""


@dataclass(frozen=True)
class StagedFile:
    """A snapshot's metadata written under a temporary name (Store.stage)."""

    chain: str
    tmp: str   # where it is now
    path: str  # where publish_staged renames it
    spare: bool  # tmp is one of this process's spares of the chain


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.chains_dir = root / "chains"
        self.tmp_dir = root / "tmp"
        # Taken by the first temporary file this Store writes, kept until close().
        self._tmp_owner = TmpOwner(str(self.tmp_dir))
        self._chain_dirs: dict[str, Path] = {}  # paths are built often, and never change
        self._state_dirs: dict[str, Path] = {}
        # The per-round path uses plain strings: Path objects cost more than the syscalls.
        self._chains = str(self.chains_dir)
        # Per chain: spare metadata files this process may publish through.
        self._spares: dict[str, list[str]] = {}
        # Per chain this process publishes in: its snapshots/ directory, kept open for
        # the directory fsync that ends each publish (an open and a close fewer a round).
        # Released with the chain's spares (drop_spares).
        self._snapshot_dir_fds: dict[str, int] = {}
        self._fds_lock = threading.Lock()
        self._root_fd = -1  # the store's root directory, for sync(); opened on first use
        # Per chain: the newest snapshot this process listed there, the mappings it was
        # taken with (an opaque key the capture compares), and the snapshot whose file
        # holds their `vmas`. A next delta with the same parent and mappings names that
        # holder (vmas_from) instead of repeating the vmas. Only this process's own
        # publishes are noted, so a parent it did not write is never matched.
        self.published_vmas: dict[str, tuple[str, object, str]] = {}
        # STORE.json's `version` as last read or written (raise_floor upgrades it); 0
        # until then.
        self.version = 0

    # --- opening ------------------------------------------------------------------------

    @classmethod
    def open(cls, root: Path, create: bool = False) -> Store:
        root = Path(root)
        try:
            return cls._open(root, create)
        except PermissionError as e:
            raise StorePermissionDenied(
                f"no permission to use the store at {root} ({e.filename}): run as its owner, "
                "or use another store (--store DIR; for the service, service.store)"
            ) from e
        except (FileExistsError, NotADirectoryError) as e:
            # mkdir of the store, or of a directory in it, where a file is.
            raise StoreError(
                f"cannot use {root} as a store: {e.filename} is in the way "
                f"({e.strerror}); choose another with --store DIR"
            ) from e

    @classmethod
    def _open(cls, root: Path, create: bool) -> Store:
        info_path = root / "STORE.json"
        if not info_path.exists():
            if not create:
                if not root.exists():
                    raise StoreError(
                        f"no store at {root}: take a snapshot first, or pass --store DIR "
                        "(or set CKPTD_STORE)"
                    )
                raise StoreError(f"{root} is not a ckptd store (no STORE.json)")
            _check_owner(root)
            # durable: the snapshots' durability needs the store's own entry too.
            make_private_dir(root, follow=True, durable=True)
            atomic_write(info_path, StoreInfo(created=time.time()).model_dump_json().encode())
        try:
            raw = json.loads(info_path.read_bytes())
        except (OSError, ValueError) as e:
            raise StoreError(f"cannot read {info_path}: {e}") from e
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
            raise StoreError(f"{root} is not a ckptd store (STORE.json has no ckptd format)")
        _check_version("a store of", info_path, raw.get("version"))
        store = cls(root)
        store.version = raw["version"]
        if create:
            _check_owner(root)
        # Only a store of our own is ever changed: root may read another user's, but
        # would follow that user's symlinks in it (chains/ -> /etc: chmod /etc 0700).
        if create or (os.access(root, os.W_OK) and os.stat(root).st_uid == os.geteuid()):
            new_dirs = not (store.chains_dir.is_dir() and store.tmp_dir.is_dir())
            make_private_dir(store.chains_dir)
            make_private_dir(store.tmp_dir)
            if new_dirs:
                # Durable before the first chain is created in chains/ (create_chain
                # fsyncs chains/, which alone does not keep chains/ itself).
                fsync_dir(root)
        return store

    # --- chains -------------------------------------------------------------------------

    def chain_dir(self, chain: str) -> Path:
        d = self._chain_dirs.get(chain)
        if d is None:
            check_chain_name(chain)  # only names checked once get into the cache
            if len(self._chain_dirs) > 4096:
                self._chain_dirs.clear()
            d = self._chain_dirs[chain] = self.chains_dir / chain
        return d

    def state_dir(self, chain: str) -> Path:
        """The chain's tracker state directory (the same object every time)."""
        d = self._state_dirs.get(chain)
        if d is None:
            if len(self._state_dirs) > 4096:
                self._state_dirs.clear()
            d = self._state_dirs[chain] = self.chain_dir(chain) / "state"
        return d

    def chain_exists(self, chain: str) -> bool:
        return os.path.isdir(f"{self._chains}/{check_chain_name(chain)}")

    def chain_ids(self) -> list[str]:
        try:
            names = os.listdir(self.chains_dir)
        except FileNotFoundError:
            return []
        # Anything else in chains/ is not a chain ckptd made: ignored, as it cannot be named.
        return sorted((n for n in names if CHAIN_NAME.fullmatch(n) is not None
                       and (self.chains_dir / n / "CHAIN.json").exists()),
                      key=_chain_sort_key)

    def chain_info(self, chain: str) -> ChainInfo:
        path = self.chain_dir(chain) / "CHAIN.json"
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise UnknownSnapshot(f"no chain {chain!r} in {self.root}") from None
        except ValueError as e:
            raise CorruptStore(f"{path}: {e}") from e
        if not isinstance(raw, dict):
            raise CorruptStore(f"{path}: not a JSON object")
        _check_version("a chain of", path, raw.get("format_version"))
        try:
            info = ChainInfo.model_validate(raw)
        except ValidationError as e:
            raise CorruptStore(f"{path}: {e}") from e
        if info.chain != chain:
            raise CorruptStore(f"{path}: names chain {info.chain!r}, not {chain!r}")
        return info

    def find_chain(self, pid: int, start_time: int) -> list[ChainInfo]:
        """Chains of this process incarnation (same pid and start time), oldest first."""
        out = []
        for c in self.chain_ids():
            if c.split("-")[0] != str(pid):
                continue
            info = self.chain_info(c)
            if info.start_time == start_time:
                out.append(info)
        return out

    def create_chain(self, info_fields: dict[str, object]) -> ChainInfo:
        pid = info_fields["pid"]
        k = 1
        while True:
            chain = f"{pid}-{k}"
            d = self.chain_dir(chain)
            try:
                d.mkdir(mode=0o700)
            except FileExistsError:
                k += 1
                continue
            break
        # A directory of that name kept open is of a chain deleted by hand since.
        self._close_dir_fds([chain])
        for sub in ("snapshots", "data", "state"):
            (d / sub).mkdir(mode=0o700)
        info = ChainInfo.model_validate({**info_fields, "chain": chain, "created": time.time()})
        atomic_write(d / "CHAIN.json", info.model_dump_json(indent=1).encode())
        fsync_dir(self.chains_dir)
        return info

    @contextmanager
    def lock_chain(self, chain: str, before_waiting: Callable[[], None] | None = None
                   ) -> Iterator[None]:
        """Exclusive writer lock on a chain (released by the kernel if we die).
        `before_waiting`: called if the lock is held elsewhere, before waiting for it
        (a caller holding other chains' locks lets go of them there)."""
        fd = os.open(f"{self._chains}/{check_chain_name(chain)}/lock",
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            if before_waiting is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    before_waiting()
                    fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # --- snapshots ----------------------------------------------------------------------

    def snapshot_path(self, snapshot_id: str) -> Path:
        chain, _ = parse_snapshot_id(snapshot_id)
        return Path(self.snapshot_file(chain, snapshot_id))

    def _read_snapshot(self, snapshot_id: str) -> tuple[str, bytes]:
        # A plain string path: compaction reads ~85 files at a time, and building Path
        # objects for them was about a tenth of its profile.
        path = self.snapshot_file(parse_snapshot_id(snapshot_id)[0], snapshot_id)
        try:
            with open(path, "rb", buffering=0) as f:
                return path, f.read()
        except FileNotFoundError:
            raise self._no_snapshot(snapshot_id) from None

    def _no_snapshot(self, snapshot_id: str) -> UnknownSnapshot:
        return UnknownSnapshot(f"no snapshot {snapshot_id!r} in {self.root}; see `ckptd list`")

    def _check_floor(self, snapshot_id: str, floor: int | None) -> None:
        """Reading a snapshot by id: a file below its chain's floor is a leftover of a
        compaction (see raise_floor), not a snapshot. `floor`: the chain's floor if the
        caller has read it already (from `listing`); None: read it here."""
        chain, seq = parse_snapshot_id(snapshot_id)
        if seq < (self.floor(chain) if floor is None else floor):
            raise self._no_snapshot(snapshot_id)

    def get(self, snapshot_id: str, floor: int | None = None) -> SnapshotMeta:
        """The snapshot's metadata, its `vmas` resolved (see _with_vmas)."""
        self._check_floor(snapshot_id, floor)
        return self._with_vmas(self._load(snapshot_id))

    def _with_vmas(self, meta: SnapshotMeta,
                   known: Mapping[str, SnapshotMeta] | None = None) -> SnapshotMeta:
        """`meta` with its `vmas` filled in (and `vmas_from` cleared) if it shares those
        of an earlier snapshot (format version 4). That snapshot, the holder, is the
        delta's nearest ancestor that stores its vmas: every snapshot from the holder to
        the delta has the same mappings. A compaction may have retired the holder; it
        made the chain's floor snapshot, which lies between the two, a full base with
        those same vmas, so the floor's snapshot is read then. `known`: metadata
        already loaded, by id (resolved or not), tried before reading a file."""
        if meta.vmas is not None:
            return meta
        holder = meta.vmas_from
        assert holder is not None  # the model requires one of the two
        try:
            holder_chain, holder_seq = parse_snapshot_id(holder)
        except UnknownSnapshot:
            raise CorruptStore(f"snapshot {meta.id} shares the vmas of {holder[:80]!r}, "
                               "which is not a snapshot id") from None
        if holder_chain != meta.chain or holder_seq >= meta.seq:
            raise CorruptStore(f"snapshot {meta.id} shares the vmas of {holder}, which is "
                               f"not an earlier snapshot of chain {meta.chain}")
        got = known.get(holder) if known is not None else None
        if got is not None and got.vmas is not None:
            return meta.model_copy(update={"vmas": got.vmas, "vmas_from": None})
        for _attempt in range(_WALK_ATTEMPTS):
            floor = self.floor(meta.chain)
            if meta.seq < floor:
                raise self._no_snapshot(meta.id)  # retired meanwhile
            source = holder if holder_seq >= floor else f"{meta.chain}-{floor}"
            got = known.get(source) if known is not None else None
            if got is None:
                try:
                    got = self._load(source)
                except UnknownSnapshot:
                    if self.floor(meta.chain) > floor:
                        continue  # a compaction meanwhile: look again
                    raise CorruptStore(f"snapshot {meta.id} shares the vmas of {source}, "
                                       "which is missing") from None
            if got.vmas is None or (source != holder and got.kind != "full"):
                raise CorruptStore(f"snapshot {meta.id} shares the vmas of {source}, which "
                                   "does not hold them")
            return meta.model_copy(update={"vmas": got.vmas, "vmas_from": None})
        raise CorruptStore(f"the vmas of snapshot {meta.id} kept moving while being read "
                           f"({_WALK_ATTEMPTS} compactions meanwhile)")

    def _load(self, snapshot_id: str) -> SnapshotMeta:
        """The snapshot's file, parsed, with no floor check."""
        path, raw = self._read_snapshot(snapshot_id)
        try:
            return _check_identity(path, snapshot_id, _parse_meta(path, raw))
        except CorruptStore:
            if self._retired_meanwhile(snapshot_id):
                raise self._no_snapshot(snapshot_id) from None
            raise

    def _retired_meanwhile(self, snapshot_id: str) -> bool:
        """For a file of `snapshot_id` that did not parse, or described another
        snapshot: is the id below its chain's floor now? Readers take no lock. A
        compaction may have retired the file as a spare after the reader opened it, and
        a publish may have written another snapshot's metadata into that same inode
        (retire_snapshot) before the reader read it. That is a snapshot removed
        meanwhile, not damage: no snapshot, and a walk to the base starts again."""
        chain, seq = parse_snapshot_id(snapshot_id)
        return seq < self.floor(chain)

    def head(self, snapshot_id: str, floor: int | None = None) -> SnapshotHead:
        """The chain-linking fields of a snapshot (fast: extents are not validated)."""
        self._check_floor(snapshot_id, floor)
        return self._parse_subset(SnapshotHead, snapshot_id)

    def pages(self, snapshot_id: str, floor: int | None = None) -> SnapshotPages:
        """What folding a snapshot into a new base needs (fast: vmas, counts and timings
        are not validated)."""
        self._check_floor(snapshot_id, floor)
        return self._parse_subset(SnapshotPages, snapshot_id)

    def _parse_subset(self, model: type[_Subset], snapshot_id: str, skip: bytes = b""
                      ) -> _Subset:
        """Parse some fields of a snapshot, failing the way `get` does: the same
        version check, and the full parse's precise error when the subset is invalid.

        `skip`, when given, is `{"vmas":` + a complete JSON value + `,`. A file that
        begins with exactly these bytes is parsed as `{` + the rest: the same members
        but `vmas`, which `model` ignores anyway. The rest is valid JSON whenever the
        whole file is; the other way round fails only if the rest starts with `}`, and
        `{}` lacks the required fields. So the result, and on any failure the error
        (from the whole file), are those of parsing the whole file, without the cost
        of scanning the mappings."""
        assert not skip or "vmas" not in model.model_fields
        path, raw = self._read_snapshot(snapshot_id)
        doc = b"{" + raw[len(skip):] if skip and raw.startswith(skip) else raw
        try:
            try:
                sub = model.model_validate_json(doc)
            except ValidationError as e:
                _parse_meta(path, raw)  # raises the precise error (version, corruption)
                raise CorruptStore(f"{path}: {e.errors()[0]['loc']}: "
                                   f"{e.errors()[0]['msg']}") from e
            # The models default format_version (for writers); a file must carry it.
            _check_version("a snapshot of", path, sub.format_version
                           if b'"format_version"' in raw else None)
            return _check_identity(path, snapshot_id, sub)
        except CorruptStore:
            if self._retired_meanwhile(snapshot_id):
                raise self._no_snapshot(snapshot_id) from None
            raise

    def chain_snapshots(self, chain: str,
                        unresolved: Callable[[SnapshotMeta, CorruptStore], None] | None = None
                        ) -> list[SnapshotMeta]:
        """The chain's listed snapshots, by sequence, their vmas resolved. `unresolved`:
        for a check of the store (verify), which reports each damaged snapshot: called
        for a snapshot whose vmas cannot be resolved, which is then listed as parsed
        (vmas None) instead of the whole call failing."""
        floor, ids = self.listing(chain)
        out: list[SnapshotMeta] = []
        loaded: dict[str, SnapshotMeta] = {}
        for i in ids:
            try:
                self._check_floor(i, floor)
                meta = self._load(i)
                try:
                    meta = self._with_vmas(meta, loaded)
                except CorruptStore as e:
                    if unresolved is None:
                        raise
                    unresolved(meta, e)
                loaded[i] = meta
                out.append(meta)
            except UnknownSnapshot:
                # A compaction retired it since the listing: it raised the floor above
                # it first. Anything else missing is damage (files at or above the floor
                # are only ever replaced, never removed).
                if parse_snapshot_id(i)[1] < self.floor(chain):
                    continue
                raise CorruptStore(
                    f"snapshot {i} of chain {chain} vanished while being listed, and no "
                    "compaction retired it") from None
        return out

    def list_snapshots(self) -> list[SnapshotMeta]:
        out: list[SnapshotMeta] = []
        for c in self.chain_ids():
            out.extend(self.chain_snapshots(c))
        return out

    def snapshot_ids(self, chain: str) -> list[str]:
        """Published snapshot ids of a chain, by sequence, without parsing any file."""
        return self.listing(chain)[1]

    def listing(self, chain: str) -> tuple[int, list[str]]:
        """The chain's floor, and its published snapshot ids (those at or above the
        floor) by sequence. The floor is read first: a compaction that raises it in
        between only retires files this listing may still name, as if it came later."""
        floor = self.floor(chain)
        return floor, [i for i in self.snapshot_files(chain) if parse_snapshot_id(i)[1] >= floor]

    def snapshot_files(self, chain: str) -> list[str]:
        """The ids of every `<id>.json` in the chain's snapshots/, by sequence, those
        below the floor included (which are not snapshots: see raise_floor). A file of
        another chain's id, or not named like an id, is not one of them."""
        d = f"{self._chains}/{check_chain_name(chain)}/snapshots"
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return []
        ids = []
        for n in names:
            m = SNAPSHOT_ID.fullmatch(n[:-5]) if n.endswith(".json") else None
            if m is not None and m.group(1) == chain:
                ids.append((int(m.group(2)), m.group(0)))
        return [i for _, i in sorted(ids)]

    def floor(self, chain: str) -> int:
        """The chain's floor: the lowest seq that is part of the chain (1 if compaction
        never raised it). Files of lower snapshots are leftovers, whatever they hold."""
        path = f"{self._chains}/{check_chain_name(chain)}/FLOOR.json"
        try:
            with open(path, "rb", buffering=0) as f:
                raw = f.read()
        except FileNotFoundError:
            return 1
        info = _parse_versioned(ChainFloor, "a chain floor of", path, raw)
        if info.chain != chain:
            raise CorruptStore(f"{path}: names chain {info.chain!r}, not {chain!r}")
        return info.floor

    def raise_floor(self, chain: str, floor: int) -> None:
        """Record, atomically and durably, that the chain's snapshots below `floor` are
        retired. Compaction calls it once the full base at `floor` is published, and
        then removes the older files with no directory fsync: from here on, readers
        skip every file below the floor, and what a crash (or a power loss, which may
        undo any of those removals) leaves of them is never listed, restored or counted;
        clean_leftovers and the next compaction delete it. Before the first floor of
        the store, STORE.json is upgraded to version 3, which an older ckptd refuses
        (it would list those files). Floors only rise. Call with the chain lock held."""
        if self.version < FLOOR_VERSION:
            self._upgrade_store()
        info = ChainFloor(chain=chain, floor=floor, created=time.time())
        atomic_write(f"{self._chains}/{chain}/FLOOR.json", info.model_dump_json().encode())

    def _upgrade_store(self) -> None:
        """STORE.json to FLOOR_VERSION, durably; `created` and `format` stay."""
        path = self.root / "STORE.json"
        raw = json.loads(path.read_bytes())
        _check_version("a store of", path, raw.get("version"))
        if raw["version"] < FLOOR_VERSION:  # another ckptd may have done it meanwhile
            info = StoreInfo.model_validate({**raw, "version": FLOOR_VERSION})
            atomic_write(path, info.model_dump_json().encode())
        self.version = max(raw["version"], FLOOR_VERSION)

    def latest(self, chain: str) -> SnapshotMeta | None:
        floor, ids = self.listing(chain)
        return self.get(ids[-1], floor) if ids else None

    def lineage(self, snapshot_id: str) -> list[SnapshotMeta]:
        """The snapshots needed to restore `snapshot_id`: its full base first, it last,
        each with its vmas resolved."""
        chain, seq = parse_snapshot_id(snapshot_id)
        for _attempt in range(_WALK_ATTEMPTS):
            walked = self._walk(snapshot_id, lambda: self.get(snapshot_id), self._load)
            out: list[SnapshotMeta] = []
            known: dict[str, SnapshotMeta] = {}
            try:
                for m in walked:  # base first: a holder comes before its sharers
                    m = self._with_vmas(m, known)
                    known[m.id] = m
                    out.append(m)
            except UnknownSnapshot:
                if seq < self.floor(chain):
                    raise
                continue  # a compaction between the walk and the vmas: walk again
            return out
        raise CorruptStore(f"snapshot chain of {snapshot_id} kept changing while being read "
                           f"({_WALK_ATTEMPTS} compactions meanwhile)")

    def fold_lineage(self, snapshot_id: str) -> tuple[SnapshotMeta, list[SnapshotData]]:
        """What compacting up to `snapshot_id` reads: that snapshot in full (it is
        rewritten), and its lineage like `lineage` (it last), the others parsed only
        as far as folding them needs (`pages`)."""
        got: list[SnapshotMeta] = []
        skip = b""

        def first() -> SnapshotData:
            nonlocal skip
            meta = self.get(snapshot_id)
            got[:] = [meta]
            # Captures write `vmas` first, and a process's mappings mostly stay the
            # same from round to round: the folded files usually begin with the very
            # bytes of `meta`'s. Skipping them about halves the parse of a small delta,
            # and SnapshotPages does not read them.
            skip = _VMAS_FIRST + vmas_json(meta.mappings) + b"," if meta.kind != "full" else b""
            return meta

        def load(i: str) -> SnapshotData:
            return self._parse_subset(SnapshotPages, i, skip=skip)

        lineage = self._walk(snapshot_id, first, load)
        return got[0], lineage

    def _walk(self, snapshot_id: str, first: Callable[[], _Walked],
              load: Callable[[str], _Walked]) -> list[_Walked]:
        """From `first()` (the snapshot `snapshot_id`) back to its full base, loading
        each parent. The floor is read once for the walk (`load` need not check it): a
        parent below it is missing, whatever file is there. A parent that is missing
        because a compaction raised the floor meanwhile (it rewrites the snapshot it
        folds into as a full base, then retires the older ones) is no damage: the walk
        starts again from the snapshot's new file. Otherwise only a damaged store has
        one, since the snapshot at the floor is a full base. A parent must be an earlier
        snapshot of the same chain (captures and compaction only make such links): any
        other would make a restore read another chain, another process's memory."""
        chain, _ = parse_snapshot_id(snapshot_id)
        for _attempt in range(_WALK_ATTEMPTS):
            floor = self.floor(chain)
            meta = first()
            out: list[_Walked] = []
            seen: set[str] = set()
            while True:
                if meta.id in seen:
                    raise CorruptStore(f"snapshot chain of {snapshot_id} loops at {meta.id}")
                seen.add(meta.id)
                out.append(meta)
                if meta.kind == "full":
                    out.reverse()
                    return out
                if meta.parent is None:
                    raise CorruptStore(f"delta snapshot {meta.id} has no parent")
                try:
                    parent_chain, seq = parse_snapshot_id(meta.parent)
                except UnknownSnapshot:
                    raise CorruptStore(
                        f"snapshot {meta.id} names {meta.parent[:80]!r} as its parent, "
                        "which is not a snapshot id") from None
                if parent_chain != chain or seq >= meta.seq:
                    raise CorruptStore(
                        f"snapshot {meta.id} names {meta.parent} as its parent, which is "
                        f"not an earlier snapshot of chain {chain}")
                try:
                    if seq < floor:
                        raise self._no_snapshot(meta.parent)
                    meta = load(meta.parent)
                except UnknownSnapshot:
                    if self.floor(chain) > floor:
                        break  # a compaction meanwhile: walk again
                    raise CorruptStore(
                        f"snapshot {meta.id} needs its parent {meta.parent}, which is "
                        "missing") from None
        raise CorruptStore(f"snapshot chain of {snapshot_id} kept changing while being read "
                           f"({_WALK_ATTEMPTS} compactions meanwhile)")

    def data_path(self, meta: SnapshotData) -> Path:
        assert meta.data_file is not None
        name = meta.data_file
        if "/" in name or name in (".", "..") or "\0" in name:
            raise CorruptStore(f"snapshot {meta.id}: data_file {name[:80]!r} is not a file name")
        return self.chain_dir(meta.chain) / "data" / name

    def snapshot_file(self, chain: str, snapshot_id: str) -> str:
        """snapshot_path as a string, for the per-round path (no Path objects)."""
        return f"{self._chains}/{chain}/snapshots/{snapshot_id}.json"

    def publish(self, meta: SnapshotMeta, vmas_json: bytes | None = None) -> None:
        """The commit point: the metadata becomes visible atomically and durably.
        `vmas_json`: see format.snapshot_json. Call with the chain lock held."""
        spare = self._take_spare(meta.chain)
        atomic_write(self.snapshot_file(meta.chain, meta.id), snapshot_json(meta, vmas_json),
                     reuse=spare, dir_fd=self._snapshots_dir_fd(meta.chain))

    def _take_spare(self, chain: str) -> str | None:
        """One of this process's spares of `chain` to write metadata into, if any."""
        pool = self._spares.get(chain)
        if pool:
            with contextlib.suppress(IndexError):  # emptied by another thread meanwhile
                return pool.pop()
        return None

    # --- group commit ---------------------------------------------------------------
    #
    # publish() makes each snapshot durable alone: an fsync of its metadata and one of
    # its directory, each a flush of the disk's cache. The service publishes many small
    # snapshots a second instead as a group (format doc, "Commit protocol"): stage()
    # each one's metadata without an fsync, sync() once, publish_staged() each (the
    # rename), sync() once more. Nothing is visible before the first sync(), so a listed
    # snapshot is still durable before it is listed.

    def stage(self, meta: SnapshotMeta, vmas_json: bytes | None = None) -> StagedFile:
        """Write the metadata file of `meta` under a temporary name, not yet durable and
        not visible. Call with the chain lock held, and keep it until publish_staged
        or discard_staged."""
        spare = self._take_spare(meta.chain)
        path = self.snapshot_file(meta.chain, meta.id)
        tmp = write_temp(path, snapshot_json(meta, vmas_json), durable=False, reuse=spare)
        return StagedFile(meta.chain, tmp, path, spare=tmp == spare)

    def sync(self) -> None:
        """Make everything written to the store's filesystem durable (syncfs): what was
        staged, and the data files it names."""
        fd = self._root_fd
        if fd < 0:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            with self._fds_lock:
                if self._root_fd < 0:
                    self._root_fd, fd = fd, -1
            if fd >= 0:
                os.close(fd)  # another thread kept its own first
        syncfs(self._root_fd)

    @staticmethod
    def publish_staged(staged: StagedFile) -> None:
        """The commit point of a staged snapshot: its rename. Durable once the next
        sync() returns; call only after a sync() that followed its stage()."""
        os.rename(staged.tmp, staged.path)

    def discard_staged(self, staged: StagedFile) -> None:
        """Give up a staged snapshot that was not published: a reused spare goes back to
        its chain's pool, a new temporary file is removed."""
        if staged.spare:
            self._spares.setdefault(staged.chain, []).append(staged.tmp)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged.tmp)

    def _close_dir_fds(self, chains: list[str] | None) -> None:
        """Close the kept directories of `chains` (of every chain if None)."""
        with self._fds_lock:
            names = chains if chains is not None else list(self._snapshot_dir_fds)
            fds = [fd for c in names if (fd := self._snapshot_dir_fds.pop(c, None)) is not None]
        for fd in fds:
            os.close(fd)

    def _snapshots_dir_fd(self, chain: str) -> int:
        fd = self._snapshot_dir_fds.get(chain)
        if fd is None:
            fd = os.open(f"{self._chains}/{chain}/snapshots",
                         os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            with self._fds_lock:
                kept = self._snapshot_dir_fds.setdefault(chain, fd)
            if kept != fd:  # another thread opened it meanwhile
                os.close(fd)
                fd = kept
        return fd

    def free_bytes(self, chain: str) -> int:
        """Bytes an unprivileged user may still write on the filesystem of `chain` (one
        fstatvfs on a kept directory: cheap enough for every round)."""
        st = os.fstatvfs(self._snapshots_dir_fd(chain))
        return st.f_bavail * st.f_frsize

    def retire_snapshot(self, chain: str, snapshot_id: str) -> None:
        """Remove the file of a snapshot below the chain's floor (compaction), with no
        directory fsync: the floor already keeps it out of the listing. If a power loss
        undoes the removal, the name comes back below the floor, holding the old
        metadata or, for a spare that a later publish wrote into, newer metadata; it is
        ignored either way. While the chain has few spares, the file is renamed to a
        spare name instead of being unlinked, and a later publish in this chain writes
        its metadata into it instead of creating a file. On ext4 (here without a
        journal) creating and fsyncing a new file cost about 1 ms of CPU against 0.3 ms
        for a reused one, and compaction retires about one file per round. Call with the
        chain lock held."""
        path = self.snapshot_file(chain, snapshot_id)
        pool = self._spares.setdefault(chain, [])
        try:
            if len(pool) < SPARES_PER_CHAIN and os.stat(path).st_size <= SPARE_MAX_BYTES:
                spare = (f"{self._chains}/{chain}/snapshots/"
                         f".spare.{writer_id()}.{next(_spare_numbers)}")
                os.rename(path, spare)
                pool.append(spare)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass  # already gone (another ckptd compacted it)

    def release_chain(self, chain: str) -> None:
        """Let go of what this process keeps for publishing in `chain` (its spares and
        its snapshots/ directory fd), once nothing of this process will publish there.
        Under the chain lock: a round or a compaction in another thread may be
        publishing there with that fd, and a closed fd number reused meanwhile would
        make its directory fsync sync another file."""
        try:
            with self.lock_chain(chain):
                self.drop_spares(chain)
        except FileNotFoundError:
            self.drop_spares(chain)  # the chain was deleted: nobody publishes there

    def drop_spares(self, chain: str | None = None) -> None:
        """Delete this process's spares of `chain` (of every chain if None): when it will
        publish nothing more there (the process was unregistered, or the engine closes).
        Spares hold old snapshot metadata; they should not outlive their use. Also closes
        the chain's kept directory (no publish in it may be under way)."""
        self._close_dir_fds([chain] if chain is not None else None)
        chains = [chain] if chain is not None else list(self._spares)
        for c in chains:
            pool = self._spares.get(c)
            while pool:
                try:
                    spare = pool.pop()
                except IndexError:  # emptied by another thread meanwhile
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(spare)

    def clean_leftovers(self, chain: str) -> list[str]:
        """Delete what writers that are no longer alive left in the chain: spare and
        temporary metadata files in snapshots/, and FLOOR.json's temporary file
        (readers ignore them: their names start with a dot); and the files below the
        floor that a compaction did not get to remove (readers skip them), oldest
        first, as compaction removes them. Call with the chain lock held. Returns the
        names removed."""
        cdir = f"{self._chains}/{chain}"
        d = f"{cdir}/snapshots"
        removed = []
        for name in os.listdir(d):
            m = _LEFTOVER.fullmatch(name)
            if m is None:
                continue
            pid, start = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            if writer_running(pid, start):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{d}/{name}")
                removed.append(name)
        for name in os.listdir(cdir):
            m = _FLOOR_LEFTOVER.fullmatch(name)
            if m is not None and not writer_running(m.group(1), m.group(2)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{cdir}/{name}")
                    removed.append(name)
        floor = self.floor(chain)
        for sid in self.snapshot_files(chain):
            if parse_snapshot_id(sid)[1] >= floor:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.snapshot_file(chain, sid))
                removed.append(f"{sid}.json")
        return removed

    def clean_orphans(self, chain: str) -> list[str]:
        """Delete data files no published snapshot of `chain` refers to: left by a writer
        that died between renaming its data and publishing its metadata, or by a
        compaction (the folded snapshots' files, the rewritten base's old one). Call with
        the chain lock held. Returns the names removed.

        A data file is named '<snapshot id>.<8 hex>.zst', and only that snapshot may
        refer to it. So a file whose id is not published (below the floor included) is
        an orphan without parsing anything, and only the published snapshots that have
        files are read, to learn which one (if any) each refers to: for a chain of inline
        deltas, one head instead of one per snapshot. A name of any other form is left
        alone."""
        floor, ids = self.listing(chain)
        published = set(ids)
        data_dir = f"{self._chains}/{chain}/data"
        by_id: dict[str, list[str]] = {}
        try:
            names = os.listdir(data_dir)
        except FileNotFoundError:
            return []
        for name in names:
            m = _DATA_NAME.fullmatch(name)
            if m is not None:
                by_id.setdefault(m.group(1), []).append(name)
        removed = []
        for sid, files in by_id.items():
            used = self.head(sid, floor).data_file if sid in published else None
            for name in files:
                if name != used:
                    os.unlink(f"{data_dir}/{name}")
                    removed.append(name)
        if removed:
            fsync_dir(data_dir)
        return removed

    def tmp_file(self, name: str) -> str:
        """The path of a new temporary file `name` in tmp/, named after this Store's
        owner lock (taken here the first time): cleanup keeps it while the Store is
        open, in whatever process or PID namespace the cleaner runs."""
        return self._tmp_owner.path_for(name)

    def clean_tmp(self) -> list[str]:
        """Remove the leftovers of writers that are gone from tmp/ (see tmpfiles.py);
        the names removed."""
        return remove_leftovers(str(self.tmp_dir))

    def close(self) -> None:
        """Let go of what this Store keeps: spares and kept directories (drop_spares),
        and its ownership of tmp/ files. Call when nothing of this process writes
        through it any more; a later write takes a new ownership."""
        self.drop_spares()
        with self._fds_lock:
            fd, self._root_fd = self._root_fd, -1
        if fd >= 0:
            os.close(fd)
        self._tmp_owner.release()


def _check_owner(root: Path) -> None:
    """Refuse to write to a store (or to create one in a directory) that another user
    owns: that user could replace its files and directories with symlinks, and ckptd
    would write, chmod and delete through them as itself (as root, anywhere)."""
    try:
        uid = os.stat(root).st_uid
    except FileNotFoundError:
        return  # created by us, 0700
    if uid != os.geteuid():
        raise StorePermissionDenied(
            f"the store at {root} is owned by uid {uid}, not by you (uid {os.geteuid()}): "
            "ckptd writes only to a store it owns, as another user could plant symlinks "
            "in it; use another store (--store DIR), or run as its owner")


_Identified = TypeVar("_Identified", SnapshotMeta, SnapshotHead, SnapshotPages)


def _check_identity(path: Path | str, snapshot_id: str, meta: _Identified) -> _Identified:
    """The file of `snapshot_id` must describe that snapshot: its id, chain and seq.
    Anything else (a file copied or renamed by hand, damage) is not that snapshot, and
    would make a reader follow another chain's links, of another process."""
    chain, seq = parse_snapshot_id(snapshot_id)
    if meta.id != snapshot_id or meta.chain != chain or meta.seq != seq:
        raise CorruptStore(f"{path}: describes snapshot {meta.id!r} of chain {meta.chain!r} "
                           f"(seq {meta.seq}), not {snapshot_id}")
    return meta


def _parse_meta(path: Path | str, raw: bytes) -> SnapshotMeta:
    return _parse_versioned(SnapshotMeta, "a snapshot of", path, raw)


_Versioned = TypeVar("_Versioned", SnapshotMeta, ChainFloor)


def _parse_versioned(model: type[_Versioned], kind: str, path: Path | str, raw: bytes
                     ) -> _Versioned:
    """A file with a `format_version`, parsed as `model`; `kind` names it in errors."""
    # pydantic's own JSON parser first: half the cost of json.loads plus validation, and
    # restore, verify and compaction parse every snapshot of a lineage. Anything it
    # rejects is parsed again below, which checks the version first and names the problem.
    try:
        parsed: _Versioned | None = model.model_validate_json(raw)
    except ValidationError:
        parsed = None  # parsed again below, for the precise error
    # The models default format_version (for writers); a file must carry it.
    if parsed is not None and b'"format_version"' in raw:
        _check_version(kind, path, parsed.format_version)
        return parsed
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise CorruptStore(f"{path}: not JSON: {e}") from e
    _check_version(kind, path, obj.get("format_version") if isinstance(obj, dict) else None)
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise CorruptStore(f"{path}: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from e


def _chain_sort_key(chain: str) -> tuple[int, int]:
    pid, _, k = chain.partition("-")
    return (int(pid) if pid.isdigit() else 0, int(k) if k.isdigit() else 0)
