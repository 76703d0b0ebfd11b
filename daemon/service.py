"""The long-running service: ``forensic-gender run`` and ``forensic-gender status``.

One process, one main loop, and that loop is the only writer to the database. The
:class:`Service` here is that loop and coordinates parts that each own one job:

- :mod:`daemon.service_discovery`: watchers (:mod:`daemon.watch`) only enqueue hints; the loop
  stats the paths, feeds the stability tracker, and upserts stable files into the ``files``
  queue; a full scan of every root at start-up, after an event-queue overflow, after an observer
  restart, and every ``watch.rescan_interval`` feeds the same upsert and notices deletions;
  renames seen while running move the row (``Store.move``): the file keeps its results and is
  not read again. Renames made while the service was stopped are *not* matched by inode: the
  start-up scan sees a new path (read and hashed once, then linked to the content already
  analysed, so it is not analysed again) and the old path is marked gone;
- :mod:`daemon.service_queue`: files are claimed under a lease (a few more than there are idle
  workers), analysed by the :class:`~daemon.workers.WorkerPool` (crash and hang isolation,
  bounded retries, then quarantine), and the outcomes are recorded by the loop;
- :mod:`daemon.service_lifecycle`: signals are blocked in the main thread and in the worker
  processes (which inherit its mask), and taken by the loop: SIGTERM/SIGINT drain (in-flight
  files finished or released) and exit 0; SIGHUP reloads the configuration (an invalid one is
  rejected, logged with its reasons and recorded, and the running one kept). SQLite: one service
  per database, enforced by ``flock`` on ``<database>.lock`` next to the database (never in an
  evidence folder); PostgreSQL: several hosts share the queue, each under its own
  ``service.host_id``;
- :mod:`daemon.service_outage`: a database outage is retried with a back-off, the outcomes kept;
- :mod:`daemon.service_health`: the heartbeat, the rate, and the ``status`` command's document;
- systemd: ``READY=1`` once the database is migrated and every worker has loaded its models,
  ``STATUS=`` with the backlog and rate, ``WATCHDOG=1`` from the main loop only, ``STOPPING=1``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from daemon import __version__
from daemon import config as config_mod
from daemon.cliargs import load_config
from daemon.config import Config, ConfigError, RootConfig
from daemon.notify import Notifier
from daemon.scan import default_workers
from daemon.service_discovery import Discovery
from daemon.service_health import HEARTBEAT_SECONDS, Health, Snapshot, print_status, provider_text, safe_url, status_document
from daemon.service_lifecycle import SIGNALS, InstanceLock, ServiceError, Signals, lock_holder, sqlite_path
from daemon.service_outage import Outage
from daemon.service_queue import WorkQueue
from daemon.store.writer import Store
from daemon.watch import Watcher

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from daemon.workers import WorkerPool

__all__ = [
    "HEARTBEAT_SECONDS",
    "SIGNALS",
    "InstanceLock",
    "Service",
    "ServiceError",
    "build_config",
    "cmd_run",
    "cmd_status",
    "lock_holder",
    "print_status",
    "register_cli",
    "sqlite_path",
    "status_document",
]

log = logging.getLogger(__name__)


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
                        "/var/lib/forensic-gender/forensic-gender.db"
                    )
                    break
    if problems:
        raise ConfigError(problems, config_path or "command line")
    return cfg


def _root_prefixes(cfg: Config) -> list[str]:
    return [r.path.rstrip(os.sep) + os.sep for r in cfg.watch.roots]


# --------------------------------------------------------------------------------------------
# The service


class Service:
    """Use once: ``Service(cfg, reload, notifier).run()`` from the main thread; returns the exit
    status (0 after a clean drain)."""

    def __init__(self, cfg: Config, reload: Callable[[], Config], notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self._reload_fn = reload
        self.notifier = notifier or Notifier(environ={})
        self.store: Store | None = None
        self.engine: Engine | None = None
        self.pool: WorkerPool | None = None
        self.lock: InstanceLock | None = None
        self.bundle_key = ""
        self.pool_restart = False
        self._pool_cfg: Config = cfg  # the settings the running workers were started with
        self.signals = Signals()
        self.health = Health(self.notifier, self._snapshot)
        self.queue = WorkQueue(self.health)
        self.discovery = Discovery(cfg.watch, self.signals, self.queue)
        self.outage = Outage(self.notifier, self.signals, self.queue, self.discovery, self.health)

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
        previous = {sig: signal.signal(sig, self.signals.on_signal) for sig in SIGNALS}
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

    def _start(self) -> None:
        from daemon.store.engine import open_store_engine

        cfg = self.cfg
        dbp = sqlite_path(cfg.database)
        if dbp is not None:
            self.lock = InstanceLock(dbp)
            self.lock.acquire()
        self.engine = open_store_engine(cfg.database)
        store = self.store = self.queue.store = self.discovery.store = Store(self.engine, cfg.host_id, cfg.identity)
        n = store.recover_leases()
        if n:
            log.warning("%d file(s) were in flight when the service last stopped without releasing them; queued again", n)
        roles = set(cfg.service.roles)
        if "analyze" in roles:
            self.pool = self._new_pool(cfg)
            self.bundle_key = self.pool.bundle_key
            store.ensure_bundle(self.pool.bundle_key, self.pool.bundle)
            store.requeue_for_bundle(self.pool.bundle_key, _root_prefixes(cfg) or None)
        if "watch" in roles:
            if not cfg.watch.roots:
                log.warning("no folder to watch: give --watch DIR or watch.roots in the configuration; only queued files are analysed")
            self.discovery.watcher = Watcher(cfg.watch.roots)
            self.discovery.watcher.start()
            for r in cfg.watch.roots:
                self.discovery.request_rescan(r.path, "startup")
            self.queue.claim_prefixes = _root_prefixes(cfg) or None
        store.event("service_started", self._describe())
        self.health.heartbeat(store)
        self.health.backlog = store.pending()
        self.notifier.ready(self.health.status_text())
        log.info(
            "forensic-gender %s ready: database %s, %s, %d file(s) waiting",
            __version__,
            safe_url(cfg.database),
            f"{self.pool.n} worker(s) on {provider_text(self.pool.bundle)}" if self.pool else "no analysis (roles: watch)",
            self.health.backlog,
        )

    def _new_pool(self, cfg: Config) -> WorkerPool:
        from daemon.workers import WorkerPool

        pool = WorkerPool(default_workers(cfg.service.workers), cfg.pipeline, db_url=cfg.database, file_timeout=cfg.service.file_timeout)
        try:
            pool.start()
        except BaseException:
            pool.close()
            raise
        return pool

    def _describe(self) -> dict[str, Any]:
        watcher = self.discovery.watcher
        return {
            "pid": os.getpid(),
            "version": __version__,
            "roots": [r.path for r in self.cfg.watch.roots],
            "modes": watcher.modes() if watcher else {},
            "workers": self.pool.n if self.pool else 0,
            "bundle": self.bundle_key,
            "roles": list(self.cfg.service.roles),
        }

    def _snapshot(self) -> Snapshot:
        watcher = self.discovery.watcher
        return Snapshot(
            watcher.modes() if watcher else {},
            self.pool.n if self.pool else None,
            self.discovery.rescan_root,
            provider_text(self.pool.bundle) if self.pool else None,
        )

    # -- the loop ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # cheap; guards against libraries unblocking
            self.signals.take(0)
            if self.signals.stop_requested:
                return
            if self.signals.reload_requested:
                self.signals.reload_requested = False
                self.outage.guarded(self._reload, self.store)
            self.outage.guarded(self._step, self.store)
            self.notifier.watchdog()

    def _step(self) -> None:
        assert self.store is not None
        now = time.monotonic()
        self.discovery.step(now)
        if self.pool is not None:
            self._pool_step()
        else:
            self.signals.sleep(self.discovery.idle_timeout())
        self.health.periodic(now, self.store)

    # -- analysis ---------------------------------------------------------------------------------

    def _pool_step(self) -> None:
        assert self.pool is not None
        queue, svc = self.queue, self.cfg.service
        now = time.monotonic()
        self._record_kept()  # results taken from the workers while the database was away
        if self.pool_restart and not queue.inflight:
            self._restart_pool()
        pool = self.pool
        if not self.pool_restart and not self.signals.stop_requested and queue.claim_prefixes != []:
            queue.claim(pool, now, svc.lease_seconds)
            self._submit()
        timeout = 0.0 if self.discovery.busy() else self.discovery.idle_timeout()
        if queue.inflight:
            outcomes = pool.poll(timeout)
        else:
            outcomes = []
            self.signals.sleep(timeout)
        queue.unrecorded.extend(outcomes)  # kept until written: a database error must not lose them
        self._record_kept()
        queue.renew(now, svc.lease_seconds)
        self._submit()

    def _submit(self) -> None:
        assert self.pool is not None
        if self.pool_restart or self.signals.stop_requested:
            return
        self.queue.submit(self.pool)

    def _record_kept(self) -> None:
        assert self.pool is not None
        self.queue.record_kept(self.pool.bundle_key, self.cfg.service.max_attempts)

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
        if old is not None:
            old.close()
        self.bundle_key = pool.bundle_key
        self.store.ensure_bundle(pool.bundle_key, pool.bundle)
        self.store.requeue_for_bundle(pool.bundle_key, self.queue.claim_prefixes or None)
        self.queue.hint = True

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
            self.notifier.ready(self.health.status_text())
            return
        kept = []
        if new.database != old.database:
            kept.append(f"database stays {safe_url(old.database)} until a restart")
            new = replace(new, database=old.database)
        if new.service.roles != old.service.roles or new.host_id != old.host_id:
            kept.append("service.roles and service.host_id apply after a restart")
            new = replace(new, service=replace(new.service, roles=old.service.roles, host_id=old.service.host_id))
        for k in kept:
            log.warning("reload: %s", k)
        self.discovery.reload(new.watch)
        if self.pool is not None and (
            new.pipeline != old.pipeline or new.service.workers != old.service.workers or new.service.file_timeout != old.service.file_timeout
        ):
            self._pool_cfg = old
            self.pool_restart = True
        logging.getLogger().setLevel(getattr(logging, new.service.log_level.upper(), logging.INFO))
        self.cfg = new
        self.queue.hint = True
        self.store.event("config_loaded", {**self._describe(), "reload": True, "kept": kept})
        log.info("configuration reloaded: %d root(s): %s", len(new.watch.roots), ", ".join(r.path for r in new.watch.roots) or "none")
        self.notifier.ready(self.health.status_text())

    # -- stopping ---------------------------------------------------------------------------------

    def _drain(self) -> None:
        assert self.store is not None
        queue = self.queue
        n = len(queue.inflight)
        self.notifier.stopping(f"stopping: finishing {n} file(s) in flight")
        log.info("stopping: %d file(s) in flight, %d claimed ahead released", n, len(queue.prefetch))
        if self.discovery.watcher is not None:
            self.discovery.watcher.stop()
        if self.outage.down_since is not None:  # stopped while backing off: the outage may be over
            try:
                self.outage.end(self.store)
            except Exception as err:  # noqa: BLE001 - still down: the results kept are handled below
                log.warning("database still unreachable while stopping (%s)", err)
        if self.pool is not None:
            self._record_kept()
        queue.release_prefetch()
        deadline = time.monotonic() + min(self.cfg.service.file_timeout + 5, 150)
        while self.pool is not None and queue.inflight and not self.signals.fast_stop and time.monotonic() < deadline:
            for outcome in self.pool.poll(0.2):
                queue.record(outcome, self.pool.bundle_key, self.cfg.service.max_attempts)
            self.signals.take(0)
            self.notifier.watchdog()
        queue.release_inflight()
        try:
            self.discovery.flush()
        except Exception as err:  # noqa: BLE001 - whatever is not flushed is found by the next start-up scan
            log.warning("could not record the last changes (%s); the next start-up scan finds them", err)
        self.store.event("service_stopped", {"pid": os.getpid(), "seconds": round(time.time() - self.health.started_at, 1)})
        self.store.clear_heartbeat()
        log.info("stopped")

    def _cleanup(self) -> None:
        if self.discovery.watcher is not None:
            with contextlib.suppress(Exception):
                self.discovery.watcher.stop()
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.engine is not None:
            self.engine.dispose()
        if self.lock is not None:
            self.lock.release()
        self.notifier.close()


# --------------------------------------------------------------------------------------------
# CLI


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.logs import setup_logging

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
    cfg = load_config(args, check_paths=False)
    doc = status_document(cfg)
    if args.format == "json":
        print(json.dumps(doc, indent=2, sort_keys=False))
    else:
        print_status(doc)
    return 0


def register_cli(subparsers: Any) -> None:
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
