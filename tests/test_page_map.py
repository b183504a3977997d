"""The page map resolver against a direct, obviously correct definition, on random
lineages (no kernel or process needed: this is pure store logic)."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest

from ckptd.intervals import IntervalMap, normalize
from ckptd.kernel.abi import PAGE_SIZE
from ckptd.store.reader import ZERO, DataRef, Source, resolve_sources

P = PAGE_SIZE


def _reference(lineage: list[Any]) -> dict[int, Source]:
    """Oldest first: each snapshot's pieces replace what they cover, then pages that do
    not hold content at that snapshot drop out. Per page, for clarity."""
    pm: IntervalMap[Source] = IntervalMap()
    for meta in lineage:
        items: list[tuple[int, int, Source]] = [
            (e.addr, e.addr + e.pages * P, DataRef(meta.id, i, e.frame, e.skip * P - e.addr))
            for i, e in enumerate(meta.extents)]
        items.extend((z.addr, z.addr + z.pages * P, ZERO) for z in meta.zeros)
        pm.overlay(items)
        pm.restrict(normalize(meta.present))
    return {a: v for s, e, v in pm for a in range(s, e, P)}


def _random_lineage(rng: random.Random, deltas: int, pages: int) -> list[Any]:
    """A full base and deltas over `pages` pages starting at two separate bases (so the
    bitmap spans more than one chunk and a gap)."""
    bases = [0x10000000, 0x7F0000000000]
    lineage: list[Any] = []
    present_pages: list[int] = []
    for k in range(deltas + 1):
        # Half the deltas keep the previous `present`, as an idle process's do (the
        # resolver skips intersecting an unchanged one).
        if k == 0 or rng.random() < 0.5:
            present_pages = sorted({b + i * P for b in bases for i in range(pages)
                                    if rng.random() < 0.9})
        stored = present_pages if k == 0 else [a for a in present_pages if rng.random() < 0.2]
        runs: list[list[int]] = []
        for a in stored:
            if runs and a == runs[-1][-1] + P and len(runs[-1]) < 16:
                runs[-1].append(a)
            else:
                runs.append([a])
        extents: list[Any] = []
        zeros: list[Any] = []
        frame = skip = 0
        for run in runs:
            if rng.random() < 0.15:
                zeros.append(SimpleNamespace(addr=run[0], pages=len(run)))
                continue
            extents.append(SimpleNamespace(addr=run[0], pages=len(run), frame=frame,
                                           skip=skip))
            skip += len(run)
            if skip >= 64:
                frame, skip = frame + 1, 0
        lineage.append(SimpleNamespace(
            id=f"1-1-{k + 1}", extents=extents, zeros=zeros,
            present=normalize((a, a + P) for a in present_pages)))
    return lineage


def _sourced_pages(lineage: list[Any]) -> dict[int, Source]:
    """The resolver's page map, page by page; no page may be sourced twice."""
    got: dict[int, Source] = {}
    for s, e, v in resolve_sources(lineage):
        for a in range(s, e, P):
            assert a not in got, f"page {a:#x} sourced twice"
            got[a] = v
    return got


@pytest.mark.parametrize("seed", range(12))
def test_resolver_matches_the_definition(seed: int) -> None:
    rng = random.Random(seed)
    lineage = _random_lineage(rng, deltas=rng.randrange(0, 12), pages=rng.choice([40, 300]))
    assert _sourced_pages(lineage) == _reference(lineage)


@pytest.mark.parametrize("seed", range(6))
def test_resolver_does_not_need_extents_in_address_order(seed: int) -> None:
    """A compacted base lists its extents in frame order, and a frame it copied whole
    can hold extents on both sides of pages stored in other frames: the resolver must
    give the same page map whatever the order of a snapshot's extents."""
    rng = random.Random(seed)
    lineage = _random_lineage(rng, deltas=rng.randrange(0, 12), pages=rng.choice([40, 300]))
    for meta in lineage:
        rng.shuffle(meta.extents)
        rng.shuffle(meta.zeros)
    assert any(m.extents != sorted(m.extents, key=lambda e: e.addr) for m in lineage)
    assert _sourced_pages(lineage) == _reference(lineage)
