"""One-shot scan: discover every file under some paths, analyse what is new, and stop.

It uses the same machinery as the service: discovery upserts into the ``files`` queue, files are
claimed under a lease, analysed by the worker pool, and recorded by this process (the single
writer). A second scan of an unchanged tree analyses nothing; a copy of an image elsewhere is a
new file row linked to the same content and analysis.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from daemon.config import Config
from daemon.discovery import walk
from daemon.store.engine import open_store_engine
from daemon.store.writer import FileStat, Store, UpsertCounts
from daemon.workers import Analysed, Crashed, Failed, Linked, Outcome, Task, WorkerPool

log = logging.getLogger(__name__)


@dataclass
class ScanSummary:
    """What a scan did. ``failures`` counts the files of this run that failed, by reason (at
    discovery or in analysis); ``states``/``reasons`` are what the database holds afterwards for
    every live file under the scanned paths (so the summary never disagrees with it);
    ``resolved`` lists the paths given as symbolic links and what they were resolved to."""

    discovered: UpsertCounts = field(default_factory=UpsertCounts)
    analysed: int = 0
    linked: int = 0
    faces: int = 0
    genders: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    states: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    resolved: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    bundle_key: str = ""

    @property
    def processed(self) -> int:
        return self.analysed + self.linked + sum(self.failures.values())

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def default_workers(configured: int) -> int:
    return configured if configured > 0 else max(1, len(os.sched_getaffinity(0)))


def record(store: Store, outcome: Outcome, bundle_key: str, max_attempts: int, summary: ScanSummary | None = None) -> None:
    """Write one worker outcome (the single writer's job)."""
    if isinstance(outcome, Analysed):
        if store.record_analysis(outcome.file_id, outcome.result, bundle_key) and summary is not None:
            summary.analysed += 1
            summary.faces += len(outcome.result.faces)
            summary.genders.update(f.gender for f in outcome.result.faces)
    elif isinstance(outcome, Linked):
        if store.record_link(outcome.file_id, outcome.sha256, outcome.md5, outcome.size, outcome.mtime_ns) and summary is not None:
            summary.linked += 1
    elif isinstance(outcome, Failed):
        if store.record_failure(outcome.file_id, outcome.reason, outcome.error, sha256=outcome.sha256, md5=outcome.md5, size=outcome.size) and summary is not None:
            summary.failures[outcome.reason] += 1
    elif isinstance(outcome, Crashed):
        state = store.record_failure(outcome.file_id, outcome.reason, outcome.error, max_attempts=max_attempts)
        if state == "quarantined" and summary is not None:
            summary.failures[outcome.reason] += 1


def _noting_folders(stats: Iterable[FileStat], folders: set[str]) -> Iterator[FileStat]:
    """Pass discovery through, noting the rows of folders that could not be listed."""
    for st in stats:
        if st.path.endswith(os.sep):
            folders.add(st.path)
        yield st


def scan(paths: Sequence[str], cfg: Config, *, workers: int = 0, progress: Callable[[int, int], None] | None = None) -> ScanSummary:
    """Analyse every image under ``paths`` into ``cfg.database``. ``progress(done, total)``."""
    t0 = time.perf_counter()
    summary = ScanSummary()
    engine = open_store_engine(cfg.database)
    store = Store(engine, cfg.host_id, cfg.identity)
    prefixes: list[str] = []
    for p in paths:
        ap = os.path.abspath(p)
        if os.path.islink(ap) and os.path.isdir(ap):  # a root given as a link: resolved once, and said so
            real = os.path.realpath(ap)
            log.warning("%s is a symbolic link to the folder %s: scanning %s (paths are recorded there)", ap, real, real)
            summary.resolved.append((ap, real))
            ap = real
        prefix = ap + os.sep if os.path.isdir(ap) else ap
        prefixes.append(prefix)
        seen_folders: set[str] = set()
        c = store.upsert_files(_noting_folders(walk(ap), seen_folders))
        summary.failures.update(c.failed)
        store.resolve_folders(prefix, seen_folders)
        for k in ("new", "changed", "unchanged", "revived"):
            setattr(summary.discovered, k, getattr(summary.discovered, k) + getattr(c, k))
    pool = WorkerPool(default_workers(workers or cfg.service.workers), cfg.pipeline, db_url=cfg.database,
                      file_timeout=cfg.service.file_timeout)
    pool.start()
    try:
        summary.bundle_key = pool.bundle_key
        store.ensure_bundle(pool.bundle_key, pool.bundle)
        store.requeue_for_bundle(pool.bundle_key, prefixes)
        total, done = store.pending(prefixes), 0
        if progress:
            progress(0, total)
        lease = cfg.service.lease_seconds
        last_renew = time.monotonic()
        exhausted = False
        while True:
            if pool.free() and not exhausted:
                claims = store.claim(pool.free(), lease, prefixes=prefixes)
                exhausted = not claims
                for c in claims:
                    pool.submit(Task(c.id, c.path, c.root, c.inode))
            if not pool.busy():
                if exhausted:
                    break
                continue
            for outcome in pool.poll(0.5):
                record(store, outcome, pool.bundle_key, cfg.service.max_attempts, summary)
                exhausted = False  # a crash may have re-queued a file
                done += 1
                if progress:
                    progress(done, max(total, done))
            if time.monotonic() - last_renew > lease / 3:
                store.renew([t.file_id for t in pool.busy()], lease)
                last_renew = time.monotonic()
        tally = store.tally(prefixes)
        summary.states, summary.reasons = tally["states"], tally["reasons"]
    finally:
        store.release([t.file_id for t in pool.busy()])
        pool.close()
        summary.seconds = time.perf_counter() - t0
        store.event("scan", {"paths": list(paths), "analysed": summary.analysed, "linked": summary.linked,
                             "failed": dict(summary.failures), "seconds": round(summary.seconds, 2)})
        engine.dispose()
    return summary
