"""How the service is doing: the rate of finished files, the heartbeat row other hosts and
``forensic-gender status`` read, systemd's ``STATUS=`` line and the minute's log line; and the
``status`` command's document (read from the database, whether or not a service runs)."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from daemon import __version__
from daemon.config import Config
from daemon.notify import Notifier
from daemon.paths import show, to_db
from daemon.service_lifecycle import lock_holder, sqlite_path
from daemon.store.writer import Store

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 15.0
STATUS_SECONDS = 5.0
LOG_SECONDS = 60.0


class Rate:
    """Files finished per second over the last minute (per-second buckets)."""

    def __init__(self, span: float = 60.0) -> None:
        self.span = span
        self.buckets: deque[list[int]] = deque()

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


@dataclass(frozen=True)
class Snapshot:
    """What the health reports take from the rest of the service at that moment."""

    modes: dict[str, str]  # watched root -> "native" or "polling"
    workers: int | None  # None: this host analyses nothing
    rescanning: str | None  # the root being rescanned
    providers: str | None = None  # the workers' execution providers (provider_text); None: no analysis


class Health:
    """The rate, the backlog and the periodic reports (``STATUS=``, heartbeat, log line) of one
    service; ``snapshot`` tells it about the watcher, the workers and the rescan."""

    def __init__(self, notifier: Notifier, snapshot: Callable[[], Snapshot]) -> None:
        self.notifier = notifier
        self.snapshot = snapshot
        self.rate = Rate()
        self.finished = 0  # since the last log line
        self.started_at = time.time()
        self.backlog = 0
        self.next_status = self.next_heartbeat = self.next_log = 0.0

    def finished_one(self) -> None:
        self.rate.add()
        self.finished += 1

    def periodic(self, now: float, store: Store) -> None:
        if now >= self.next_status:
            self.next_status = now + STATUS_SECONDS
            self.backlog = store.pending()
            self.notifier.status(self.status_text())
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + HEARTBEAT_SECONDS
            self.heartbeat(store)
        if now >= self.next_log:
            if self.next_log and (self.finished or self.backlog):
                log.info("%s", self.status_text())
            self.next_log = now + LOG_SECONDS
            self.finished = 0

    def status_text(self) -> str:
        snap = self.snapshot()
        polling = sum(1 for m in snap.modes.values() if m == "polling")
        parts = [f"backlog {self.backlog} file(s)", f"{self.rate.per_second():.1f} files/s over the last minute"]
        if snap.workers is not None:
            parts.append(f"{snap.workers} worker(s)")
        parts.append(f"{len(snap.modes)} root(s) watched" + (f" ({polling} polling)" if polling else ""))
        if snap.rescanning:
            parts.append(f"rescanning {snap.rescanning}")
        return "; ".join(parts)

    def heartbeat(self, store: Store) -> None:
        snap = self.snapshot()
        store.heartbeat(
            {
                "pid": os.getpid(),
                "version": __version__,
                "started": self.started_at,
                "backlog": self.backlog,
                "rate_per_s": round(self.rate.per_second(), 3),
                "workers": snap.workers or 0,
                "roots": snap.modes,
                "providers": snap.providers,
            }
        )


def provider_text(bundle: dict[str, Any]) -> str:
    """The execution providers a model bundle ran on, for people: ``CPU``, ``CUDA (then CPU)``
    (a bundle names them only when they are not the CPU alone)."""
    names = [str(p).removesuffix("ExecutionProvider") for p in bundle.get("providers") or ["CPUExecutionProvider"]]
    return names[0] + (f" (then {', '.join(names[1:])})" if names[1:] else "")


def safe_url(url: str) -> str:
    """The database URL without its password, for logs and reports."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url


# --------------------------------------------------------------------------------------------
# status


def status_document(cfg: Config) -> dict[str, Any]:
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
        hosts.append(
            {
                "host": hb.get("host"),
                "pid": hb.get("pid"),
                "version": hb.get("version"),
                "last_heartbeat_s": age,
                "alive": age is not None and age < 4 * HEARTBEAT_SECONDS,
                "backlog": hb.get("backlog"),
                "rate_per_s": hb.get("rate_per_s"),
                "roots": hb.get("roots"),
                "providers": hb.get("providers"),
            }
        )
    dbp = sqlite_path(cfg.database)
    pid = lock_holder(dbp + ".lock") if dbp else None
    running = pid is not None if dbp else any(h["alive"] for h in hosts)
    configured = {to_db(r.path) for r in cfg.watch.roots}
    roots = []
    for root in sorted(set(s["by_root"]) | configured):
        st = s["by_root"].get(root, {})
        roots.append(
            {
                "root": root,
                "configured": root in configured,
                "files": {"total": sum(st.values()), **st},
                "backlog": st.get("queued", 0) + st.get("working", 0),
            }
        )
    failures = {reason: sum(v.values()) for reason, v in sorted(s["failures"].items(), key=lambda kv: -sum(kv[1].values()))}
    quarantined = {reason: v["quarantined"] for reason, v in s["failures"].items() if v.get("quarantined")}
    return {
        "database": safe_url(cfg.database),
        "service": {"running": running, "pid": pid, "hosts": hosts},
        "files": files,
        "backlog": totals.get("queued", 0) + totals.get("working", 0),
        "failures": failures,
        "quarantined": quarantined,
        "rate": {
            "last_minute": s["finished_last_minute"],
            "last_5_minutes": s["finished_last_window"],
            "per_minute": round(s["finished_last_window"] / (s["window"] / 60.0), 2),
        },
        "roots": roots,
        "configured_roots": sorted(configured),
    }


STATES = ("total", "done", "queued", "working", "failed", "quarantined", "gone")


def print_status(doc: dict[str, Any], out: TextIO = sys.stdout) -> None:
    w = out.write
    svc = doc["service"]
    if svc["running"]:
        state = "running" + (f" (pid {svc['pid']})" if svc.get("pid") else "")
    else:
        state = "not running"
    w(f"database  {doc['database']}\n")
    w(f"service   {state}\n")
    for h in svc["hosts"]:
        w(
            f"          host {h['host']}: pid {h['pid']}, last heartbeat {h['last_heartbeat_s']} s ago"
            f"{'' if h['alive'] else ' (stale)'}, backlog {h['backlog']}, {h['rate_per_s']} files/s\n"
        )
        if h.get("providers"):
            w(f"            execution provider: {h['providers']}\n")
    f = doc["files"]
    w("files     " + "  ".join(f"{k} {f.get(k, 0)}" for k in STATES) + "\n")
    w(f"backlog   {doc['backlog']}\n")
    r = doc["rate"]
    w(f"rate      {r['last_minute']} file(s) finished in the last minute, {r['last_5_minutes']} in the last 5 minutes ({r['per_minute']}/min)\n")
    if doc["failures"]:
        failures = (f"{k} {v}" + (f" ({doc['quarantined'][k]} quarantined)" if k in doc["quarantined"] else "") for k, v in doc["failures"].items())
        w("failures  " + ", ".join(failures) + "\n")
    else:
        w("failures  none\n")
    if doc["roots"]:
        w("roots\n")
        for root in doc["roots"]:
            fr = root["files"]
            w(f"  {show(root['root'])}{' (not in this configuration)' if doc['configured_roots'] and not root['configured'] else ''}\n")
            w("    " + "  ".join(f"{k} {fr.get(k, 0)}" for k in STATES) + f"  backlog {root['backlog']}\n")
