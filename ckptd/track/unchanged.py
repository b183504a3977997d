"""Written pages whose content did not change: found by comparing with a copy.

A page the get-and-clear reports need not hold new content: a process may write a value
back over itself. An interpreter does so all the time (reference counts that go up and
back down, the same stack frames): of the 15 pages an idle Python process writes per
second, 3-5 change. Storing the others costs compression, disk and, later, compaction.

`UnchangedPages` keeps a copy of the pages that small rounds read, as the snapshot
`of` holds them, and drops the pages read again with the same bytes: the parent's page
map then finds them where they were stored before. The copies are those of the last
round's pages that its snapshot holds as present: the page map's rule is that a page
comes from the newest snapshot that stored it only if it held content at every snapshot
since, so a copy of a page the last snapshot lacks must not stand for it.

Comparing copies costs about a tenth of hashing the pages (SHA-256, 2.7 us a page
here), and only memory: that is bounded per process (MAX_PAGES) and for the whole
service (`ContentBudget`), so that a thousand registrations cannot hold more than
DEFAULT_BUDGET_PAGES pages between them. A process that finds the budget spent is not
filtered until room frees up.
"""

from __future__ import annotations

import threading

from ..intervals import Span, contains, covers
from ..kernel import abi

# Rounds that read more pages than this are not filtered (a large round is mostly real
# changes, and its copies would hold much memory); so a process keeps at most this many.
MAX_PAGES = 256
# All processes together: 16 MiB of copies (100 idle Python processes use about 6).
DEFAULT_BUDGET_PAGES = 4096


class ContentBudget:
    """How many page copies the processes of this service may keep together."""

    def __init__(self, pages: int) -> None:
        self.free = pages
        self._lock = threading.Lock()  # trackers commit from several capture threads

    def resize(self, held: int, wanted: int) -> bool:
        """Go from holding `held` pages to `wanted`; False (and no change) if the budget
        does not have the difference."""
        with self._lock:
            if wanted - held > self.free:
                return False
            self.free -= wanted - held
            return True


SHARED_BUDGET = ContentBudget(DEFAULT_BUDGET_PAGES)


class UnchangedPages:
    """The page copies of one tracked process; see the module doc."""

    def __init__(self, budget: ContentBudget = SHARED_BUDGET) -> None:
        self._budget = budget
        self._pages: dict[int, bytes] = {}  # address -> content as snapshot `_of` holds it
        self._of: str | None = None
        # This round's copies until it commits: (runs read, copies).
        self._pending: tuple[list[Span], dict[int, bytes]] | None = None

    def filter(self, parent_id: str | None, runs: list[Span], data: memoryview
               ) -> list[bool] | None:
        """Per page of `runs` (read into `data`, in order), whether to store it; None
        to store them all. Pages equal to their copy as of `parent_id` are not stored."""
        pages_read = sum(e - s for s, e in runs) >> abi.PAGE_SHIFT
        if pages_read > MAX_PAGES:
            self.clear()
            return None
        known = self._pages if parent_id is not None and self._of == parent_id else {}
        copies: dict[int, bytes] = {}
        keep: list[bool] = []
        ps = abi.PAGE_SIZE
        pos = 0
        for start, end in runs:
            for addr in range(start, end, ps):
                # A bytes copy: comparing a memoryview with bytes goes element by
                # element, twenty times slower than copying and comparing.
                page = bytes(data[pos : pos + ps])
                old = known.get(addr)
                if old is not None and old == page:
                    copies[addr] = old
                    keep.append(False)
                else:
                    copies[addr] = page
                    keep.append(True)
                pos += ps
        self._pending = (runs, copies)
        return None if all(keep) else keep

    def commit(self, snapshot_id: str, present: list[Span]) -> None:
        """The round that called `filter` published `snapshot_id`, with these present
        pages (normalized). Its copies replace the older ones: the pages a process
        writes back unchanged are mostly the same from round to round, and a copy not
        read again would hold memory for a page that may never come back."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        runs, copies = pending
        if not all(covers(present, r) for r in runs):  # a page read, not present (dropped)
            copies = {a: p for a, p in copies.items() if contains(present, a)}
        if not self._budget.resize(len(self._pages), len(copies)):
            self.clear()
            return
        self._pages, self._of = copies, snapshot_id

    def abandon(self) -> None:
        """The round failed: the copies still describe its parent."""
        self._pending = None

    def clear(self) -> None:
        """Forget every copy (and give their room back)."""
        self._budget.resize(len(self._pages), 0)
        self._pages, self._of, self._pending = {}, None, None

    @property
    def held(self) -> int:
        return len(self._pages)


__all__ = ["MAX_PAGES", "ContentBudget", "UnchangedPages"]
