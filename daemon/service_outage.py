"""Errors in the service's loop. A database error (the server restarting, the network away) is
retried with a back-off while the workers' outcomes are kept, and the outage is recorded once a
write succeeds again; any other error is logged, and the service gives up (exit 1, systemd
restarts it) only when such errors repeat without a single good step in between."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from daemon.notify import Notifier
from daemon.service_discovery import Discovery
from daemon.service_health import Health
from daemon.service_lifecycle import Signals
from daemon.service_queue import WorkQueue
from daemon.store.writer import Store

log = logging.getLogger(__name__)

MAX_INTERNAL_FAILURES = 20  # in a row: the service gives up


class Outage:
    """The current database outage (``down_since``) and the failures in a row."""

    def __init__(self, notifier: Notifier, signals: Signals, queue: WorkQueue, discovery: Discovery, health: Health) -> None:
        self.notifier = notifier
        self.signals = signals
        self.queue = queue
        self.discovery = discovery
        self.health = health
        self.db_failures = 0
        self.down_since: float | None = None  # first failed database call of the current outage
        self.internal_failures = 0

    def guarded(self, fn: Callable[[], None], store: Store | None) -> None:
        """Run one step; database errors are retried with a back-off (the database may be
        restarting), other errors are logged, and re-raised only when they repeat without a
        single good step in between."""
        from sqlalchemy.exc import DBAPIError

        try:
            fn()
            self.internal_failures = 0
            if self.down_since is not None:
                # a step may touch no table (nothing to do): the outage is over only when a write
                # succeeds, and recording the outage is that write (it raises while still down)
                self.end(store)
            self.db_failures = 0
        except DBAPIError as err:
            self.db_failures += 1
            if self.down_since is None:
                self.down_since = time.time()
            delay = min(10.0, 0.5 * 2 ** min(self.db_failures, 6))
            why = (str(getattr(err, "orig", err)).strip().splitlines() or [type(err).__name__])[0][:200]
            down = time.time() - self.down_since
            log.error("database error (%s); unreachable for %.0f s, retrying in %.0f s", why, down, delay)
            self.notifier.status(
                f"database unreachable for {down:.0f} s ({why}); retrying in {delay:.0f} s; "
                f"{len(self.queue.inflight)} file(s) in flight, {len(self.queue.unrecorded)} result(s) waiting to be written"
            )
            self.discovery.rescan_all("database_error")  # changes taken from the watcher may not have been recorded
            self.signals.sleep(delay)
        except Exception:
            self.internal_failures += 1
            log.exception("internal error in the service loop (%d in a row)", self.internal_failures)
            if self.internal_failures >= MAX_INTERNAL_FAILURES:
                raise
            self.signals.sleep(min(5.0, 0.2 * self.internal_failures))

    def end(self, store: Store | None) -> None:
        """Record the database outage that ``down_since`` marks, and end it (raises a
        DBAPIError, leaving it marked, while the database is still unreachable)."""
        down = time.time() - (self.down_since or time.time())
        if store is not None:
            store.event("database_outage", {"seconds": round(down, 1)})
        self.down_since = None
        log.warning("database reachable again after %.0f s; resuming (%d result(s) kept meanwhile)", down, len(self.queue.unrecorded))
        self.notifier.status(self.health.status_text())
