"""UnchangedPages: which written pages still hold the content their parent has, and the
memory the copies may take. (The tracker-level behaviour, with a real process and
restores, is in test_tracker_rounds.py.)"""

from __future__ import annotations

from ckptd.kernel.abi import PAGE_SIZE as P
from ckptd.track.unchanged import MAX_PAGES, ContentBudget, UnchangedPages

BASE = 0x7F0000000000


def pages(*fills: int) -> memoryview:
    """Consecutive pages, page i filled with byte fills[i]."""
    return memoryview(b"".join(bytes([f]) * P for f in fills))


def run(n: int) -> list[tuple[int, int]]:
    return [(BASE, BASE + n * P)]


def test_pages_read_again_with_the_same_bytes_are_dropped() -> None:
    u = UnchangedPages(ContentBudget(100))
    assert u.filter("c-1", run(3), pages(1, 2, 3)) is None  # nothing known yet
    u.commit("c-2", run(3))
    assert u.filter("c-2", run(3), pages(1, 9, 3)) == [False, True, False]
    u.commit("c-3", run(3))
    assert u.filter("c-3", run(3), pages(1, 9, 3)) == [False, False, False]


def test_copies_stand_only_for_the_snapshot_they_describe() -> None:
    u = UnchangedPages(ContentBudget(100))
    u.filter("c-1", run(2), pages(1, 2))
    u.commit("c-2", run(2))
    # The parent is another snapshot (another ckptd extended the chain): store all.
    assert u.filter("c-7", run(2), pages(1, 2)) is None
    # A failed round leaves the copies describing its parent.
    u.abandon()
    assert u.filter("c-2", run(2), pages(1, 2)) == [False, False]
    # No parent at all.
    assert u.filter(None, run(2), pages(1, 2)) is None


def test_a_page_the_snapshot_lacks_is_not_stood_for() -> None:
    """Read (as zeros) but not present in the snapshot, e.g. dropped: its copy must not
    stand for the page later, since the page map finds nothing for it."""
    u = UnchangedPages(ContentBudget(100))
    u.filter("c-1", run(2), pages(0, 5))
    u.commit("c-2", [(BASE + P, BASE + 2 * P)])  # page 0 not present
    assert u.held == 1
    assert u.filter("c-2", run(2), pages(0, 5)) == [True, False]


def test_only_the_last_rounds_pages_are_kept() -> None:
    u = UnchangedPages(ContentBudget(100))
    u.filter("c-1", run(2), pages(1, 2))
    u.commit("c-2", run(2))
    other = [(BASE + 8 * P, BASE + 9 * P)]
    u.filter("c-2", other, pages(7))
    u.commit("c-3", [*run(2), *other])
    assert u.held == 1
    assert u.filter("c-3", run(2), pages(1, 2)) is None


def test_large_rounds_are_not_filtered_and_give_their_room_back() -> None:
    budget = ContentBudget(MAX_PAGES + 10)
    u = UnchangedPages(budget)
    u.filter("c-1", run(10), pages(*range(10)))
    u.commit("c-2", run(10))
    assert budget.free == MAX_PAGES
    big = run(MAX_PAGES + 1)
    assert u.filter("c-2", big, pages(*([1] * (MAX_PAGES + 1)))) is None
    u.commit("c-3", big)
    assert u.held == 0 and budget.free == MAX_PAGES + 10


def test_the_shared_budget_bounds_all_copies() -> None:
    budget = ContentBudget(5)
    a, b = UnchangedPages(budget), UnchangedPages(budget)
    a.filter("a-1", run(3), pages(1, 2, 3))
    a.commit("a-2", run(3))
    b.filter("b-1", run(3), pages(1, 2, 3))
    b.commit("b-2", run(3))  # 3 more do not fit: b keeps none
    assert (a.held, b.held, budget.free) == (3, 0, 2)
    assert b.filter("b-2", run(3), pages(1, 2, 3)) is None
    a.clear()
    assert budget.free == 5
    b.commit("b-3", run(3))
    assert (b.held, budget.free) == (3, 2)
    assert b.filter("b-3", run(3), pages(1, 2, 3)) == [False, False, False]
