"""Open-file budget of the service.

Every registration keeps file descriptors open for as long as it lasts (its pidfd, our
copy of the target's userfaultfd, /proc/PID/pagemap, the tracker's state file,
/proc/PID/stat and /proc/PID/maps, and its chain's snapshots/ directory), so
the number of processes the service can hold follows from RLIMIT_NOFILE. systemd starts
services with a soft limit of 1024 and a much higher hard limit; at that soft limit
registrations beyond about 120 would fail in the middle of their first round (EMFILE).
The service therefore raises its soft limit to the hard one at start (select() is not
used anywhere, so high descriptor numbers are safe), and refuses a registration that
would not fit, with a message that says which limit to raise.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

# What one registration holds open between rounds (measured with the uffd-wp tracker,
# which holds the most).
FDS_PER_REGISTRATION = 7
# Kept free for everything else: control clients, the store's files during a round or a
# compaction, the tracking of processes snapshotted without a registration, logging,
# the metrics listener.
RESERVED_FDS = 128
_NR_OPEN = "/proc/sys/fs/nr_open"


@dataclass(frozen=True)
class FdBudget:
    before: int  # the soft limit the service was started with
    soft: int    # the soft limit now
    hard: int

    @property
    def registrations(self) -> int:
        """How many registrations fit in the soft limit."""
        return max(0, (self.soft - RESERVED_FDS) // FDS_PER_REGISTRATION)


def _ceiling(hard: int) -> int:
    """The highest soft limit that can be set: the hard limit, or the kernel's nr_open
    when the hard limit is unlimited."""
    if hard != resource.RLIM_INFINITY:
        return hard
    with open(_NR_OPEN) as f:
        return int(f.read())


def raise_soft_limit() -> FdBudget:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit; return the budget."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _ceiling(hard)
    # A soft limit can only be unlimited along with the hard one: it is then at target.
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return FdBudget(before=soft, soft=target, hard=hard)
