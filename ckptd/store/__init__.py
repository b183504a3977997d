"""The delta store: format (pydantic models), writer (commit protocol), reader (page map,
materialize, verify). docs/store-format.md documents the on-disk format."""

from .format import FORMAT_VERSION, ChainInfo, SnapshotMeta
from .store import Store, default_store_path, parse_snapshot_id

__all__ = [
    "FORMAT_VERSION",
    "ChainInfo",
    "SnapshotMeta",
    "Store",
    "default_store_path",
    "parse_snapshot_id",
]
