"""Sorted, non-overlapping half-open address intervals, with an optional value each.

Page maps and page sets are kept as such lists rather than per-page dicts, so a 1 GiB
process with few distinct runs costs a few entries, not 262144.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Iterable, Iterator, Sequence
from itertools import starmap
from typing import Generic, TypeVar

V = TypeVar("V")

Span = tuple[int, int]


def normalize(spans: Iterable[Span]) -> list[Span]:
    """Sort and merge overlapping or touching spans; drop empty ones."""
    items = sorted(spans)
    if not items:
        return items
    # Most inputs are already normalized (pieces of normalized lists, kernel regions):
    # one check loop that allocates nothing is about 4x cheaper than merging.
    prev_end = items[0][0] - 1
    for s, e in items:
        if s <= prev_end or e <= s:
            break
        prev_end = e
    else:
        return items
    out: list[Span] = []
    for s, e in items:
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def intersect(a: list[Span], b: list[Span]) -> list[Span]:
    """Intersection of two normalized span lists."""
    if len(a) > len(b):
        a, b = b, a  # walk the shorter list
    out: list[Span] = []
    nb = len(b)
    if not a or not nb:
        return out
    append = out.append
    j = 0
    if len(a) * 8 < nb:
        # Lopsided (a few spans against a long list): jump into `b` by bisection.
        for s, e in a:
            j = bisect.bisect_left(b, (s,), j)  # first span of b starting at or after s
            if j and b[j - 1][1] > s:
                j -= 1
            while j < nb:
                bs, be = b[j]
                if bs >= e:
                    break
                append((bs if bs > s else s, be if be < e else e))
                if be > e:
                    break  # b[j] may reach into the next span of a
                j += 1
        return out
    bs, be = b[0]
    for s, e in a:
        while be <= s:
            j += 1
            if j == nb:
                return out
            bs, be = b[j]
        while bs < e:
            append((bs if bs > s else s, be if be < e else e))
            if be > e:
                break  # b[j] may reach into the next span of a
            j += 1
            if j == nb:
                return out
            bs, be = b[j]
    return out


def union(base: list[Span], extra: list[Span]) -> list[Span]:
    """base | extra, both normalized, as a new list. Cheap when `extra` is short: the
    untouched stretches of `base` are copied by slicing, not visited one by one."""
    if not extra:
        return base[:]
    out: list[Span] = []
    n = len(base)
    pos = 0  # base[:pos] has been copied or merged into out
    for s, e in extra:
        i = bisect.bisect_left(base, (s,), pos)  # first span of base starting at or after s
        if i > pos and base[i - 1][1] >= s:
            i -= 1  # base[i - 1] overlaps or touches [s, e)
        out += base[pos:i]
        pos = i
        if out and out[-1][1] >= s:  # touches what came before (from base or extra)
            ps, pe = out.pop()
            s = ps
            if pe > e:
                e = pe
        while pos < n and base[pos][0] <= e:
            bs, be = base[pos]
            if bs < s:
                s = bs
            if be > e:
                e = be
            pos += 1
        out.append((s, e))
    out += base[pos:]
    return out


def subtract(a: list[Span], b: list[Span]) -> list[Span]:
    """a minus b, both normalized."""
    out: list[Span] = []
    j = 0
    for s, e in a:
        cur = s
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            k += 1
        if cur < e:
            out.append((cur, e))
    return out


def contains(spans: list[Span], addr: int) -> bool:
    """Is addr inside one of the normalized spans?"""
    i = bisect.bisect_right(spans, (addr, float("inf"))) - 1
    return i >= 0 and spans[i][0] <= addr < spans[i][1]


def covers(spans: Sequence[Span], span: Span) -> bool:
    """Is `span` wholly inside one span of the normalized `spans`?"""
    i = bisect.bisect_right(spans, (span[0], float("inf"))) - 1
    return i >= 0 and spans[i][0] <= span[0] and span[1] <= spans[i][1]


def overlaps(spans: Sequence[Span], span: Span) -> bool:
    """Does `span` share at least one address with the normalized `spans`?"""
    i = bisect.bisect_left(spans, (span[1],))  # spans[:i] start before span's end
    return i > 0 and spans[i - 1][1] > span[0]


def clip_to(spans: list[Span], start: int, end: int) -> list[Span]:
    """The parts of the normalized `spans` inside [start, end)."""
    return [(max(s, start), min(e, end)) for s, e in _clip(spans, start, end)]


def total(spans: Iterable[Span]) -> int:
    # The sum of (end - start), computed in C: a round runs this over its present list.
    negated: Iterator[int] = starmap(operator.sub, spans)
    return -sum(negated)


class IntervalMap(Generic[V]):
    """Non-overlapping [start, end) -> value. Values should be immutable.

    `value_at_offset` semantics: a value describes its whole original span; when a span
    is cut, the pieces keep the same value, and users compute positions from the span
    start they stored inside the value.
    """

    def __init__(self, items: Iterable[tuple[int, int, V]] = ()) -> None:
        self._items: list[tuple[int, int, V]] = sorted(items, key=lambda t: t[0])

    def __iter__(self) -> Iterator[tuple[int, int, V]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def spans(self) -> list[Span]:
        return normalize((s, e) for s, e, _ in self._items)

    def overlay(self, new: Iterable[tuple[int, int, V]]) -> None:
        """Put `new` (non-overlapping among themselves) on top, replacing what they cover."""
        new_items = sorted(new, key=lambda t: t[0])
        if not new_items:
            return
        covered = normalize((s, e) for s, e, _ in new_items)
        kept: list[tuple[int, int, V]] = []
        for s, e, v in self._items:
            for ks, ke in subtract([(s, e)], _clip(covered, s, e)):
                kept.append((ks, ke, v))
        kept.extend(new_items)
        kept.sort(key=lambda t: t[0])
        self._items = kept

    def restrict(self, keep: list[Span]) -> None:
        """Keep only the parts inside the normalized spans `keep`."""
        out: list[tuple[int, int, V]] = []
        for s, e, v in self._items:
            for ks, ke in intersect([(s, e)], _clip(keep, s, e)):
                out.append((ks, ke, v))
        self._items = out

    def lookup(self, addr: int) -> tuple[int, int, V] | None:
        i = bisect.bisect_right(self._items, addr, key=lambda t: t[0]) - 1
        if i >= 0 and self._items[i][0] <= addr < self._items[i][1]:
            return self._items[i]
        return None

    def clip(self, start: int, end: int) -> list[tuple[int, int, V]]:
        """Items overlapping [start, end), cut to it."""
        i = max(bisect.bisect_right(self._items, start, key=lambda t: t[0]) - 1, 0)
        out: list[tuple[int, int, V]] = []
        while i < len(self._items) and self._items[i][0] < end:
            s, e, v = self._items[i]
            if e > start:
                out.append((max(s, start), min(e, end), v))
            i += 1
        return out


def _clip(spans: list[Span], start: int, end: int) -> list[Span]:
    """The normalized spans overlapping [start, end) (not cut)."""
    i = max(bisect.bisect_right(spans, (start, end)) - 1, 0)
    out: list[Span] = []
    while i < len(spans) and spans[i][0] < end:
        if spans[i][1] > start:
            out.append(spans[i])
        i += 1
    return out
