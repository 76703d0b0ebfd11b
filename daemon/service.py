"""The long-running service: ``forensic-gender run`` and ``forensic-gender status``.

One process, one main loop, and that loop is the only writer to the database:

- watchers (:mod:`daemon.watch`) only enqueue hints; the loop stats the paths, feeds the
  stability tracker, and upserts stable files into the ``files`` queue;
- a full scan of every root at start-up, after an event-queue overflow, after an observer
  restart, and every ``watch.rescan_interval`` feeds the same upsert (a rescan of an unchanged
  tree costs one ``lstat`` per entry and one indexed look-up per 500 paths: nothing is read or
  hashed); it also notices deletions (rows whose file is gone);
- files are claimed under a lease (a few more than there are idle workers), analysed by the
  :class:`~daemon.workers.WorkerPool` (crash and hang isolation, bounded retries, then
  quarantine), and the outcomes are recorded by the loop;
- renames seen while running move the row (``Store.move``): the file keeps its results and is
  not read again. Renames made while the service was stopped are *not* matched by inode: the
  start-up scan sees a new path (read and hashed once, then linked to the content already
  analysed, so it is not analysed again) and the old path is marked gone;
- signals are blocked in the main thread and in the worker processes (which inherit its mask),
  and taken by the loop (``sigtimedwait``, plus a handler that only records them for threads
  that libraries started before the mask was set): SIGTERM/SIGINT drain (in-flight files finished or
  released) and exit 0; SIGHUP reloads the configuration (an invalid one is rejected, logged
  with its reasons and recorded, and the running one kept);
- SQLite: one service per database, enforced by ``flock`` on ``<database>.lock`` next to the
  database (never in an evidence folder); PostgreSQL: several hosts share the queue, each under
  its own ``service.host_id``;
- systemd: ``READY=1`` once the database is migrated and every worker has loaded its models,
  ``STATUS=`` with the backlog and rate, ``WATCHDOG=1`` from the main loop only, ``STOPPING=1``.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import logging
import os
import signal
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import replace

from daemon import __version__
from daemon import config as config_mod
from daemon.config import Config, ConfigError, RootConfig
from daemon.discovery import stat_path, walk
from daemon.paths import show, to_db
from daemon.notify import Notifier
from daemon.scan import default_workers, record
from daemon.store.writer import Claim, FileStat, Store, UpsertCounts
from daemon.watch import Change, RootWatch, StabilityTracker, Watcher, filtered

log = logging.getLogger(__name__)

SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
HEARTBEAT_SECONDS = 15.0
HEALTH_SECONDS = 2.0
STATUS_SECONDS = 5.0
CLAIM_POLL_SECONDS = 1.0
UPSERT_CHUNK = 500
MAX_CHANGES_PER_STEP = 5000
MAX_DUE_PER_STEP = 2000
TRACKER_LIMIT = 50_000
PREFETCH_PER_WORKER = 4
NOTICE_SECONDS = 10.0  # the same watcher notice is logged and recorded at most this often


class ServiceError(Exception):
    """The service cannot start (another instance holds the database, ...)."""


# --------------------------------------------------------------------------------------------
# Configuration for ``run``


def build_config(config_path: str | None, watch_dirs: list[str] | None = None, db: str | None = None) -> Config:
    """The configuration file (or defaults) with ``--watch`` roots added and ``--db`` applied;
    raises ConfigError listing every problem."""
    cfg = config_mod.load(config_path)
    problems: list[str] = []
    if db:
        cfg = replace(cfg, database=config_mod.parse({"database": db}, check_paths=False).database)
    roots = list(cfg.watch.roots)
    for d in watch_dirs or []:
        p = os.path.abspath(os.path.expanduser(d))
        if not os.path.isdir(p):
            problems.append(f"--watch {d}: must be an existing directory")
        elif all(r.path != p for r in roots):
            roots.append(RootConfig(path=p))
    cfg = replace(cfg, watch=replace(cfg.watch, roots=tuple(roots)))
    dbp = sqlite_path(cfg.database)
    if dbp is not None:
        for i, r in enumerate(cfg.watch.roots):
            root = os.path.realpath(r.path)
            for what, p in (("database", dbp), ("database lock", dbp + ".lock")):
                rp = os.path.realpath(p)
                if rp == root or rp.startswith(root.rstrip(os.sep) + os.sep):
                    problems.append(
                        f"database: the {what} {p} must not be inside the watched root {r.path} (watch.roots[{i}]); "
                        "nothing is ever written into evidence folders; put the database elsewhere, e.g. "
                        "/var/lib/forensic-gender/forensic-gender.db")
                    break
    if problems:
        raise ConfigError(problems, config_path or "command line")
    return cfg


def sqlite_path(url: str) -> str | None:
    """The database file of a ``sqlite:///`` URL (None for other databases and ``:memory:``)."""
    if not url.startswith("sqlite:///"):
        return None
    p = url[len("sqlite:///"):].split("?", 1)[0]
    return None if p in ("", ":memory:") else os.path.abspath(p)


# --------------------------------------------------------------------------------------------
# Single instance (SQLite)


class InstanceLock:
    """``flock`` on ``<database>.lock``: one service per SQLite database. The file stays (removing
    lock files races with the next start); the kernel drops the lock when the process dies."""

    def __init__(self, db_path: str) -> None:
        self.path = db_path + ".lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ServiceError(f"cannot lock {self.path}: {err.strerror}") from err
            holder = lock_holder(self.path)
            who = f"pid {holder}" if holder else "another process"
            raise ServiceError(
                f"another forensic-gender service is already running on the database {self.path[:-5]} "
                f"({who} holds {self.path}); stop it first (systemctl stop forensic-gender), or give this one "
                "another --db") from err
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None


def lock_holder(lock_path: str) -> int | None:
    """The pid holding the service lock on ``lock_path`` (from /proc/locks, which tests the lock
    without taking it), or None when no service runs."""
    try:
        st = os.stat(lock_path)
    except OSError:
        return None
    try:
        with open("/proc/locks", encoding="ascii") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return _probe_lock(lock_path)
    for line in lines:
        parts = line.split()
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        try:
            major, minor, ino = parts[5].split(":")
            if int(ino) == st.st_ino and os.makedev(int(major, 16), int(minor, 16)) == st.st_dev:
                return int(parts[4])
        except ValueError:
            continue
    return None


def _probe_lock(lock_path: str) -> int | None:
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except OSError:
        try:
            return int(os.pread(fd, 32, 0).decode().strip() or 0) or -1
        except ValueError:
            return -1
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# The service


def _signature(st: FileStat) -> tuple[int, int, int | None]:
    return (st.size, st.mtime_ns, st.inode)


def _vanished(path: str) -> bool:
    """True only when the path is certainly gone (not for permission or transport errors)."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


class _Rate:
    """Files finished per second over the last minute (per-second buckets)."""

    def __init__(self, span: float = 60.0) -> None:
        self.span = span
        self.buckets: deque[list] = deque()

    def add(self, n: int = 1, now: float | None = None) -> None:
        sec = int(time.monotonic() if now is None else now)
        if self.buckets and self.buckets[-1][0] == sec:
            self.buckets[-1][1] += n
        else:
            self.buckets.append([sec, n])
        self._trim(sec)

    def _trim(self, sec: int) -> None:
        while self.buckets and self.buckets[0][0] <= sec - self.span:
            self.buckets.popleft()

    def per_second(self) -> float:
        self._trim(int(time.monotonic()))
        return sum(n for _, n in self.buckets) / self.span


class Service:
    """Use once: ``Service(cfg, reload, notifier).run()`` from the main thread; returns the exit
    status (0 after a clean drain)."""

    def __init__(self, cfg: Config, reload: Callable[[], Config], notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self._reload_fn = reload
        self.notifier = notifier or Notifier(environ={})
        self.store: Store | None = None
        self.engine = None
        self.pool = None
        self.watcher: Watcher | None = None
        self.lock: InstanceLock | None = None
        self.tracker = StabilityTracker(cfg.watch.stability_window, limit=TRACKER_LIMIT)
        self.bundle_key = ""
        # work in flight
        self.prefetch: deque[Claim] = deque()
        self.inflight: dict[int, Claim] = {}
        self.superseded: set[int] = set()  # in flight, but re-queued since: drop the old outcome
        self.moved_inflight: set[int] = set()  # renamed while in flight: a "missing" outcome is retried
        self.queue_hint = True
        self.next_claim = 0.0
        self.claim_prefixes: list[str] | None = None
        # discovery
        self.upserts: list[FileStat] = []
        self.gone: dict[str, str] = {}  # path -> root
        self.gone_dirs: dict[str, str] = {}  # prefix -> root
        self.rescan_pending: OrderedDict[str, str] = OrderedDict()  # root -> reason
        self.rescan_again: dict[str, str] = {}
        self.rescan: Iterator[None] | None = None
        self.rescan_root: str | None = None
        self.last_rescan: dict[str, float] = {}
        # lifecycle
        self.stop_requested = False
        self.fast_stop = False
        self.reload_requested = False
        self.pool_restart = False
        self.pending_signals: list[int] = []
        self.rate = _Rate()
        self.finished = 0
        self.started_at = time.time()
        self.next_health = self.next_status = self.next_heartbeat = self.next_log = 0.0
        self.backlog = 0
        self.db_failures = 0
        self.db_down_since: float | None = None  # first failed database call of the current outage
        self.unrecorded: deque = deque()  # worker outcomes not yet written (the database was away)
        self.internal_failures = 0
        self.not_intact_warned: set[str] = set()
        self._next_renew = 0.0
        self.last_notice: dict[tuple[str, str], float] = {}
        self._pool_cfg: Config = cfg

    # -- start-up ---------------------------------------------------------------------------------

    def run(self) -> int:
        from multiprocessing import resource_tracker

        # Signals: the main thread blocks them, so the worker processes it spawns inherit the
        # mask and a Ctrl-C in a terminal (sent to the whole process group) or a stray SIGTERM
        # does not kill a worker mid-file; the loop fetches them with sigtimedwait. Threads that
        # libraries started at import time (BLAS pools...) do not block them, so a handler that
        # only records the signal is installed too (Python runs it in the main thread).
        # The multiprocessing resource tracker must exist first: launching it later unblocks
        # SIGINT/SIGTERM in the calling thread.
        resource_tracker.ensure_running()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            self._start()
            self._loop()
            self._drain()
            return 0
        finally:
            self._cleanup()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signo: int, _frame) -> None:  # noqa: ANN001
        self.pending_signals.append(signo)

    def _start(self) -> None:
        from daemon.store.engine import open_store_engine

        cfg = self.cfg
        dbp = sqlite_path(cfg.database)
        if dbp is not None:
            self.lock = InstanceLock(dbp)
            self.lock.acquire()
        self.engine = open_store_engine(cfg.database)
        self.store = Store(self.engine, cfg.host_id, cfg.identity)
        n = self.store.recover_leases()
        if n:
            log.warning("%d file(s) were in flight when the service last stopped without releasing them; queued again", n)
        roles = set(cfg.service.roles)
        if "analyze" in roles:
            self.pool = self._new_pool(cfg)
            self.bundle_key = self.pool.bundle_key
            self.store.ensure_bundle(self.pool.bundle_key, self.pool.bundle)
            self.store.requeue_for_bundle(self.pool.bundle_key, self._root_prefixes(cfg) or None)
        if "watch" in roles:
            if not cfg.watch.roots:
                log.warning("no folder to watch: give --watch DIR or watch.roots in the configuration; only queued files are analysed")
            self.watcher = Watcher(cfg.watch.roots)
            self.watcher.start()
            for r in cfg.watch.roots:
                self._request_rescan(r.path, "startup")
            self.claim_prefixes = self._root_prefixes(cfg) or None
        self.store.event("service_started", self._describe())
        self._heartbeat()
        self.backlog = self.store.pending()
        self.notifier.ready(self._status_text())
        log.info("forensic-gender %s ready: database %s, %s, %d file(s) waiting", __version__, _safe_url(cfg.database),
                 f"{self.pool.n} worker(s)" if self.pool else "no analysis (roles: watch)", self.backlog)

    def _new_pool(self, cfg: Config):  # noqa: ANN202
        from daemon.workers import WorkerPool

        pool = WorkerPool(default_workers(cfg.service.workers), cfg.pipeline, db_url=cfg.database,
                          file_timeout=cfg.service.file_timeout)
        try:
            pool.start()
        except BaseException:
            pool.close()
            raise
        return pool

    @staticmethod
    def _root_prefixes(cfg: Config) -> list[str]:
        return [r.path.rstrip(os.sep) + os.sep for r in cfg.watch.roots]

    def _describe(self) -> dict:
        return {"pid": os.getpid(), "version": __version__, "roots": [r.path for r in self.cfg.watch.roots],
                "modes": self.watcher.modes() if self.watcher else {}, "workers": self.pool.n if self.pool else 0,
                "bundle": self.bundle_key, "roles": list(self.cfg.service.roles)}

    # -- the loop ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # cheap; guards against libraries unblocking
            self._take_signals(0)
            if self.stop_requested:
                return
            if self.reload_requested:
                self.reload_requested = False
                self._guarded(self._reload)
            self._guarded(self._step)
            self.notifier.watchdog()

    def _guarded(self, fn: Callable[[], None]) -> None:
        """Run one step; database errors are retried with a back-off (the database may be
        restarting), other errors are logged, and the service gives up (exit 1, systemd restarts
        it) only when they repeat without a single good step in between."""
        from sqlalchemy.exc import DBAPIError

        try:
            fn()
            self.internal_failures = 0
            if self.db_down_since is not None:
                # a step may touch no table (nothing to do): the outage is over only when a write
                # succeeds, and recording the outage is that write (it raises while still down)
                self._record_outage()
            self.db_failures = 0
        except DBAPIError as err:
            self.db_failures += 1
            if self.db_down_since is None:
                self.db_down_since = time.time()
            delay = min(10.0, 0.5 * 2 ** min(self.db_failures, 6))
            why = (str(getattr(err, "orig", err)).strip().splitlines() or [type(err).__name__])[0][:200]
            down = time.time() - self.db_down_since
            log.error("database error (%s); unreachable for %.0f s, retrying in %.0f s", why, down, delay)
            self.notifier.status(f"database unreachable for {down:.0f} s ({why}); retrying in {delay:.0f} s; "
                                 f"{len(self.inflight)} file(s) in flight, {len(self.unrecorded)} result(s) waiting to be written")
            if self.watcher is not None:  # changes taken from the watcher may not have been recorded
                for root in self.watcher.roots:
                    self._request_rescan(root, "database_error")
            self._sleep(delay)
        except Exception:
            self.internal_failures += 1
            log.exception("internal error in the service loop (%d in a row)", self.internal_failures)
            if self.internal_failures >= 20:
                raise
            self._sleep(min(5.0, 0.2 * self.internal_failures))

    def _record_outage(self) -> None:
        """Record the database outage that ``db_down_since`` marks, and end it (raises a
        DBAPIError, leaving it marked, while the database is still unreachable)."""
        down = time.time() - (self.db_down_since or time.time())
        if self.store is not None:
            self.store.event("database_outage", {"seconds": round(down, 1)})
        self.db_down_since = None
        log.warning("database reachable again after %.0f s; resuming (%d result(s) kept meanwhile)", down, len(self.unrecorded))
        self.notifier.status(self._status_text())

    def _take_signals(self, timeout: float) -> None:
        """Collect pending signals, waiting up to ``timeout`` s for the first one (our sleep)."""
        while True:
            if self.pending_signals:
                signo = self.pending_signals.pop(0)
            else:
                info = signal.sigtimedwait(SIGNALS, timeout) if timeout > 0 else signal.sigtimedwait(SIGNALS, 0)
                if info is None:
                    if self.pending_signals:  # recorded by the handler meanwhile
                        continue
                    break
                signo = info.si_signo
            timeout = 0
            if signo in (signal.SIGTERM, signal.SIGINT):
                if self.stop_requested:
                    self.fast_stop = True
                    log.warning("second stop signal: releasing the files in flight without waiting")
                else:
                    log.info("%s received: finishing the files in flight, then stopping", signal.Signals(signo).name)
                self.stop_requested = True
            elif signo == signal.SIGHUP:
                log.info("SIGHUP received: reloading the configuration")
                self.reload_requested = True

    def _sleep(self, seconds: float) -> None:
        """Wait, in short slices so that a signal caught by the handler ends the wait soon."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.stop_requested or self.reload_requested:
                return
            self._take_signals(min(left, 0.25))

    def _step(self) -> None:
        now = time.monotonic()
        if self.watcher is not None:
            for ch in self.watcher.changes(MAX_CHANGES_PER_STEP):
                self._on_change(ch)
            if now >= self.next_health:
                self.next_health = now + HEALTH_SECONDS
                self.watcher.check_health()
                self._update_claim_prefixes()
            self._settle_due()
            self._flush()
            self._rescan_step(now)
            self._flush()
        if self.pool is not None:
            self._pool_step()
        else:
            self._sleep(self._idle_timeout())
        self._periodic(now)

    def _busy(self) -> bool:
        return bool((self.watcher and self.watcher.pending()) or self.rescan is not None or self.rescan_pending
                    or self.upserts or self.gone or self.gone_dirs)

    def _idle_timeout(self) -> float:
        if self._busy():
            return 0.0
        t = 0.25
        nd = self.tracker.next_due_in()
        if nd is not None:
            t = min(t, nd + 0.01)
        return t

    # -- watcher changes --------------------------------------------------------------------------

    def _on_change(self, ch: Change) -> None:
        assert self.watcher is not None and self.store is not None
        if ch.kind == "rescan":
            kind = {"overflow": "inotify_overflow", "polling_fallback": "watch_fallback"}.get(ch.reason or "", "watch_" + (ch.reason or "rescan"))
            now = time.monotonic()
            key = (kind, ch.root)
            if now - self.last_notice.get(key, -1e9) >= NOTICE_SECONDS:  # a burst overflows again and again
                self.last_notice[key] = now
                log.warning("%s: %s; rescanning", ch.root, ch.detail or ch.reason)
                self.store.event(kind, {"root": ch.root, "reason": ch.reason, "detail": ch.detail})
            self._request_rescan(ch.root, ch.reason or "rescan")
            return
        rw = self.watcher.roots.get(ch.root)
        if rw is None:
            return
        if ch.kind == "changed":
            self._saw(rw, ch.path)
        elif ch.kind == "deleted":
            self.tracker.forget(ch.path)
            self.gone[ch.path] = rw.path
        elif ch.kind == "moved" and ch.dest is not None:
            self._moved(rw, ch.path, ch.dest)
        elif ch.kind == "dir_deleted":
            # Only a folder that is really gone takes its files with it. A root that "vanishes"
            # (a share unmounted, a polling snapshot that sees the root's inode change) is
            # rescanned instead: the rescan marks files gone only when they are provably gone.
            if ch.path.rstrip(os.sep) == rw.path.rstrip(os.sep) or not _vanished(ch.path):
                self._request_rescan(rw.path, "folder_replaced")
                return
            prefix = ch.path.rstrip(os.sep) + os.sep
            self.tracker.forget_under(prefix)
            self.gone_dirs[prefix] = rw.path
        elif ch.kind == "dir_moved" and ch.dest is not None:
            # The files below arrive as their own "moved" changes (watchdog generates them);
            # anything still settling under the old name is looked at again under the new one.
            prefix = ch.path.rstrip(os.sep) + os.sep
            self.tracker.forget_under(prefix)

    def _saw(self, rw: RootWatch, path: str) -> None:
        if not filtered(rw, path):
            return
        st = stat_path(path, rw.path)
        if st is None:  # vanished already (or a directory)
            self.tracker.forget(path)
            self.gone[path] = rw.path
            return
        if st.reason:  # symlink, FIFO, device: recorded as failed at once, never opened
            self.upserts.append(st)
            return
        self.gone.pop(path, None)
        if not self.tracker.observe(path, rw.path, _signature(st), activity=True):
            self._request_rescan(rw.path, "tracker_full")

    def _moved(self, rw: RootWatch, src: str, dest: str) -> None:
        assert self.store is not None
        self.tracker.forget(src)
        src_ok = filtered(rw, src)
        if not filtered(rw, dest):
            if src_ok:
                self.gone[src] = rw.path
            return
        st = stat_path(dest, rw.path)
        if src_ok and st is not None and not st.reason and src not in self.gone and self.store.move(src, dest, rw.path):
            self._follow_move(src, dest)
            # The row follows the file. Looking at it once more costs a stat and an indexed
            # look-up after the window: an unchanged file stays as it is (not read again).
            self._saw(rw, dest)
            return
        if src_ok:
            self.gone[src] = rw.path
        self._saw(rw, dest)

    def _follow_move(self, src: str, dest: str) -> None:
        for fid, c in self.inflight.items():
            if c.path == src:
                self.moved_inflight.add(fid)
        for i, c in enumerate(self.prefetch):
            if c.path == src:
                self.prefetch[i] = replace(c, path=dest)

    def _settle_due(self) -> None:
        for path, root in self.tracker.due(MAX_DUE_PER_STEP):
            st = stat_path(path, root)
            if st is not None and st.reason:
                self.tracker.forget(path)
                self.upserts.append(st)
                continue
            verdict = self.tracker.settle(path, None if st is None else _signature(st))
            if verdict == "stable":
                self.upserts.append(st)
            elif verdict == "vanished":
                self.gone[path] = root

    def _flush(self) -> None:
        assert self.store is not None
        if self.upserts:
            batch, self.upserts = self.upserts, []
            for i in range(0, len(batch), UPSERT_CHUNK):
                c = self.store.upsert_files(batch[i:i + UPSERT_CHUNK])
                if c.new or c.changed or c.revived:
                    self.queue_hint = True
        if self.gone:
            gone, self.gone = self.gone, {}
            by_root: dict[str, list[str]] = {}
            for p, root in gone.items():
                by_root.setdefault(root, []).append(p)
            for root, paths in by_root.items():
                if not self._intact(root):
                    continue
                for i in range(0, len(paths), UPSERT_CHUNK):
                    self.store.mark_gone(paths[i:i + UPSERT_CHUNK])
        if self.gone_dirs:
            dirs, self.gone_dirs = self.gone_dirs, {}
            for prefix, root in dirs.items():
                if self._intact(root):
                    self.store.mark_gone_under(prefix)

    def _intact(self, root: str) -> bool:
        ok = self.watcher is None or self.watcher.root_intact(root)
        if not ok and root not in self.not_intact_warned:
            self.not_intact_warned.add(root)
            log.error("%s is not reachable or no longer the folder watched at start (a share unmounted?); "
                      "deletions there are not recorded until it is back", root)
        elif ok:
            self.not_intact_warned.discard(root)
        return ok

    def _update_claim_prefixes(self) -> None:
        if self.watcher is None or not self.watcher.roots:
            self.claim_prefixes = None
            return
        self.claim_prefixes = [p.rstrip(os.sep) + os.sep for p in self.watcher.roots if self._intact(p)]

    # -- rescans ----------------------------------------------------------------------------------

    def _request_rescan(self, root: str, reason: str) -> None:
        if self.rescan_root == root:
            self.rescan_again[root] = reason
        elif root not in self.rescan_pending:
            self.rescan_pending[root] = reason

    def _rescan_step(self, now: float) -> None:
        if self.watcher is None:
            return
        if self.rescan is None:
            for root in self.watcher.roots:
                if now - self.last_rescan.get(root, now) >= self.cfg.watch.rescan_interval and root not in self.rescan_pending:
                    self.rescan_pending[root] = "periodic"
            while self.rescan_pending:
                root, reason = self.rescan_pending.popitem(last=False)
                rw = self.watcher.roots.get(root)
                if rw is not None:
                    self.rescan_root = root
                    self.rescan = self._rescan_iter(rw, reason)
                    break
        if self.rescan is None:
            return
        try:
            next(self.rescan)
        except StopIteration:
            root = self.rescan_root
            self.rescan = self.rescan_root = None
            if root in self.rescan_again:
                self._request_rescan(root, self.rescan_again.pop(root))

    def _rescan_iter(self, rw: RootWatch, reason: str) -> Iterator[None]:
        """Walk a root (stat only), upsert what is settled, track what is still being written,
        then mark gone the rows whose files disappeared. One chunk per step of the loop."""
        assert self.store is not None
        store, root = self.store, rw.path
        t0 = time.monotonic()
        self.last_rescan[root] = t0
        counts = UpsertCounts()
        seen: set[int] = set()  # hashes of the paths seen (a few bytes per file, not the paths)
        tracked = gone = 0
        window = self.cfg.watch.stability_window
        intact = self._intact(root)
        batch: list[FileStat] = []
        for st in walk(root, recursive=rw.cfg.recursive, filt=rw.filt):
            seen.add(hash(st.path))
            if not st.reason:
                if st.path in self.tracker:
                    continue
                if time.time() - st.mtime_ns / 1e9 < window:  # written moments ago: let it settle
                    if not self.tracker.observe(st.path, root, _signature(st), activity=False):
                        self.rescan_again[root] = reason
                    tracked += 1
                    continue
            batch.append(st)
            if len(batch) >= UPSERT_CHUNK:
                _add(counts, store.upsert_files(batch))
                batch = []
                yield
            while self.tracker.full and not self.stop_requested:
                yield  # back-pressure: let the tracker drain first
        if batch:
            _add(counts, store.upsert_files(batch))
        if counts.new or counts.changed or counts.revived:
            self.queue_hint = True
        yield
        if intact and self._intact(root):
            prefix, after = root.rstrip(os.sep) + os.sep, 0
            while True:
                rows = store.live_paths(prefix, after, 1000)
                if not rows:
                    break
                after = rows[-1][0]
                # a folder's row (it could not be listed) ends when the folder is listed again
                missing = [p for _, p in rows if hash(p) not in seen and p not in self.tracker
                           and (p.endswith(os.sep) or _vanished(p))]
                if missing:
                    gone += store.mark_gone(missing)
                yield
        secs = time.monotonic() - t0
        detail = {"root": root, "reason": reason, "new": counts.new, "changed": counts.changed, "revived": counts.revived,
                  "unchanged": counts.unchanged, "settling": tracked, "gone": gone, "seconds": round(secs, 2)}
        store.event("rescan", detail)
        lvl = logging.INFO if (counts.new or counts.changed or counts.revived or gone or reason != "periodic") else logging.DEBUG
        log.log(lvl, "rescan of %s (%s): %d new, %d changed, %d back, %d unchanged, %d settling, %d gone in %.1f s",
                root, reason, counts.new, counts.changed, counts.revived, counts.unchanged, tracked, gone, secs)

    # -- analysis ---------------------------------------------------------------------------------

    def _pool_step(self) -> None:
        assert self.pool is not None and self.store is not None
        pool, store, svc = self.pool, self.store, self.cfg.service
        now = time.monotonic()
        self._record_kept()  # results taken from the workers while the database was away
        if self.pool_restart and not self.inflight:
            self._restart_pool()
            pool = self.pool
        if not self.pool_restart and not self.stop_requested and self.claim_prefixes != []:
            free = pool.free()
            # Claim in batches, a few files ahead per worker: workers never wait on the
            # database, and one claim transaction serves several files.
            if free and len(self.prefetch) < free + pool.n and (self.queue_hint or now >= self.next_claim):
                want = free + PREFETCH_PER_WORKER * pool.n - len(self.prefetch)
                claims = store.claim(want, svc.lease_seconds, prefixes=self.claim_prefixes)
                self.next_claim = now + CLAIM_POLL_SECONDS
                self.queue_hint = len(claims) == want
                known = {c.id for c in self.prefetch}
                for c in claims:
                    if c.id in self.inflight:
                        self.superseded.add(c.id)  # changed while being analysed: the old result is stale
                    if c.id not in known:
                        self.prefetch.append(c)
                        known.add(c.id)
            self._submit()
        timeout = 0.0 if self._busy() else self._idle_timeout()
        if self.inflight:
            outcomes = pool.poll(timeout)
        else:
            outcomes = []
            self._sleep(timeout)
        self.unrecorded.extend(outcomes)  # kept until written: a database error must not lose them
        self._record_kept()
        if self.inflight or self.prefetch:
            if now >= self._next_renew:
                self._next_renew = now + svc.lease_seconds / 3
                store.renew(list(self.inflight) + [c.id for c in self.prefetch], svc.lease_seconds)
        self._submit()

    def _submit(self) -> None:
        from daemon.workers import Task

        assert self.pool is not None
        if self.pool_restart or self.stop_requested:
            return
        skipped: list[Claim] = []
        while self.prefetch and self.pool.free():
            c = self.prefetch.popleft()
            if c.id in self.inflight:
                skipped.append(c)  # wait for the stale run of the same file to come back
                continue
            self.inflight[c.id] = c
            self.pool.submit(Task(c.id, c.path, c.root, c.inode))
        self.prefetch.extendleft(reversed(skipped))

    def _record_kept(self) -> None:
        while self.unrecorded:
            self._record(self.unrecorded[0])  # raises on a database error: the outcome stays
            self.unrecorded.popleft()

    def _record(self, outcome) -> None:  # noqa: ANN001
        from daemon.workers import Crashed, Failed

        assert self.store is not None and self.pool is not None
        fid = outcome.file_id
        self.inflight.pop(fid, None)
        if fid in self.superseded:
            self.superseded.discard(fid)
            return
        if fid in self.moved_inflight:
            self.moved_inflight.discard(fid)
            if isinstance(outcome, (Failed, Crashed)):
                self.store.release([fid])  # the file was renamed under the worker: try it again
                self.queue_hint = True
                return
        if isinstance(outcome, Failed) and outcome.reason == "internal_error" and \
                outcome.error.startswith(("OperationalError", "InterfaceError", "DisconnectionError")):
            # the worker's "already analysed?" look-up hit a database outage: not the file's fault
            self.store.release([fid])
            self.queue_hint = True
            return
        record(self.store, outcome, self.pool.bundle_key, self.cfg.service.max_attempts)
        if isinstance(outcome, Crashed):
            self.queue_hint = True
        self.rate.add()
        self.finished += 1

    def _restart_pool(self) -> None:
        """Apply new pipeline settings: start the new pool first, keep the old one if it fails."""
        assert self.store is not None
        self.pool_restart = False
        log.info("starting workers with the new analysis settings")
        try:
            pool = self._new_pool(self.cfg)
        except Exception as err:  # noqa: BLE001 - a bad model must not take the service down
            log.error("the new analysis settings cannot be used (%s); keeping the running workers and settings", err)
            self.store.event("config_rejected", {"problems": [f"pipeline: {err}"]})
            self.cfg = replace(self.cfg, pipeline=self._pool_cfg.pipeline, service=replace(self.cfg.service, workers=self._pool_cfg.service.workers))
            return
        old, self.pool = self.pool, pool
        old.close()
        self.bundle_key = pool.bundle_key
        self.store.ensure_bundle(pool.bundle_key, pool.bundle)
        self.store.requeue_for_bundle(pool.bundle_key, self.claim_prefixes or None)
        self.queue_hint = True

    # -- periodic ---------------------------------------------------------------------------------

    def _periodic(self, now: float) -> None:
        assert self.store is not None
        if now >= self.next_status:
            self.next_status = now + STATUS_SECONDS
            self.backlog = self.store.pending()
            self.notifier.status(self._status_text())
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + HEARTBEAT_SECONDS
            self._heartbeat()
        if now >= self.next_log:
            if self.next_log and (self.finished or self.backlog):
                log.info("%s", self._status_text())
            self.next_log = now + 60.0
            self.finished = 0

    def _status_text(self) -> str:
        roots = self.watcher.modes() if self.watcher else {}
        polling = sum(1 for m in roots.values() if m == "polling")
        parts = [f"backlog {self.backlog} file(s)", f"{self.rate.per_second():.1f} files/s over the last minute"]
        if self.pool:
            parts.append(f"{self.pool.n} worker(s)")
        parts.append(f"{len(roots)} root(s) watched" + (f" ({polling} polling)" if polling else ""))
        if self.rescan_root:
            parts.append(f"rescanning {self.rescan_root}")
        return "; ".join(parts)

    def _heartbeat(self) -> None:
        assert self.store is not None
        self.store.heartbeat({"pid": os.getpid(), "version": __version__, "started": self.started_at,
                              "backlog": self.backlog, "rate_per_s": round(self.rate.per_second(), 3),
                              "workers": self.pool.n if self.pool else 0,
                              "roots": self.watcher.modes() if self.watcher else {}})

    # -- reload -----------------------------------------------------------------------------------

    def _reload(self) -> None:
        assert self.store is not None
        self.notifier.reloading()
        old = self.cfg
        try:
            new = self._reload_fn()
        except ConfigError as err:
            log.error("the new configuration is rejected; the running one is kept:\n  %s", "\n  ".join(err.problems))
            self.store.event("config_rejected", {"problems": err.problems})
            self.notifier.ready(self._status_text())
            return
        kept = []
        if new.database != old.database:
            kept.append(f"database stays {_safe_url(old.database)} until a restart")
            new = replace(new, database=old.database)
        if new.service.roles != old.service.roles or new.host_id != old.host_id:
            kept.append("service.roles and service.host_id apply after a restart")
            new = replace(new, service=replace(new.service, roles=old.service.roles, host_id=old.service.host_id))
        for k in kept:
            log.warning("reload: %s", k)
        if self.watcher is not None:
            added, removed = self.watcher.update(new.watch.roots)
            for p in removed:
                self.tracker.forget_under(p.rstrip(os.sep) + os.sep)
                self.rescan_pending.pop(p, None)
                self.rescan_again.pop(p, None)
                self.last_rescan.pop(p, None)
                if self.rescan_root == p:
                    self.rescan = self.rescan_root = None
            for p in added:
                self._request_rescan(p, "config")
            self._update_claim_prefixes()
        self.tracker.set_window(new.watch.stability_window)
        if self.pool is not None and (new.pipeline != old.pipeline or new.service.workers != old.service.workers
                                      or new.service.file_timeout != old.service.file_timeout):
            self._pool_cfg = old
            self.pool_restart = True
        logging.getLogger().setLevel(getattr(logging, new.service.log_level.upper(), logging.INFO))
        self.cfg = new
        self.queue_hint = True
        self.store.event("config_loaded", {**self._describe(), "reload": True, "kept": kept})
        log.info("configuration reloaded: %d root(s): %s", len(new.watch.roots), ", ".join(r.path for r in new.watch.roots) or "none")
        self.notifier.ready(self._status_text())

    # -- stopping ---------------------------------------------------------------------------------

    def _drain(self) -> None:
        assert self.store is not None
        n = len(self.inflight)
        self.notifier.stopping(f"stopping: finishing {n} file(s) in flight")
        log.info("stopping: %d file(s) in flight, %d claimed ahead released", n, len(self.prefetch))
        if self.watcher is not None:
            self.watcher.stop()
        if self.db_down_since is not None:  # stopped while backing off: the outage may be over
            try:
                self._record_outage()
            except Exception as err:  # noqa: BLE001 - still down: the results kept are handled below
                log.warning("database still unreachable while stopping (%s)", err)
        if self.pool is not None:
            self._record_kept()
        if self.prefetch:
            self.store.release([c.id for c in self.prefetch])
            self.prefetch.clear()
        deadline = time.monotonic() + min(self.cfg.service.file_timeout + 5, 150)
        while self.pool is not None and self.inflight and not self.fast_stop and time.monotonic() < deadline:
            for outcome in self.pool.poll(0.2):
                self._record(outcome)
            self._take_signals(0)
            self.notifier.watchdog()
        if self.inflight:
            log.warning("released %d file(s) still being analysed; they are taken again at the next start", len(self.inflight))
            self.store.release(list(self.inflight))
            self.inflight.clear()
        try:
            self._flush()
        except Exception as err:  # noqa: BLE001 - whatever is not flushed is found by the next start-up scan
            log.warning("could not record the last changes (%s); the next start-up scan finds them", err)
        self.store.event("service_stopped", {"pid": os.getpid(), "seconds": round(time.time() - self.started_at, 1)})
        self.store.clear_heartbeat()
        log.info("stopped")

    def _cleanup(self) -> None:
        if self.watcher is not None:
            try:
                self.watcher.stop()
            except Exception:  # noqa: BLE001
                pass
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.engine is not None:
            self.engine.dispose()
        if self.lock is not None:
            self.lock.release()
        self.notifier.close()


def _add(total: UpsertCounts, c: UpsertCounts) -> None:
    for k in ("new", "changed", "unchanged", "revived"):
        setattr(total, k, getattr(total, k) + getattr(c, k))


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url


# --------------------------------------------------------------------------------------------
# status


def status_document(cfg: Config) -> dict:
    """Everything ``forensic-gender status`` reports, as one JSON-able document."""
    from daemon.store.engine import open_engine
    from daemon.store.writer import status_summary

    engine = open_engine(cfg.database, readonly=True)
    try:
        s = status_summary(engine)
    finally:
        engine.dispose()
    now = time.time()
    totals = s["totals"]
    files = {"total": sum(totals.values()), **totals}
    hosts = []
    for hb in s["heartbeats"]:
        at = hb.get("at")
        age = None if at is None else round(now - at, 1)
        hosts.append({"host": hb.get("host"), "pid": hb.get("pid"), "version": hb.get("version"),
                      "last_heartbeat_s": age, "alive": age is not None and age < 4 * HEARTBEAT_SECONDS,
                      "backlog": hb.get("backlog"), "rate_per_s": hb.get("rate_per_s"), "roots": hb.get("roots")})
    dbp = sqlite_path(cfg.database)
    pid = lock_holder(dbp + ".lock") if dbp else None
    running = pid is not None if dbp else any(h["alive"] for h in hosts)
    configured = {to_db(r.path) for r in cfg.watch.roots}
    roots = []
    for root in sorted(set(s["by_root"]) | configured):
        st = s["by_root"].get(root, {})
        roots.append({"root": root, "configured": root in configured, "files": {"total": sum(st.values()), **st},
                      "backlog": st.get("queued", 0) + st.get("working", 0)})
    failures = {reason: sum(v.values()) for reason, v in sorted(s["failures"].items(), key=lambda kv: -sum(kv[1].values()))}
    quarantined = {reason: v["quarantined"] for reason, v in s["failures"].items() if v.get("quarantined")}
    return {
        "database": _safe_url(cfg.database),
        "service": {"running": running, "pid": pid, "hosts": hosts},
        "files": files,
        "backlog": totals.get("queued", 0) + totals.get("working", 0),
        "failures": failures,
        "quarantined": quarantined,
        "rate": {"last_minute": s["finished_last_minute"], "last_5_minutes": s["finished_last_window"],
                 "per_minute": round(s["finished_last_window"] / (s["window"] / 60.0), 2)},
        "roots": roots,
        "configured_roots": sorted(configured),
    }


def print_status(doc: dict, out=sys.stdout) -> None:  # noqa: ANN001
    w = out.write
    svc = doc["service"]
    if svc["running"]:
        state = "running" + (f" (pid {svc['pid']})" if svc.get("pid") else "")
    else:
        state = "not running"
    w(f"database  {doc['database']}\n")
    w(f"service   {state}\n")
    for h in svc["hosts"]:
        w(f"          host {h['host']}: pid {h['pid']}, last heartbeat {h['last_heartbeat_s']} s ago"
          f"{'' if h['alive'] else ' (stale)'}, backlog {h['backlog']}, {h['rate_per_s']} files/s\n")
    f = doc["files"]
    w("files     " + "  ".join(f"{k} {f.get(k, 0)}" for k in ("total", "done", "queued", "working", "failed", "quarantined", "gone")) + "\n")
    w(f"backlog   {doc['backlog']}\n")
    r = doc["rate"]
    w(f"rate      {r['last_minute']} file(s) finished in the last minute, {r['last_5_minutes']} in the last 5 minutes ({r['per_minute']}/min)\n")
    if doc["failures"]:
        w("failures  " + ", ".join(f"{k} {v}" + (f" ({doc['quarantined'][k]} quarantined)" if k in doc["quarantined"] else "")
                                  for k, v in doc["failures"].items()) + "\n")
    else:
        w("failures  none\n")
    if doc["roots"]:
        w("roots\n")
        for root in doc["roots"]:
            fr = root["files"]
            w(f"  {show(root['root'])}{' (not in this configuration)' if doc['configured_roots'] and not root['configured'] else ''}\n")
            w("    " + "  ".join(f"{k} {fr.get(k, 0)}" for k in ("total", "done", "queued", "working", "failed", "quarantined", "gone"))
              + f"  backlog {root['backlog']}\n")


# --------------------------------------------------------------------------------------------
# CLI


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.cli import setup_logging

    def load() -> Config:
        return build_config(args.config, args.watch, args.db)

    cfg = load()
    if getattr(args, "log_level", None) is None:
        setup_logging(cfg.service.log_level)
    try:
        return Service(cfg, load, Notifier()).run()
    except ServiceError as err:
        print(f"forensic-gender run: {err}", file=sys.stderr)
        return 2


def cmd_status(args: argparse.Namespace) -> int:
    from daemon.cli import load_config

    cfg = load_config(args, check_paths=False)
    doc = status_document(cfg)
    if args.format == "json":
        print(json.dumps(doc, indent=2, sort_keys=False))
    else:
        print_status(doc)
    return 0


def register_cli(subparsers) -> None:  # noqa: ANN001
    p = subparsers.add_parser("run", help="the service: watch folders, analyse new images, record the results (foreground; systemd Type=notify)")
    p.add_argument("--config", metavar="FILE", help="YAML configuration (see config.example.yaml)")
    p.add_argument("--watch", metavar="DIR", action="append", default=[], help="watch this folder too (repeatable)")
    p.add_argument("--db", metavar="URL", help="database URL (overrides the configuration), e.g. sqlite:///var/forensic-gender.db")
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser("status", help="files by state, failures, backlog, rate, per root, and whether the service runs")
    p.add_argument("--config", metavar="FILE", help="YAML configuration (for the database and the roots)")
    p.add_argument("--db", metavar="URL", help="database URL (overrides the configuration)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="table (default) or json")
    p.set_defaults(func=cmd_status)
