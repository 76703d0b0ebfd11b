"""What the service finds in the watched roots, turned into rows of the ``files`` queue.

Watchers (:mod:`daemon.watch`) only enqueue hints; here the paths are stat'ed, fed to the
stability tracker, and the stable files upserted. A full scan of a root at start-up, after an
event-queue overflow, after an observer restart, and every ``watch.rescan_interval`` feeds the
same upsert (a rescan of an unchanged tree costs one ``lstat`` per entry and one indexed look-up
per 500 paths: nothing is read or hashed); it also notices deletions (rows whose file is gone).
Renames seen while running move the row (``Store.move``): the file keeps its results and is not
read again.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterator

from daemon.config import WatchConfig
from daemon.discovery import stat_path, walk
from daemon.service_lifecycle import Signals
from daemon.service_queue import WorkQueue
from daemon.store.writer import FileStat, Store, UpsertCounts
from daemon.watch import Change, RootWatch, StabilityTracker, Watcher, filtered

log = logging.getLogger(__name__)

HEALTH_SECONDS = 2.0
UPSERT_CHUNK = 500
MAX_CHANGES_PER_STEP = 5000
MAX_DUE_PER_STEP = 2000
TRACKER_LIMIT = 50_000
NOTICE_SECONDS = 10.0  # the same watcher notice is logged and recorded at most this often


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


def _add(total: UpsertCounts, c: UpsertCounts) -> None:
    for k in ("new", "changed", "unchanged", "revived"):
        setattr(total, k, getattr(total, k) + getattr(c, k))


class Discovery:
    """The watcher's changes, the stability tracker, the rescans, and the upserts and deletions
    they produce. ``store`` and ``watcher`` are set at start-up (no watcher: the host only
    analyses). New work sets ``queue.hint``; renames of claimed files are passed to the queue."""

    def __init__(self, cfg: WatchConfig, signals: Signals, queue: WorkQueue) -> None:
        self.cfg = cfg
        self.signals = signals
        self.queue = queue
        self.store: Store | None = None
        self.watcher: Watcher | None = None
        self.tracker = StabilityTracker(cfg.stability_window, limit=TRACKER_LIMIT)
        self.next_health = 0.0
        self.upserts: list[FileStat] = []
        self.gone: dict[str, str] = {}  # path -> root
        self.gone_dirs: dict[str, str] = {}  # prefix -> root
        self.rescan_pending: OrderedDict[str, str] = OrderedDict()  # root -> reason
        self.rescan_again: dict[str, str] = {}
        self.rescan: Iterator[None] | None = None
        self.rescan_root: str | None = None
        self.last_rescan: dict[str, float] = {}
        self.not_intact_warned: set[str] = set()
        self.last_notice: dict[tuple[str, str], float] = {}

    def step(self, now: float) -> None:
        """One step of the loop: the watcher's changes, its health, what has settled, a chunk of
        the rescan."""
        if self.watcher is None:
            return
        for ch in self.watcher.changes(MAX_CHANGES_PER_STEP):
            self.on_change(ch)
        if now >= self.next_health:
            self.next_health = now + HEALTH_SECONDS
            self.watcher.check_health()
            self.update_claim_prefixes()
        self.settle_due()
        self.flush()
        self.rescan_step(now)
        self.flush()

    def busy(self) -> bool:
        return bool((self.watcher and self.watcher.pending()) or self.rescan is not None or self.rescan_pending or self.upserts or self.gone or self.gone_dirs)

    def idle_timeout(self) -> float:
        if self.busy():
            return 0.0
        t = 0.25
        nd = self.tracker.next_due_in()
        if nd is not None:
            t = min(t, nd + 0.01)
        return t

    def reload(self, cfg: WatchConfig) -> None:
        """Apply a new ``watch`` section: roots added are scanned, roots removed forgotten."""
        if self.watcher is not None:
            added, removed = self.watcher.update(cfg.roots)
            for p in removed:
                self.tracker.forget_under(p.rstrip(os.sep) + os.sep)
                self.rescan_pending.pop(p, None)
                self.rescan_again.pop(p, None)
                self.last_rescan.pop(p, None)
                if self.rescan_root == p:
                    self.rescan = self.rescan_root = None
            for p in added:
                self.request_rescan(p, "config")
            self.update_claim_prefixes()
        self.tracker.set_window(cfg.stability_window)
        self.cfg = cfg

    # -- watcher changes --------------------------------------------------------------------------

    def on_change(self, ch: Change) -> None:
        assert self.watcher is not None and self.store is not None
        if ch.kind == "rescan":
            kind = {"overflow": "inotify_overflow", "polling_fallback": "watch_fallback"}.get(ch.reason or "", "watch_" + (ch.reason or "rescan"))
            now = time.monotonic()
            key = (kind, ch.root)
            if now - self.last_notice.get(key, -1e9) >= NOTICE_SECONDS:  # a burst overflows again and again
                self.last_notice[key] = now
                log.warning("%s: %s; rescanning", ch.root, ch.detail or ch.reason)
                self.store.event(kind, {"root": ch.root, "reason": ch.reason, "detail": ch.detail})
            self.request_rescan(ch.root, ch.reason or "rescan")
            return
        rw = self.watcher.roots.get(ch.root)
        if rw is None:
            return
        if ch.kind == "changed":
            self.saw(rw, ch.path)
        elif ch.kind == "deleted":
            self.tracker.forget(ch.path)
            self.gone[ch.path] = rw.path
        elif ch.kind == "moved" and ch.dest is not None:
            self.moved(rw, ch.path, ch.dest)
        elif ch.kind == "dir_deleted":
            # Only a folder that is really gone takes its files with it. A root that "vanishes"
            # (a share unmounted, a polling snapshot that sees the root's inode change) is
            # rescanned instead: the rescan marks files gone only when they are provably gone.
            if ch.path.rstrip(os.sep) == rw.path.rstrip(os.sep) or not _vanished(ch.path):
                self.request_rescan(rw.path, "folder_replaced")
                return
            prefix = ch.path.rstrip(os.sep) + os.sep
            self.tracker.forget_under(prefix)
            self.gone_dirs[prefix] = rw.path
        elif ch.kind == "dir_moved" and ch.dest is not None:
            # The files below arrive as their own "moved" changes (watchdog generates them);
            # anything still settling under the old name is looked at again under the new one.
            prefix = ch.path.rstrip(os.sep) + os.sep
            self.tracker.forget_under(prefix)

    def saw(self, rw: RootWatch, path: str) -> None:
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
            self.request_rescan(rw.path, "tracker_full")

    def moved(self, rw: RootWatch, src: str, dest: str) -> None:
        assert self.store is not None
        self.tracker.forget(src)
        src_ok = filtered(rw, src)
        if not filtered(rw, dest):
            if src_ok:
                self.gone[src] = rw.path
            return
        st = stat_path(dest, rw.path)
        if src_ok and st is not None and not st.reason and src not in self.gone and self.store.move(src, dest, rw.path):
            self.queue.follow_move(src, dest)
            # The row follows the file. Looking at it once more costs a stat and an indexed
            # look-up after the window: an unchanged file stays as it is (not read again).
            self.saw(rw, dest)
            return
        if src_ok:
            self.gone[src] = rw.path
        self.saw(rw, dest)

    def settle_due(self) -> None:
        for path, root in self.tracker.due(MAX_DUE_PER_STEP):
            st = stat_path(path, root)
            if st is not None and st.reason:
                self.tracker.forget(path)
                self.upserts.append(st)
                continue
            verdict = self.tracker.settle(path, None if st is None else _signature(st))
            if verdict == "stable" and st is not None:  # "stable" implies a fresh stat
                self.upserts.append(st)
            elif verdict == "vanished":
                self.gone[path] = root

    def flush(self) -> None:
        assert self.store is not None
        if self.upserts:
            batch, self.upserts = self.upserts, []
            for i in range(0, len(batch), UPSERT_CHUNK):
                c = self.store.upsert_files(batch[i : i + UPSERT_CHUNK])
                if c.new or c.changed or c.revived:
                    self.queue.hint = True
        if self.gone:
            gone, self.gone = self.gone, {}
            by_root: dict[str, list[str]] = {}
            for p, root in gone.items():
                by_root.setdefault(root, []).append(p)
            for root, paths in by_root.items():
                if not self.intact(root):
                    continue
                for i in range(0, len(paths), UPSERT_CHUNK):
                    self.store.mark_gone(paths[i : i + UPSERT_CHUNK])
        if self.gone_dirs:
            dirs, self.gone_dirs = self.gone_dirs, {}
            for prefix, root in dirs.items():
                if self.intact(root):
                    self.store.mark_gone_under(prefix)

    def intact(self, root: str) -> bool:
        ok = self.watcher is None or self.watcher.root_intact(root)
        if not ok and root not in self.not_intact_warned:
            self.not_intact_warned.add(root)
            log.error(
                "%s is not reachable or no longer the folder watched at start (a share unmounted?); deletions there are not recorded until it is back",
                root,
            )
        elif ok:
            self.not_intact_warned.discard(root)
        return ok

    def update_claim_prefixes(self) -> None:
        """Claim only under the roots that are reachable (a share unmounted is not claimed from)."""
        if self.watcher is None or not self.watcher.roots:
            self.queue.claim_prefixes = None
            return
        self.queue.claim_prefixes = [p.rstrip(os.sep) + os.sep for p in self.watcher.roots if self.intact(p)]

    # -- rescans ----------------------------------------------------------------------------------

    def request_rescan(self, root: str, reason: str) -> None:
        if self.rescan_root == root:
            self.rescan_again[root] = reason
        elif root not in self.rescan_pending:
            self.rescan_pending[root] = reason

    def rescan_all(self, reason: str) -> None:
        if self.watcher is not None:
            for root in self.watcher.roots:
                self.request_rescan(root, reason)

    def rescan_step(self, now: float) -> None:
        if self.watcher is None:
            return
        if self.rescan is None:
            for root in self.watcher.roots:
                if now - self.last_rescan.get(root, now) >= self.cfg.rescan_interval and root not in self.rescan_pending:
                    self.rescan_pending[root] = "periodic"
            while self.rescan_pending:
                root, reason = self.rescan_pending.popitem(last=False)
                rw = self.watcher.roots.get(root)
                if rw is not None:
                    self.rescan_root = root
                    self.rescan = self.rescan_iter(rw, reason)
                    break
        if self.rescan is None:
            return
        try:
            next(self.rescan)
        except StopIteration:
            done = self.rescan_root
            self.rescan = self.rescan_root = None
            if done in self.rescan_again:
                self.request_rescan(done, self.rescan_again.pop(done))

    def rescan_iter(self, rw: RootWatch, reason: str) -> Iterator[None]:
        """Walk a root (stat only), upsert what is settled, track what is still being written,
        then mark gone the rows whose files disappeared. One chunk per step of the loop."""
        assert self.store is not None
        store, root = self.store, rw.path
        t0 = time.monotonic()
        self.last_rescan[root] = t0
        counts = UpsertCounts()
        seen: set[int] = set()  # hashes of the paths seen (a few bytes per file, not the paths)
        tracked = gone = 0
        window = self.cfg.stability_window
        intact = self.intact(root)
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
            while self.tracker.full and not self.signals.stop_requested:
                yield  # back-pressure: let the tracker drain first
        if batch:
            _add(counts, store.upsert_files(batch))
        if counts.new or counts.changed or counts.revived:
            self.queue.hint = True
        yield
        if intact and self.intact(root):
            prefix, after = root.rstrip(os.sep) + os.sep, 0
            while True:
                rows = store.live_paths(prefix, after, 1000)
                if not rows:
                    break
                after = rows[-1][0]
                # a folder's row (it could not be listed) ends when the folder is listed again
                missing = [p for _, p in rows if hash(p) not in seen and p not in self.tracker and (p.endswith(os.sep) or _vanished(p))]
                if missing:
                    gone += store.mark_gone(missing)
                yield
        secs = time.monotonic() - t0
        detail = {
            "root": root,
            "reason": reason,
            "new": counts.new,
            "changed": counts.changed,
            "revived": counts.revived,
            "unchanged": counts.unchanged,
            "settling": tracked,
            "gone": gone,
            "seconds": round(secs, 2),
        }
        store.event("rescan", detail)
        lvl = logging.INFO if (counts.new or counts.changed or counts.revived or gone or reason != "periodic") else logging.DEBUG
        log.log(
            lvl,
            "rescan of %s (%s): %d new, %d changed, %d back, %d unchanged, %d settling, %d gone in %.1f s",
            root,
            reason,
            counts.new,
            counts.changed,
            counts.revived,
            counts.unchanged,
            tracked,
            gone,
            secs,
        )
