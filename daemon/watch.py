"""Watching evidence roots: watchdog observers, a stability tracker, health checks.

This is the only module that imports watchdog. Events are *hints*: the database decides (see
``docs``: watchers lose events, a burst of 20,000 files overflowed the default inotify queue and
68% of the events were lost). So:

- the watchdog handler only turns an event into a small :class:`Change` and appends it to a
  bounded in-memory queue; it never raises (an exception escaping a handler silently stops the
  observer thread), and when the queue is full it drops the event and asks for a rescan;
- an inotify queue overflow (watchdog's ``EventsLostEvent`` for the root, once it has repaired
  its watches) is turned into a ``rescan`` change of that root with reason ``overflow``;
- running out of inotify watches is detected (an error when scheduling, or a probe watch that
  fails with ENOSPC right after scheduling: watchdog silently skips sub-folders it cannot watch)
  and the root falls back to polling with a message that names ``fs.inotify.max_user_watches``;
- :meth:`Watcher.check_health` notices a dead observer (or emitter) and restarts it, then asks
  for a rescan of that root, because events were lost while it was dead.

:class:`StabilityTracker` is pure (an injectable clock, no I/O): a file is taken once its
signature (size, mtime, inode) stayed the same for the stability window.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from watchdog.events import (
    DirDeletedEvent,
    DirMovedEvent,
    EventsLostEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyObserver
from watchdog.observers.polling import PollingObserverVFS

from daemon.config import RootConfig
from daemon.discovery import Filter
from daemon.states import Rescan

log = logging.getLogger(__name__)

# What the observers report. Opens and read-only closes (our own workers reading evidence) are
# not even requested from the kernel: they would only add load and overflow the queue sooner.
# EventsLostEvent (a queue overflow) reaches a watch with a filter only if the filter names it.
EVENT_FILTER = [FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileAttribEvent, FileDeletedEvent,
                FileMovedEvent, DirDeletedEvent, DirMovedEvent, EventsLostEvent]

MAX_QUEUED_CHANGES = 200_000  # beyond this the handler drops events and asks for a rescan
WATCHES_SYSCTL = "fs.inotify.max_user_watches"
INSTANCES_SYSCTL = "fs.inotify.max_user_instances"
QUEUE_SYSCTL = "fs.inotify.max_queued_events"

Signature = tuple[int, int, int | None]  # size, mtime_ns, inode


# --------------------------------------------------------------------------------------------
# Stability


@dataclass
class _Entry:
    root: str
    sig: Signature | None
    since: float


class StabilityTracker:
    """Which paths have kept the same signature (size, mtime_ns, inode) for ``window`` seconds.

    Pure: no I/O, time from ``clock``. The caller stats files and reports what it saw:

    - :meth:`observe` when an event or a scan saw a path (an event is activity: it restarts the
      quiet period even when the signature looks the same, since the timestamp granularity can
      hide a write);
    - :meth:`due` lists paths whose quiet period is over; the caller stats each again and calls
      :meth:`settle`, which answers ``stable`` (take it), ``changed`` (the quiet period restarts)
      or ``vanished``.

    At most ``limit`` paths are tracked (memory stays bounded in a burst; the backlog lives in the
    database): :meth:`observe` returns False for a new path when full, and the caller relies on a
    rescan to find it later.
    """

    def __init__(self, window: float, *, clock: Callable[[], float] = time.monotonic, limit: int = 50_000) -> None:
        if window < 0:
            raise ValueError(f"stability window must be >= 0 seconds, got {window}")
        self.window, self.clock, self.limit = window, clock, limit
        self._entries: dict[str, _Entry] = {}  # insertion order == order of ``since``

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, path: object) -> bool:
        return path in self._entries

    @property
    def full(self) -> bool:
        return len(self._entries) >= self.limit

    def root_of(self, path: str) -> str | None:
        e = self._entries.get(path)
        return e.root if e else None

    def observe(self, path: str, root: str, sig: Signature | None, *, activity: bool = True) -> bool:
        """``path`` was seen with ``sig``. A new path, a different signature or (``activity``) an
        event restarts its quiet period. False when a new path does not fit."""
        e = self._entries.get(path)
        if e is None:
            if self.full:
                return False
            self._entries[path] = _Entry(root, sig, self.clock())
            return True
        if activity or e.sig != sig:
            self._restart(path, e, sig)
        return True

    def _restart(self, path: str, e: _Entry, sig: Signature | None) -> None:
        del self._entries[path]  # re-insert so that the dict stays ordered by ``since``
        e.sig, e.since = sig, self.clock()
        self._entries[path] = e

    def due(self, limit: int | None = None) -> list[tuple[str, str]]:
        """``(path, root)`` of paths quiet for the window, oldest first (at most ``limit``)."""
        now = self.clock()
        out: list[tuple[str, str]] = []
        for path, e in self._entries.items():
            if now - e.since < self.window or (limit is not None and len(out) >= limit):
                break
            out.append((path, e.root))
        return out

    def next_due_in(self) -> float | None:
        """Seconds until the oldest path is due (0 when one is due now), None when empty."""
        for e in self._entries.values():
            return max(0.0, e.since + self.window - self.clock())
        return None

    def settle(self, path: str, sig: Signature | None) -> str:
        """A fresh stat of a due path: ``stable`` (forgotten; take it), ``changed`` (quiet period
        restarted), ``waiting`` (not due yet) or ``vanished`` (forgotten)."""
        e = self._entries.get(path)
        if e is None:
            return "vanished" if sig is None else "changed"
        if sig is None:
            del self._entries[path]
            return "vanished"
        if sig != e.sig:
            self._restart(path, e, sig)
            return "changed"
        if self.clock() - e.since < self.window:
            return "waiting"
        del self._entries[path]
        return "stable"

    def forget(self, path: str) -> bool:
        return self._entries.pop(path, None) is not None

    def forget_under(self, prefix: str) -> int:
        """Forget every path starting with ``prefix`` (a folder path ending with a separator)."""
        gone = [p for p in self._entries if p.startswith(prefix)]
        for p in gone:
            del self._entries[p]
        return len(gone)

    def set_window(self, window: float) -> None:
        self.window = window


# --------------------------------------------------------------------------------------------
# Changes: what the watcher hands to the service


@dataclass(frozen=True)
class Change:
    """One hint from a watcher. ``kind``: ``changed`` (created, written, closed, attributes),
    ``deleted``, ``moved`` (``dest`` set), ``dir_deleted``, ``dir_moved``, or ``rescan`` (events
    were or may have been lost: ``reason`` overflow, observer_restarted, handler_error,
    queue_full, polling_fallback; ``detail`` a message for the log and the audit trail)."""

    kind: str
    root: str
    path: str
    dest: str | None = None
    reason: Rescan | None = None
    detail: str | None = None


class _Handler(FileSystemEventHandler):
    """Only enqueues; never raises (an exception here would silently kill the observer)."""

    def __init__(self, watcher: Watcher, root: str) -> None:
        self.watcher, self.root = watcher, root

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self.watcher._enqueue(self.root, event)
        except Exception:  # noqa: BLE001 - must never escape into watchdog
            self.watcher._handler_failed(self.root)


# --------------------------------------------------------------------------------------------
# inotify limits


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def inotify_limits() -> dict[str, int | None]:
    """The current sysctls (None where /proc/sys cannot be read, e.g. under ProcSubset=pid)."""
    return {
        WATCHES_SYSCTL: _read_int("/proc/sys/fs/inotify/max_user_watches"),
        INSTANCES_SYSCTL: _read_int("/proc/sys/fs/inotify/max_user_instances"),
        QUEUE_SYSCTL: _read_int("/proc/sys/fs/inotify/max_queued_events"),
        "user.max_inotify_watches": _read_int("/proc/sys/user/max_inotify_watches"),
    }


def exhausted_message(root: str, err_no: int, poll_interval: float) -> str:
    """The operator's message for an exhausted inotify limit (ENOSPC watches, EMFILE instances)."""
    lim = inotify_limits()
    if err_no == errno.EMFILE:
        key, value, suggest = INSTANCES_SYSCTL, lim[INSTANCES_SYSCTL], 1024
    else:
        key, value, suggest = WATCHES_SYSCTL, lim[WATCHES_SYSCTL], 524288
        ns = lim["user.max_inotify_watches"]
        if ns is not None and value is not None and ns < value:
            value = f"{value}, and {ns} in this user namespace (/proc/sys/user/max_inotify_watches)"  # type: ignore[assignment]
    shown = "unknown" if value is None else value
    return (f"{root}: the inotify limit {key} is exhausted (currently {shown}); some folders could not be"
            f" watched, so this root falls back to polling every {poll_interval:g} s (slower, but nothing is"
            f" missed). Raise the limit: `sysctl -w {key}={suggest}` and make it permanent in"
            f" /etc/sysctl.d/60-forensic-gender.conf, then restart the service")


_libc = None


def _probe_inotify(path: str) -> int:
    """Try to add one more inotify watch (on a separate instance) and remove it again: 0 when
    that works, else the errno (ENOSPC: watches exhausted, EMFILE: instances exhausted).
    Adding a watch reads nothing and changes nothing on disk."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fd = _libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        return ctypes.get_errno() or errno.EMFILE
    try:
        IN_DELETE_SELF, IN_ONLYDIR = 0x400, 0x01000000  # noqa: N806
        wd = _libc.inotify_add_watch(fd, os.fsencode(path), IN_DELETE_SELF | IN_ONLYDIR)
        if wd < 0:
            e = ctypes.get_errno()
            return e if e in (errno.ENOSPC, errno.EMFILE) else 0  # other errors: not a limit
        return 0
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# The watcher


@dataclass
class RootWatch:
    """One watched root and its observer. ``mode``: inotify or polling (``fallback`` says why
    an inotify root polls)."""

    cfg: RootConfig
    filt: Filter
    mode: str
    observer: BaseObserver | None = None
    fallback: str | None = None
    was_mount: bool | None = None  # whether the root was a mount point when watching started
    failures: int = 0
    next_retry: float = 0.0
    restarts: int = 0

    @property
    def path(self) -> str:
        return self.cfg.path


class Watcher:
    """Observers for a set of roots, feeding :class:`Change` items into a bounded queue.

    Use from one thread (the service loop): :meth:`start`, :meth:`changes`, :meth:`check_health`,
    :meth:`update`, :meth:`stop`. The observers' threads only append to the queue.
    """

    def __init__(self, roots: Sequence[RootConfig], *, max_queued: int = MAX_QUEUED_CHANGES,
                 probe: Callable[[str], int] = _probe_inotify, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_queued = max_queued
        self._probe = probe
        self.clock = clock
        self.roots: dict[str, RootWatch] = {}
        self._queue: deque[Change] = deque()
        self._lock = threading.Lock()  # guards the flags below (set from observer threads)
        self._overflows: Counter[str] = Counter()  # root -> queue overflows not yet turned into rescans
        self._dropped: set[str] = set()
        self._handler_errors: dict[str, int] = {}
        self._started = False
        self._pending_roots = list(roots)
        self.overflow_count = 0

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._started = True
        roots, self._pending_roots = self._pending_roots, []
        for r in roots:
            self._add_root(r)

    def stop(self) -> None:
        for rw in self.roots.values():
            self._stop_observer(rw)
        self._started = False

    def update(self, roots: Sequence[RootConfig]) -> tuple[list[str], list[str]]:
        """Apply a new set of roots (reload): returns (added, removed) root paths. A root whose
        settings changed is restarted (and counted as added)."""
        wanted = {r.path: r for r in roots}
        removed = [p for p, rw in self.roots.items() if p not in wanted or wanted[p] != rw.cfg]
        for p in removed:
            self._stop_observer(self.roots.pop(p))
        added = [p for p in wanted if p not in self.roots]
        for p in added:
            self._add_root(wanted[p])
        return added, [p for p in removed if p not in wanted]

    def modes(self) -> dict[str, str]:
        return {p: rw.mode for p, rw in self.roots.items()}

    # -- observers ------------------------------------------------------------------------------

    def _add_root(self, cfg: RootConfig) -> None:
        rw = RootWatch(cfg, Filter(cfg.include, cfg.exclude), "polling" if cfg.polling else "inotify")
        self.roots[cfg.path] = rw
        rw.was_mount = os.path.ismount(cfg.path)
        self._start_observer(rw)

    def _make_observer(self, rw: RootWatch) -> BaseObserver:
        if rw.mode == "polling":
            return PollingObserverVFS(os.lstat, os.scandir, polling_interval=rw.cfg.poll_interval)
        return InotifyObserver()

    def _start_observer(self, rw: RootWatch) -> bool:
        """Start (or restart) the root's observer; falls back to polling when inotify limits are
        exhausted. False when the root cannot be watched now (retried by check_health)."""
        try:
            obs = self._make_observer(rw)
            obs.schedule(_Handler(self, rw.path), rw.path, recursive=rw.cfg.recursive, event_filter=EVENT_FILTER)
            obs.start()
        except OSError as err:
            if rw.mode == "inotify" and err.errno in (errno.ENOSPC, errno.EMFILE):
                return self._fall_back(rw, err.errno)
            return self._start_failed(rw, f"cannot watch {rw.path}: {err}")
        except Exception as err:  # noqa: BLE001 - a watcher problem must not stop the service
            return self._start_failed(rw, f"cannot watch {rw.path}: {type(err).__name__}: {err}")
        rw.observer = obs
        rw.failures = 0
        if rw.mode == "inotify":
            e = self._probe(rw.path)
            if e in (errno.ENOSPC, errno.EMFILE):
                self._stop_observer(rw)  # frees the watches it holds for other roots
                return self._fall_back(rw, e)
        log.info("watching %s (%s%s)", rw.path, rw.mode,
                 f", every {rw.cfg.poll_interval:g} s" if rw.mode == "polling" else "")
        return True

    def _fall_back(self, rw: RootWatch, err_no: int) -> bool:
        msg = exhausted_message(rw.path, err_no, rw.cfg.poll_interval)
        log.error("%s", msg)
        rw.mode, rw.fallback = "polling", msg
        self._queue.append(Change("rescan", rw.path, rw.path, reason=Rescan.POLLING_FALLBACK, detail=msg))
        return self._start_observer(rw)

    def _start_failed(self, rw: RootWatch, msg: str) -> bool:
        rw.observer = None
        rw.failures += 1
        delay = min(60.0, 2.0 ** min(rw.failures, 6))
        rw.next_retry = self.clock() + delay
        log.error("%s; retrying in %.0f s", msg, delay)
        return False

    def _stop_observer(self, rw: RootWatch) -> None:
        obs, rw.observer = rw.observer, None
        if obs is None:
            return
        try:
            obs.stop()
            if obs.is_alive():
                obs.join(10)
        except Exception as err:  # noqa: BLE001
            log.warning("stopping the observer of %s: %s", rw.path, err)

    @staticmethod
    def _alive(obs: BaseObserver) -> bool:
        emitters = obs.emitters
        return obs.is_alive() and bool(emitters) and all(e.is_alive() for e in emitters)

    def check_health(self) -> list[str]:
        """Restart dead observers (each restart queues a rescan of its root) and notice inotify
        watches running out since start-up (those roots fall back to polling). Returns the
        roots restarted."""
        restarted = []
        now = self.clock()
        for rw in list(self.roots.values()):
            if rw.observer is not None and self._alive(rw.observer):
                continue
            if rw.observer is None and now < rw.next_retry:
                continue
            if rw.observer is not None:
                log.error("the observer of %s died; restarting it and rescanning the root", rw.path)
                self._stop_observer(rw)
            if self._start_observer(rw):
                rw.restarts += 1
                restarted.append(rw.path)
                self._queue.append(Change("rescan", rw.path, rw.path, reason=Rescan.OBSERVER_RESTARTED,
                                          detail=f"the observer of {rw.path} was (re)started; events may have been lost"))
        inotify_roots = [rw for rw in self.roots.values() if rw.mode == "inotify" and rw.observer is not None]
        if inotify_roots:
            e = self._probe(inotify_roots[0].path)
            if e in (errno.ENOSPC, errno.EMFILE):
                # New folders created since start-up may not be watched; we cannot tell which root.
                for rw in inotify_roots:
                    self._stop_observer(rw)
                    self._fall_back(rw, e)
        with self._lock:
            errors, self._handler_errors = self._handler_errors, {}
        for root, n in errors.items():
            self._queue.append(Change("rescan", root, root, reason=Rescan.HANDLER_ERROR,
                                      detail=f"{n} event(s) could not be handled; rescanning"))
        return restarted

    def root_intact(self, root: str) -> bool:
        """Whether ``root`` is reachable and still what was watched at start: a network share
        that was unmounted leaves an empty mount point (or no folder at all), and its files must
        not then be marked gone nor handed to the workers. A share mounted again is intact again."""
        rw = self.roots.get(root)
        if not os.path.isdir(root):  # also False for a dead FUSE mount (ENOTCONN)
            return False
        return rw is None or rw.was_mount is None or os.path.ismount(root) == rw.was_mount

    # -- the queue ------------------------------------------------------------------------------

    def _enqueue(self, root: str, event: FileSystemEvent) -> None:
        if isinstance(event, EventsLostEvent):  # the kernel queue overflowed: events of this root were lost
            with self._lock:
                self._overflows[root] += 1
            return
        if len(self._queue) >= self.max_queued:
            with self._lock:
                self._dropped.add(root)
            return
        src = os.fsdecode(event.src_path)
        if isinstance(event, (FileMovedEvent, DirMovedEvent)):
            dest = os.fsdecode(event.dest_path)
            kind = "dir_moved" if event.is_directory else "moved"
            self._queue.append(Change(kind, root, src, dest))
        elif isinstance(event, DirDeletedEvent):
            self._queue.append(Change("dir_deleted", root, src))
        elif isinstance(event, FileDeletedEvent):
            self._queue.append(Change("deleted", root, src))
        elif not event.is_directory:
            self._queue.append(Change("changed", root, src))

    def _handler_failed(self, root: str) -> None:
        try:
            with self._lock:
                self._handler_errors[root] = self._handler_errors.get(root, 0) + 1
        except Exception:  # noqa: BLE001
            pass

    def changes(self, limit: int = 5000) -> list[Change]:
        """Take up to ``limit`` queued changes (rescan requests first)."""
        out: list[Change] = []
        with self._lock:
            overflows, self._overflows = self._overflows, Counter()
            dropped, self._dropped = self._dropped, set()
        if overflows:
            self.overflow_count += sum(overflows.values())
            lim = inotify_limits()[QUEUE_SYSCTL]
            for root, n in overflows.items():
                if root not in self.roots:  # removed by a reload since
                    continue
                out.append(Change("rescan", root, root, reason=Rescan.OVERFLOW,
                                  detail=f"the inotify event queue overflowed {n} time(s) and events were lost; a larger queue"
                                         f" ({QUEUE_SYSCTL}, now {lim}, read when the watch starts) means fewer rescans"))
        for root in dropped:
            out.append(Change("rescan", root, root, reason=Rescan.QUEUE_FULL,
                              detail=f"more than {self.max_queued} changes were waiting; events were dropped"))
        q = self._queue
        while q and len(out) < limit:
            out.append(q.popleft())
        return out

    def pending(self) -> int:
        return len(self._queue)


def filtered(rw: RootWatch, path: str) -> bool:
    """Whether ``path`` (absolute) is evidence under this root by its filter and recursion."""
    rel = os.path.relpath(path, rw.path)
    if rel.startswith(os.pardir + os.sep) or rel == os.pardir or rel == os.curdir:
        return False
    if not rw.cfg.recursive and os.sep in rel:
        return False
    return rw.filt.accepts(rel)


def under(path: str, roots: Iterable[str]) -> str | None:
    """The root that contains ``path`` (longest match), or None."""
    best = None
    for r in roots:
        if path == r or path.startswith(r.rstrip(os.sep) + os.sep):
            if best is None or len(r) > len(best):
                best = r
    return best
