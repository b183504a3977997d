"""The long-running service: wires config, registry, scheduler, engine, control socket,
sd_notify and metrics together on an asyncio (uvloop) event loop.

Blocking work never runs on the loop:
  capture workers (service.concurrency threads) engine.snapshot: ptrace, reads,
                                               compression (workers.py: a timer round
                                               is posted, and does not call back)
  work pool     (2 threads)                    store reads for requests: list, show,
                                               materialize, verify
  maint pool    (1 thread)                     retention and compaction, in the background
The engine has its own zstd pool (2 threads). All are sized for a 2-core machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import gc
import grp
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .. import __version__
from ..engine import Engine, PublishLater
from ..errors import (
    AccessRevoked,
    CkptdError,
    CorruptStore,
    PermissionDenied,
    StoreFull,
    TargetBusy,
    TargetGone,
    TargetNotFound,
    UnknownSnapshot,
    UserError,
)
from ..kernel.abi import PAGE_SIZE
from ..kernel.syscalls import name_os_thread
from ..store import SnapshotMeta, Store, parse_snapshot_id
from ..store import reader as store_reader
from ..store.fsutil import Owner
from ..store.views import page_map_view
from . import aio, auth, fdlimit, maintenance, protocol
from .auth import Peer
from .config import ConfigError, Policy, PolicyOverride, ServiceConfig, load_config
from .logsetup import set_level, setup_logging
from .metrics import CONTENT_TYPE, Metrics
from .notify import Notifier
from .protocol import ErrorCode, ProtocolError
from .registry import (
    REGISTRY_FILE,
    Registration,
    Registry,
    new_record,
    open_process,
    pidfd_exited,
)
from .scheduler import Scheduler, Slot, Stopped
from .views import registration_view, snapshot_detail, snapshot_summary, status_line
from .workers import Workers

log = logging.getLogger("ckptd.service")
T = TypeVar("T")

MAX_CLIENTS = 128
# Connections of one non-root user at once: one user must not hold every connection
# (idle, or with half a request each) and lock the others out. Root's connections are
# never refused, so root can always reach a service other users keep busy.
MAX_CLIENTS_PER_USER = 32
# The metrics HTTP listener: at most this many connections at once, each given this long
# to send its request head. Any local user (or anyone, if it listens wider) can connect.
MAX_HTTP_CLIENTS = 16
HTTP_TIMEOUT = 5.0
READ_CHUNK = 1 << 16
# Unregistered processes snapshotted with `snapshot` whose tracking (a pidfd, the
# engine's open files, tracker state) is kept for their next one: at most this many,
# fewer when registrations leave less room in the open-file limit; beyond that the least
# recently snapshotted one is forgotten (its next snapshot starts a new tracking).
ADHOC_MAX = 16
# What a stopping service still answers: these touch neither the engine nor the store,
# which the shutdown closes (every other op is refused with `busy`).
OPS_WHILE_STOPPING = (protocol.PingReq, protocol.ListReq, protocol.StatusReq,
                      protocol.MetricsReq)


def error_code(exc: BaseException) -> ErrorCode:
    if isinstance(exc, (TargetNotFound, UnknownSnapshot)):
        return "not-found"
    if isinstance(exc, PermissionDenied):
        return "permission"
    if isinstance(exc, UserError):
        return "user-error"
    if isinstance(exc, TargetGone):
        return "gone"
    if isinstance(exc, TargetBusy):
        return "busy"
    if isinstance(exc, StoreFull):
        return "store-full"
    return "internal"


def failure_reason(exc: BaseException) -> str:
    """A short, stable label for metrics."""
    if isinstance(exc, (TargetGone, TargetNotFound)):
        return "gone"
    if isinstance(exc, PermissionDenied):
        return "permission"
    if isinstance(exc, UserError):
        return "user"
    if isinstance(exc, CkptdError):
        name = type(exc).__name__
        return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
    if isinstance(exc, OSError):
        return "os_error"
    return "internal"


class Service:
    def __init__(self, config: ServiceConfig, config_path: Path | None) -> None:
        self.cfg = config
        self.config_path = config_path
        self.metrics = Metrics()
        self.notifier = Notifier.from_env()
        self.started = time.time()
        self.last_snapshot_at: float | None = None
        # Rounds failed for lack of space since the last round that stored: a full store
        # fails every round, and one log line (and the STATUS line) says so, not each.
        self.full_store_rounds = 0
        self._full_store_lock = threading.Lock()
        self._compactions_out_of_space: set[str] = set()  # chains; on the loop only
        self.stopping = False
        self._stop_event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop  # set by run(); capture workers call into it
        self._persist_lock: asyncio.Lock | None = None
        self._adhoc_slots: OrderedDict[int, Slot] = OrderedDict()  # least recently used first
        self._watched: set[int] = set()  # pids whose pidfd we watch for exit
        self._adhoc_pidfds: dict[int, int] = {}
        self._maint_running: set[str] = set()
        self._tallies: dict[int, maintenance.ChainTally] = {}  # by pid: its current chain
        self._clients = 0
        self._clients_of: dict[int, int] = {}  # open connections per uid
        self._http_clients = 0
        self._busy: set[asyncio.Future[Any]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._http: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # Work that uses the engine or the store (unregistrations, compactions,
        # maintenance jobs, ...): the shutdown waits for these (within its grace) before
        # it closes them.
        self._ops: set[asyncio.Task[Any]] = set()
        self.store: Store
        self.engine: Engine
        self.registry: Registry
        self.scheduler: Scheduler
        self.fds = fdlimit.raise_soft_limit()
        self.capture = Workers(config.service.concurrency, "ckptd-capture",
                               on_idle=self._publish_staged)
        self.work_pool = ThreadPoolExecutor(2, "ckptd-work", initializer=name_os_thread)
        self.maint_pool = ThreadPoolExecutor(1, "ckptd-maint", initializer=name_os_thread)

    # --- helpers ------------------------------------------------------------------------

    def _publish_staged(self) -> None:
        """In a capture worker with no more work queued: publish the timer rounds it
        staged, as one group (Engine.flush)."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.flush()

    def policy_of(self, reg: Registration) -> Policy:
        return reg.policy(self.cfg.defaults)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _spawn_op(self, coro: Any, name: str) -> None:
        """_spawn for work that uses the engine or the store: the shutdown waits for it."""
        task = asyncio.create_task(coro, name=name)
        self._ops.add(task)
        task.add_done_callback(self._ops.discard)
        task.add_done_callback(self._task_done)

    async def _op(self, coro: Coroutine[Any, Any, T], name: str) -> T:
        """Run a request's work that uses the engine or the store as an op (see _ops),
        in its own task: a client going away does not cut it short."""
        task = asyncio.create_task(coro, name=name)
        self._ops.add(task)
        task.add_done_callback(self._ops.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # Nobody will see its outcome now: log a failure (_task_done).
            task.add_done_callback(self._task_done)
            raise

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("background task %s failed: %r", task.get_name(), exc,
                      exc_info=exc)

    async def _in(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any,
                  **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(pool, functools.partial(fn, *args, **kwargs))
        self._busy.add(fut)
        try:
            return await asyncio.shield(fut)
        finally:
            if fut.done():
                self._busy.discard(fut)
            else:
                fut.add_done_callback(self._busy.discard)

    # --- start --------------------------------------------------------------------------

    async def run(self) -> int:
        loop = self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._persist_lock = asyncio.Lock()
        svc = self.cfg.service
        # The listening sockets first: a second instance, or a socket path or metrics
        # address that cannot be used, stops here, before the store is opened and
        # restored registrations start their rounds. Connections wait in the backlog
        # until the service serves them.
        ctl = await self._listen_control()
        http: socket.socket | None = None
        try:
            if self.cfg.metrics.listen:
                http = _listen_tcp(self.cfg.metrics.listen)
            restored, gone = await self._open_and_restore()
            self._server = await asyncio.start_unix_server(
                self._client, sock=ctl, limit=protocol.MAX_MESSAGE + 2)
            if http is not None:
                self._http = await asyncio.start_server(self._http_client, sock=http)
                log.info("metrics on http://%s/metrics", self.cfg.metrics.listen)
        except BaseException:
            ctl.close()
            if http is not None:
                http.close()
            _unlink_socket(svc.socket)
            raise
        for sig, handler in ((signal.SIGTERM, self._on_term), (signal.SIGINT, self._on_term),
                             (signal.SIGHUP, self._on_hup)):
            loop.add_signal_handler(sig, handler)
        log.info("ckptd %s serving on %s, store %s, %d registration(s) restored, "
                 "%d dropped", __version__, svc.socket, svc.store, len(restored), len(gone))
        self._log_fd_budget()
        self.notifier.ready(self._status_text())
        self._spawn(self._ticker(), "ticker")
        await self._stop_event.wait()
        return await self._shutdown()

    async def _open_and_restore(self) -> tuple[list[Registration], list[Any]]:
        svc = self.cfg.service
        self.store = await self._in(self.work_pool, Store.open, svc.store, create=True)
        state_dir = svc.store / "service"
        await self._in(self.work_pool, _private_dir, state_dir)
        self.engine = Engine(self.store, compress_threads=2, retain_buffer_bytes=16 << 20)
        self.registry = Registry(state_dir / REGISTRY_FILE)
        self.scheduler = Scheduler(self._scheduled_job, self.policy_of, svc.concurrency,
                                   on_overrun=self._count_overrun, post=self.capture.post,
                                   batch_window=svc.batch_window)

        restored, gone = await self._in(self.work_pool, self.registry.restore)
        for rec, why in gone:
            log.warning("registration of pid %d (%s) dropped: %s; its snapshots are kept",
                        rec.pid, rec.comm, why)
        for reg in restored:
            self._watch_exit(reg.pid, reg.pidfd)
            self.scheduler.start(reg, first_delay=0.0)
            log.info("pid %d (%s) restored; re-arming with a snapshot now", reg.pid,
                     reg.record.comm)
        if gone:
            await self._persist()
        self.metrics.registered.set(len(self.registry))
        return restored, list(gone)

    def _log_fd_budget(self) -> None:
        fds = self.fds
        if fds.soft != fds.before:
            log.info("open-file limit raised from %d to %d: room for %d registrations",
                     fds.before, fds.soft, fds.registrations)
        if len(self.registry) > fds.registrations:
            log.warning("%d registrations restored, but the open-file limit (%d) holds "
                        "%d: rounds beyond that will fail with 'Too many open files'; "
                        "raise LimitNOFILE= in ckptd.service", len(self.registry), fds.soft,
                        fds.registrations)
        if fds.registrations < self.cfg.service.max_registrations:
            log.warning("the open-file limit (%d, hard limit %d) has room for %d "
                        "registrations, fewer than service.max_registrations (%d); raise "
                        "LimitNOFILE= in ckptd.service to hold more", fds.soft, fds.hard,
                        fds.registrations, self.cfg.service.max_registrations)

    async def _listen_control(self) -> socket.socket:
        """The control socket, bound (mode 0660, group service.socket_group) and
        listening. A setting that cannot be used is a ConfigError naming it."""
        svc = self.cfg.service
        path = svc.socket
        await self._in(self.work_pool, _prepare_socket_path, path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            old = os.umask(0o117)  # the socket is created 0660: never briefly wider
            try:
                sock.bind(str(path))
            finally:
                os.umask(old)
            sock.listen(MAX_CLIENTS)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:  # bound since the check just above
                raise UserError(f"another ckptd is already serving on {path}") from None
            raise ConfigError(f"service.socket = '{path}': cannot listen there: "
                              f"{exc.strerror or exc}") from None
        try:
            # Mode 0660 came from the umask at bind(): no chmod, which would follow a
            # symlink; the directory is writable by no other user (_prepare_socket_path).
            if svc.socket_group:
                try:
                    gid = grp.getgrnam(svc.socket_group).gr_gid
                except KeyError:
                    raise ConfigError(
                        f"service.socket_group = {svc.socket_group!r}: no such group") from None
                os.chown(path, -1, gid, follow_symlinks=False)
        except BaseException:
            sock.close()
            _unlink_socket(path)
            raise
        return sock

    # --- signals, reload, shutdown ------------------------------------------------------

    def _on_term(self) -> None:
        if not self.stopping:
            log.info("stop requested: finishing snapshots in flight")
            self.stopping = True
            # At once, not when _shutdown gets to it: a `snapshot` request waiting for a
            # timer round must not start its own round once that one has ended.
            self.scheduler.stopping = True
            assert self._stop_event is not None
            self._stop_event.set()

    def _on_hup(self) -> None:
        if self.stopping:  # a reload would resize the pools the shutdown closes
            log.info("reload requested while stopping: ignored")
            return
        self._spawn(self._reload_on_signal(), "reload")

    async def _reload_on_signal(self) -> None:
        with contextlib.suppress(ConfigError):  # logged by _reload: one line, no traceback
            await self.reload()

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file; keep registrations. A bad file keeps the old config."""
        self.notifier.reloading()
        try:
            return await self._reload()
        finally:
            # After RELOADING=1 systemd waits for READY=1, whatever the outcome.
            self.notifier.ready(self._status_text())

    async def _reload(self) -> dict[str, Any]:
        try:
            if self.config_path is not None:
                text = await aio.read_text(self.config_path)
                from .config import parse_config
                new = parse_config(text, str(self.config_path))
            else:
                new = await self._in(self.work_pool, load_config, None)
        except (ConfigError, OSError, UnicodeDecodeError) as exc:
            if isinstance(exc, UnicodeDecodeError):
                exc = ConfigError(f"{self.config_path}: not UTF-8 text ({exc.reason} at byte "
                                  f"{exc.start})")
            log.error("reload refused, keeping the running configuration: %s", exc)
            raise ConfigError(f"reload refused: {exc}") from None
        old = self.cfg
        restart_needed = [k for k in ("store", "socket", "socket_group")
                          if getattr(old.service, k) != getattr(new.service, k)]
        if old.metrics.listen != new.metrics.listen:
            restart_needed.append("metrics.listen")
        if restart_needed:
            log.warning("reload: %s changed; this takes effect on restart",
                        ", ".join(restart_needed))
        keep = {"store": old.service.store, "socket": old.service.socket,
                "socket_group": old.service.socket_group}
        new = new.model_copy(update={
            "service": new.service.model_copy(update=keep),
            "metrics": new.metrics.model_copy(update={"listen": old.metrics.listen}),
        })
        self.cfg = new
        set_level(new.service.log_level)
        self.scheduler.batch_window = new.service.batch_window
        self.scheduler.policies_changed()
        if new.service.concurrency != old.service.concurrency:
            self.scheduler.set_concurrency(new.service.concurrency)
            self.capture.resize(new.service.concurrency)
        log.info("configuration reloaded from %s; %d registration(s) kept",
                 self.config_path or "defaults", len(self.registry))
        return {"reloaded": True, "restart_needed": restart_needed,
                "registered": len(self.registry)}

    async def _shutdown(self) -> int:
        self.notifier.stopping()
        if self._server is not None:
            self._server.close()
        if self._http is not None:
            self._http.close()
        await self.scheduler.shutdown()
        # Nothing new starts now (requests that use the engine or the store are refused,
        # exits are not turned into unregistrations, timers are stopped): what runs is
        # in these, and what it starts is awaited by it.
        pending: list[asyncio.Future[Any]] = [
            f for f in (*self._busy, *self._ops, *self.scheduler.on_demand) if not f.done()]
        count = len(pending) + self.capture.jobs
        if self.capture.jobs:
            pending.append(asyncio.ensure_future(self.capture.wait_idle()))
        if pending:
            log.info("waiting up to %.0fs for %d operation(s) in flight",
                     self.cfg.service.shutdown_grace, count)
            _, still = await asyncio.wait(pending, timeout=self.cfg.service.shutdown_grace)
            if still:
                await self._persist()
                log.warning("abandoning %d operation(s) still running after %.0fs: a "
                            "snapshot in flight is not published; the store keeps only "
                            "complete snapshots", len(still), self.cfg.service.shutdown_grace)
                _unlink_socket(self.cfg.service.socket)
                logging.shutdown()
                sys.stderr.flush()
                os._exit(0)
        await self._persist()
        for t in list(self._tasks):
            t.cancel()
        _unlink_socket(self.cfg.service.socket)
        for pid in list(self._watched):
            self._unwatch(pid)
        for reg in list(self.registry.by_pid.values()):
            reg.close()
        for fd in self._adhoc_pidfds.values():
            os.close(fd)
        # The pools first: the engine closes its trackers, kept files and compression
        # pool, and the store's kept directories, with no lock against a job using them.
        self.capture.shutdown(wait=True)
        for pool in (self.work_pool, self.maint_pool):
            pool.shutdown(wait=True)
        self.engine.close()
        log.info("stopped")
        return 0

    async def _persist(self) -> None:
        assert self._persist_lock is not None
        async with self._persist_lock:
            await aio.atomic_write(self.registry.path, self.registry.to_bytes())

    def _status_text(self) -> str:
        return status_line(len(self.registry), self.last_snapshot_at, time.time(),
                           self.full_store_rounds)

    async def _ticker(self) -> None:
        interval = self.notifier.watchdog_interval or 5.0
        interval = min(interval, 5.0)
        last_status = 0.0
        while True:
            if self.notifier.watchdog_interval:
                self.notifier.watchdog()
            now = time.monotonic()
            if now - last_status >= 5.0:
                self.notifier.status(self._status_text())
                last_status = now
            await asyncio.sleep(interval)

    # --- process exit watching ----------------------------------------------------------

    def _watch_exit(self, pid: int, pidfd: int) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(pidfd, self._on_exit, pid)
        self._watched.add(pid)

    def _unwatch(self, pid: int) -> None:
        if pid in self._watched:
            self._watched.discard(pid)
            reg = self.registry.get(pid)
            fd = reg.pidfd if reg is not None else self._adhoc_pidfds.get(pid)
            if fd is not None:
                asyncio.get_running_loop().remove_reader(fd)

    def _on_exit(self, pid: int) -> None:
        reg = self.registry.get(pid)
        self._unwatch(pid)
        if self.stopping:
            # Not turned into an unregistration, whose engine.forget would run while the
            # shutdown closes the engine: the registration is saved as it is, and the
            # next start drops it (its process is gone). A one-off's files are closed by
            # the engine's close.
            if reg is None:
                self._forget_adhoc(pid)
            return
        if reg is not None:
            if not reg.unregistering:
                self._begin_unregister(reg, exited=True)
                self._spawn_op(self._unregister(reg, "the process exited"), f"exit-{pid}")
        else:
            self._drop_adhoc(pid)

    # --- registrations ------------------------------------------------------------------

    def _authorize(self, peer: Peer, pid: int) -> tuple[int, int, auth.Ownership]:
        """Open a pidfd for `pid`, then check that `peer` may act on its process. Returns
        (pidfd, start time, ownership); the caller owns the pidfd. The pidfd comes
        first because the checks read /proc by PID: what they read is the pidfd's
        process only if it has not exited by the end (then its PID was not reused)."""
        pidfd, start = open_process(pid)
        try:
            own = auth.check_process(peer, pid)
            if pidfd_exited(pidfd):
                raise TargetGone(f"process {pid} exited during the request; nothing was done")
        except BaseException:
            os.close(pidfd)
            raise
        return pidfd, start, own

    @staticmethod
    def _stale(pid: int) -> ProtocolError:
        # The registered (or tracked) process exited and its PID is another process's
        # now: the exit is being handled (its pidfd polls readable), which takes a moment.
        return ProtocolError("busy", f"the process registered as PID {pid} exited and the "
                             "PID now belongs to another process: try again once its "
                             "registration is dropped")

    def _dropped_meanwhile(self, reg: Registration) -> Exception:
        """What to answer a `register` of `reg` that was unregistered while it waited."""
        if reg.exited:
            return TargetGone(f"process {reg.pid} exited while it was being registered")
        return ProtocolError("busy", f"PID {reg.pid} was unregistered while this request "
                             "was being served: register it again")

    async def register(self, peer: Peer, req: protocol.RegisterReq) -> dict[str, Any]:
        pid = req.pid
        if pid == os.getpid():
            raise UserError("ckptd cannot snapshot itself")
        pidfd, start, own = self._authorize(peer, pid)
        existing = self.registry.get(pid)
        if existing is not None:
            os.close(pidfd)  # the registration has its own
            return await self._update_registration(peer, existing, start, req.policy)
        try:
            if len(self.registry) >= self.cfg.service.max_registrations:
                raise UserError(f"already {len(self.registry)} registrations "
                                "(service.max_registrations); unregister some first")
            self._check_user_share(peer.uid)
            if len(self.registry) >= self.fds.registrations:
                raise UserError(
                    f"already {len(self.registry)} registrations, all that the service's "
                    f"open-file limit ({self.fds.soft}) has room for: raise LimitNOFILE= "
                    f"in ckptd.service (each registration holds "
                    f"{fdlimit.FDS_PER_REGISTRATION})")
            # One-off snapshots' processes hold files too: make room among them first.
            self._trim_adhoc(max(0, self.fds.registrations - len(self.registry) - 1), pid)
            rec = new_record(pid, start, own.uids[0], peer.uid, req.policy, peer.gid)
        except BaseException:
            os.close(pidfd)
            raise
        # A process we snapshotted ad hoc may have a watcher already: take it over.
        self._forget_adhoc(pid)
        reg = self.registry.add(rec, pidfd)  # the registration owns the pidfd now
        self._watch_exit(pid, pidfd)
        self.metrics.registered.set(len(self.registry))
        def undo() -> None:
            # Kept unsaved, it would be listed and watched with no timer, and answer a
            # second `register` with "updated".
            if self.registry.get(pid) is reg:
                self._unwatch(pid)
                self.registry.remove(pid)
                self.metrics.registered.set(len(self.registry))

        await self._persist_or_undo(undo, f"PID {pid} not registered")
        if self.registry.get(pid) is not reg or reg.unregistering:
            # It exited, or was unregistered, during the write: no timer for it.
            raise self._dropped_meanwhile(reg)
        if not self.stopping:  # else it is saved, and its rounds start at the next start
            self.scheduler.start(reg, first_delay=0.0)
        log.info("pid %d (%s) registered by uid %d, interval %.3gs", pid, rec.comm,
                 peer.uid, self.policy_of(reg).interval)
        return {"registered": True, "updated": False,
                **registration_view(reg, self.policy_of(reg))}

    def _check_user_share(self, uid: int) -> None:
        """One non-root user may hold only its share of the registrations, so that it
        cannot lock every other user out (root, who configures the service, may)."""
        if uid == 0:
            return
        svc = self.cfg.service
        share = svc.max_registrations_per_user or max(1, svc.max_registrations // 2)
        held = sum(1 for r in self.registry.by_pid.values() if r.record.registered_by == uid)
        if held >= share:
            raise UserError(f"uid {uid} already has {held} registrations, its share "
                            "(service.max_registrations_per_user); unregister some first")

    async def _persist_or_undo(self, undo: Callable[[], None], what: str) -> None:
        """Save the registry; if that fails, `undo` the change in memory too, and say
        `what` did not happen (an OSError, such as a full disk, as one line)."""
        try:
            await self._persist()
        except BaseException as exc:
            undo()
            if isinstance(exc, OSError):
                raise CkptdError(f"{what}: cannot save {self.registry.path}: "
                                 f"{exc.strerror or exc}") from exc
            raise

    async def _update_registration(self, peer: Peer, reg: Registration, start: int,
                                   policy: PolicyOverride) -> dict[str, Any]:
        pid = reg.pid
        if reg.unregistering:
            raise ProtocolError("busy", f"PID {pid} is being unregistered: register it "
                                "again once that is done")
        if reg.record.start_time != start:
            raise self._stale(pid)
        before = reg.record
        self.registry.update(pid, policy=policy)
        self.scheduler.policies_changed()

        def undo() -> None:
            if self.registry.get(pid) is reg and reg.record.policy is policy:
                # The old policy stays, in memory too.
                self.registry.update(pid, policy=before.policy)
                self.scheduler.policies_changed()

        await self._persist_or_undo(undo, f"PID {pid}'s policy not changed")
        if self.registry.get(pid) is not reg or reg.unregistering:
            raise self._dropped_meanwhile(reg)
        log.info("pid %d: policy updated by uid %d", pid, peer.uid)
        return {"registered": True, "updated": True,
                **registration_view(reg, self.policy_of(reg))}

    def _forget_adhoc(self, pid: int) -> None:
        """Stop keeping a one-off snapshot's process: its pidfd and slot (the engine's
        tracking stays: see _drop_adhoc)."""
        self._adhoc_slots.pop(pid, None)
        fd = self._adhoc_pidfds.pop(pid, None)
        if fd is not None:
            if pid in self._watched:
                self._watched.discard(pid)
                asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def _drop_adhoc(self, pid: int) -> None:
        """_forget_adhoc, and the engine's tracking of the process too (its open files,
        tracker state): it exited, or makes room for others."""
        self._forget_adhoc(pid)
        # In the work pool: forget waits for a round of the process in flight.
        self._spawn_op(self._in(self.work_pool, self.engine.forget, pid), f"forget-{pid}")

    def _trim_adhoc(self, keep: int, spare: int = 0) -> bool:
        """Drop the least recently used one-off snapshot processes until at most `keep`
        remain, skipping those with a snapshot running or waiting, and `spare` (a PID
        about to be registered: its tracking is taken over). False if those keep it
        above `keep`."""
        for pid in list(self._adhoc_slots):
            if len(self._adhoc_slots) <= keep:
                break
            slot = self._adhoc_slots[pid]
            if pid == spare or self._adhoc_busy(slot):
                continue
            log.debug("pid %d: forgetting its one-off snapshot tracking (at most %d kept)",
                      pid, keep)
            self._drop_adhoc(pid)
        return len(self._adhoc_slots) <= keep

    @staticmethod
    def _adhoc_busy(slot: Slot) -> bool:
        return slot.lock.locked() or (slot.current is not None and not slot.current.done())

    async def unregister(self, pid: int, why: str) -> dict[str, Any]:
        reg = self.registry.get(pid)
        if reg is None:
            raise TargetNotFound(f"PID {pid} is not registered; see `ckptd ps`")
        if reg.unregistering:
            raise TargetNotFound(f"PID {pid} is being unregistered already")
        self._begin_unregister(reg)
        return await self._unregister(reg, why)

    def _begin_unregister(self, reg: Registration, exited: bool = False) -> None:
        # Before the first await: a `register` of the PID meanwhile is refused instead of
        # "updating" a registration about to be dropped.
        reg.unregistering = True
        reg.exited = exited
        self._unwatch(reg.pid)

    async def _unregister(self, reg: Registration, why: str) -> dict[str, Any]:
        pid = reg.pid
        await self.scheduler.stop(pid)
        # forget waits for a staged round of the process, whose bookkeeping notes it in
        # the tally: dropped after that.
        await self._in(self.work_pool, self.engine.forget, pid)
        self._tallies.pop(pid, None)
        if self.registry.get(pid) is reg:
            self.registry.remove(pid)
        reg.close()
        self.metrics.registered.set(len(self.registry))
        try:
            await self._persist()
        except OSError as exc:
            raise CkptdError(f"PID {pid} unregistered, but {self.registry.path} could not "
                             f"be saved ({exc.strerror or exc}): the registration comes "
                             "back if the service restarts before it is saved") from exc
        log.info("pid %d (%s) unregistered: %s; its snapshots are kept (%d round(s) this "
                 "run)", pid, reg.record.comm, why, reg.rounds)
        return {"unregistered": True, "pid": pid, "rounds": reg.rounds,
                "last_snapshot": reg.snapshot_ids[-1] if reg.snapshot_ids else None}

    # --- snapshots ----------------------------------------------------------------------
    #
    # A round is one hand-off to a capture worker (workers.py), which runs the engine and
    # then the round's bookkeeping (metrics, the registration's counters, the chain's
    # tally) at once, in the same thread, while that code and data are still in the CPU's
    # caches. A timer round is posted: the worker also records its end for the scheduler
    # (scheduler.py), and the event loop does not wake for it unless something waits
    # for that round. An on-demand round wakes the loop once more, to answer the client.
    # Sharing that state with the loop is safe: metrics change under their lock (there
    # are several workers when concurrency > 1) and the loop renders them under it; a
    # registration's counters have one writer at a time (one round of a process at
    # once) and the loop only reads them; what needs the loop (unregistering a gone
    # process, starting a maintenance job) is handed to it with call_soon_threadsafe.

    def _scheduled_job(self, reg: Registration) -> None:
        """In a capture worker: a timer round, which nobody awaits. A failed snapshot is
        logged and counted by _attempt; anything else raised is a bug and goes to the
        scheduler, which logs it."""
        if self.stopping or reg.closed:
            return
        if pidfd_exited(reg.pidfd):
            # Its exit watcher drops the registration. The PID may be another process's
            # already: the engine would snapshot that one.
            return
        pol = self.policy_of(reg)
        max_pages = -(-pol.max_bytes_per_round // PAGE_SIZE) if pol.max_bytes_per_round else 0
        rec = reg.record
        # A group commit holds each round's locks until its worker runs out of work; with
        # several workers, another one could be waiting for them meanwhile.
        group = self.cfg.service.group_commit and self.capture.size == 1
        self._attempt(reg.pid, reg, pol.tracker, pol.consistency == "fuzzy", max_pages,
                      rec.start_time, auth.still_allowed(rec.registered_by, rec.registered_gid),
                      group=group)

    def _count_overrun(self, reg: Registration) -> None:
        # In the capture worker that ended the round.
        m = self.metrics
        with m.lock:
            m.overruns.inc()

    def _capture_job(self, pid: int, reg: Registration | None, holder: Registration,
                     pidfd: int, start: int, tracker: str, fuzzy: bool,
                     max_pages: int, peer: Peer) -> SnapshotMeta:
        """In a capture worker: an on-demand round of the process the request was
        authorized for (`pidfd`, started at `start`; `peer` is checked again once the
        process is frozen); `holder` is its registration, or the slot's stand-in for a
        one-off. A failure is raised to the client once it has been logged and
        counted."""
        if pidfd_exited(pidfd):
            # The PID may be another process's already: the engine would snapshot it.
            raise TargetGone(f"process {pid} exited; nothing was stored")
        meta = self._attempt(pid, reg, tracker, fuzzy, max_pages, start,
                             auth.still_allowed(peer.uid, peer.gid))
        if isinstance(meta, Exception):
            raise meta
        assert meta is not None  # published before returning: not a group's
        holder.chain = meta.chain
        # Alive after the round: the PID was its all along. Exited: the engine may have
        # found another process with that PID (it identifies by PID and start time, and
        # takes a new start time for a new process); the chain says which it captured.
        if pidfd_exited(pidfd) and self.store.chain_info(meta.chain).start_time != start:
            log.error("pid %d: the process exited during a snapshot and its PID was reused: "
                      "%s is of the new process", pid, meta.id)
            raise TargetGone(f"process {pid} exited during the snapshot and its PID now "
                             f"belongs to another process, which {meta.id} holds; take a "
                             "snapshot of that one only if it is the one you meant")
        return meta

    def _attempt(self, pid: int, reg: Registration | None, tracker: str, fuzzy: bool,
                 max_pages: int, start_time: int,
                 authorize: Callable[[int], None] | None = None, group: bool = False
                 ) -> SnapshotMeta | Exception | None:
        """In a capture worker: one snapshot of the process `pid` that started at
        `start_time` (the engine refuses another process with that PID), and its
        bookkeeping; `authorize`: auth.still_allowed for the client. The engine's
        failure is logged and counted here, and returned. `group`: the snapshot is
        published with the worker's group (Engine.flush), and its bookkeeping done
        then; None is returned."""
        m = self.metrics
        with m.lock:
            m.in_flight.add(1)
        t0 = time.monotonic()
        later = PublishLater(lambda meta: self._succeeded(pid, reg, meta, t0),
                             lambda exc: self._failed(pid, reg, exc)) if group else None
        try:
            meta = self.engine.snapshot(pid, tracker=tracker, fuzzy=fuzzy, max_pages=max_pages,
                                        start_time=start_time, authorize=authorize,
                                        later=later)
        except Exception as exc:
            return self._failed(pid, reg, exc)
        if later is not None:
            return None
        self._succeeded(pid, reg, meta, t0)
        return meta

    def _failed(self, pid: int, reg: Registration | None, exc: Exception) -> Exception:
        """A round failed: log and count it."""
        m = self.metrics
        reason = failure_reason(exc)
        with m.lock:
            m.in_flight.add(-1)
            m.failures.inc(reason=reason)
        if reg is not None:
            reg.failures += 1
            reg.last_error = str(exc)
        if reason == "gone":
            log.info("pid %d: %s", pid, exc)
            if reg is not None:
                self._loop.call_soon_threadsafe(self._gone, reg, str(exc))
        elif isinstance(exc, AccessRevoked):
            # Its user may not ptrace it any more: no further round may capture it.
            log.warning("pid %d: %s; unregistering it", pid, exc)
            if reg is not None:
                self._loop.call_soon_threadsafe(self._gone, reg, str(exc), False)
        elif isinstance(exc, UserError):
            log.warning("pid %d: snapshot refused: %s", pid, exc)
        elif isinstance(exc, TargetBusy):
            log.warning("pid %d: %s", pid, exc)
        elif isinstance(exc, StoreFull):
            self._note_store_full(pid, exc)
        elif isinstance(exc, CkptdError):
            log.error("pid %d: snapshot failed: %s", pid, exc)
        else:
            log.error("pid %d: snapshot failed with an internal error", pid, exc_info=exc)
        return exc

    def _succeeded(self, pid: int, reg: Registration | None, meta: SnapshotMeta,
                   t0: float) -> None:
        """A round's snapshot is published: count it, and record it in its registration."""
        m = self.metrics
        elapsed = time.monotonic() - t0
        now = time.time()
        counts = meta.counts
        with m.lock:
            m.in_flight.add(-1)
            m.snapshots.inc(kind=meta.kind)
            m.bytes_read.inc(counts.bytes_read)
            m.bytes_stored.inc(counts.bytes_stored)
            m.freeze_seconds.observe(meta.timings.freeze_ms / 1e3)
            m.round_seconds.observe(elapsed)
            if meta.truncated:
                m.truncated.inc()
        self.last_snapshot_at = now
        if self.full_store_rounds:
            self._store_has_room()
        if reg is not None:
            reg.rounds += 1
            reg.last_snapshot_at = now
            reg.last_duration = elapsed
            reg.last_error = None
            reg.chain = meta.chain
            ids = reg.snapshot_ids
            ids.append(meta.id)
            if len(ids) > 16:
                del ids[0]
            if meta.truncated:
                reg.truncated_rounds += 1
            self._maybe_maintain(reg, meta, now)
        log.debug("pid %d: %s %s, %d pages stored, %.1f ms frozen, %.1f ms total", pid,
                  meta.kind, meta.id, counts.pages_stored, meta.timings.freeze_ms,
                  meta.timings.total_ms)

    def _gone(self, reg: Registration, why: str, exited: bool = True) -> None:
        # On the loop. The registration may have been dropped or replaced meanwhile, or
        # be on its way out (the pidfd saw the exit first). Not while stopping: see
        # _on_exit. `exited` False: dropped because its user lost the right to it.
        if self.registry.get(reg.pid) is reg and not reg.unregistering and not self.stopping:
            self._begin_unregister(reg, exited=exited)
            self._spawn_op(self._unregister(reg, why), f"gone-{reg.pid}")

    async def snapshot_now(self, peer: Peer, req: protocol.SnapshotNowReq) -> dict[str, Any]:
        pid = req.pid
        pidfd, start, _ = self._authorize(peer, pid)
        try:
            reg = self.registry.get(pid)
            if reg is not None:
                if reg.unregistering:
                    raise TargetNotFound(f"PID {pid} is being unregistered")
                if reg.record.start_time != start:
                    raise self._stale(pid)
                slot = self.scheduler.slots.get(pid)
                if slot is None:  # its registration is being saved; the timer comes next
                    raise ProtocolError("busy", f"PID {pid} is being registered: try again")
                pol = self.policy_of(reg)
                default_pages = (-(-pol.max_bytes_per_round // PAGE_SIZE)
                                 if pol.max_bytes_per_round else 0)
                tracker = req.tracker or pol.tracker
                fuzzy = pol.consistency == "fuzzy" if req.fuzzy is None else req.fuzzy
            else:
                slot = self._adhoc_slot(pid, pidfd, start)
                default_pages, tracker = 0, req.tracker or "auto"
                fuzzy = bool(req.fuzzy)
            max_pages = default_pages if req.max_pages is None else req.max_pages
            holder = slot.reg

            async def capture() -> SnapshotMeta:
                # Not through _in: shutdown waits for these through self.capture's jobs.
                return await self.capture.submit(self._capture_job, pid, reg, holder, pidfd,
                                                 start, tracker, fuzzy, max_pages, peer)

            task = self.scheduler.start_exclusive(slot, capture)
        except BaseException:
            os.close(pidfd)
            raise
        # The round checks the pidfd to its end, even if this request goes away first.
        task.add_done_callback(lambda _: os.close(pidfd))
        # Stopped (it waited for a round of the process past the start of a stop) is
        # answered `busy` by dispatch.
        return snapshot_summary(await asyncio.shield(task))

    def _adhoc_slot(self, pid: int, pidfd: int, start: int) -> Slot:
        """The slot of an unregistered process, whose `pidfd` and `start` the request
        was authorized for."""
        slot = self._adhoc_slots.get(pid)
        if slot is not None:
            if slot.reg.record.start_time == start:
                self._adhoc_slots.move_to_end(pid)
                return slot
            # The process kept under this PID exited (its exit is on its way to us).
            if self._adhoc_busy(slot):
                raise ProtocolError("busy", f"a snapshot of the process that had PID {pid} "
                                    "before is running: try again")
            self._drop_adhoc(pid)
        # Registrations come first in the open-file budget; one is always allowed.
        keep = max(1, min(ADHOC_MAX, self.fds.registrations - len(self.registry)))
        if not self._trim_adhoc(keep - 1):
            raise ProtocolError("busy", f"{len(self._adhoc_slots)} snapshots of unregistered "
                                "processes are running, all that the service keeps: try "
                                "again when one has ended, or register the process")
        watch = os.dup(pidfd)  # the slot's own: the request's is closed when it ends
        self._adhoc_pidfds[pid] = watch
        self._watch_exit(pid, watch)
        rec = new_record(pid, start, -1, -1, PolicyOverride())
        slot = Slot(Registration(record=rec, pidfd=-1, closed=True))
        self._adhoc_slots[pid] = slot
        return slot

    # --- retention and compaction -------------------------------------------------------

    def _maybe_maintain(self, reg: Registration, meta: SnapshotMeta, now: float) -> None:
        """In the round's worker: note the snapshot; ask the loop for a maintenance job
        only if the chain may need one."""
        chain = meta.chain
        tally = self._tallies.get(reg.pid)
        if tally is None or tally.chain != chain:  # new registration, or the process exec'd
            tally = self._tallies[reg.pid] = maintenance.ChainTally(chain)
        tally.note(meta)  # even if a job is running: the next one plans from memory
        if chain in self._maint_running or self.stopping:
            return
        if not tally.may_need_work(self.policy_of(reg).retention, now):
            # Nothing to do by what we remember: no job, no listing of the chain. (What
            # we remember is checked against the disk whenever a job does run.)
            return
        self._loop.call_soon_threadsafe(self._start_maintenance, reg, tally)

    def _start_maintenance(self, reg: Registration, tally: maintenance.ChainTally) -> None:
        chain = tally.chain
        if reg.closed or self.stopping or chain in self._maint_running:
            return
        self._maint_running.add(chain)
        self._spawn_op(self._maintain(chain, self.policy_of(reg), tally), f"maint-{chain}")

    def _note_store_full(self, pid: int, exc: StoreFull) -> None:
        with self._full_store_lock:
            self.full_store_rounds += 1
            first = self.full_store_rounds == 1
        if first:
            log.error("pid %d: %s (until a round stores again, rounds failing for lack of "
                      "space are counted in metrics, not logged)", pid, exc)
        else:
            log.debug("pid %d: %s", pid, exc)

    def _store_has_room(self) -> None:
        with self._full_store_lock:
            failed, self.full_store_rounds = self.full_store_rounds, 0
        if failed:
            log.warning("the store has room again: %d round(s) failed for lack of space",
                        failed)

    async def _maintain(self, chain: str, pol: Policy, tally: maintenance.ChainTally
                        ) -> None:
        try:
            result = await self._in(self.maint_pool, maintenance.run, self.store, chain,
                                    pol.retention, time.time(), tally)
            if result is not None:
                self.metrics.compactions.inc(result="ok")
                log.info("chain %s: %s", chain, result)
                self._compactions_out_of_space.discard(chain)
        except StoreFull as exc:
            # Tried again after every round while the store stays full: said once.
            self.metrics.compactions.inc(result="failed")
            if chain not in self._compactions_out_of_space:
                self._compactions_out_of_space.add(chain)
                log.error("chain %s: retention/compaction failed: %s (retried after each "
                          "round, logged again once it has worked)", chain, exc)
        except Exception as exc:
            self.metrics.compactions.inc(result="failed")
            log.error("chain %s: retention/compaction failed: %s", chain, exc,
                      exc_info=not isinstance(exc, CkptdError))
        finally:
            self._maint_running.discard(chain)
        # Its process may have exited or been unregistered meanwhile (engine.forget let go
        # of the chain before this compaction kept spares there).
        await self._release_if_unused(chain)

    async def _compact(self, chain: str, upto: str | None) -> dict[str, Any]:
        try:
            result = await self._in(self.maint_pool, maintenance.compact_now, self.store,
                                    chain, upto)
        finally:  # also after a failure: it may have got as far as keeping spares
            await self._release_if_unused(chain)
        return {"chain": chain, "result": result}

    def _chain_in_use(self, chain: str) -> bool:
        """Whether a registration, or a one-off process still tracked, publishes in
        `chain`: what the engine keeps for publishing there is then released by
        engine.forget (or close), when it stops tracking that process."""
        pid = int(chain.partition("-")[0])
        reg = self.registry.get(pid)
        if reg is not None and not reg.unregistering and reg.chain == chain:
            return True
        slot = self._adhoc_slots.get(pid)
        return slot is not None and slot.reg.chain == chain

    async def _release_if_unused(self, chain: str) -> None:
        """After compacting `chain`: compaction keeps the files it retires as spares for
        the chain's next snapshots (up to 64), and the chain's snapshots/ directory open;
        only engine.forget and engine.close let go of them, for the chains of processes
        the engine tracks. For any other chain (an old one, or one whose process exited
        or was unregistered during the compaction) nothing else ever would."""
        if not self._chain_in_use(chain):
            await self._in(self.maint_pool, self.store.release_chain, chain)

    # --- store queries ------------------------------------------------------------------

    def _chain_uid(self, chain: str) -> int:
        return self.store.chain_info(chain).uid

    def _visible(self, peer: Peer, chain: str, cache: dict[str, int]) -> bool:
        if peer.is_root:
            return True
        if chain not in cache:
            cache[chain] = self._chain_uid(chain)
        return auth.may_see_chain(peer, cache[chain])

    def _list_snapshots(self, peer: Peer, pid: int | None, chain: str | None
                        ) -> list[dict[str, Any]]:
        cache: dict[str, int] = {}
        chains = self.store.chain_ids()
        if chain is not None:
            chains = [c for c in chains if c == chain]
        if pid is not None:
            chains = [c for c in chains if c.split("-")[0] == str(pid)]
        out: list[dict[str, Any]] = []
        for c in chains:
            if self._visible(peer, c, cache):
                out.extend(snapshot_summary(m) for m in self.store.chain_snapshots(c))
        return out

    def _get_visible(self, peer: Peer, snapshot_id: str) -> SnapshotMeta:
        meta = self.store.get(snapshot_id)
        # The file must be the snapshot asked for (Store.get checks it too): visibility
        # is decided by its chain, and a reader follows its links.
        if meta.id != snapshot_id or meta.chain != parse_snapshot_id(snapshot_id)[0]:
            raise CorruptStore(f"the file of snapshot {snapshot_id} describes {meta.id}")
        if not self._visible(peer, meta.chain, {}):
            # Same answer as a missing id: do not reveal other users' snapshots.
            raise UnknownSnapshot(f"no snapshot {snapshot_id!r}; see `ckptd list`")
        return meta

    def _materialize(self, peer: Peer, snapshot_id: str, out_dir: str) -> dict[str, Any]:
        self._get_visible(peer, snapshot_id)
        if "\0" in out_dir:
            raise UserError("out_dir contains a NUL byte")
        if not out_dir.startswith("/"):
            raise UserError(f"out_dir must be an absolute path, got {out_dir!r}")
        if peer.is_root:
            index, out = store_reader.materialize_to(self.store, snapshot_id,
                                                     os.path.realpath(out_dir), None)
        else:
            # The path is the client's: it is walked with the client's permissions, and
            # written through descriptors, never looked up again as root (reader.py).
            index, out = store_reader.materialize_to(self.store, snapshot_id, out_dir,
                                                     Owner(peer.uid, peer.gid))
        vmas = index.get("vmas")
        return {"snapshot": snapshot_id, "out_dir": out,
                "files": len(vmas) if isinstance(vmas, list) else 0,
                "index": os.path.join(out, "index.json")}

    def _show(self, peer: Peer, snapshot_id: str) -> dict[str, Any]:
        self._get_visible(peer, snapshot_id)
        view = page_map_view(self.store, snapshot_id)
        return {"snapshot": snapshot_detail(view.meta), "lineage": view.lineage,
                "page_map": view.page_map, "unsourced": view.unsourced}

    def _verify(self) -> dict[str, Any]:
        count, problems = store_reader.verify(self.store)
        return {"snapshots": count, "problems": problems, "ok": not problems}

    # --- requests -----------------------------------------------------------------------

    async def dispatch(self, frame: bytes, peer: Peer) -> bytes:
        try:
            req = protocol.parse_request(frame)
        except ProtocolError as exc:
            log.info("uid %d pid %d: bad request: %s", peer.uid, peer.pid, exc)
            return protocol.encode_protocol_error(exc)
        try:
            result = await self.handle(req, peer)
        except ProtocolError as exc:
            return protocol.encode_error(req.id, exc.code, exc.message)
        except Stopped as exc:  # an on-demand round that had not started
            return protocol.encode_error(req.id, "busy", str(exc))
        except UserError as exc:
            log.info("uid %d: %s refused: %s", peer.uid, req.op, exc)
            return protocol.encode_error(req.id, error_code(exc), str(exc))
        except Exception as exc:
            if not isinstance(exc, CkptdError):
                log.exception("uid %d: %s failed with an internal error", peer.uid, req.op)
            else:
                log.error("uid %d: %s failed: %s", peer.uid, req.op, exc)
            return protocol.encode_error(req.id, error_code(exc), f"{type(exc).__name__}: {exc}")
        return protocol.encode_ok(req.id, result)

    def _require_root(self, peer: Peer, what: str) -> None:
        if not peer.is_root:
            raise PermissionDenied(f"{what} needs root (you are uid {peer.uid})")

    def _require_owner(self, peer: Peer, reg: Registration) -> None:
        if not peer.is_root and peer.uid != reg.record.uid:
            raise PermissionDenied(
                f"PID {reg.pid} belongs to uid {reg.record.uid}; you are uid {peer.uid}")

    async def handle(self, req: protocol.Request, peer: Peer) -> dict[str, Any]:
        if isinstance(req, protocol.PingReq):
            return {"protocol": protocol.PROTOCOL_VERSION, "version": __version__,
                    "pid": os.getpid(), "your_uid": peer.uid}
        if self.stopping and not isinstance(req, OPS_WHILE_STOPPING):
            # The shutdown waits for what runs, then closes the engine and the store.
            raise ProtocolError("busy", "the service is stopping")
        if isinstance(req, protocol.RegisterReq):
            return await self._op(self.register(peer, req), f"register-{req.pid}")
        if isinstance(req, protocol.UnregisterReq):
            reg = self.registry.get(req.pid)
            if reg is None:
                raise TargetNotFound(f"PID {req.pid} is not registered; see `ckptd ps`")
            self._require_owner(peer, reg)
            return await self._op(self.unregister(req.pid, f"requested by uid {peer.uid}"),
                                  f"unregister-{req.pid}")
        if isinstance(req, protocol.ListReq):
            regs = [registration_view(r, self.policy_of(r))
                    for r in self.registry.by_pid.values()
                    if peer.is_root or r.record.uid == peer.uid]
            return {"processes": regs}
        if isinstance(req, protocol.StatusReq):
            return self.status(peer)
        if isinstance(req, protocol.SnapshotNowReq):
            return await self.snapshot_now(peer, req)
        if isinstance(req, protocol.SnapshotsReq):
            snaps = await self._in(self.work_pool, self._list_snapshots, peer, req.pid,
                                   req.chain)
            return {"snapshots": snaps}
        if isinstance(req, protocol.ShowReq):
            return await self._in(self.work_pool, self._show, peer, req.snapshot)
        if isinstance(req, protocol.MaterializeReq):
            return await self._in(self.work_pool, self._materialize, peer, req.snapshot,
                                  req.out_dir)
        if isinstance(req, protocol.VerifyReq):
            self._require_root(peer, "verify (it reads every user's snapshots)")
            return await self._in(self.work_pool, self._verify)
        if isinstance(req, protocol.CompactReq):
            # Also for root: a chain that does not exist is not-found, not "no snapshots".
            if self._chain_uid(req.chain) != peer.uid and not peer.is_root:
                # As for a missing chain (show, materialize): do not reveal that another
                # user's process was snapshotted.
                raise UnknownSnapshot(f"no chain {req.chain!r}; see `ckptd list`")
            return await self._op(self._compact(req.chain, req.upto), f"compact-{req.chain}")
        if isinstance(req, protocol.ReloadReq):
            self._require_root(peer, "reload")
            return await self.reload()
        if isinstance(req, protocol.MetricsReq):
            if not self.cfg.metrics.enabled:
                raise UserError("metrics are disabled (metrics.enabled = false)")
            return {"content_type": CONTENT_TYPE, "text": self.metrics.render().decode()}
        raise ProtocolError("unknown-op", f"unknown op {req.op!r}", req.id)

    def status(self, peer: Peer) -> dict[str, Any]:
        now = time.time()
        mine = [r for r in self.registry.by_pid.values()
                if peer.is_root or r.record.uid == peer.uid]
        m = self.metrics
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": now - self.started,
            "config": str(self.config_path) if self.config_path else None,
            "store": str(self.cfg.service.store),
            "socket": str(self.cfg.service.socket),
            "concurrency": self.cfg.service.concurrency,
            "registered": len(mine),
            # How many registrations the service accepts: its setting, or fewer if its
            # open-file limit holds fewer (fdlimit).
            "registrations_max": min(self.cfg.service.max_registrations,
                                     self.fds.registrations),
            "in_flight": int(m.in_flight.get()),  # snapshots running in capture threads
            "last_snapshot_age": None if self.last_snapshot_at is None
            else now - self.last_snapshot_at,
            "snapshots": int(sum(m.snapshots.values.values())),
            "failures": int(sum(m.failures.values.values())),
            "overruns": int(m.overruns.get()),
            "status": self._status_text(),
            "defaults": self.cfg.defaults.model_dump(mode="json"),
        }

    # --- connections --------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            peer = auth.peer_credentials(sock)
        except OSError as exc:
            log.warning("cannot read peer credentials, closing: %s", exc)
            writer.close()
            return
        mine = self._clients_of.get(peer.uid, 0)
        if not peer.is_root and (self._clients >= MAX_CLIENTS
                                 or mine >= MAX_CLIENTS_PER_USER):
            log.info("uid %d pid %d: connection refused: %d open, %d of this uid",
                     peer.uid, peer.pid, self._clients, mine)
            writer.write(protocol.encode_error(None, "busy", "too many clients"))
            writer.close()
            return
        self._clients += 1
        self._clients_of[peer.uid] = mine + 1
        decoder = protocol.FrameDecoder()
        # A request that has begun must end, and each reply be taken, within
        # request_timeout: a client that stalls (or a user who sends half a request on
        # each of many connections) must not hold its connection slots, and what it
        # sent, for ever. Idle connections between requests may stay (MAX_CLIENTS*).
        loop = asyncio.get_running_loop()
        limit = self.cfg.service.request_timeout
        deadline: float | None = None  # of the request under way, if one has begun
        try:
            while True:
                if not decoder.in_message:
                    deadline = None
                elif deadline is None:
                    deadline = loop.time() + limit
                try:
                    data = await asyncio.wait_for(
                        reader.read(READ_CHUNK),
                        None if deadline is None else max(0.0, deadline - loop.time()))
                except TimeoutError:
                    log.info("uid %d pid %d: request unfinished after %g s; closing the "
                             "connection", peer.uid, peer.pid, limit)
                    writer.write(protocol.encode_error(
                        None, "timeout", f"request not finished within {limit:g} s (a "
                        "request ends with a newline); the connection is closed"))
                    break
                if not data:
                    break
                events = decoder.feed(data)
                if events:
                    deadline = None  # a request ended: the next one has its own time
                for ev in events:
                    if isinstance(ev, protocol.Oversize):
                        log.info("uid %d pid %d: request over %d bytes rejected", peer.uid,
                                 peer.pid, protocol.MAX_MESSAGE)
                        reply = protocol.encode_error(
                            None, "too-large",
                            f"request exceeds {protocol.MAX_MESSAGE} bytes; it was skipped")
                    else:
                        reply = await self.dispatch(ev.data, peer)
                    writer.write(reply)
                    await asyncio.wait_for(writer.drain(), limit)
        except (ConnectionResetError, BrokenPipeError) as exc:
            log.debug("uid %d pid %d: client went away: %s", peer.uid, peer.pid, exc)
        except TimeoutError:
            log.info("uid %d pid %d: a reply not taken within %g s; closing the connection",
                     peer.uid, peer.pid, limit)
        finally:
            self._clients -= 1
            left = self._clients_of[peer.uid] - 1
            if left:
                self._clients_of[peer.uid] = left
            else:
                del self._clients_of[peer.uid]
            writer.close()

    async def _http_client(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        # Bounded: anyone who can reach the port could otherwise hold connections (and
        # the root service's open files) for ever.
        if self._http_clients >= MAX_HTTP_CLIENTS:
            writer.close()
            return
        self._http_clients += 1
        try:
            await asyncio.wait_for(self._http_reply(reader, writer), HTTP_TIMEOUT)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._http_clients -= 1
            writer.close()

    async def _http_reply(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        line = head.split(b"\r\n", 1)[0].split()
        if len(line) >= 2 and line[0] == b"GET" and line[1] in (b"/metrics", b"/"):
            body = self.metrics.render()
            status = b"200 OK"
            ctype = CONTENT_TYPE.encode()
        else:
            body, status, ctype = b"not found\n", b"404 Not Found", b"text/plain"
        writer.write(b"HTTP/1.0 " + status + b"\r\nContent-Type: " + ctype +
                     b"\r\nContent-Length: " + str(len(body)).encode() +
                     b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()


def _private_dir(path: Path) -> None:
    from ..store.fsutil import make_private_dir
    make_private_dir(path, durable=True)  # registrations.json is fsynced in it


def _prepare_socket_path(path: Path) -> None:
    """Create the socket's directory; refuse if a live service owns the path; remove a
    stale socket left by a crash."""
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        st = os.stat(path.parent)
    except OSError as exc:
        raise ConfigError(f"service.socket = '{path}': cannot create its directory "
                          f"{exc.filename or path.parent}: {exc.strerror}") from None
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
        # Another user could plant a socket there (a fake service, or one that keeps
        # ours from starting), or swap ours for a symlink that chown would follow.
        raise ConfigError(
            f"service.socket = '{path}': other users may write to its directory "
            f"{path.parent} (mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}): "
            "use a directory only root may write, such as /run/ckptd")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:  # e.g. a file where a directory of the path should be
        raise ConfigError(f"service.socket = '{path}': {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise UserError(f"{path} exists and is not a socket: remove it or set service.socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise UserError(f"another ckptd is already serving on {path}")


def _listen_tcp(listen: str) -> socket.socket:
    """A listening TCP socket for metrics.listen ("HOST:PORT"); a ConfigError naming the
    setting if it cannot be had."""
    host, _, port = listen.rpartition(":")
    try:
        info = socket.getaddrinfo(host.strip("[]") or "127.0.0.1", int(port),
                                  type=socket.SOCK_STREAM)[0]
        return socket.create_server(info[4], family=info[0])
    except OSError as exc:
        raise ConfigError(f"metrics.listen = {listen!r}: cannot listen there: "
                          f"{exc.strerror or exc}") from None


def _unlink_socket(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def serve(config_path: Path | None) -> int:
    """Entry point of `ckptd serve`."""
    import uvloop

    cfg = load_config(config_path)
    setup_logging(cfg.service.log_level)
    service = Service(cfg, config_path)
    # Each round allocates many short-lived objects: with the default thresholds the
    # cyclic collector ran several times per round. Collect less often, and leave the
    # objects that live as long as the service (modules, config) out of every pass.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    return int(uvloop.run(service.run()))
