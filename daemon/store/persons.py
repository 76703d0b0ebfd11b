"""Persons: faces grouped by identity (schema version 6).

- ``persons``: one row per person (cluster); ``name`` set by an examiner; ``merged_into`` when
  an examiner merged it into another (kept for the audit trail and old references).
- ``face_persons``: the person of a face (at most one); ``pinned`` when an examiner put it there.
- ``person_decisions``: the examiner's decisions, append-only (who, when, what).

Placing a new face (in the writer's transaction, :meth:`Placer.place`), first rule that applies:

1. an examiner's decision about this face: the latest ``assign``/``release`` of the same image
   content (sha256) whose box overlaps it with IoU >= 0.5 (as reviews attach,
   :mod:`daemon.store.reviews`), so decisions survive re-analysis with a new bundle;
2. the person of the overlapping face of the image's previous analysis (clusters survive
   re-analysis, even with a new backbone);
3. the person whose farthest face is nearest, when every face of it is within
   ``identity.threshold`` of its descriptor (complete linkage, as :func:`recluster`);
4. a new person, when the face is large and sure enough to seed one (``identity.min_face_px``,
   ``identity.min_score``); otherwise none.

:func:`recluster` rebuilds the persons of all current faces (each image's latest analysis) from
scratch by complete-linkage clustering (:func:`daemon.identity.clusters`): pinned faces keep
their person and the clusters they are in join it; the other clusters take the id of the old person they share most faces with, so names
survive. The same faces give the same persons.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    Select,
    String,
    Table,
    Text,
    delete,
    exists,
    insert,
    select,
    update,
)

from daemon import identity
from daemon.config import IdentityConfig
from daemon.store import schema as s
from daemon.store.reviews import iou

log = logging.getLogger("daemon.persons")

GENERATION = "persons:generation"  # meta key: bumped whenever persons change other than by placing
ACTIONS = ("assign", "release", "merge", "name")

metadata = MetaData()

persons = Table(
    "persons",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", Text),
    Column("merged_into", Integer),
    Column("created", Float, nullable=False),
    Column("updated", Float, nullable=False),
)

face_persons = Table(
    "face_persons",
    metadata,
    Column("face_id", Integer, primary_key=True, autoincrement=False),
    Column("person_id", Integer, nullable=False),
    Column("pinned", Boolean, nullable=False, default=False),
    Index("ix_face_persons_person", "person_id", "face_id"),
)

decisions = Table(
    "person_decisions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("at", Float, nullable=False),
    Column("action", String(16), nullable=False),
    Column("person_id", Integer),
    Column("other_id", Integer),
    Column("name", Text),
    Column("sha256", String(64)),
    Column("x1", Float),
    Column("y1", Float),
    Column("x2", Float),
    Column("y2", Float),
    Column("face_id", Integer),
    Column("reviewer", String(128)),
    Index("ix_person_decisions_sha256", "sha256"),
)


def has_persons(conn: Connection) -> bool:
    """Whether this database has the persons tables (read-only commands work without them)."""
    return conn.dialect.has_table(conn, "face_persons")


class PersonError(ValueError):
    """A decision that cannot be recorded (unknown face or person, bad name)."""


Box = tuple[float, float, float, float]


def generation(conn: Connection) -> int:
    row = conn.execute(select(s.meta.c.value).where(s.meta.c.key == GENERATION)).first()
    return int(row[0]) if row else 0


def _bump(conn: Connection) -> None:
    g = generation(conn) + 1
    if conn.execute(update(s.meta).where(s.meta.c.key == GENERATION).values(value=str(g))).rowcount == 0:
        conn.execute(insert(s.meta).values(key=GENERATION, value=str(g)))


def _new_person(conn: Connection, name: str | None = None) -> int:
    now = time.time()
    key = conn.execute(insert(persons).values(name=name, created=now, updated=now)).inserted_primary_key
    assert key is not None
    return int(key[0])


def seeds(cfg: IdentityConfig, width_px: float, score: float) -> bool:
    """Whether a face is large and sure enough to start a person of its own."""
    return width_px >= cfg.min_face_px and score >= cfg.min_score


def current_faces() -> Select[Any]:
    """Faces of each image's latest analysis (id, box, size, score, descriptor, image sha256)."""
    f, a, i = s.faces, s.analyses, s.images
    later = s.analyses.alias("a_later")
    return (
        select(f.c.id, f.c.x1, f.c.y1, f.c.x2, f.c.y2, f.c.width_px, f.c.score, f.c.descriptor, i.c.sha256)
        .select_from(f.join(a, a.c.id == f.c.analysis_id).join(i, i.c.id == a.c.image_id))
        .where(~exists(select(later.c.id).where(later.c.image_id == a.c.image_id, later.c.id > a.c.id)))
    )


def _pins(conn: Connection, shas: Sequence[str]) -> dict[str, list[tuple[Box, int | None]]]:
    """The latest examiner decision per face box of each image content: (box, person or None
    for released), newest first."""
    out: dict[str, list[tuple[Box, int | None]]] = {}
    if not shas:
        return out
    d = decisions
    for k in range(0, len(shas), 500):
        q = (
            select(d.c.sha256, d.c.x1, d.c.y1, d.c.x2, d.c.y2, d.c.action, d.c.person_id)
            .where(d.c.sha256.in_(list(shas[k : k + 500])), d.c.action.in_(("assign", "release")))
            .order_by(d.c.id.desc())
        )
        for r in conn.execute(q):
            out.setdefault(r.sha256, []).append(((r.x1, r.y1, r.x2, r.y2), r.person_id if r.action == "assign" else None))
    return out


def _pinned_person(pins: list[tuple[Box, int | None]], box: Box) -> tuple[bool, int | None]:
    """(decided, person) for a face box: the newest decision whose box overlaps it."""
    for b, person in pins:
        if iou(b, box) >= 0.5:
            return True, person
    return False, None


@dataclass
class Placer:
    """Places new faces into persons in the writer's transaction (see the module doc). Keeps
    the descriptors of placed faces in memory; reloads them when persons changed elsewhere
    (recluster, an examiner's decision), appends the rows other writers added since."""

    cfg: IdentityConfig
    generation: int = -1
    last_face: int = 0
    ids: list[int] = field(default_factory=list)
    people: list[int] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    _matrix: np.ndarray | None = None

    def _refresh(self, conn: Connection) -> None:
        g = generation(conn)
        if g != self.generation:
            self.generation, self.last_face = g, 0
            self.ids, self.people, self.vectors, self._matrix = [], [], [], None
        fp, f = face_persons, s.faces
        q = (
            select(fp.c.face_id, fp.c.person_id, f.c.descriptor)
            .select_from(fp.join(f, f.c.id == fp.c.face_id))
            .where(fp.c.face_id > self.last_face, f.c.descriptor.is_not(None))
            .order_by(fp.c.face_id)
        )
        rows = conn.execute(q).all()
        if rows:
            self._add([r.face_id for r in rows], [r.person_id for r in rows], identity.stack([r.descriptor for r in rows]))

    def _add(self, ids: list[int], people: list[int], vectors: np.ndarray) -> None:
        self.ids += ids
        self.people += people
        self.vectors.append(vectors)
        self._matrix = None
        self.last_face = max(self.last_face, *ids)

    def matrix(self) -> np.ndarray:
        if self._matrix is None:
            self._matrix = np.concatenate(self.vectors) if self.vectors else np.zeros((0, identity.DIM), np.float32)
            self.vectors = [self._matrix]
        return self._matrix

    def place(self, conn: Connection, analysis_id: int, image_id: int, sha256: str) -> int:
        """Give the faces of a new analysis their persons; returns how many got one."""
        f, a, fp = s.faces, s.analyses, face_persons
        new = conn.execute(
            select(f.c.id, f.c.x1, f.c.y1, f.c.x2, f.c.y2, f.c.width_px, f.c.score, f.c.descriptor).where(f.c.analysis_id == analysis_id).order_by(f.c.idx)
        ).all()
        if not new:
            return 0
        self._refresh(conn)
        pins = _pins(conn, [sha256]).get(sha256, [])
        before = conn.execute(
            select(f.c.x1, f.c.y1, f.c.x2, f.c.y2, fp.c.person_id)
            .select_from(f.join(a, a.c.id == f.c.analysis_id).join(fp, fp.c.face_id == f.c.id))
            .where(a.c.image_id == image_id, a.c.id != analysis_id)
            .order_by(a.c.id.desc())
        ).all()
        rows, added = [], []
        for r in new:
            box = (r.x1, r.y1, r.x2, r.y2)
            decided, person = _pinned_person(pins, box)
            pinned = decided and person is not None
            if not decided:
                person = next((b.person_id for b in before if iou((b.x1, b.y1, b.x2, b.y2), box) >= 0.5), None)
            vec = identity.unpack(r.descriptor) if r.descriptor is not None else None
            if person is None and not decided and vec is not None:
                person = self._vote(vec)
                if person is None and seeds(self.cfg, r.width_px, r.score):
                    person = _new_person(conn)
            if person is None:
                continue
            rows.append({"face_id": r.id, "person_id": person, "pinned": pinned})
            if vec is not None:
                added.append((r.id, person, vec))
        if rows:
            conn.execute(insert(fp), rows)
        if added:
            self._add([x[0] for x in added], [x[1] for x in added], np.stack([x[2] for x in added]))
        return len(rows)

    def _vote(self, vec: np.ndarray) -> int | None:
        """The person a face joins under complete linkage (:func:`daemon.identity.join`)."""
        m = self.matrix()
        if not len(m):
            return None
        lab = identity.join(m, np.asarray(self.people, np.int64), vec, self.cfg.threshold)
        return lab if lab >= 0 else None


# -- recluster ------------------------------------------------------------------------------------


def recluster(engine: Engine, cfg: IdentityConfig, *, seed: int = 0) -> dict[str, Any]:
    """Rebuild the persons of every current face from scratch (see the module doc); returns
    counts for the summary. Faces of earlier analyses keep the persons they had."""
    t0 = time.time()
    with engine.begin() as conn:
        rows = conn.execute(current_faces().where(s.faces.c.descriptor.is_not(None)).order_by(s.faces.c.id)).all()
        n = len(rows)
        pins = _pins(conn, sorted({r.sha256 for r in rows}))
        old = dict(conn.execute(select(face_persons.c.face_id, face_persons.c.person_id)).all())
        merged = dict(conn.execute(select(persons.c.id, persons.c.merged_into).where(persons.c.merged_into.is_not(None))).all())
        X = identity.stack([r.descriptor for r in rows])  # noqa: N806
        base = 1 + max([*old.values(), *merged.keys(), *merged.values(), 0])  # labels above every person id
        labels, fixed = _cluster(cfg, rows, X, pins, merged, base)
        ids = [r.id for r in rows]
        final = _name_clusters(conn, ids, labels, base, old, merged)
        pinned_ids = {ids[k] for k in np.flatnonzero(fixed).tolist()}
        conn.execute(delete(face_persons).where(face_persons.c.face_id.in_(select(current_faces().subquery().c.id))))
        new_rows = [{"face_id": fid, "person_id": p, "pinned": fid in pinned_ids} for fid, p in zip(ids, final, strict=True) if p >= 0]
        for k in range(0, len(new_rows), 5000):
            conn.execute(insert(face_persons), new_rows[k : k + 5000])
        # persons left with no face, no name and no decision go
        used = select(face_persons.c.person_id)
        decided = select(decisions.c.person_id).where(decisions.c.person_id.is_not(None))
        gone = conn.execute(
            delete(persons).where(persons.c.name.is_(None), persons.c.merged_into.is_(None), persons.c.id.not_in(used), persons.c.id.not_in(decided))
        ).rowcount
        _bump(conn)
        stats = {
            "faces": n,
            "placed": len(new_rows),
            "persons": len(set(final) - {-1}),
            "pinned": len(pinned_ids),
            "removed_persons": gone,
            "seconds": round(time.time() - t0, 2),
        }
        conn.execute(insert(s.events).values(at=time.time(), kind="recluster", detail=json.dumps(stats)))
    return stats


def _cluster(
    cfg: IdentityConfig,
    rows: Sequence[Any],
    X: np.ndarray,  # noqa: N803 (a matrix)
    pins: dict[str, list[tuple[Box, int | None]]],
    merged: dict[int, int],
    base: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels for the current faces: person ids (< ``base``) for pinned faces and the clusters
    they are in, ``base + k`` for new clusters, -1 for none (see :func:`recluster`); and which
    faces are pinned."""
    n = len(rows)
    person = np.full(n, -1, np.int64)  # pinned person per face
    released = np.zeros(n, bool)
    eligible = np.zeros(n, bool)
    for k, r in enumerate(rows):
        decided, p = _pinned_person(pins.get(r.sha256, []), (r.x1, r.y1, r.x2, r.y2))
        if decided and p is not None:
            person[k] = _final(p, merged)
        released[k] = decided and p is None
        eligible[k] = not decided and seeds(cfg, r.width_px, r.score)
    pinned = person >= 0
    groups = identity.clusters(X, cfg.threshold, seeds=pinned | eligible)
    labels = np.where(pinned, person, -1)
    for g in np.unique(groups[groups >= 0]).tolist():
        members = np.flatnonzero(groups == g)
        anchors = members[pinned[members]]
        if not len(anchors):
            labels[members] = base + g
            continue
        for k in members[~pinned[members]].tolist():  # to the person of the nearest pinned face
            labels[k] = person[anchors[int(np.argmin(identity.distances(X[anchors], X[k])))]]
    placed = labels >= 0
    for k in np.flatnonzero(~placed & ~released).tolist():  # small or unsure faces join, never seed
        labels[k] = identity.join(X[placed], labels[placed], X[k], cfg.threshold)
    return labels, pinned


def _final(person: int, merged: dict[int, int]) -> int:
    seen = set()
    while person in merged and person not in seen:
        seen.add(person)
        person = merged[person]
    return person


def _subgraph(g: identity.Graph, keep: np.ndarray) -> identity.Graph:
    src = np.repeat(np.arange(len(g.indptr) - 1), np.diff(g.indptr))[keep]
    indptr = np.zeros(len(g.indptr), np.int64)
    np.add.at(indptr, src + 1, 1)
    return identity.Graph(np.cumsum(indptr), g.indices[keep], g.dist[keep])


def _name_clusters(conn: Connection, ids: list[int], labels: np.ndarray, base: int, old: dict[int, int], merged: dict[int, int]) -> list[int]:
    """Person ids for the clusters: a label below ``base`` is already a person (pinned); each
    other cluster takes the old person it shares most faces with (largest overlaps first, each
    old person once), else a new person."""
    final = [int(x) if 0 <= x < base else -1 for x in labels.tolist()]
    taken = set(final) - {-1}
    clusters: dict[int, list[int]] = {}
    for k, lab in enumerate(labels.tolist()):
        if lab >= base:
            clusters.setdefault(lab, []).append(k)
    overlap: list[tuple[int, int, int, int]] = []  # (-shared, label, old person, first member)
    for lab, members in clusters.items():
        counts: dict[int, int] = {}
        for k in members:
            p = old.get(ids[k])
            if p is not None:
                p = _final(p, merged)
                counts[p] = counts.get(p, 0) + 1
        overlap += [(-c, lab, p, members[0]) for p, c in counts.items()]
    chosen: dict[int, int] = {}
    for _neg, lab, p, _first in sorted(overlap):
        if lab not in chosen and p not in taken:
            chosen[lab] = p
            taken.add(p)
    for lab in sorted(clusters, key=lambda lab: clusters[lab][0]):
        person = chosen.get(lab)
        if person is None:
            person = _new_person(conn)
        for k in clusters[lab]:
            final[k] = person
    return final


# -- examiner decisions ---------------------------------------------------------------------------


def _check_text(value: str | None, what: str, limit: int) -> str | None:
    if value is None:
        return None
    value = value.strip()
    problems = []
    if len(value) > limit:
        problems.append(f"{what} must be at most {limit} characters, got {len(value)}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        problems.append(f"{what} must not contain control characters (line breaks, tabs, NUL); retype it")
    if any("\ud800" <= c <= "\udfff" for c in value):
        problems.append(f"{what} must be valid text (UTF-8), got undecodable bytes; retype it")
    if problems:
        raise PersonError("; ".join(problems))
    return value or None


def _person(conn: Connection, person_id: int) -> Any:
    row = conn.execute(select(persons).where(persons.c.id == person_id)).first()
    if row is None:
        raise PersonError(f"person {person_id} does not exist; list persons with `forensic-gender persons`")
    if row.merged_into is not None:
        raise PersonError(f"person {person_id} was merged into person {row.merged_into}; use that one")
    return row


def _face(conn: Connection, face_id: int) -> Any:
    f, a, i = s.faces, s.analyses, s.images
    row = conn.execute(
        select(f.c.id, f.c.x1, f.c.y1, f.c.x2, f.c.y2, i.c.sha256)
        .select_from(f.join(a, a.c.id == f.c.analysis_id).join(i, i.c.id == a.c.image_id))
        .where(f.c.id == face_id)
    ).first()
    if row is None:
        raise PersonError(f"face {face_id} does not exist; list faces with `forensic-gender faces` to find its id")
    return row


def _decide(conn: Connection, action: str, reviewer: str | None, **values: Any) -> None:
    conn.execute(insert(decisions).values(at=time.time(), action=action, reviewer=reviewer, **values))


def _put(conn: Connection, face: Any, person: int | None, reviewer: str | None) -> None:
    """Record and apply: ``face`` belongs to ``person`` (None: to nobody), pinned."""
    _decide(
        conn,
        "assign" if person is not None else "release",
        reviewer,
        person_id=person,
        sha256=face.sha256,
        x1=face.x1,
        y1=face.y1,
        x2=face.x2,
        y2=face.y2,
        face_id=face.id,
    )
    conn.execute(delete(face_persons).where(face_persons.c.face_id == face.id))
    if person is not None:
        conn.execute(insert(face_persons).values(face_id=face.id, person_id=person, pinned=True))


def assign(engine: Engine, face_id: int, person_id: int | None, *, reviewer: str | None = None) -> int:
    """Move a face to a person (``None``: split it off into a new person of its own); returns
    the person. The face stays there through re-analysis and recluster."""
    reviewer = _check_text(reviewer, "reviewer", 128)
    with engine.begin() as conn:
        face = _face(conn, face_id)
        if person_id is None:
            person_id = _new_person(conn)
        else:
            _person(conn, person_id)
        _put(conn, face, person_id, reviewer)
        _touch(conn, person_id)
        _bump(conn)
    return person_id


def release(engine: Engine, face_id: int, *, reviewer: str | None = None) -> None:
    """Take a face out of every person (not a face of anyone the case needs, or a wrong
    detection); it stays out through re-analysis and recluster."""
    reviewer = _check_text(reviewer, "reviewer", 128)
    with engine.begin() as conn:
        _put(conn, _face(conn, face_id), None, reviewer)
        _bump(conn)


def merge(engine: Engine, keep: int, other: int, *, reviewer: str | None = None) -> int:
    """Merge person ``other`` into ``keep``: every face of both is pinned to ``keep`` (the
    examiner has seen them as one person); ``other`` is kept as merged for the audit trail.
    Returns the number of faces moved."""
    reviewer = _check_text(reviewer, "reviewer", 128)
    if keep == other:
        raise PersonError(f"cannot merge person {keep} into itself")
    with engine.begin() as conn:
        a, b = _person(conn, keep), _person(conn, other)
        f, an, i, fp = s.faces, s.analyses, s.images, face_persons
        faces = conn.execute(
            select(f.c.id, f.c.x1, f.c.y1, f.c.x2, f.c.y2, i.c.sha256)
            .select_from(fp.join(f, f.c.id == fp.c.face_id).join(an, an.c.id == f.c.analysis_id).join(i, i.c.id == an.c.image_id))
            .where(fp.c.person_id.in_((keep, other)))
        ).all()
        _decide(conn, "merge", reviewer, person_id=keep, other_id=other)
        moved = 0
        for face in faces:
            _put(conn, face, keep, reviewer)
            moved += 1
        conn.execute(update(persons).where(persons.c.id == other).values(merged_into=keep, updated=time.time()))
        if a.name is None and b.name is not None:
            conn.execute(update(persons).where(persons.c.id == keep).values(name=b.name))
        _touch(conn, keep)
        _bump(conn)
    return moved


def rename(engine: Engine, person_id: int, name: str | None, *, reviewer: str | None = None) -> None:
    """Name a person (``None`` or blank clears the name)."""
    name = _check_text(name, "name", 200)
    reviewer = _check_text(reviewer, "reviewer", 128)
    with engine.begin() as conn:
        _person(conn, person_id)
        _decide(conn, "name", reviewer, person_id=person_id, name=name)
        conn.execute(update(persons).where(persons.c.id == person_id).values(name=name, updated=time.time()))


def _touch(conn: Connection, person_id: int) -> None:
    conn.execute(update(persons).where(persons.c.id == person_id).values(updated=time.time()))
