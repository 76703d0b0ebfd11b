"""Read-only queries over persons (faces grouped by identity, :mod:`daemon.store.persons`) for the
review page and the command line.

Only *current* faces count: the faces of each image's latest analysis
(:func:`daemon.store.persons.current_faces`). A person merged into another keeps its row (the
audit trail) but no faces; :func:`resolve` follows ``merged_into`` to the surviving person.

Every list is bounded: :func:`list_persons` pages by keyset on (face count descending, person
id), :func:`person` pages a person's faces by face id and caps the images it lists. The path of
a face is its image's first recorded path (lowest file id), as in :mod:`daemon.queries.read`;
None when no recorded path holds that content any more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, and_, exists, func, or_, select

from daemon.store import persons as ps
from daemon.store import schema as s

MAX_LIMIT = 500
BATCH = 500


@dataclass(frozen=True)
class PersonSummary:
    """One person of the grid: its current faces and the distinct images (contents) they are in,
    and a representative face (the widest, then the most confidently detected, then the lowest id)."""

    person_id: int
    name: str | None
    faces: int
    images: int
    face_id: int


@dataclass(frozen=True)
class PersonList:
    """A page of persons; ``next`` is the keyset position (faces, person id) of the last row
    when more follow (pass it as ``after``), else None."""

    rows: list[PersonSummary]
    next: tuple[int, int] | None


@dataclass(frozen=True)
class FaceRow:
    """A current or past face with what the persons pages show: where it is (content, first
    recorded path, box in pixels of the upright image), the model's output (stored label,
    p(male), age) and its person (None: nobody's; ``pinned``: put there by an examiner)."""

    face_id: int
    sha256: str
    path: str | None
    x1: float
    y1: float
    x2: float
    y2: float
    width_px: float
    score: float
    gender: str
    p_male: float
    age: float | None
    age_std: float | None
    person_id: int | None
    person_name: str | None
    pinned: bool
    has_descriptor: bool


@dataclass(frozen=True)
class PersonImage:
    """An image (content) a person's faces come from, with how many of them it holds."""

    sha256: str
    path: str | None
    faces: int


@dataclass(frozen=True)
class PersonDetail:
    """A person: its row, its totals, one page of its current faces (by face id; ``next`` is
    the face id to continue ``after``, None on the last page) and the images they come from
    (most faces first, at most ``image_limit``; ``images_total`` counts them all).
    ``merged_into``: the surviving person when this one was merged (then no faces)."""

    person_id: int
    name: str | None
    merged_into: int | None
    created: float
    updated: float
    faces_total: int
    images_total: int
    faces: list[FaceRow]
    next: int | None
    images: list[PersonImage]


def _bounded(limit: int, what: str) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"{what} must be from 1 to {MAX_LIMIT}, got {limit}")
    return limit


def _current_person_faces() -> Select[Any]:
    """(face id, person id, image sha256, width, score) of every current face that has a person."""
    current: Callable[[], Select[Any]] = ps.current_faces  # (its return type is not annotated there)
    cur = current()
    fp = ps.face_persons
    return cur.with_only_columns(s.faces.c.id.label("face_id"), fp.c.person_id, s.images.c.sha256, s.faces.c.width_px, s.faces.c.score).join(
        fp, fp.c.face_id == s.faces.c.id
    )


def resolve(conn: Connection, person_id: int) -> int | None:
    """The surviving person for ``person_id`` (itself unless it was merged; the end of the chain
    when merged more than once), or None when no such person exists."""
    seen: set[int] = set()
    current = person_id
    while current not in seen:
        seen.add(current)
        row = conn.execute(select(ps.persons.c.merged_into).where(ps.persons.c.id == current)).first()
        if row is None:
            return None if current == person_id else current
        if row.merged_into is None:
            return current
        current = int(row.merged_into)
    return current


def list_persons(conn: Connection, *, min_faces: int = 1, name: str | None = None, limit: int = 50, after: tuple[int, int] | None = None) -> PersonList:
    """Persons with at least ``min_faces`` current faces, most faces first (ties by person id);
    ``name``: only those whose name contains it (case-insensitive for ASCII on SQLite, for all
    letters on PostgreSQL); ``after``: the ``next`` of the previous page. Persons merged into
    another have no faces and never appear."""
    _bounded(limit, "limit")
    if min_faces < 1:
        raise ValueError(f"min_faces must be at least 1, got {min_faces}")
    if not ps.has_persons(conn):
        return PersonList([], None)
    P = ps.persons  # noqa: N806
    cf = _current_person_faces().subquery("cf")
    counted = (
        select(cf.c.person_id, func.count().label("faces"), func.count(func.distinct(cf.c.sha256)).label("images"))
        .group_by(cf.c.person_id)
        .having(func.count() >= min_faces)
        .subquery("counted")
    )
    conds: list[ColumnElement[bool]] = [P.c.merged_into.is_(None)]
    if name:
        conds.append(P.c.name.icontains(name, autoescape=True))
    if after is not None:
        n, pid = after
        conds.append(or_(counted.c.faces < n, and_(counted.c.faces == n, counted.c.person_id > pid)))
    q = (
        select(counted.c.person_id, counted.c.faces, counted.c.images, P.c.name)
        .select_from(counted.join(P, P.c.id == counted.c.person_id))
        .where(*conds)
        .order_by(counted.c.faces.desc(), counted.c.person_id)
        .limit(limit + 1)
    )
    rows = conn.execute(q).all()
    more = len(rows) > limit
    rows = rows[:limit]
    reps = representatives(conn, [r.person_id for r in rows])
    out = [PersonSummary(int(r.person_id), r.name, int(r.faces), int(r.images), reps[int(r.person_id)]) for r in rows if int(r.person_id) in reps]
    last = rows[-1] if rows else None
    return PersonList(out, (int(last.faces), int(last.person_id)) if more and last is not None else None)


def representatives(conn: Connection, person_ids: Sequence[int]) -> dict[int, int]:
    """The representative current face of each person (widest, then highest detection score,
    then lowest id); persons without current faces are left out."""
    out: dict[int, int] = {}
    for k in range(0, len(person_ids), BATCH):
        chunk = list(person_ids[k : k + BATCH])
        cf = _current_person_faces().where(ps.face_persons.c.person_id.in_(chunk)).subquery("cf")
        rank = func.row_number().over(partition_by=cf.c.person_id, order_by=(cf.c.width_px.desc(), cf.c.score.desc(), cf.c.face_id))
        ranked = select(cf.c.person_id, cf.c.face_id, rank.label("rank")).subquery("ranked")
        for r in conn.execute(select(ranked.c.person_id, ranked.c.face_id).where(ranked.c.rank == 1)):
            out[int(r.person_id)] = int(r.face_id)
    return out


def _first_paths(conn: Connection, image_ids: Sequence[int]) -> dict[int, str]:
    """Each image's first recorded path (lowest file id); images with none are left out."""
    F = s.files  # noqa: N806
    out: dict[int, str] = {}
    ids = sorted(set(image_ids))
    for k in range(0, len(ids), BATCH):
        first = select(func.min(F.c.id)).where(F.c.image_id.in_(ids[k : k + BATCH])).group_by(F.c.image_id)
        for r in conn.execute(select(F.c.image_id, F.c.path).where(F.c.id.in_(first))):
            out[int(r.image_id)] = r.path
    return out


def _face_rows(conn: Connection, where: Sequence[ColumnElement[bool]], *, order_limit: int | None = None, current: bool = False) -> list[FaceRow]:
    f, a, i = s.faces, s.analyses, s.images
    has = ps.has_persons(conn)
    cols = [
        f.c.id,
        i.c.sha256,
        i.c.id.label("image_id"),
        f.c.x1,
        f.c.y1,
        f.c.x2,
        f.c.y2,
        f.c.width_px,
        f.c.score,
        f.c.gender,
        f.c.p_male,
        f.c.age,
        f.c.age_std,
        f.c.descriptor.is_not(None).label("has_descriptor"),
    ]
    frm = f.join(a, a.c.id == f.c.analysis_id).join(i, i.c.id == a.c.image_id)
    if has:
        fp, P = ps.face_persons, ps.persons  # noqa: N806
        cols += [fp.c.person_id, fp.c.pinned, P.c.name.label("person_name")]
        frm = frm.outerjoin(fp, fp.c.face_id == f.c.id).outerjoin(P, P.c.id == fp.c.person_id)
    q = select(*cols).select_from(frm).where(*where)
    if current:
        later = s.analyses.alias("a_later")
        q = q.where(~exists(select(later.c.id).where(later.c.image_id == a.c.image_id, later.c.id > a.c.id)))
    q = q.order_by(f.c.id)
    if order_limit is not None:
        q = q.limit(order_limit)
    rows = conn.execute(q).all()
    paths = _first_paths(conn, [int(r.image_id) for r in rows])
    out = []
    for r in rows:
        m = r._mapping
        out.append(
            FaceRow(
                int(r.id),
                r.sha256,
                paths.get(int(r.image_id)),
                r.x1,
                r.y1,
                r.x2,
                r.y2,
                r.width_px,
                r.score,
                r.gender,
                r.p_male,
                r.age,
                r.age_std,
                m.get("person_id"),
                m.get("person_name"),
                bool(m.get("pinned") or False),
                bool(r.has_descriptor),
            )
        )
    return out


def faces_by_id(conn: Connection, face_ids: Sequence[int]) -> dict[int, FaceRow]:
    """The faces ``face_ids`` (any analysis) with their persons; unknown ids are left out."""
    out: dict[int, FaceRow] = {}
    ids = sorted(set(face_ids))
    for k in range(0, len(ids), BATCH):
        for row in _face_rows(conn, [s.faces.c.id.in_(ids[k : k + BATCH])]):
            out[row.face_id] = row
    return out


def face(conn: Connection, face_id: int) -> FaceRow | None:
    """One face with its person (None when no such face)."""
    return faces_by_id(conn, [face_id]).get(face_id)


def person(conn: Connection, person_id: int, *, limit: int = 100, after: int | None = None, image_limit: int = 100) -> PersonDetail | None:
    """Person ``person_id`` with one page of its current faces (``limit`` faces with ids above
    ``after``) and the images they come from (at most ``image_limit``); None when no such
    person (or no persons tables). A merged person comes back with ``merged_into`` set to the
    surviving person and no faces."""
    _bounded(limit, "limit")
    _bounded(image_limit, "image_limit")
    if not ps.has_persons(conn):
        return None
    P = ps.persons  # noqa: N806
    row = conn.execute(select(P).where(P.c.id == person_id)).first()
    if row is None:
        return None
    if row.merged_into is not None:
        return PersonDetail(person_id, row.name, resolve(conn, person_id), row.created, row.updated, 0, 0, [], None, [])
    cf = _current_person_faces().where(ps.face_persons.c.person_id == person_id).subquery("cf")
    faces_total, images_total = conn.execute(select(func.count(), func.count(func.distinct(cf.c.sha256)))).one()
    conds: list[ColumnElement[bool]] = [ps.face_persons.c.person_id == person_id]
    if after is not None:
        conds.append(s.faces.c.id > after)
    rows = _face_rows(conn, conds, order_limit=limit + 1, current=True)
    more = len(rows) > limit
    rows = rows[:limit]
    per_image = select(cf.c.sha256, func.count().label("faces")).group_by(cf.c.sha256).order_by(func.count().desc(), cf.c.sha256).limit(image_limit)
    counts = conn.execute(per_image).all()
    image_ids = dict(conn.execute(select(s.images.c.sha256, s.images.c.id).where(s.images.c.sha256.in_([c.sha256 for c in counts]))).all())
    paths = _first_paths(conn, list(image_ids.values()))
    images = [PersonImage(c.sha256, paths.get(image_ids.get(c.sha256, -1)), int(c.faces)) for c in counts]
    return PersonDetail(
        person_id, row.name, None, row.created, row.updated, int(faces_total), int(images_total), rows, rows[-1].face_id if more and rows else None, images
    )
