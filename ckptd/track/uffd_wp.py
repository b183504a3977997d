"""uffd-wp: async userfaultfd write-protect + PAGEMAP_SCAN get-and-clear.

The target is made to create a userfaultfd (an injected syscall, see kernel/ptrace.py;
two more move it off fds 0-2 if it lands there), by a child process that survives
ckptd being killed meanwhile (see injector.py).
The fd stays open in the target, close-on-exec, so registration (which lives as long as
any copy of the fd is open) survives ckptd exiting and restarting; ckptd takes its own
copy with pidfd_getfd whenever it works. An exec closes the fd and gives a new address
space; ckptd then starts a new chain with a full snapshot.

What the target can observe: one extra fd (anon_inode:[userfaultfd], O_CLOEXEC, never
0, 1 or 2), and the first write to each page after a snapshot costing a minor fault.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import AddressSpaceReplaced, TrackerUnavailable
from ..intervals import (
    Span,
    contains,
    covers,
    intersect,
    normalize,
    overlaps,
    subtract,
    total,
    union,
)
from ..kernel import abi, pagemap, procfs, ptrace, syscalls, uffd
from ..kernel.procfs import Mapping
from ..store.fsutil import atomic_write
from . import injector
from .base import (
    MAX_READONLY_REGISTER,
    MAX_REGISTER,
    ArmResult,
    Harvest,
    TrackContext,
    Tracker,
    capturable,
)
from .unchanged import UnchangedPages

log = logging.getLogger(__name__)

STATE_FILE = "uffd-wp.json"
_STATE_RECORD = 512  # bytes: the state file's fixed size (JSON, padded with spaces)


def probe() -> tuple[bool, str]:
    """Does this kernel offer async write-protect and PAGEMAP_SCAN? Checked on a
    userfaultfd of our own, without touching any target."""
    ok, why = pagemap.probe_scan(os.getpid(), abi.PAGE_IS_WPALLOWED | abi.PAGE_IS_WRITTEN)
    if not ok:
        return False, why
    try:
        fd = syscalls.syscall(
            abi.SYS_userfaultfd, abi.O_CLOEXEC | abi.O_NONBLOCK | abi.UFFD_USER_MODE_ONLY
        )
    except OSError as e:
        return False, f"userfaultfd() unavailable: {e.strerror}"
    try:
        uffd.api_handshake(fd)
    except uffd.UffdUnsupported as e:
        return False, str(e)
    except OSError as e:
        return False, f"UFFDIO_API failed: {e.strerror}"
    finally:
        os.close(fd)
    return True, "async write-protect (WP_ASYNC) and PAGEMAP_SCAN available"


# state/uffd-wp.json's `target_fd` while a userfaultfd is being installed: written before
# the injection, so that a ckptd that dies before recording the new fd leaves a trace the
# next one can recognise its fd by (see UffdWpTracker._adopt).
INSTALLING = -1


@dataclass
class _State:
    target_fd: int  # INSTALLING, or the fd number in the target
    inode: int
    start_time: int
    synced_with: str | None  # the snapshot the write-protect state corresponds to


class UffdWpTracker(Tracker):
    name = "uffd-wp"

    def __init__(self) -> None:
        self.fd = -1  # our copy of the target's userfaultfd
        self.state: _State | None = None
        self.pm: pagemap.Pagemap | None = None
        self._pid = 0
        self._start_time = 0
        self._state_dir: Path | None = None
        # Between rounds: spans we know are registered (None: unknown, verify with the
        # kernel), spans whose registration failed (captured whole, not retried), and the
        # size of the last read (sizes the next capture buffer without a scan).
        self._registered: list[Span] | None = None
        self._unregistrable: list[Span] = []
        self._last_read_pages: int | None = None
        self._state_fd = -1  # the state file, open for in-place updates
        self._state_path: str | None = None
        self._state_ino = 0  # the inode of _state_fd (an open file's inode never changes)
        self._state_verified = False  # arm found the state file to be ours this round
        self._state_file: tuple[Path, str] | None = None  # see _state_file_path
        self._plan_cache: tuple[list[Span] | None, list[Span], list[Mapping], _Plan] | None = None
        self._parent_cache: _FromParent | None = None
        self._asked_about: list[Mapping] | None = None  # mappings the last plan knew
        self._fuzzy_present: tuple[str, list[Span]] | None = None  # see _lost_in_parent
        self._unchanged = UnchangedPages()  # see select
        self._round_present: list[Span] = []
        self._exec_seen = False  # the last round found the address space replaced

    # --- state ------------------------------------------------------------------------

    def _load_state(self, ctx: TrackContext) -> _State | None:
        try:
            raw = json.loads((ctx.state_dir / STATE_FILE).read_text())
            return _State(**raw)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as e:
            log.warning("pid %d: unreadable tracker state, starting over: %s", ctx.pid, e)
            return None

    def _save_state(self, ctx: TrackContext) -> None:
        """Replace the state file. Not fsynced: the kernel's write tracking it describes
        does not survive a machine crash either. It must survive ckptd dying at any
        point: the first write goes through an atomic rename; later ones (every round)
        overwrite it in place with one pwrite of a fixed-size, space-padded record, which
        the kernel copies whole or not at all (a single page, from memory we own)."""
        assert self.state is not None
        data = json.dumps(self.state.__dict__).encode()
        path = self._state_file_path(ctx.state_dir)
        verified, self._state_verified = self._state_verified, False
        if (self._state_fd >= 0 and self._state_path == path and len(data) < _STATE_RECORD
                and (verified or self._state_file_is_ours(path))):
            os.pwrite(self._state_fd, data.ljust(_STATE_RECORD - 1) + b"\n", 0)
            return
        self._close_state()
        atomic_write(Path(path), data.ljust(_STATE_RECORD - 1) + b"\n"
                     if len(data) < _STATE_RECORD else data, durable=False)
        self._state_fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        self._state_ino = os.fstat(self._state_fd).st_ino
        self._state_path = path

    def _state_file_path(self, state_dir: Path) -> str:
        """The state file in `state_dir`, remembered: building the path anew cost a
        quarter of begin(), which runs every round."""
        known = self._state_file
        if known is None or known[0] != state_dir:
            known = self._state_file = (state_dir, str(state_dir / STATE_FILE))
        return known[1]

    def _state_file_is_ours(self, path: str) -> bool:
        """Is our open fd still the file at `path`? Another ckptd process working on the
        same chain (under the chain lock, as we are now) replaces the file by a rename;
        writing to our old inode would then leave its content on disk."""
        try:
            return os.stat(path).st_ino == self._state_ino
        except FileNotFoundError:
            return False

    def _close_state(self) -> None:
        self._state_verified = False
        if self._state_fd >= 0:
            os.close(self._state_fd)
            self._state_fd = -1
            self._state_path = None

    # --- arm --------------------------------------------------------------------------

    def arm(self, ctx: TrackContext) -> ArmResult:
        start_time = ctx.start_time or procfs.start_time(ctx.pid)
        exec_seen, self._exec_seen = self._exec_seen, False
        if (self.fd >= 0 and self.state is not None and self._pid == ctx.pid
                and self._start_time == start_time and self._state_dir == ctx.state_dir
                and (self._state_fd < 0
                     or self._state_file_is_ours(self._state_file_path(ctx.state_dir)))):
            # Our copy of the fd keeps the registration alive whatever the target does
            # with its own copy, as long as the address space is the one it was made
            # for: an exec usually starts a new chain (its layout differs), and one
            # that keeps the layout (ASLR off) is caught by the harvest. The state in
            # memory is current unless another ckptd process replaced the state file
            # (a `ckptd watch` next to the service): its get-and-clear took pages that
            # only its own snapshot holds, if it published one, so the file decides.
            self._state_verified = True  # for this round's _save_state (chain locked)
            return ArmResult(self._sync_reason(ctx))
        self.close()
        self._pid, self._start_time, self._state_dir = ctx.pid, start_time, ctx.state_dir
        state = self._load_state(ctx)
        if state and self._still_ours(ctx.pid, state, start_time):
            try:
                with _pidfd(ctx.pid) as pidfd:
                    self.fd = syscalls.pidfd_getfd(pidfd, state.target_fd)
            except OSError as e:
                raise TrackerUnavailable(f"cannot take the tracking fd from the target: "
                                         f"{e.strerror}") from e
            self.state = state
            self.pm = pagemap.Pagemap(ctx.pid)
            self._registered = None  # registered by an earlier ckptd: ask the kernel
            return ArmResult(self._sync_reason(ctx))
        reason = None
        if state and state.target_fd == INSTALLING and state.start_time == start_time:
            reason = self._adopt(ctx, start_time)
        if reason is None:
            self._inject(ctx, start_time)
            reason = ("the process exec'd since the last snapshot, keeping its address "
                      "layout: write-protect tracking started again" if exec_seen
                      else "write-protect tracking started with this snapshot")
        self.pm = pagemap.Pagemap(ctx.pid)
        # A new userfaultfd, or one whose installer died before registering anything.
        self._registered = []
        return ArmResult(reason)

    def _sync_reason(self, ctx: TrackContext) -> str | None:
        assert self.state is not None
        if ctx.parent_id is None:
            return "first snapshot of this process"
        if self.state.synced_with != ctx.parent_id:
            return (f"tracking state belongs to {self.state.synced_with or 'no snapshot'}, "
                    f"not the parent {ctx.parent_id} (an earlier snapshot did not complete)")
        return None

    @staticmethod
    def _still_ours(pid: int, state: _State, start_time: int) -> bool:
        if state.start_time != start_time:
            return False
        try:
            st = os.stat(f"/proc/{pid}/fd/{state.target_fd}")
            link = os.readlink(f"/proc/{pid}/fd/{state.target_fd}")
        except OSError:
            return False
        return link == "anon_inode:[userfaultfd]" and st.st_ino == state.inode

    def _inject(self, ctx: TrackContext, start_time: int) -> None:
        pid = ctx.pid
        foreign = procfs.userfaultfd_fds(pid)
        if foreign:
            raise TrackerUnavailable(
                f"the target already uses userfaultfd (fd {', '.join(map(str, foreign))}); "
                "write-protect tracking would interfere with it"
            )
        registered = procfs.uffd_vma_flags(pid)
        if registered:
            s, e, flags = registered[0]
            raise TrackerUnavailable(
                f"the target has userfaultfd-registered memory ({s:#x}-{e:#x}: "
                f"{','.join(sorted(flags))})"
            )
        seccomp = procfs.read_status(pid).get("Seccomp", "0")
        suspend = False
        if seccomp != "0":
            if not ctx.privileged:
                raise TrackerUnavailable(
                    "the target runs under seccomp; injecting userfaultfd() could kill it, "
                    "and suspending seccomp needs CAP_SYS_ADMIN"
                )
            suspend = True
        # The target has no userfaultfd now (checked above, and it cannot make one while
        # frozen): if ckptd dies before the record below names the new fd, the next
        # ckptd finds this one and the single userfaultfd, and takes it as its own.
        # Catchable signals wait until the new fd is recorded (a few ms): a Ctrl-C of
        # `ckptd snapshot` while the injecting child works would otherwise lose its
        # answer, and the target would keep a userfaultfd nobody recorded.
        with ptrace.signals_held():
            self.state = _State(INSTALLING, 0, start_time, None)
            self._save_state(ctx)
            try:
                target_fd = self._inject_with_retries(pid, suspend, ctx.authorize)
                inode = os.fstat(self.fd).st_ino  # our copy: the same open file
            except BaseException:
                self._drop_installing(ctx)
                raise
            self.state = _State(target_fd, inode, start_time, None)
            self._save_state(ctx)
        log.info("pid %d: userfaultfd installed as fd %d (ino %d)", pid, target_fd, inode)

    def _inject_with_retries(self, pid: int, suspend: bool,
                             authorize: Callable[[int], None] | None) -> int:
        try:
            for attempt in range(_INJECT_ATTEMPTS):
                try:
                    return self._inject_frozen(pid, suspend, authorize)
                except ptrace.InjectionDeferred as e:
                    if attempt == _INJECT_ATTEMPTS - 1:
                        raise TrackerUnavailable(f"cannot inject userfaultfd(): {e}, "
                                                 f"{_INJECT_ATTEMPTS} times") from e
                    time.sleep(0.001)  # let it leave the section
                except ptrace.InjectionImpossible as e:
                    raise TrackerUnavailable(str(e)) from e
        except PermissionError as e:
            raise TrackerUnavailable(f"ptrace denied: {e.strerror}") from e
        except OSError as e:
            if e.errno == errno.EPERM:
                raise TrackerUnavailable("ptrace denied (EPERM)") from e
            raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _drop_installing(self, ctx: TrackContext) -> None:
        """The installation failed, and its cleanup closed what it made in the target:
        remove the INSTALLING record, so that a userfaultfd the target makes later is
        never taken for the one ckptd was installing (see _adopt)."""
        self.state = None
        path = self._state_file_path(ctx.state_dir)
        ours = self._state_fd >= 0 and self._state_file_is_ours(path)
        self._close_state()
        if ours:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _adopt(self, ctx: TrackContext, start_time: int) -> str | None:
        """The state says an earlier ckptd was installing a userfaultfd in this process
        (same start time) and never recorded it: it died in between. If the target
        holds exactly one userfaultfd, made as ckptd makes them (O_NONBLOCK and
        close-on-exec, fd 3 or above, either not yet set up or set up with exactly
        ckptd's features), with no memory registered on any userfaultfd, it is that
        one: take a copy, finish its setup, record it, and return the reason for a
        full snapshot. Otherwise None: the target's own userfaultfd is never taken.
        The one case this cannot tell apart is a target that, after that ckptd died
        and before this check, made a first userfaultfd of its own with these same
        flags and features and registered nothing yet."""
        pid = ctx.pid
        fds = procfs.userfaultfd_fds(pid)
        if len(fds) != 1 or fds[0] < _LOWEST_TARGET_FD or procfs.uffd_vma_flags(pid):
            return None
        target_fd = fds[0]
        try:
            info = procfs.fdinfo(pid, target_fd)
            flags = int(info["flags"], 8)
            features = int(info["API"].split(":")[1], 16) & ~abi.UFFD_FEATURE_INITIALIZED
        except (OSError, KeyError, IndexError, ValueError):
            return None
        if (flags & (os.O_NONBLOCK | os.O_CLOEXEC) != (os.O_NONBLOCK | os.O_CLOEXEC)
                or features not in (0, uffd.WP_FEATURES)):
            return None
        try:
            with _pidfd(pid) as pidfd:
                self.fd = syscalls.pidfd_getfd(pidfd, target_fd)
            if features == 0:
                uffd.api_handshake(self.fd)
            inode = os.fstat(self.fd).st_ino
        except (OSError, uffd.UffdUnsupported) as e:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            log.warning("pid %d: cannot take over the userfaultfd (fd %d) an earlier ckptd "
                        "installed: %s", pid, target_fd, e)
            return None
        self.state = _State(target_fd, inode, start_time, None)
        self._save_state(ctx)
        log.warning("pid %d: took over the userfaultfd (fd %d, ino %d) that an earlier ckptd "
                    "installed and did not record (it died meanwhile)", pid, target_fd, inode)
        return ("write-protect tracking taken over from an earlier ckptd that died while "
                "setting it up")

    def _inject_frozen(self, pid: int, suspend: bool,
                       authorize: Callable[[int], None] | None = None) -> int:
        """Make the target create a userfaultfd, and take a copy of it (self.fd).
        Returns the fd's number in the target. The injection runs in a child process
        (see track/injector.py), so that ckptd dying meanwhile cannot leave the target
        with injected registers. A child is refused where ckptd itself is not when the
        target is ckptd's own descendant under Yama's ptrace_scope 1: then it runs here."""
        try:
            target_fd, self.fd = injector.in_child(
                lambda: _inject_frozen(pid, suspend, authorize))
        except PermissionError:
            target_fd, self.fd = _inject_frozen(pid, suspend, authorize)
        return target_fd

    # --- harvest ----------------------------------------------------------------------

    def _verified_registered(self, mappings: list[Mapping]) -> list[Span]:
        """Which of `mappings` the kernel has registered (one WPALLOWED probe each:
        registration is per mapping, so its first page answers for all of it)."""
        assert self.pm is not None
        firsts = [(m.start, m.start + abi.PAGE_SIZE) for m in mappings]
        allowed = normalize((s, e) for s, e, _ in self.pm.scan(firsts, pagemap.WP_ALLOWED
                                                                   ).regions)
        return normalize((m.start, m.end) for m in mappings if contains(allowed, m.start))

    def _unregistered_parts(self, spans: list[Span], vmas: list[Mapping]) -> list[Span]:
        """The parts of `spans` that lie in mappings not registered for async
        write-protect. The query matches pages *without* WPALLOWED: the kernel skips a
        registered mapping whole at its per-mapping check, without walking its pages, so
        this costs nothing for registered memory however large, and for unregistered
        memory about what the presence scan that follows costs anyway."""
        assert self.pm is not None
        return normalize((s, e) for s, e, _ in self.pm.scan(_join_across_holes(spans, vmas),
                                                            pagemap.NOT_WP_ALLOWED).regions)

    def _plan(self, vmas: list[Mapping]) -> _Plan:
        """How this round treats each mapping; see _Plan. Computed once per distinct
        (mappings, registrations) and reused while neither changes, which is the steady
        state of most processes.

        Registration is a property of a kernel mapping (VMA), and /proc/PID/maps shows
        one line per VMA. Memory registered in an earlier round can since have been split
        or merged by mprotect, grown in place by mremap or as a stack (all still
        registered; their pages keep their write-protect state, so they stay tracked), or
        unmapped, with new memory mapped at an overlapping address (not registered: to be
        captured whole). So when the mappings changed at all, the plan asks the kernel
        about every mapping that overlaps memory registered before, in one cheap probe
        (_unregistered_parts). A mapping that overlaps nothing registered before is new
        without asking: registered memory only moves by mremap, which drops the
        registration (the flags do not follow the VMA without UFFD_FEATURE_EVENT_REMAP).
        While the mappings look the same, the plan is reused without asking; a mapping
        replaced by an identical one (munmap + mmap at the same place) then looks
        registered, and the get-and-clear's CHECK_WPASYNC catches that (see harvest)."""
        cached = self._plan_cache
        if (cached is not None and cached[0] is self._registered
                and cached[1] is self._unregistrable and cached[2] == vmas):
            return cached[3]
        cap = capturable(vmas)
        want_reg = [m for m in cap if _registrable(m)]
        # Ask the kernel only about mappings it has not answered for yet: after a round
        # that registered new memory, the same mappings come back with a new `known`.
        fresh = self._registered is None or vmas == self._asked_about
        if self._registered is None:
            self._registered = self._verified_registered(want_reg)
        known = self._registered
        failed_before = self._unregistrable
        never_reg = normalize(
            (m.start, m.end) for m in cap
            if not _registrable(m) or covers(failed_before, (m.start, m.end)))
        candidates = [m for m in want_reg if not covers(never_reg, (m.start, m.end))]
        maybe = [m for m in candidates if overlaps(known, (m.start, m.end))]
        if maybe and not fresh:
            unreg = self._unregistered_parts(normalize((m.start, m.end) for m in maybe), vmas)
            maybe = [m for m in maybe if not overlaps(unreg, (m.start, m.end))]
        self._asked_about = list(vmas)
        believed = normalize((m.start, m.end) for m in maybe)
        if believed == known:
            believed = known  # the same list: harvest then has nothing to update
        # `believed` is a union of whole mappings, which never overlap one another.
        new_vmas = [m for m in candidates if not covers(believed, (m.start, m.end))]
        file_spans = normalize((m.start, m.end) for m in want_reg if m.file_backed)
        file_reg = intersect(believed, file_spans)
        still_failed = normalize((m.start, m.end) for m in want_reg
                                 if covers(failed_before, (m.start, m.end)))
        plan = _Plan(want_reg=want_reg, never_reg=never_reg, believed=believed,
                     new_vmas=new_vmas, file_reg=file_reg,
                     anon_reg=subtract(believed, file_spans), still_failed=still_failed,
                     frozen_scan=_join_across_holes(believed, vmas))
        self._plan_cache = (self._registered, self._unregistrable, list(vmas), plan)
        return plan

    def estimate(self, ctx: TrackContext, vmas: Callable[[], list[Mapping]], full: bool
                 ) -> int:
        assert self.pm is not None
        if not full and self._registered is not None and self._last_read_pages is not None:
            # Steady state: size the buffer from the last round instead of a scan; a
            # larger burst is still read (into a buffer grown while frozen).
            return 2 * self._last_read_pages + 64
        current = vmas()
        plan = self._plan(current)
        if full:
            spans = normalize((m.start, m.end) for m in capturable(current))
            return self.pm.scan(spans, pagemap.DUMPABLE).pages
        unregistered = normalize([*plan.never_reg, *subtract(
            normalize((m.start, m.end) for m in plan.want_reg), plan.believed)])
        return (self.pm.scan(plan.believed, pagemap.WRITTEN_FAST).pages
                + self.pm.scan(unregistered, pagemap.DUMPABLE).pages)

    def harvest(self, ctx: TrackContext, vmas: list[Mapping], full: bool) -> Harvest:
        if full:
            self._unregistrable = []  # a full round retries registrations that failed
        if ctx.fuzzy:
            # Not frozen: mappings may be replaced at any moment, so the cache cannot be
            # checked against the kernel reliably. Ask the kernel each round, and let the
            # get-and-clear skip whatever was unregistered since (as WP_MATCHING does);
            # the next round sees it as new and captures it whole.
            self._registered = None
            return self._harvest(ctx, vmas, full, read_all=full, checked=False)
        try:
            return self._harvest(ctx, vmas, full, read_all=full, checked=True)
        except _RegistrationLost as e:
            # Part of the get-and-clear may have happened without our seeing its result:
            # read every page that holds content this time (a delta that holds all of
            # them is still correct), after asking the kernel what is registered. The
            # target is frozen, so that answer holds for the rest of the round.
            log.info("pid %d: %s; this round reads every page", ctx.pid, e)
            self._registered = None
            self._unregistrable = []
            h = self._harvest(ctx, vmas, full, read_all=True, checked=False)
            h.notes.insert(0, f"{e}: every page was read")
            return h

    def _harvest(self, ctx: TrackContext, vmas: list[Mapping], full: bool, read_all: bool,
                 checked: bool) -> Harvest:
        assert self.pm is not None and self.fd >= 0
        pm = self.pm
        t0 = time.perf_counter()
        # Before any question to the kernel. Frozen, the process cannot exec from here
        # on; fuzzy, it is checked again at the end, after the last question.
        self._check_address_space(ctx)
        notes: list[str] = []
        plan = self._plan(vmas)
        registered, never_reg, new_vmas = plan.believed, plan.never_reg, plan.new_vmas

        # Newly seen memory: in a frozen snapshot read its presence before write-protecting
        # (no markers yet); in a fuzzy one write-protect first so no write slips between.
        new_spans = normalize((m.start, m.end) for m in new_vmas)
        new_present: list[Span] = []
        if not ctx.fuzzy:
            new_present, _ = self._present(ctx, new_spans, None)
        failed = self._register(new_vmas, notes)
        if ctx.fuzzy:
            new_present, _ = self._present(ctx, subtract(new_spans, failed), None)
        else:
            new_present = subtract(new_present, failed)
        untracked = normalize([*never_reg, *failed])
        untracked_present, _ = self._present(ctx, untracked, None)
        # Remember failures (not retried every round), for the mappings that still exist;
        # a round that reads everything retries them. (The plan was made with the same
        # self._unregistrable, so its still_failed is current.)
        unregistrable = normalize([*plan.still_failed, *failed])
        if unregistrable != self._unregistrable:
            self._unregistrable = unregistrable

        # The atomic get-and-clear over memory that was already tracked. CHECK_WPASYNC:
        # the kernel refuses (EPERM) if any of it is not registered after all. Frozen,
        # the mappings cannot change, so spans apart only by unmapped holes go in one
        # ioctl (see _join_across_holes); fuzzy, one per span.
        try:
            written = pm.scan(registered if ctx.fuzzy else plan.frozen_scan,
                              _GET_AND_CLEAR_CHECKED if checked
                              else pagemap.WRITTEN_FAST_GET_AND_CLEAR,
                              max_pages=0 if full else ctx.max_pages)
        except OSError as e:
            if e.errno != errno.EPERM:
                raise
            raise _RegistrationLost("a tracked mapping was replaced since the last round "
                                    "(no longer registered)") from None
        written_spans = normalize((s, e) for s, e, _ in written.regions)
        if new_spans:
            self._registered = normalize([*registered, *subtract(new_spans, failed)])
        elif self._registered is not registered:
            self._registered = registered  # mappings that went away drop out

        if read_all:
            tracked_present, _ = self._present(ctx, registered, None)
            present = normalize([*tracked_present, *new_present, *untracked_present])
            to_read = present
        else:
            # Anonymous memory: content changes only by writes, or by pages being dropped,
            # which the get-and-clear reports too (as none ptes: they read as zeros). So
            # presence carries over from the parent, limited to the mappings that exist.
            # Private file mappings also lose content by reverting to the file (a dropped
            # copy-on-write page leaves a marker, not reported). Only pages that held
            # content at the parent can have been dropped: scan just those. Pages copied
            # since were written, so the get-and-clear reported them.
            fp = self._from_parent(plan, ctx.parent_present or [], vmas)
            unsure: list[Span] = []
            if fp.had_check is not None and fp.had_check.holds(pm.fd):
                kept = fp.had  # all still private copies: the usual case
            else:
                kept, unsure = self._present(ctx, fp.had, fp.parent, scan=fp.had_scan)
            # present = (parent | written) & anon_reg, plus kept | (written & file_reg),
            # plus the new and untracked pages; anon_reg | file_reg is plan.believed.
            # Merged into the long lists from the parent, which repeat round after round.
            lost = self._lost_in_parent(ctx, plan.believed)
            lost_present = self._present(ctx, lost, None)[0] if lost else []
            extra = normalize([*intersect(written_spans, plan.believed), *new_present,
                               *untracked_present, *lost_present])
            if kept == fp.had:  # no file page reverted: the usual case
                present = union(fp.anon_and_had, extra)
            else:
                present = union(fp.anon, normalize([*kept, *extra]))
            to_read = normalize([*written_spans, *new_present, *untracked_present, *unsure,
                                 *lost_present])
        # A round that read everything says nothing about the next delta's size.
        self._last_read_pages = None if read_all else (
            total(to_read) >> abi.PAGE_SHIFT)
        self._fuzzy_present = (ctx.snapshot_id, present) if ctx.fuzzy else None
        self._round_present = present
        if ctx.fuzzy:
            self._check_address_space(ctx)
        return Harvest(
            to_read=to_read,
            present=present,
            pages_dirty=written.pages,
            truncated=written.truncated,
            scan_ms=(time.perf_counter() - t0) * 1e3,
            notes=notes,
        )

    def _check_address_space(self, ctx: TrackContext) -> None:
        """Raise AddressSpaceReplaced if the process exec'd since our pagemap and
        userfaultfd were set up: they then describe its old address space, and every
        answer they give is empty (no page written, none present) instead of an error."""
        assert self.pm is not None
        if not self.pm.same_address_space():
            self.close()
            self._exec_seen = True
            raise AddressSpaceReplaced(
                f"process {ctx.pid} exec'd since its tracking was set up; nothing was stored")

    def _lost_in_parent(self, ctx: TrackContext, believed: list[Span]) -> list[Span]:
        """Tracked pages that the last round, a fuzzy one, reported present but that its
        snapshot (the parent) lacks. A fuzzy capture drops what it fails to read because
        the process unmapped memory meanwhile, and a failed read drops the rest of its
        run, which can reach into a mapping that stays. Such pages were write-protected as
        they were, so no later get-and-clear reports them, and a delta that takes presence
        from the parent would lose them: they are scanned and read again. (Before the
        plan asked the kernel about changed mappings, the frozen round after fuzzy ones
        nearly always read every page, which hid this.)"""
        last = self._fuzzy_present
        if last is None or last[0] != ctx.parent_id or ctx.parent_present is None:
            return []
        lost = subtract(last[1], normalize(ctx.parent_present))
        return intersect(lost, believed) if lost else []

    def _from_parent(self, plan: _Plan, parent: list[Span], vmas: list[Mapping]
                     ) -> _FromParent:
        """What a delta derives from the parent's present pages alone. In the steady state
        the plan and the parent's pages (the last round's result, unless something was
        written outside them) repeat, and so does all of this: reused while the plan is
        the same object and the parent's list is equal (compared in C)."""
        fp = self._parent_cache
        if fp is not None and fp.plan is plan and fp.parent == parent:
            return fp
        parent = normalize(parent)  # a private copy; normally normalized already
        anon = intersect(parent, plan.anon_reg)
        had = intersect(parent, plan.file_reg)
        had_scan = _coalesce(had, vmas, _COALESCE_FILE_GAP)
        fp = _FromParent(plan=plan, parent=parent, anon=anon, had=had, had_scan=had_scan,
                         had_check=pagemap.PrivatePresentCheck(had, had_scan) if had else None,
                         anon_and_had=normalize([*anon, *had]))
        self._parent_cache = fp
        return fp

    def _present(self, ctx: TrackContext, spans: list[Span], previously: list[Span] | None,
                 scan: list[Span] | None = None) -> tuple[list[Span], list[Span]]:
        """(pages holding content in `spans`, pages among them that must be re-read).

        PAGEMAP_SCAN reports a uffd-wp marker (unpopulated page) as SWAPPED, like a real
        swap entry. Only SWAPPED pages that matter are examined: all of them when
        `previously` is None, else those that held content at the parent (elsewhere a
        SWAPPED page without WRITTEN can only be a marker). /proc/PID/pagemap tells markers
        from swap entries to a privileged reader; an unprivileged one cannot, so it
        re-reads those pages, which yields their true content (zeros for a marker)."""
        assert self.pm is not None
        if not spans:
            return [], []
        regions = self.pm.scan(scan or spans, pagemap.DUMPABLE).regions
        present = normalize((s, e) for s, e, c in regions if c & abi.PAGE_IS_PRESENT)
        swapped = normalize((s, e) for s, e, c in regions if not c & abi.PAGE_IS_PRESENT)
        if scan is not None:  # wider ranges were scanned: keep what is inside `spans`
            present, swapped = intersect(present, spans), intersect(swapped, spans)
        check = swapped if previously is None else intersect(swapped, previously)
        must_read: list[Span] = []
        if check:
            content, _markers = pagemap.split_swapped(ctx.pid, check)
            present.extend(content)
            if not ctx.privileged:
                must_read = content
        return normalize(present), must_read

    def _register(self, vmas: list[Mapping], notes: list[str]) -> list[Span]:
        """Register and write-protect; returns the spans that could not be registered."""
        failed: list[Span] = []
        for m in vmas:
            try:
                uffd.register_wp(self.fd, m.start, m.end)
                uffd.write_protect(self.fd, m.start, m.end)
            except OSError as e:
                if e.errno == errno.ENOMEM:
                    continue  # the mapping went away (fuzzy mode)
                failed.append((m.start, m.end))
                notes.append(f"{m.start:#x}-{m.end:#x} {m.path or ''}: not write-protectable "
                             f"({errno.errorcode.get(e.errno or 0, e.errno)}); captured whole")
        return normalize(failed)

    # --- after ------------------------------------------------------------------------

    def begin(self, ctx: TrackContext) -> None:
        # The get-and-clear is about to reset "written" so that it matches the snapshot
        # this round will publish. Record that name first: if the round dies before
        # publishing, the chain's latest snapshot is not that name, and the next round
        # (see _sync_reason) is full. One write per round, and none at commit.
        assert self.state is not None
        self.state.synced_with = ctx.snapshot_id
        self._save_state(ctx)

    def select(self, ctx: TrackContext, runs: list[Span], data: memoryview) -> list[bool] | None:
        """Drop the written pages whose content is what the parent holds (see
        track/unchanged.py). Fuzzy rounds are not filtered, and forget the copies: their
        reads may fail part way."""
        if ctx.fuzzy:
            self._unchanged.clear()
            return None
        return self._unchanged.filter(ctx.parent_id, runs, data)

    def commit(self, ctx: TrackContext, snapshot_id: str) -> None:
        self._unchanged.commit(snapshot_id, self._round_present)

    def abandon(self, ctx: TrackContext) -> None:
        self._unchanged.abandon()
        if self.state is not None and self.state.synced_with is not None:
            self.state.synced_with = None
            self._save_state(ctx)

    def release(self) -> None:
        """Unregister the target's memory from our userfaultfd, so that the process can
        use userfaultfd on it itself (the kernel refuses a second registration with
        EBUSY) and its pages are no longer write-protected. The fd stays in the target
        (closing it would take another injection); registered again, tracking starts
        over with a full snapshot."""
        if self.fd < 0 or not self._pid:
            return
        try:
            spans = [(m.start, m.end) for m in procfs.read_maps(self._pid)
                     if m.private and not m.special]
        except (FileNotFoundError, ProcessLookupError):
            return  # gone: so is its memory
        for start, end in spans:
            try:
                uffd.unregister(self.fd, start, end)
            except OSError as e:
                # Not registered (EINVAL for mappings userfaultfd cannot take), or gone.
                log.debug("pid %d: unregister %#x-%#x: %s", self._pid, start, end, e)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.pm is not None:
            self.pm.close()
            self.pm = None
        self.state = None
        self._registered = None
        self._unregistrable = []
        self._last_read_pages = None
        self._plan_cache = None
        self._parent_cache = None
        self._asked_about = None
        self._fuzzy_present = None
        self._unchanged.clear()
        self._round_present = []
        self._close_state()


def _inject_frozen(pid: int, suspend: bool,
                   authorize: Callable[[int], None] | None) -> tuple[int, int]:
    """Freeze, make the target create a userfaultfd, take a copy of the new fd and thaw.
    Returns (the fd's number in the target, our copy). `authorize` (see TrackContext)
    is checked once frozen: no injection into a process the client may not ptrace."""
    with ptrace.Freezer(pid, suspend_seccomp=suspend) as fz:
        if authorize is not None:
            authorize(pid)
        if not suspend and procfs.read_status(pid).get("Seccomp", "0") != "0":
            # It installed a filter since we looked: the filter might kill it for the
            # injected call.
            raise TrackerUnavailable("the target started using seccomp; "
                                     "write-protect tracking was not set up")
        with fz.injection() as inj:
            target_fd = _new_userfaultfd(pid, inj)
        fd = -1
        try:
            with _pidfd(pid) as pidfd:
                fd = syscalls.pidfd_getfd(pidfd, target_fd)
            uffd.api_handshake(fd)
        except (OSError, uffd.UffdUnsupported) as e:
            # Leave no trace: close the fd we made the target open.
            if fd >= 0:
                os.close(fd)
            fz.inject_syscall(abi.SYS_close, target_fd)
            raise TrackerUnavailable(f"cannot set up write-protect tracking: {e}") from e
        return target_fd, fd


def _new_userfaultfd(pid: int, inj: ptrace.Injection) -> int:
    """Make the target create a userfaultfd, numbered _LOWEST_TARGET_FD or above, and
    return its number there. The kernel gives the lowest free number, which is 0, 1 or 2
    in a process that closed its standard streams; such a process may count on its next
    open() getting that number back (a daemon reopening /dev/null as its stdout would
    write into our fd). The fd is then moved up in the same injection session, with the
    thread still held: duplicated with F_DUPFD_CLOEXEC (the copy is close-on-exec, and
    shares the open file and its O_NONBLOCK), and the low number closed. On any failure
    the fds made in the target are closed again before the error goes up."""
    made: list[int] = []  # fds open in the target because of us
    try:
        fd = inj.syscall(abi.SYS_userfaultfd,
                         abi.O_CLOEXEC | abi.O_NONBLOCK | abi.UFFD_USER_MODE_ONLY)
        if fd < 0:
            raise TrackerUnavailable(f"userfaultfd() in the target failed: {os.strerror(-fd)}")
        made.append(fd)
        if fd >= _LOWEST_TARGET_FD:
            return fd
        moved = inj.syscall(abi.SYS_fcntl, fd, abi.F_DUPFD_CLOEXEC, _LOWEST_TARGET_FD)
        if moved < 0:
            raise TrackerUnavailable(f"cannot move the target's userfaultfd off fd {fd} "
                                     f"(fcntl F_DUPFD_CLOEXEC: {os.strerror(-moved)})")
        made.append(moved)
        closed = inj.syscall(abi.SYS_close, fd)
        # close() frees the number whatever it returns, except EBADF, which would mean
        # that something else (a process sharing the fd table) closed it: either way it
        # is no longer ours to close.
        made.remove(fd)
        if closed < 0:
            raise TrackerUnavailable(f"closing fd {fd} in the target after moving the "
                                     f"userfaultfd failed: {os.strerror(-closed)}")
        log.debug("pid %d: userfaultfd moved from fd %d to fd %d", pid, fd, moved)
        return moved
    except BaseException as e:
        if isinstance(e, ptrace.TargetGone):
            raise  # its fds went with it
        for n in reversed(made):
            try:
                inj.syscall(abi.SYS_close, n)
            except Exception as why:  # the original error matters more
                log.warning("pid %d: could not close fd %d in the target: %s", pid, n, why)
                break
        raise


# The first fd above the standard streams (stdin, stdout, stderr): the userfaultfd never
# takes one of theirs.
_LOWEST_TARGET_FD = 3


_INJECT_ATTEMPTS = 20  # freezes to find the thread outside an rseq critical section


class _RegistrationLost(Exception):
    pass


@dataclass(frozen=True)
class _Plan:
    want_reg: list[Mapping]   # mappings to keep registered
    never_reg: list[Span]     # not registrable, or registration failed: captured whole
    believed: list[Span]      # registered, as far as we know (checked by the kernel)
    new_vmas: list[Mapping]   # to register this round
    file_reg: list[Span]      # registered private file mappings (presence is scanned)
    anon_reg: list[Span]      # registered anonymous memory (presence carries over)
    still_failed: list[Span]  # want_reg whose registration failed in an earlier round
    frozen_scan: list[Span]   # believed, joined across unmapped holes (frozen rounds)


@dataclass(frozen=True)
class _FromParent:
    """A delta's inputs that depend only on the plan and the parent (see _from_parent)."""
    plan: _Plan
    parent: list[Span]        # the parent's present pages (normalized, our own copy)
    anon: list[Span]          # parent & anon_reg
    had: list[Span]           # parent & file_reg: file pages that may have reverted
    had_scan: list[Span]      # `had`, coalesced into fewer scan ranges
    had_check: pagemap.PrivatePresentCheck | None  # are all of `had` still private copies?
    anon_and_had: list[Span]  # anon | had: present now if no file page reverted


# Scanning across a gap costs the kernel a walk of the mapped pages in it (about 50 ns
# each in the general path); a separate ioctl from Python costs about as much as a few
# hundred of them.
_COALESCE_FILE_GAP = 256


def _coalesce(spans: list[Span], vmas: list[Mapping], max_gap_pages: int) -> list[Span]:
    """Merge neighbouring spans into one scan range when little mapped memory lies
    between them (results are then clipped back to `spans`)."""
    if len(spans) < 2:
        return spans
    starts = [m.start for m in vmas]
    out = [spans[0]]
    for s, e in spans[1:]:
        gap_lo, gap_hi = out[-1][1], s
        mapped = 0
        i = max(bisect.bisect_right(starts, gap_lo) - 1, 0)
        while i < len(vmas) and vmas[i].start < gap_hi:
            mapped += max(0, min(vmas[i].end, gap_hi) - max(vmas[i].start, gap_lo))
            i += 1
        if mapped >> abi.PAGE_SHIFT <= max_gap_pages:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def _join_across_holes(spans: list[Span], vmas: list[Mapping]) -> list[Span]:
    """Join neighbouring spans when no mapping at all lies between them, so that one
    ioctl scans both. The kernel's page walk passes over a hole without calling the scan's
    per-mapping check, so PM_SCAN_CHECK_WPASYNC still fails only for a mapping that is not
    registered, and the get-and-clear reports and protects exactly the same pages. A
    mapping of any kind in between (unregistered, special, new this round) keeps the
    spans apart: the check would fail on it, and the get-and-clear must not touch it.
    `vmas` must be every mapping of the process, sorted, as read while it is frozen."""
    if len(spans) < 2:
        return spans
    starts = [m.start for m in vmas]
    out = [spans[0]]
    for s, e in spans[1:]:
        lo = out[-1][1]
        i = bisect.bisect_left(starts, s)  # vmas[:i] start before s
        if i and vmas[i - 1].end > lo:  # the last of them reaches into the gap
            out.append((s, e))
        else:
            out[-1] = (out[-1][0], e)
    return out


_GET_AND_CLEAR_CHECKED = pagemap.Query(
    category_mask=pagemap.WRITTEN_FAST_GET_AND_CLEAR.category_mask,
    return_mask=pagemap.WRITTEN_FAST_GET_AND_CLEAR.return_mask,
    flags=pagemap.WRITTEN_FAST_GET_AND_CLEAR.flags | abi.PM_SCAN_CHECK_WPASYNC,
)


def _registrable(m: Mapping) -> bool:
    if m.size > MAX_REGISTER:
        return False
    return m.writable or m.size <= MAX_READONLY_REGISTER


class _pidfd:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = -1

    def __enter__(self) -> int:
        self.fd = syscalls.pidfd_open(self.pid)
        return self.fd

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


__all__ = ["UffdWpTracker", "probe"]
