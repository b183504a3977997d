"""The span-list helpers against a per-page reference (a set of page numbers), on random
lists shaped like the tracker's: long lists against short ones, touching and
overlapping spans, empty spans, and lists of every length from empty upwards."""

from __future__ import annotations

import random

import pytest

from ckptd.intervals import Span, intersect, normalize, subtract, total, union


def pages(spans: list[Span]) -> set[int]:
    return {p for s, e in spans for p in range(s, e)}


def from_pages(ps: set[int]) -> list[Span]:
    """The canonical normalized list for a page set (the reference)."""
    out: list[Span] = []
    for p in sorted(ps):
        if out and out[-1][1] == p:
            out[-1] = (out[-1][0], p + 1)
        else:
            out.append((p, p + 1))
    return out


def random_spans(rnd: random.Random, n: int, limit: int, raw: bool) -> list[Span]:
    """n spans in [0, limit); `raw`: unsorted, overlapping, touching and empty ones too."""
    spans = []
    for _ in range(n):
        s = rnd.randrange(limit)
        spans.append((s, min(limit, s + rnd.choice([0, 1, 1, 2, 3, 5, 8, 40]))))
    if raw:
        rnd.shuffle(spans)
        return spans
    return from_pages(pages(spans))


CASES = [(seed, na, nb) for seed in range(40) for na, nb in
         [(0, 0), (0, 5), (1, 1), (1, 30), (3, 200), (30, 30), (200, 3), (60, 9)]]


@pytest.mark.parametrize("seed,na,nb", CASES)
def test_set_operations_match_a_per_page_reference(seed: int, na: int, nb: int) -> None:
    rnd = random.Random(seed * 1000 + na * 10 + nb)
    limit = rnd.choice([50, 400, 3000])
    a = random_spans(rnd, na, limit, raw=False)
    b = random_spans(rnd, nb, limit, raw=False)
    pa, pb = pages(a), pages(b)
    a_before, b_before = list(a), list(b)
    assert intersect(a, b) == from_pages(pa & pb)
    assert intersect(b, a) == from_pages(pa & pb)
    assert union(a, b) == from_pages(pa | pb)
    assert union(b, a) == from_pages(pa | pb)
    assert subtract(a, b) == from_pages(pa - pb)
    assert (a, b) == (a_before, b_before)  # inputs are never modified
    assert union(a, []) == a and union(a, []) is not a  # always a new list
    assert total(a) == len(pa) and total(iter(b)) == len(pb)


@pytest.mark.parametrize("seed", range(60))
def test_normalize_matches_a_per_page_reference(seed: int) -> None:
    rnd = random.Random(seed)
    raw = random_spans(rnd, rnd.choice([0, 1, 2, 5, 30, 300]), rnd.choice([20, 500]), raw=True)
    assert normalize(raw) == from_pages(pages(raw))
    already = from_pages(pages(raw))
    assert normalize(already) == already
    assert normalize(iter(already)) == already  # any iterable


def test_normalize_edge_cases() -> None:
    assert normalize([]) == []
    assert normalize([(5, 5)]) == []
    assert normalize([(5, 5), (1, 2)]) == [(1, 2)]
    assert normalize([(0, 3), (3, 4)]) == [(0, 4)]  # touching spans merge
    assert normalize([(3, 4), (0, 10)]) == [(0, 10)]
    assert normalize([(-5, -2), (-2, 0)]) == [(-5, 0)]


def test_union_merges_across_several_base_spans() -> None:
    base = [(0, 2), (4, 6), (8, 10), (20, 30)]
    assert union(base, [(1, 9)]) == [(0, 10), (20, 30)]
    assert union(base, [(2, 4)]) == [(0, 6), (8, 10), (20, 30)]
    assert union(base, [(10, 11), (11, 20)]) == [(0, 2), (4, 6), (8, 30)]
    assert union(base, [(40, 50)]) == [*base, (40, 50)]
    assert union([], [(1, 2)]) == [(1, 2)]
