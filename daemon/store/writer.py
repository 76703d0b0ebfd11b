"""All writes to the results database. One :class:`Store` per process that writes.

The ``files`` table is the work queue: discovery upserts rows (idempotent; events, start-up scans
and rescans all go through :meth:`Store.upsert_files`), workers' results come back to the one
writer, which records them only while this host still holds the file's lease.

Paths cross this API as OS paths (``str``, ``surrogateescape`` for names that are not UTF-8, as
``os`` returns them) and are stored in their recorded form (:func:`daemon.paths.to_db`), so any
name the file system can hold is recorded losslessly and cannot fail a batch.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, and_, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from daemon.config import IdentityConfig
from daemon.paths import from_db, to_db
from daemon.states import FileState, Reason
from daemon.store import capture, videos
from daemon.store import schema as s
from daemon.store.nearcopies import store_hash
from daemon.store.persons import Placer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileStat:
    """What discovery saw of one path (a regular file unless ``reason`` says otherwise)."""

    path: str
    root: str
    size: int
    mtime_ns: int
    inode: int | None = None
    reason: Reason | None = None  # not_regular_file, symlink, ... -> recorded as failed at once
    error: str | None = None


@dataclass(frozen=True)
class Claim:
    """A file taken under a lease: its OS path, the root it was found under and the inode that
    discovery saw (the reader checks that it opens that very file)."""

    id: int
    path: str
    attempts: int
    root: str | None = None
    inode: int | None = None


@dataclass(frozen=True)
class _Row:
    size: int
    mtime_ns: int
    inode: int | None
    state: str


@dataclass
class UpsertCounts:
    """What an upsert did; ``failed`` counts the new or changed rows recorded as failed at
    discovery (links, FIFOs, unreadable entries), by reason."""

    new: int = 0
    changed: int = 0
    unchanged: int = 0
    revived: int = 0
    failed: Counter[str] = field(default_factory=Counter)


def _insert(conn: Connection, table):  # noqa: ANN001, ANN202
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


class Store:
    """The single writer's API over an engine whose schema is migrated."""

    def __init__(self, engine: Engine, host: str, identity: IdentityConfig | None = None) -> None:
        """``identity``: how new faces are placed into persons (default settings when None;
        ``enabled: false`` leaves them unplaced until ``recluster``)."""
        self.engine, self.host = engine, host
        cfg = identity or IdentityConfig()
        self.placer = Placer(cfg) if cfg.enabled else None

    # -- discovery ---------------------------------------------------------------------------

    def upsert_files(self, stats: Iterable[FileStat], *, chunk: int = 500) -> UpsertCounts:
        """Insert new paths as queued; re-queue paths whose size, mtime or inode changed (new
        content) or that had been marked gone; leave unchanged rows alone. Idempotent."""
        counts = UpsertCounts()
        batch: list[FileStat] = []
        for st in stats:
            batch.append(st)
            if len(batch) >= chunk:
                self._upsert_batch(batch, counts)
                batch = []
        if batch:
            self._upsert_batch(batch, counts)
        return counts

    def _upsert_batch(self, batch: Sequence[FileStat], counts: UpsertCounts) -> None:
        now = time.time()
        f = s.files
        batch = [FileStat(to_db(b.path), to_db(b.root), b.size, b.mtime_ns, b.inode, b.reason, b.error) for b in batch]
        with self.engine.begin() as conn:
            rows = {r.path: r for r in conn.execute(
                select(f.c.path, f.c.size, f.c.mtime_ns, f.c.inode, f.c.state).where(f.c.path.in_([b.path for b in batch]))
            )}
            for st in batch:
                old = rows.get(st.path)
                state = FileState.FAILED if st.reason else FileState.QUEUED
                if old is None:
                    ins = _insert(conn, f).values(
                        path=st.path, root=st.root, size=st.size, mtime_ns=st.mtime_ns, inode=st.inode, state=state,
                        attempts=0, reason=st.reason, error=st.error, first_seen=now, last_seen=now, updated=now,
                    ).on_conflict_do_nothing(index_elements=["path"]).returning(f.c.id)
                    if conn.execute(ins).first() is not None:
                        counts.new += 1
                        if st.reason:
                            counts.failed[st.reason] += 1
                            self._event(conn, "file_failed", {"path": st.path, "reason": st.reason})
                    else:
                        counts.unchanged += 1
                    rows[st.path] = _Row(st.size, st.mtime_ns, st.inode, state)
                    continue
                same = (old.size, old.mtime_ns) == (st.size, st.mtime_ns) and (st.inode is None or old.inode in (None, st.inode))
                if same and old.state != FileState.GONE:
                    counts.unchanged += 1
                    continue
                counts.changed += old.state != FileState.GONE
                counts.revived += old.state == FileState.GONE
                if st.reason:
                    counts.failed[st.reason] += 1
                conn.execute(update(f).where(f.c.path == st.path).values(
                    root=st.root, size=st.size, mtime_ns=st.mtime_ns, inode=st.inode, state=state, attempts=0,
                    reason=st.reason, error=st.error, lease_owner=None, lease_expires=None, last_seen=now, updated=now,
                    image_id=None if not same else f.c.image_id,
                ))
                self._event(conn, "file_changed" if old.state != FileState.GONE else "file_back", {"path": st.path})

    def mark_gone(self, paths: Iterable[str]) -> int:
        """Mark deleted paths gone (results kept). Returns how many rows changed."""
        paths = [to_db(p) for p in paths]
        if not paths:
            return 0
        f = s.files
        with self.engine.begin() as conn:
            n = conn.execute(update(f).where(f.c.path.in_(paths), f.c.state != FileState.GONE).values(
                state=FileState.GONE, lease_owner=None, lease_expires=None, updated=time.time()
            )).rowcount
            if n:
                self._event(conn, "files_gone", {"count": n, "paths": paths[:20]})
        return n

    def resolve_folders(self, prefix: str, unlistable: set[str]) -> int:
        """Mark gone the rows of folders under ``prefix`` that could not be listed before but
        were listed now (not in ``unlistable``, OS paths ending with a separator)."""
        f = s.files
        keep = {to_db(p) for p in unlistable}
        with self.engine.connect() as conn:
            rows = [r[0] for r in conn.execute(select(f.c.path).where(
                _under(to_db(prefix)), f.c.path.endswith("/", autoescape=True), f.c.state != FileState.GONE))]
        return self.mark_gone([from_db(p) for p in rows if p not in keep])

    def move(self, old: str, new: str, root: str) -> bool:
        """A rename: the row follows the file, so it is not analysed again. False when the old
        path is unknown or the new one is already recorded (then discovery handles it)."""
        f = s.files
        old, new, root = to_db(old), to_db(new), to_db(root)
        with self.engine.begin() as conn:
            if conn.execute(select(f.c.id).where(f.c.path == new)).first():
                return False
            n = conn.execute(update(f).where(f.c.path == old).values(path=new, root=root, updated=time.time())).rowcount
            if n:
                self._event(conn, "file_moved", {"from": old, "to": new})
        return bool(n)

    # -- the queue ---------------------------------------------------------------------------

    def claim(self, n: int, lease_seconds: float, *, prefixes: Sequence[str] | None = None) -> list[Claim]:
        """Take up to ``n`` queued files (or files whose lease expired) under a lease."""
        f = s.files
        now = time.time()
        with self.engine.begin() as conn:
            cond = or_(f.c.state == FileState.QUEUED, and_(f.c.state == FileState.WORKING, f.c.lease_expires < now))
            if prefixes:
                cond = and_(cond, _any_prefix(prefixes))
            q = select(f.c.id).where(cond).order_by(f.c.id).limit(n)
            if conn.dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True)
            ids = [r[0] for r in conn.execute(q)]
            if not ids:
                return []
            rows = conn.execute(
                update(f).where(f.c.id.in_(ids)).values(
                    state=FileState.WORKING, lease_owner=self.host, lease_expires=now + lease_seconds,
                    attempts=f.c.attempts + 1, updated=now,
                ).returning(f.c.id, f.c.path, f.c.attempts, f.c.root, f.c.inode)
            ).all()
        return sorted((Claim(r.id, from_db(r.path), r.attempts, from_db(r.root), r.inode) for r in rows), key=lambda c: c.id)

    def renew(self, ids: Sequence[int], lease_seconds: float) -> None:
        f = s.files
        if ids:
            with self.engine.begin() as conn:
                conn.execute(update(f).where(f.c.id.in_(list(ids)), f.c.lease_owner == self.host, f.c.state == FileState.WORKING)
                             .values(lease_expires=time.time() + lease_seconds))

    def release(self, ids: Sequence[int]) -> None:
        """Give claimed files back to the queue (drain on shutdown); the attempt is not counted."""
        f = s.files
        if ids:
            with self.engine.begin() as conn:
                conn.execute(update(f).where(f.c.id.in_(list(ids)), f.c.lease_owner == self.host, f.c.state == FileState.WORKING)
                             .values(state=FileState.QUEUED, lease_owner=None, lease_expires=None, attempts=f.c.attempts - 1))

    def requeue_for_bundle(self, bundle_key: str, prefixes: Sequence[str] | None = None) -> int:
        """Queue again the done files whose content has no analysis under ``bundle_key`` (new
        models or parameters); earlier analyses are kept."""
        f, a = s.files, s.analyses
        has = select(a.c.id).where(a.c.image_id == f.c.image_id, a.c.bundle == bundle_key).exists()
        cond = and_(f.c.state == FileState.DONE, ~has)
        if prefixes:
            cond = and_(cond, _any_prefix(prefixes))
        with self.engine.begin() as conn:
            n = conn.execute(update(f).where(cond).values(state=FileState.QUEUED, attempts=0, updated=time.time())).rowcount
            if n:
                self._event(conn, "requeued_for_bundle", {"bundle": bundle_key, "count": n})
        return n

    def pending(self, prefixes: Sequence[str] | None = None) -> int:
        f = s.files
        cond = f.c.state.in_((FileState.QUEUED, FileState.WORKING))
        if prefixes:
            cond = and_(cond, _any_prefix(prefixes))
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(f).where(cond)).scalar_one()

    # -- results -----------------------------------------------------------------------------

    def ensure_bundle(self, key: str, spec: dict) -> None:
        with self.engine.begin() as conn:
            conn.execute(_insert(conn, s.bundles).values(key=key, spec=json.dumps(spec, sort_keys=True), created=time.time())
                         .on_conflict_do_nothing(index_elements=["key"]))

    def _held(self, conn: Connection, file_id: int) -> bool:
        f = s.files
        row = conn.execute(select(f.c.state, f.c.lease_owner).where(f.c.id == file_id)).first()
        return row is not None and row.state == FileState.WORKING and row.lease_owner == self.host

    def _image_id(self, conn: Connection, sha256: str, md5: str, size: int, info: dict | None) -> int:
        vals = {"sha256": sha256, "md5": md5, "size": size, "first_seen": time.time(), **(info or {})}
        conn.execute(_insert(conn, s.images).values(**vals).on_conflict_do_nothing(index_elements=["sha256"]))
        if info:  # fill in decode facts for a row first created by a failed or linked file
            conn.execute(update(s.images).where(s.images.c.sha256 == sha256, s.images.c.width.is_(None)).values(**info))
        return conn.execute(select(s.images.c.id).where(s.images.c.sha256 == sha256)).scalar_one()

    def record_analysis(self, file_id: int, result, bundle_key: str) -> bool:  # noqa: ANN001
        """Store an analysed file (``ImageResult``); False when the lease was lost (nothing
        written). A second analysis of the same content and bundle is not stored again."""
        with self.engine.begin() as conn:
            if not self._held(conn, file_id):
                log.warning("lease on file %d lost; result dropped", file_id)
                return False
            info = {"format": result.format, "width": result.width, "height": result.height,
                    "orientation": result.orientation, "frames": result.frames, "notes": "; ".join(result.notes) or None}
            image_id = self._image_id(conn, result.sha256, result.md5, result.size, info)
            if getattr(result, "near_hash", None) is not None:
                store_hash(conn, image_id, result.near_hash)
            if getattr(result, "capture", None) is not None:
                capture.store(conn, image_id, result.capture)
            if getattr(result, "video", None) is not None:
                videos.store(conn, image_id, result.video)
            ins = _insert(conn, s.analyses).values(
                image_id=image_id, bundle=bundle_key, faces=len(result.faces),
                seconds=sum(result.seconds.values()), host=self.host, created=time.time(),
            ).on_conflict_do_nothing(index_elements=["image_id", "bundle"]).returning(s.analyses.c.id)
            row = conn.execute(ins).first()
            if row is not None:
                aid = row[0]
                if result.faces:
                    conn.execute(s.faces.insert(), [_face_row(aid, i, fc) for i, fc in enumerate(result.faces)])
                    if self.placer is not None:
                        self._place(conn, aid, image_id, result.sha256)
            self._finish(conn, file_id, FileState.DONE, image_id=image_id, size=result.size, mtime_ns=result.mtime_ns)
        return True

    def _place(self, conn: Connection, analysis_id: int, image_id: int, sha256: str) -> None:
        """Place the new faces into persons; a failure there never costs the analysis (the faces
        stay unplaced until ``recluster``)."""
        assert self.placer is not None
        try:
            with conn.begin_nested():
                self.placer.place(conn, analysis_id, image_id, sha256)
        except Exception:
            log.exception("placing the faces of analysis %d into persons failed; `forensic-gender recluster` places them", analysis_id)
            self.placer.generation = -1  # reload from the database next time

    def record_link(self, file_id: int, sha256: str, md5: str, size: int, mtime_ns: int) -> bool:
        """A file whose content is already analysed under the current bundle."""
        with self.engine.begin() as conn:
            if not self._held(conn, file_id):
                return False
            image_id = self._image_id(conn, sha256, md5, size, None)
            self._finish(conn, file_id, FileState.DONE, image_id=image_id, size=size, mtime_ns=mtime_ns)
        return True

    def record_failure(self, file_id: int, reason: Reason, error: str, *, sha256: str | None = None,
                       md5: str | None = None, size: int | None = None, max_attempts: int | None = None) -> str | None:
        """A file that could not be analysed. Bad input -> ``failed``. A crash or hang
        (``max_attempts`` given) -> back to ``queued`` until the attempts are used up, then
        ``quarantined``. Returns the new state, or None when the lease was lost."""
        f = s.files
        with self.engine.begin() as conn:
            if not self._held(conn, file_id):
                return None
            image_id = self._image_id(conn, sha256, md5 or "", size or 0, None) if sha256 else None
            state = FileState.FAILED
            if max_attempts is not None:
                attempts = conn.execute(select(f.c.attempts).where(f.c.id == file_id)).scalar_one()
                state = FileState.QUARANTINED if attempts >= max_attempts else FileState.QUEUED
            self._finish(conn, file_id, state, image_id=image_id, reason=reason, error=error[:2000])
            self._event(conn, "file_" + state, {"file_id": file_id, "reason": reason, "error": error[:500]}, file_id)
        return state

    def _finish(self, conn: Connection, file_id: int, state: FileState, **values) -> None:  # noqa: ANN003
        f = s.files
        if state in (FileState.DONE,):
            values.setdefault("reason", None)
            values.setdefault("error", None)
        values = {k: v for k, v in values.items() if v is not None or k in ("reason", "error")}
        conn.execute(update(f).where(f.c.id == file_id).values(state=state, lease_owner=None, lease_expires=None, updated=time.time(), **values))

    # -- events ------------------------------------------------------------------------------

    def event(self, kind: str, detail: dict | None = None, file_id: int | None = None) -> None:
        with self.engine.begin() as conn:
            self._event(conn, kind, detail, file_id)

    def _event(self, conn: Connection, kind: str, detail: dict | None, file_id: int | None = None) -> None:
        conn.execute(s.events.insert().values(at=time.time(), kind=kind, host=self.host, file_id=file_id,
                                              detail=json.dumps(detail, default=str) if detail else None))


    # -- service support (daemon/service.py) ---------------------------------------------------

    def recover_leases(self) -> int:
        """At start-up: give back to the queue the files this host had claimed when it last
        stopped without releasing them (killed, crashed, power loss). The attempt is not counted
        (the file did not cause it; a file that crashes its worker is counted by the pool)."""
        f = s.files
        with self.engine.begin() as conn:
            n = conn.execute(update(f).where(f.c.state == FileState.WORKING, f.c.lease_owner == self.host).values(
                state=FileState.QUEUED, lease_owner=None, lease_expires=None,
                attempts=func.max(f.c.attempts - 1, 0) if conn.dialect.name == "sqlite" else func.greatest(f.c.attempts - 1, 0),
                updated=time.time(),
            )).rowcount
            if n:
                self._event(conn, "leases_recovered", {"count": n})
        return n

    def mark_gone_under(self, prefix: str) -> int:
        """Mark every live file whose path starts with ``prefix`` (a folder path ending with a
        separator) gone: the folder was deleted or moved out of the watched roots."""
        f = s.files
        prefix = to_db(prefix)
        with self.engine.begin() as conn:
            n = conn.execute(update(f).where(_under(prefix), f.c.state != FileState.GONE).values(
                state=FileState.GONE, lease_owner=None, lease_expires=None, updated=time.time()
            )).rowcount
            if n:
                self._event(conn, "files_gone", {"count": n, "under": prefix})
        return n

    def live_paths(self, prefix: str, after_id: int = 0, limit: int = 1000) -> list[tuple[int, str]]:
        """``(id, path)`` of files not marked gone under ``prefix``, by id, after ``after_id``
        (a rescan pages through these to notice deletions)."""
        f = s.files
        q = (select(f.c.id, f.c.path).where(_under(to_db(prefix)), f.c.state != FileState.GONE, f.c.id > after_id)
             .order_by(f.c.id).limit(limit))
        with self.engine.connect() as conn:
            return [(r.id, from_db(r.path)) for r in conn.execute(q)]

    def tally(self, prefixes: Sequence[str]) -> dict[str, Counter[str]]:
        """Live files under ``prefixes`` (OS paths) by state, and failures by reason: what a
        scan's summary reports, read back from the database."""
        f = s.files
        states: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        q = (select(f.c.state, f.c.reason, func.count()).where(_any_prefix(prefixes), f.c.state != FileState.GONE)
             .group_by(f.c.state, f.c.reason))
        with self.engine.connect() as conn:
            for state, reason, n in conn.execute(q):
                states[state] += n
                if state in (FileState.FAILED, FileState.QUARANTINED):
                    reasons[reason or "unknown"] += n
        return {"states": states, "reasons": reasons}

    def heartbeat(self, info: dict) -> None:
        """Record that a service runs on this host (``meta`` key ``service:<host>``), for
        ``forensic-gender status``."""
        key = ("service:" + self.host)[:64]
        value = json.dumps({**info, "host": self.host, "at": time.time()}, sort_keys=True, default=str)
        with self.engine.begin() as conn:
            if conn.execute(update(s.meta).where(s.meta.c.key == key).values(value=value)).rowcount == 0:
                conn.execute(_insert(conn, s.meta).values(key=key, value=value).on_conflict_do_nothing(index_elements=["key"]))

    def clear_heartbeat(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(s.meta.delete().where(s.meta.c.key == ("service:" + self.host)[:64]))


def _face_row(analysis_id: int, idx: int, fc) -> dict:  # noqa: ANN001
    x1, y1, x2, y2 = fc.box
    return {
        "analysis_id": analysis_id, "idx": idx, "x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": fc.score,
        "landmarks": json.dumps([[round(x, 2), round(y, 2)] for x, y in fc.landmarks]), "width_px": fc.width_px,
        "p_male": fc.p_male, "p_female": fc.p_female, "gender": fc.gender, "age": fc.age, "age_std": fc.age_std,
        "descriptor": fc.descriptor, "frame": getattr(fc, "frame", None), "frame_time": getattr(fc, "time", None),
    }


def analysed(conn: Connection, sha256: str, bundle_key: str) -> bool:
    """Whether this content already has an analysis under this bundle (workers ask this)."""
    q = select(s.analyses.c.id).join(s.images, s.images.c.id == s.analyses.c.image_id).where(
        s.images.c.sha256 == sha256, s.analyses.c.bundle == bundle_key)
    return conn.execute(q).first() is not None


def _any_prefix(prefixes: Sequence[str]):  # noqa: ANN202
    """Paths starting with any of ``prefixes`` (OS paths: a folder ending with a separator, or a
    file's own path)."""
    return or_(*[_under(to_db(p)) for p in prefixes])


def _under(prefix: str):  # noqa: ANN202
    """Paths starting with ``prefix``, case-sensitively (SQLite's LIKE ignores ASCII case)."""
    f = s.files
    return and_(f.c.path.startswith(prefix, autoescape=True), func.substr(f.c.path, 1, len(prefix)) == prefix)


def status_summary(engine: Engine, *, now: float | None = None, window: float = 300.0) -> dict:
    """What ``forensic-gender status`` shows: files by state (overall and per root), failures by
    reason, files finished in the last minute and the last ``window`` seconds, and the services'
    heartbeats. Read-only."""
    f = s.files
    now = time.time() if now is None else now
    with engine.connect() as conn:
        by_root: dict[str, dict[str, int]] = {}
        totals = {st: 0 for st in s.FILE_STATES}
        for root, state, n in conn.execute(select(f.c.root, f.c.state, func.count()).group_by(f.c.root, f.c.state)):
            by_root.setdefault(root, {st: 0 for st in s.FILE_STATES})[state] = n
            totals[state] = totals.get(state, 0) + n
        failures: dict[str, dict[str, int]] = {}
        for state, reason, n in conn.execute(select(f.c.state, f.c.reason, func.count())
                                             .where(f.c.state.in_((FileState.FAILED, FileState.QUARANTINED))).group_by(f.c.state, f.c.reason)):
            failures.setdefault(reason or "unknown", {})[state] = n
        finished = f.c.state.in_((FileState.DONE, FileState.FAILED, FileState.QUARANTINED))
        last_min = conn.execute(select(func.count()).select_from(f).where(finished, f.c.updated >= now - 60)).scalar_one()
        last_win = conn.execute(select(func.count()).select_from(f).where(finished, f.c.updated >= now - window)).scalar_one()
        beats = []
        for key, value in conn.execute(select(s.meta.c.key, s.meta.c.value).where(s.meta.c.key.startswith("service:"))):
            try:
                beats.append(json.loads(value))
            except ValueError:
                beats.append({"host": key[len("service:"):], "at": None})
    return {"totals": totals, "by_root": by_root, "failures": failures, "finished_last_minute": last_min,
            "finished_last_window": last_win, "window": window, "heartbeats": beats}
