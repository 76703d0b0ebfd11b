"""The service's share of the ``files`` queue: files claimed under a lease (a few more than there
are idle workers), handed to the :class:`~daemon.workers.WorkerPool`, their leases renewed while
they wait or run, and the workers' outcomes recorded. Outcomes are kept until written, so that a
database outage loses none of them."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import replace

from daemon.scan import record
from daemon.service_health import Health
from daemon.states import Reason
from daemon.store.writer import Claim, Store
from daemon.workers import Crashed, Failed, Outcome, Task, WorkerPool

log = logging.getLogger(__name__)

CLAIM_POLL_SECONDS = 1.0
PREFETCH_PER_WORKER = 4


class WorkQueue:
    """Claimed files (``prefetch``: waiting for a worker; ``inflight``: being analysed) and the
    outcomes not yet written (``unrecorded``). ``store`` is set once the database is open."""

    def __init__(self, health: Health) -> None:
        self.health = health
        self.store: Store | None = None
        self.prefetch: deque[Claim] = deque()
        self.inflight: dict[int, Claim] = {}
        self.superseded: set[int] = set()  # in flight, but re-queued since: drop the old outcome
        self.moved_inflight: set[int] = set()  # renamed while in flight: a "missing" outcome is retried
        self.hint = True  # the queue may have new work: claim without waiting for the poll interval
        self.next_claim = 0.0
        self.claim_prefixes: list[str] | None = None  # claim only under these roots (None: anywhere)
        self.unrecorded: deque[Outcome] = deque()  # worker outcomes not yet written (the database was away)
        self.next_renew = 0.0

    def claim(self, pool: WorkerPool, now: float, lease_seconds: float) -> None:
        """Claim in batches, a few files ahead per worker: workers never wait on the database,
        and one claim transaction serves several files."""
        assert self.store is not None
        free = pool.free()
        if free and len(self.prefetch) < free + pool.n and (self.hint or now >= self.next_claim):
            want = free + PREFETCH_PER_WORKER * pool.n - len(self.prefetch)
            claims = self.store.claim(want, lease_seconds, prefixes=self.claim_prefixes)
            self.next_claim = now + CLAIM_POLL_SECONDS
            self.hint = len(claims) == want
            known = {c.id for c in self.prefetch}
            for c in claims:
                if c.id in self.inflight:
                    self.superseded.add(c.id)  # changed while being analysed: the old result is stale
                if c.id not in known:
                    self.prefetch.append(c)
                    known.add(c.id)

    def submit(self, pool: WorkerPool) -> None:
        """Hand claimed files to the idle workers."""
        skipped: list[Claim] = []
        while self.prefetch and pool.free():
            c = self.prefetch.popleft()
            if c.id in self.inflight:
                skipped.append(c)  # wait for the stale run of the same file to come back
                continue
            self.inflight[c.id] = c
            pool.submit(Task(c.id, c.path, c.root, c.inode))
        self.prefetch.extendleft(reversed(skipped))

    def renew(self, now: float, lease_seconds: float) -> None:
        """Renew the leases of the files claimed or in flight, every third of a lease."""
        assert self.store is not None
        if (self.inflight or self.prefetch) and now >= self.next_renew:
            self.next_renew = now + lease_seconds / 3
            self.store.renew(list(self.inflight) + [c.id for c in self.prefetch], lease_seconds)

    def follow_move(self, src: str, dest: str) -> None:
        """A file claimed or in flight was renamed from ``src`` to ``dest``."""
        for fid, c in self.inflight.items():
            if c.path == src:
                self.moved_inflight.add(fid)
        for i, c in enumerate(self.prefetch):
            if c.path == src:
                self.prefetch[i] = replace(c, path=dest)

    def release_prefetch(self) -> None:
        """Give back the files claimed ahead (stopping)."""
        assert self.store is not None
        if self.prefetch:
            self.store.release([c.id for c in self.prefetch])
            self.prefetch.clear()

    def release_inflight(self) -> None:
        """Give back the files still being analysed (stopping): taken again at the next start."""
        assert self.store is not None
        if self.inflight:
            log.warning("released %d file(s) still being analysed; they are taken again at the next start", len(self.inflight))
            self.store.release(list(self.inflight))
            self.inflight.clear()

    def record_kept(self, bundle_key: str, max_attempts: int) -> None:
        """Write the outcomes kept so far, oldest first."""
        while self.unrecorded:
            self.record(self.unrecorded[0], bundle_key, max_attempts)  # raises on a database error: the outcome stays
            self.unrecorded.popleft()

    def record(self, outcome: Outcome, bundle_key: str, max_attempts: int) -> None:
        assert self.store is not None
        fid = outcome.file_id
        self.inflight.pop(fid, None)
        if fid in self.superseded:
            self.superseded.discard(fid)
            return
        if fid in self.moved_inflight:
            self.moved_inflight.discard(fid)
            if isinstance(outcome, (Failed, Crashed)):
                self.store.release([fid])  # the file was renamed under the worker: try it again
                self.hint = True
                return
        if (
            isinstance(outcome, Failed)
            and outcome.reason == Reason.INTERNAL_ERROR
            and outcome.error.startswith(("OperationalError", "InterfaceError", "DisconnectionError"))
        ):
            # the worker's "already analysed?" look-up hit a database outage: not the file's fault
            self.store.release([fid])
            self.hint = True
            return
        record(self.store, outcome, bundle_key, max_attempts)
        if isinstance(outcome, Crashed):
            self.hint = True
        self.health.finished_one()
