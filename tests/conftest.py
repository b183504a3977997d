from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ckptd.engine import Engine
from ckptd.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store", create=True)


@pytest.fixture
def engine(store: Store) -> Iterator[Engine]:
    eng = Engine(store)
    try:
        yield eng
    finally:
        eng.close()
