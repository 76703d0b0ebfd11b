"""Read-only queries over the results store (SQLAlchemy Core; SQLite and PostgreSQL alike).

Everything here takes an open :class:`~sqlalchemy.Connection` and :class:`Filters` and returns
plain dicts. Large results are streamed (``yield_per``: a server-side cursor on PostgreSQL), so
an export of a million faces holds one batch in memory, never the whole result.

Shapes
    A *face row* is one face of one analysis, with its image (hashes, size, dimensions), the
    first recorded path that matches the file filters (``path``, ``root``, ``seen``, ``state``;
    None when no path holds that content any more and no file filter was given), the query-time
    decision ``gender`` (and the stored ``model_gender``), and the face's current review.
    An *image row* is one distinct content (or one path whose content was never hashed, e.g.
    an unreadable file) with all its paths, their states, and face counts under the cut.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

from sqlalchemy import Connection, and_, case, exists, false, func, literal, or_, select, text, true
from sqlalchemy.sql.elements import ColumnElement

from daemon.queries.filters import (ADULT_AGE, FACE_SORTS, IMAGE_SORTS, Cut, FilterError, Filters, check_cut, cursor_text, cursor_values,
                                    glob_match, glob_to_pg_regex)
from daemon.store import capture, videos
from daemon.store import persons as ps
from daemon.store import reviews as rv
from daemon.store import schema as s

BATCH = 500
ACTIVE_REVIEWS = ("confirmed", "corrected", "ignored")


@dataclass(frozen=True)
class Scope:
    """What a query needs besides the filters: the cut, whether the reviews table exists, and
    the analysis selection (``None`` = latest per image, ``"all"``, or a full bundle key)."""

    cut: Cut
    reviews: bool
    bundle: str | None
    dialect: str = "sqlite"
    persons: bool = True  # whether the persons tables exist (schema version 6)
    videos: bool = True  # whether faces have frames and the videos table exists (schema version 9)


def scope(conn: Connection, f: Filters, default_cut: Cut = Cut()) -> Scope:
    """Resolve the cut and the bundle for ``f`` on ``conn``. On PostgreSQL this also turns JIT
    compilation off for the current transaction: these are short queries whose (over-)estimated
    cost would trigger it, and compiling takes longer than running them."""
    cut = f.cut(default_cut)
    bad = check_cut(cut)
    if bad:
        raise FilterError(bad)
    if conn.dialect.name == "postgresql":
        conn.execute(text("SET LOCAL jit = off"))
    elif conn.dialect.name == "sqlite":
        register_functions(conn)
    return Scope(cut, rv.has_reviews(conn), resolve_bundle(conn, f.bundle), conn.dialect.name, ps.has_persons(conn),
                 videos.has_tables(conn))


def register_functions(conn: Connection) -> None:
    """Give a SQLite connection the SQL function ``fg_glob(pattern, path)`` (the path-glob
    matcher of :mod:`daemon.queries.filters`, linear in the path; no regular expression)."""
    raw = conn.connection.driver_connection
    if raw is not None:
        raw.create_function("fg_glob", 2, glob_match, deterministic=True)


def resolve_bundle(conn: Connection, bundle: str) -> str | None:
    if bundle == "latest":
        return None
    if bundle == "all":
        return "all"
    keys = [r[0] for r in conn.execute(select(s.bundles.c.key).where(s.bundles.c.key.startswith(bundle, autoescape=True)))]
    if len(keys) != 1:
        known = [r[0] for r in conn.execute(select(s.bundles.c.key).order_by(s.bundles.c.created))]
        what = "matches no model bundle" if not keys else f"is ambiguous ({', '.join(keys)})"
        raise FilterError([f"--bundle: {bundle!r} {what}; bundles in this database: {', '.join(known) or 'none'}"])
    return keys[0]


def decision(p: ColumnElement, cut: Cut) -> ColumnElement:
    """The query-time gender label from p(male), as :func:`daemon.pipeline.classify.decide`."""
    if cut.margin <= 0:
        return case((p >= cut.threshold, literal("male")), else_=literal("female"))
    return case((p >= cut.threshold + cut.margin, literal("male")), (p <= cut.threshold - cut.margin, literal("female")),
                else_=literal("uncertain"))


def glob_cond(col, pattern: str, dialect: str) -> ColumnElement:  # noqa: ANN001
    """``col`` (a recorded path) matches the path glob ``pattern``: on PostgreSQL an anchored
    regular expression with no backtracking, elsewhere the SQLite function ``fg_glob`` (see
    :func:`daemon.queries.filters.compile_glob`). Both give the same answer."""
    if dialect == "postgresql":
        return col.op("~")(glob_to_pg_regex(pattern))
    return func.fg_glob(pattern, col) == 1


PATH_END = "\U0010ffff"  # after every text that starts with the same prefix, compared bytewise (UTF-8)


def _file_conds(f: Filters, files, dialect: str = "sqlite", *, by_path: bool = False) -> list[ColumnElement]:  # noqa: ANN001
    """The file filters on ``files``. ``by_path``: the rows are read in path order; on SQLite
    (which compares text bytewise) a single path prefix or root is then also given as a range of
    the path, so that the paths' unique index starts and stops there, and the root's own index is
    kept out of it (SQLite, without statistics, would take the equality on the root, then sort
    every face under it)."""
    c = []
    ranged = by_path and dialect == "sqlite"
    if f.path_prefix:
        c.append(or_(*[func.substr(files.c.path, 1, len(p)) == p for p in f.path_prefix]))
    if f.path_glob:
        c.append(or_(*[glob_cond(files.c.path, g, dialect) for g in f.path_glob]))
    if f.root:
        c.append((files.c.root.concat("") if ranged else files.c.root).in_(f.root))
    if ranged:
        for prefixes in (f.path_prefix, f.root):
            if len(prefixes) == 1:
                c += [files.c.path >= prefixes[0], files.c.path < prefixes[0] + PATH_END]
    if f.seen_since is not None:
        c.append(files.c.first_seen >= f.seen_since)
    if f.seen_until is not None:
        c.append(files.c.first_seen < f.seen_until)
    if f.status:
        c.append(files.c.state.in_(f.status))
    if f.reason:
        c.append(files.c.reason.in_(f.reason))
    return c


def sha_prefix(col, h: str) -> ColumnElement:  # noqa: ANN001
    """``col`` (lower-case hex) starts with ``h``: a range, so the unique index serves it (a LIKE
    would not in SQLite, whose LIKE ignores case)."""
    return col == h if len(h) == 64 else and_(col >= h, col < h + "g")


def _sha_conds(f: Filters, images) -> list[ColumnElement]:  # noqa: ANN001
    if not f.sha256:
        return []
    return [or_(*[sha_prefix(images.c.sha256, h) for h in f.sha256])]


def capture_record(row: dict | None) -> dict:
    """An image row's capture fields as records name them (``camera_make`` for EXIF Make)."""
    row = row or {}
    return {("camera_" + k if k in ("make", "model") else k): row.get(k) for k in capture.FIELDS}


def video_record(row: dict | None) -> dict:
    """An image row's video fields as records name them (all None for a photo)."""
    row = row or {}
    return {k: row.get(k) for k in ("duration", "codec", "sampled", "cut")}


def _capture_conds(f: Filters, image_id: ColumnElement) -> list[ColumnElement]:
    if not f.capture_level:
        return []
    return capture.conditions(image_id, taken_from=f.taken_from, taken_to=f.taken_to, devices=f.device, has_gps=f.has_gps)


def _analysis_conds(sc: Scope, a) -> list[ColumnElement]:  # noqa: ANN001
    if sc.bundle == "all":
        return []
    if sc.bundle is None:  # the image's latest analysis: no later one exists
        a2 = s.analyses.alias("a_later")
        return [~exists(select(a2.c.id).where(a2.c.image_id == a.c.image_id, a2.c.id > a.c.id))]
    return [a.c.bundle == sc.bundle]


def _gender_cond(p: ColumnElement, cut: Cut, genders: Sequence[str]) -> ColumnElement:
    """``decision(p, cut) IN genders`` written as ranges of p: planners estimate (and can index)
    ranges, while a condition on a CASE expression is a blind guess to them."""
    t, m = cut.threshold, cut.margin
    if m > 0:
        ranges = {"male": p >= t + m, "female": p <= t - m, "uncertain": and_(p > t - m, p < t + m)}
    else:
        ranges = {"male": p >= t, "female": p < t, "uncertain": false()}
    return or_(*[ranges[g] for g in genders])


@dataclass(frozen=True)
class _Key:
    """One sort key of a list: an expression (None: NULL on every row of this part of the list),
    its direction, and whether it can be NULL (NULLs sort last either way)."""

    expr: ColumnElement | None
    desc: bool
    nullable: bool = False


def _order(keys: Sequence[_Key], backward: bool = False) -> list:
    """ORDER BY for ``keys`` (reversed, NULLs first, when ``backward``)."""
    out = []
    for k in keys:
        if k.expr is None:
            continue
        o = k.expr.desc() if k.desc != backward else k.expr.asc()
        if k.nullable:
            o = o.nulls_first() if backward else o.nulls_last()
        out.append(o)
    return out


def _all(*terms: bool | ColumnElement) -> bool | ColumnElement:
    """AND of SQL terms and Python constants, the constants folded away."""
    if any(t is False for t in terms):
        return False
    rest = [t for t in terms if t is not True]
    return True if not rest else rest[0] if len(rest) == 1 else and_(*rest)


def _any(*terms: bool | ColumnElement) -> bool | ColumnElement:
    """OR of SQL terms and Python constants, the constants folded away."""
    if any(t is True for t in terms):
        return True
    rest = [t for t in terms if t is not False]
    return False if not rest else rest[0] if len(rest) == 1 else or_(*rest)


def _beyond(keys: Sequence[_Key], values: Sequence, backward: bool = False) -> bool | ColumnElement:
    """The rows strictly after the position ``values`` in the order of ``keys`` (strictly before
    it when ``backward``): a condition, or True / False for a part of a list that lies wholly on
    one side of the position."""
    alts, same = [], []
    for k, v in zip(keys, values):
        if k.expr is None:  # NULL on every row of this part: after every value, before none
            beyond, eq = v is not None and not backward, v is None
        elif v is None:  # before a NULL: every value; after one: nothing (NULLs sort last)
            beyond = (k.expr.is_not(None) if k.nullable else True) if backward else False
            eq = k.expr.is_(None) if k.nullable else False
        else:
            beyond = k.expr < v if k.desc != backward else k.expr > v
            if k.nullable and not backward:
                beyond = or_(beyond, k.expr.is_(None))
            eq = k.expr == v
        alts.append(_all(*same, beyond))
        same.append(eq)
    cond = _any(*alts)
    first, v = keys[0], values[0]
    if first.expr is not None and v is not None and not (first.nullable and not backward) and not isinstance(cond, bool):
        # the same condition led by a plain range on the first key, so that its index starts there
        cond = and_(first.expr <= v if first.desc != backward else first.expr >= v, cond)
    return cond


def _seek(keys: Sequence[_Key], cursor: Sequence | None, backward: bool) -> list[ColumnElement] | None:
    """WHERE terms for a position (none without one); None when no row of this part is beyond it."""
    if cursor is None:
        return []
    cond = _beyond(keys, cursor, backward)
    if cond is False:
        return None
    return [] if cond is True else [cond]


# The fields of a face list's position per sort (each ends with the face id), and their names.
_FACE_CURSOR = {
    "path": ((("text", True), ("hex", False), ("int", False), ("int", False)), "PATH,SHA256,ANALYSIS_ID,FACE_INDEX"),
    "sha256": ((("hex", False), ("int", False), ("int", False)), "SHA256,ANALYSIS_ID,FACE_INDEX"),
    "seen": ((("float", True),), "SEEN"), "age": ((("float", True),), "AGE"), "p_male": ((("float", False),), "P_MALE"),
    "width": ((("float", False),), "WIDTH"), "score": ((("float", False),), "SCORE"), "id": ((), ""),
}
_IMAGE_CURSOR = {
    "path": ((), ""), "sha256": ((("hex", True),), "SHA256"), "size": ((("int", True),), "SIZE"),
    "seen": ((("float", False),), "SEEN"), "faces": ((("int", False),), "FACES"),
}


def _position(f: Filters, table: dict, last: tuple, what: str) -> tuple[tuple | None, bool]:
    """The typed position of ``f.after`` / ``f.before`` (None without one) and whether it is
    ``before``. ``table``: sort -> (fields, names); ``last``: the tiebreak field closing every key."""
    text_ = f.after if f.after is not None else f.before
    if text_ is None:
        return None, False
    fields_, names = table[f.sort.lstrip("-")]
    kinds = (*fields_, last[0])
    try:
        return cursor_values(text_, kinds), f.after is None
    except ValueError as err:
        opt = "--after" if f.after is not None else "--before"
        shape = ",".join(x for x in (names, last[1]) if x)
        raise FilterError([f"{opt}: {text_[:200]!r} {err}; a position in the {what} sorted by {f.sort} is {shape} "
                           f"(follow the page's next and previous links, or leave {opt} out to start at the top)"]) from None


def check_position(f: Filters, rows: str = "faces") -> None:
    """Raise :class:`FilterError` now when ``f.after`` / ``f.before`` is not a position in the
    ``rows`` ("faces" or "images") sorted by ``f.sort`` (commands call it before they create
    an output file; the queries check it again)."""
    if rows == "faces":
        _position(f, _FACE_CURSOR, (("int", False), "FACE_ID"), "face list")
    else:
        _position(f, _IMAGE_CURSOR, (("text", False), "PATH"), "image list")


class _FaceQuery:
    """FROM + WHERE of a face query, with named expressions for the select list and sorting.

    The first matching path (``FL``) and the current review (``R``) are joined only when asked for
    (``with_files``/``with_reviews``) or when a filter needs them; the images table only when the
    columns, the sort, a SHA-256 filter or the reviews need it. A page (``limit``) is selected in
    two steps: the ids and sort keys of the page with only what the filters and the sort need,
    then the full columns for those rows alone.

    Modes: ``faces`` (driven by the faces), ``files`` (driven by each image's first matching path,
    whose index gives the order of the path and seen sorts) and ``nofile`` (faces of contents no
    recorded path holds any more). ``ages``: only the faces with (``known``) or without
    (``unknown``) an age, the two parts of a list sorted by age (each then reads its index in
    order, either way)."""

    def __init__(self, f: Filters, sc: Scope, *, with_files: bool = True, with_reviews: bool = True, mode: str = "faces",
                 correlated: bool | None = None, with_images: bool = True, ages: str | None = None) -> None:
        F, A, I = s.faces, s.analyses, s.images  # noqa: N806
        self.f, self.sc, self.mode, self.ages = f, sc, mode, ages
        # per-row lookups of the first path suit SQLite, and PostgreSQL too when few rows qualify
        self.correlated = (sc.dialect != "postgresql" or bool(f.sha256)) if correlated is None else correlated
        self.fconds = bool(_file_conds(f, s.files, sc.dialect))
        self.has_review = sc.reviews and (with_reviews or bool(f.review or f.final_gender))
        self.has_images = with_images or bool(f.sha256) or self.has_review
        w: list[ColumnElement] = []
        if mode == "files":
            FL = s.files.alias("fl")  # noqa: N806
            # ``+ 0``: SQLite must not find an analysis by its id from a face, so that it reads the
            # files first, in index order, even without statistics (which nothing gathers for it)
            aid = A.c.id + 0 if sc.dialect == "sqlite" else A.c.id
            # ``idx >= 0`` (always true) on SQLite when the list is read in path (or seen) order:
            # a range on the second column of the faces' (analysis, idx) index makes that index
            # look narrower to it than a partial index it would otherwise build over every face
            # on each run when face filters are given (a million faces: 0.6 s per page). Not for
            # counts: the faces would then look cheaper to start from than the files
            ordered = sc.dialect == "sqlite" and f.sort.lstrip("-") in ("path", "seen")
            on_faces = and_(F.c.analysis_id == aid, F.c.idx >= 0) if ordered else F.c.analysis_id == aid
            base = FL.join(A, A.c.image_id == FL.c.image_id).join(F, on_faces)
            if self.has_images:
                base = base.join(I, I.c.id == A.c.image_id)
            self.frm, _, self.R = self.joins(base, False, self.has_review)
            self.FL = FL
            self.has_path = True
            w += [self._first(FL), *_file_conds(f, FL, sc.dialect, by_path=f.sort.lstrip("-") == "path")]
        else:
            self.has_path = mode == "faces" and (with_files or self.fconds)
            # the faces of contents without a path: from the analyses that have none (as above)
            aid = A.c.id + 0 if mode == "nofile" and sc.dialect == "sqlite" else A.c.id
            base = F.join(A, aid == F.c.analysis_id)
            if self.has_images:
                base = base.join(I, I.c.id == A.c.image_id)
            self.frm, self.FL, self.R = self.joins(base, self.has_path, self.has_review)
            if mode == "nofile":  # faces of contents no recorded path holds any more
                w.append(~exists(select(s.files.c.id).where(s.files.c.image_id == A.c.image_id)))
        self.D = D = decision(F.c.p_male, sc.cut)  # noqa: N806
        self.final = case((self.R.c.status.in_(("confirmed", "corrected")), self.R.c.label), else_=D) if self.R is not None else D
        w += _analysis_conds(sc, A)
        if ages:
            w.append(F.c.age.is_not(None) if ages == "known" else F.c.age.is_(None))
        if f.sha256:
            w += _sha_conds(f, I)
        w += _capture_conds(f, A.c.image_id)
        # Range filters are written as ``col + 0`` on SQLite so that it never drives a query from
        # a range index whose selectivity it cannot know (without STAT4 it would walk half the
        # table through an index), except on the column the list is sorted by, whose index then
        # gives the order and the range at once. PostgreSQL estimates ranges from its statistics.
        key = f.sort.lstrip("-")

        def rng(col, sort_key: str):  # noqa: ANN001, ANN202
            return col if sc.dialect == "postgresql" or key == sort_key else col + 0

        p_male, age, width, score = rng(F.c.p_male, "p_male"), rng(F.c.age, "age"), rng(F.c.width_px, "width"), rng(F.c.score, "score")
        if f.gender:
            w.append(_gender_cond(p_male, sc.cut, f.gender))
        if f.uncertain:
            w.append(_gender_cond(p_male, sc.cut, ("uncertain",)))
        if f.final_gender:
            model = [g for g in f.final_gender if g != "not_face"]
            decided = _gender_cond(p_male, sc.cut, model) if model else false()
            if self.R is None:
                w.append(decided)
            else:  # the analyst's label where a review confirmed or corrected the face, else the decision
                R = self.R  # noqa: N806
                labelled = R.c.status.in_(("confirmed", "corrected"))
                w.append(or_(and_(labelled, R.c.label.in_(f.final_gender)),
                             and_(or_(R.c.status.is_(None), R.c.status.not_in(("confirmed", "corrected"))), decided)))
        if f.p_male_min is not None:
            w.append(p_male >= f.p_male_min)
        if f.p_male_max is not None:
            w.append(p_male <= f.p_male_max)
        if f.age_min is not None:
            w.append(age >= f.age_min)
        if f.age_max is not None:
            w.append(age <= f.age_max)
        if f.minors:
            spread = f.minor_k * func.coalesce(F.c.age_std, 0.0)
            w.append(age.is_not(None))
            w.append((F.c.age + spread if f.minors == "likely" else F.c.age - spread) < ADULT_AGE)
        if f.width_min is not None:
            w.append(width >= f.width_min)
        if f.width_max is not None:
            w.append(width <= f.width_max)
        if f.score_min is not None:
            w.append(score >= f.score_min)
        if f.review:
            w.append(or_(*[self._review_cond(x) for x in f.review]))
            if sc.reviews and "unreviewed" not in f.review:  # only reviewed images can match
                w.append(I.c.sha256.in_(select(rv.reviews.c.sha256)))
        self.where = w

    def _first(self, FL) -> ColumnElement:  # noqa: ANN001, N803
        """``FL`` is its image's first path (lowest id) among those matching the file filters: no
        earlier one exists (an anti-join PostgreSQL hashes or probes by index, and a probe of the
        image's index entries on SQLite)."""
        f2 = s.files.alias("f2")
        return ~exists(select(f2.c.id).where(f2.c.image_id == FL.c.image_id, f2.c.id < FL.c.id, *_file_conds(self.f, f2, self.sc.dialect)))

    def joins(self, frm, with_path: bool, with_review: bool, *, correlated: bool | None = None):  # noqa: ANN001, ANN201
        """``frm`` (which holds faces and analyses, and images when reviews are asked for) joined
        to the first matching path (an inner join when file filters ask for a path)
        and the current review. The first path is a correlated lookup per row on SQLite (and for
        a page's few rows); on PostgreSQL a join to the files with no earlier matching path of
        the same image (an anti-join), which its planner hashes or probes by index as it sees fit."""
        F, A, I = s.faces, s.analyses, s.images  # noqa: N806
        FL = R = None  # noqa: N806
        if with_path:
            FL = s.files.alias("fl")  # noqa: N806
            f2 = s.files.alias("f2")
            outer = not self.fconds
            if correlated is None:
                correlated = self.correlated
            if correlated:
                first = select(func.min(f2.c.id)).where(f2.c.image_id == A.c.image_id, *_file_conds(self.f, f2, self.sc.dialect)).scalar_subquery()
                frm = frm.join(FL, FL.c.id == first, isouter=outer)
            else:
                frm = frm.join(FL, and_(FL.c.image_id == A.c.image_id, self._first(FL), *_file_conds(self.f, FL, self.sc.dialect)), isouter=outer)
        if with_review:
            R, r2 = rv.reviews.alias("r"), rv.reviews.alias("r2")  # noqa: N806
            latest = (select(r2.c.id).where(r2.c.sha256 == I.c.sha256, rv.overlaps(r2, F.c.x1, F.c.y1, F.c.x2, F.c.y2))
                      .order_by(r2.c.id.desc()).limit(1).scalar_subquery())
            # the membership test (one pass over reviews) spares the lookup for unreviewed images
            latest = case((I.c.sha256.in_(select(rv.reviews.c.sha256)), latest))
            frm = frm.outerjoin(R, R.c.id == latest)
        return frm, FL, R

    def _review_cond(self, x: str) -> ColumnElement:
        R = self.R  # noqa: N806
        if R is None:  # no reviews table: nothing is reviewed
            return true() if x == "unreviewed" else false()
        if x == "reviewed":
            return R.c.status.in_(ACTIVE_REVIEWS)
        if x == "unreviewed":
            return or_(R.c.id.is_(None), R.c.status == "cleared")
        return R.c.status == x

    def columns(self, FL=None, R=None) -> list:  # noqa: ANN001, N803
        F, A, I = s.faces, s.analyses, s.images  # noqa: N806
        FL = self.FL if FL is None else FL  # noqa: N806
        R = self.R if R is None else R  # noqa: N806
        cols = [
            F.c.id.label("face_id"), I.c.sha256, I.c.md5, F.c.idx, F.c.x1, F.c.y1, F.c.x2, F.c.y2, F.c.width_px, F.c.score,
            F.c.p_male, F.c.p_female, self.D.label("gender"), F.c.gender.label("model_gender"), F.c.age, F.c.age_std,
            F.c.landmarks, A.c.bundle, A.c.id.label("analysis_id"), A.c.created.label("analysed"), I.c.id.label("image_id"),
            I.c.size, I.c.width.label("image_width"), I.c.height.label("image_height"), I.c.format,
        ]
        if FL is not None:
            cols += [FL.c.path, FL.c.root, FL.c.first_seen.label("seen"), FL.c.state]
        else:
            cols += [literal(None).label(n) for n in ("path", "root", "seen", "state")]
        if R is not None:
            final = case((R.c.status.in_(("confirmed", "corrected")), R.c.label), else_=self.D)
            cols += [R.c.status.label("review"), R.c.label.label("review_label"), R.c.note.label("review_note"),
                     R.c.reviewer, R.c.created.label("reviewed"), R.c.id.label("review_id"), final.label("final_gender")]
        else:
            cols += [literal(None).label(n) for n in ("review", "review_label", "review_note", "reviewer", "reviewed", "review_id")]
            cols.append(self.D.label("final_gender"))
        if self.sc.persons:  # the face's person: a lookup per row by primary key
            fp, p = ps.face_persons, ps.persons
            cols += [select(fp.c.person_id).where(fp.c.face_id == F.c.id).scalar_subquery().label("person_id"),
                     select(p.c.name).select_from(fp.join(p, p.c.id == fp.c.person_id)).where(fp.c.face_id == F.c.id)
                     .scalar_subquery().label("person_name")]
        else:
            cols += [literal(None).label("person_id"), literal(None).label("person_name")]
        if self.sc.videos:  # a video's face: its frame and the frame's time (null for images)
            cols += [F.c.frame, F.c.frame_time]
        else:
            cols += [literal(None).label("frame"), literal(None).label("frame_time")]
        return cols

    def keys(self) -> list[_Key]:
        """The sort, ending with the face id (a total order, so that positions are exact). A
        descending sort is the ascending one reversed, the tiebreak included, except that NULLs
        (no age; no current path) come last either way."""
        F, A, I = s.faces, s.analyses, s.images  # noqa: N806
        key = self.f.sort.lstrip("-")
        desc = self.f.sort.startswith("-")
        if key not in FACE_SORTS:
            raise FilterError([f"--sort: faces sort by {', '.join(FACE_SORTS)}, got {self.f.sort!r}"])
        FL = self.FL  # noqa: N806 - None in the part without a current path (NULL there)
        no_path = self.mode == "faces" and not self.fconds  # the path is an outer join: NULL for faces without one
        primary: list[tuple[ColumnElement | None, bool]] = {
            "path": [(None if FL is None else FL.c.path, no_path), (I.c.sha256, False), (A.c.id, False), (F.c.idx, False)],
            "sha256": [(I.c.sha256, False), (A.c.id, False), (F.c.idx, False)],
            "seen": [(None if FL is None else FL.c.first_seen, no_path)],
            "p_male": [(F.c.p_male, False)], "age": [(None if self.ages == "unknown" else F.c.age, self.ages is None)],
            "width": [(F.c.width_px, False)],
            "score": [(F.c.score, False)], "id": [],
        }[key]
        return [_Key(c, desc, nullable) for c, nullable in primary] + [_Key(F.c.id, desc)]

    def select(self, limit: int | None, offset: int = 0, *, cursor: Sequence | None = None, backward: bool = False,
               with_keys: bool = True):  # noqa: ANN201
        """This part's rows in order (reversed when ``backward``), beyond ``cursor`` when given,
        each with its sort key as ``_k0``, ``_k1``... (pages; ``with_keys``: also without a
        limit); None when no row is beyond the cursor."""
        if not limit:
            keys = self.keys()
            seek = _seek(keys, cursor, backward)
            if seek is None:
                return None
            key_cols = [k.expr.label(f"_k{i}") for i, k in enumerate(keys) if k.expr is not None] if with_keys else []
            q = select(*self.columns(), *key_cols).select_from(self.frm).where(*self.where, *seek).order_by(*_order(keys, backward))
            return q.offset(offset) if offset else q
        # step 1: the page's face ids and sort keys, joining only what filters and sort need
        key = self.f.sort.lstrip("-")
        slim = _FaceQuery(self.f, self.sc, with_files=key in ("path", "seen"), with_reviews=False, mode=self.mode,
                          with_images=key in ("path", "sha256"), ages=self.ages)
        keys = slim.keys()
        seek = _seek(keys, cursor, backward)
        if seek is None:
            return None
        live = [i for i, k in enumerate(keys) if k.expr is not None]
        page = (select(*[keys[i].expr.label(f"k{i}") for i in live]).select_from(slim.frm).where(*slim.where, *seek)
                .order_by(*_order(keys, backward)).limit(limit).offset(offset or None).subquery("pg"))
        # step 2: every column for those rows only
        F, A, I = s.faces, s.analyses, s.images  # noqa: N806
        frm = page.join(F, F.c.id == page.c[f"k{len(keys) - 1}"]).join(A, A.c.id == F.c.analysis_id).join(I, I.c.id == A.c.image_id)
        frm, FL, R = self.joins(frm, self.mode != "nofile", self.sc.reviews, correlated=True)  # noqa: N806
        order = [_Key(page.c[f"k{i}"] if k.expr is not None else None, k.desc, k.nullable) for i, k in enumerate(keys)]
        return (select(*self.columns(FL, R), *[page.c[f"k{i}"].label(f"_k{i}") for i in live])
                .select_from(frm).order_by(*_order(order, backward)))

    def count(self):  # noqa: ANN201
        return select(func.count()).select_from(self.frm).where(*self.where)

    def image_exists(self, image_id_col) -> ColumnElement:  # noqa: ANN001
        """EXISTS a matching face in the image ``image_id_col`` (for the images command)."""
        q = select(s.faces.c.id).select_from(self.frm).where(*self.where, s.analyses.c.image_id == image_id_col)
        return exists(q)


def _face_parts(f: Filters, sc: Scope) -> list[_FaceQuery]:
    """The parts a face list is read in, in order. Sorted by path or by when the path was seen:
    faces whose content is at a recorded path (found through the files table, whose indexes give
    the order), then faces of contents no path holds any more (no path: last either way); with a
    SHA-256 filter, one part (the same order). Sorted by age: the faces with an age, then those
    without (last either way)."""
    key = f.sort.lstrip("-")
    if key in ("path", "seen") and f.sha256:  # a few images, found by their hash: one part, sorted after the fact
        return [_FaceQuery(f, sc)]
    if key in ("path", "seen"):
        parts = [_FaceQuery(f, sc, mode="files")]
        if not _file_conds(f, s.files, sc.dialect):
            parts.append(_FaceQuery(f, sc, mode="nofile"))
        return parts
    if key == "age":
        return [_FaceQuery(f, sc, ages="known"), _FaceQuery(f, sc, ages="unknown")]
    return [_FaceQuery(f, sc)]


def _walk_faces(conn: Connection, f: Filters, sc: Scope, *, limit: int | None, offset: int = 0, cursor: tuple | None = None,
                backward: bool = False, stream: bool = False, with_keys: bool = True) -> Iterator[tuple[dict, tuple]]:
    """(row, sort key) in ``f.sort`` order (reversed when ``backward``) from the position
    ``cursor`` on (exclusive), at most ``limit``, after skipping ``offset``. Without
    ``with_keys``, an unlimited walk reads no sort keys (the key is then empty)."""
    parts = _face_parts(f, sc)
    nkeys = len(parts[0].keys())
    if backward:
        parts.reverse()
    for i, part in enumerate(parts):
        if i > 0 and offset:  # the earlier parts' rows all came before the offset
            offset = max(0, offset - conn.execute(parts[i - 1].count()).scalar_one())
        q = part.select(limit, offset, cursor=cursor, backward=backward, with_keys=with_keys)
        if q is None:
            continue
        res = conn.execution_options(yield_per=BATCH).execute(q) if stream else conn.execute(q)
        got = 0
        if with_keys or limit:
            popped = [f"_k{j}" for j in range(nkeys)]
            for row in res:
                got += 1
                d = dict(row._mapping)
                yield d, tuple([d.pop(k, None) for k in popped])
        else:  # a stream without positions (exports): nothing to take out
            for row in res:
                got += 1
                yield dict(row._mapping), ()
        if limit:
            limit -= got
            if limit <= 0:
                return
        if got:
            offset = 0


def faces(conn: Connection, f: Filters, sc: Scope, *, stream: bool = False) -> Iterator[dict]:
    """Face rows matching ``f`` in ``f.sort`` order; ``f.limit`` and ``f.offset``, or the keyset
    position ``f.after`` / ``f.before``, applied (with ``before``, the ``limit`` rows just before
    the position, read backwards and returned in order)."""
    cursor, backward = _position(f, _FACE_CURSOR, (("int", False), "FACE_ID"), "face list")
    if backward:
        rows = [r for r, _ in _walk_faces(conn, f, sc, limit=f.limit, cursor=cursor, backward=True)]
        yield from with_capture(conn, reversed(rows))
        return
    walk = _walk_faces(conn, f, sc, limit=f.limit, offset=f.offset, cursor=cursor, stream=stream, with_keys=False)
    yield from with_capture(conn, (r for r, _ in walk))


def with_capture(conn: Connection, rows: Iterable[dict], chunk: int = 500) -> Iterator[dict]:
    """``rows`` (with ``image_id``) with their image's capture fields added, looked up ``chunk``
    rows at a time (an export stays streamed)."""
    if not capture.has_table(conn):
        yield from rows
        return
    batch: list[dict] = []
    for r in rows:
        batch.append(r)
        if len(batch) >= chunk:
            yield from _add_capture(conn, batch)
            batch = []
    yield from _add_capture(conn, batch)


def _add_capture(conn: Connection, batch: list[dict]) -> list[dict]:
    found = capture.lookup(conn, sorted({r["image_id"] for r in batch if r.get("image_id") is not None}))
    return [{**r, **capture_record(c)} if (c := found.get(r.get("image_id"))) else r for r in batch]


@dataclass(frozen=True)
class Page:
    """One page of a list: its rows, and the positions of the pages on either side (texts for
    ``after=`` and ``before=``; None where there is no such page)."""

    rows: list[dict]
    next: str | None
    prev: str | None


def _page(walk, f: Filters, table: dict, last: tuple, what: str) -> Page:  # noqa: ANN001
    """A page of ``f.limit`` rows at ``f.after`` / ``f.before`` / ``f.offset``, one more row read
    to know whether a next (previous) page exists. Asked for the page before a position with
    fewer than a page of rows before it, the first page is given."""
    limit = f.limit or 50
    cursor, backward = _position(f, table, last, what)
    if backward:
        got = list(walk(limit=limit + 1, cursor=cursor, backward=True))
        if len(got) >= limit:
            got, earlier = got[:limit][::-1], len(got) > limit
            return Page([r for r, _ in got], cursor_text(got[-1][1]), cursor_text(got[0][1]) if earlier else None)
        cursor = None
    got = list(walk(limit=limit + 1, offset=f.offset, cursor=cursor))
    more = len(got) > limit
    got = got[:limit]
    started = cursor is not None or (f.offset > 0 and not backward)
    prev = (cursor_text(got[0][1]) if got else (f.after or None)) if started else None
    return Page([r for r, _ in got], cursor_text(got[-1][1]) if more else None, prev)


def face_page(conn: Connection, f: Filters, sc: Scope) -> Page:
    """One page of faces (``f.limit`` of them, default 50) with the positions of the next and
    previous pages: what the review page shows. A page deep in the list costs what the first does."""
    def walk(**kw) -> Iterator[tuple[dict, tuple]]:  # noqa: ANN003
        return _walk_faces(conn, f, sc, **kw)

    return _page(walk, f, _FACE_CURSOR, (("int", False), "FACE_ID"), "face list")


def count_faces(conn: Connection, f: Filters, sc: Scope, *, cap: int | None = None) -> int:
    """How many faces match ``f`` (paging ignored). With ``cap``, counting stops after cap + 1:
    a result above ``cap`` means "more than cap", at a bounded cost for broad filters."""
    if cap is None and not (f.face_level or f.file_level or f.sha256):
        # no filter on the faces, their paths or hashes: the analyses say how many faces they
        # hold (the writer records both in one transaction), so the count reads no face row
        A = s.analyses  # noqa: N806
        total = select(func.coalesce(func.sum(A.c.faces), 0)).where(*_analysis_conds(sc, A), *_capture_conds(f, A.c.image_id))
        return int(conn.execute(total).scalar_one())
    # sorted by id: no range filter is then written for a sort's index (see _FaceQuery). With
    # file filters on SQLite, driven by each image's first matching path (an index on the files
    # may find them, and a path test runs once per file, not once per face: a million faces, a
    # glob 4.3 -> 0.5 s); PostgreSQL plans the faces' join to the first path as well either way
    by_file = f.file_level and sc.dialect == "sqlite"
    q = _FaceQuery(replace(f.page(None), sort="id"), sc, with_files=False, with_reviews=False, with_images=False,
                   mode="files" if by_file else "faces")
    if cap is None:
        return conn.execute(q.count()).scalar_one()
    some = select(literal(1).label("one")).select_from(q.frm).where(*q.where).limit(cap + 1).subquery("capped")
    return conn.execute(select(func.count()).select_from(some)).scalar_one()


def paths_of(conn: Connection, image_ids: Sequence[int]) -> dict[int, list[dict]]:
    """Every recorded path of each image (for exports and the image page), ordered by path."""
    out: dict[int, list[dict]] = {i: [] for i in image_ids}
    F = s.files  # noqa: N806
    for chunk in _chunks(list(image_ids), BATCH):
        q = (select(F.c.id, F.c.image_id, F.c.path, F.c.root, F.c.state, F.c.reason, F.c.error, F.c.size, F.c.mtime_ns,
                    F.c.first_seen, F.c.last_seen, F.c.updated, F.c.attempts)
             .where(F.c.image_id.in_(chunk)).order_by(F.c.path))
        for r in conn.execute(q):
            out[r.image_id].append(dict(r._mapping))
    return out


def _chunks(seq: list, n: int) -> Iterator[list]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


# --------------------------------------------------------------------------------------------
# Images


def _walk_images(conn: Connection, f: Filters, sc: Scope, *, limit: int | None, offset: int = 0, cursor: tuple | None = None,
                 backward: bool = False, stream: bool = False) -> Iterator[tuple[dict, tuple]]:
    """(image row, sort key) in ``f.sort`` order (reversed when ``backward``) from the position
    ``cursor`` on (exclusive). The sort ends with the image's first path, unique in the list."""
    FI, I = s.files, s.images  # noqa: N806
    key = f.sort.lstrip("-")
    lone = case((FI.c.image_id.is_(None), FI.c.id))
    conds = [*_file_conds(f, FI, sc.dialect, by_path=key == "path"), *_sha_conds(f, I), *_capture_conds(f, FI.c.image_id)]
    if f.sha256:
        conds.append(FI.c.image_id.is_not(None))
    if f.face_level or sc.bundle not in (None, "all"):
        fq = _FaceQuery(f.page(None), sc, with_files=False, with_reviews=False, with_images=False)
        if f.face_level:
            conds.append(fq.image_exists(FI.c.image_id))
        else:  # a bundle was named: images analysed under it
            A = s.analyses  # noqa: N806
            conds.append(exists(select(A.c.id).where(A.c.image_id == FI.c.image_id, A.c.bundle == sc.bundle)))
    frm = FI.outerjoin(I, I.c.id == FI.c.image_id)
    desc = f.sort.startswith("-")
    if key == "path":
        q = _first_paths_in_order(f, sc, frm, conds, lone, desc, cursor, backward)
        if q is None:
            return
    else:
        q = _image_groups(f, sc, frm, conds, lone, key, desc, cursor, backward)
        if q is None:
            return
    if limit:
        q = q.limit(limit)
    if offset:
        q = q.offset(offset)
    res = conn.execution_options(yield_per=BATCH).execute(q) if stream else conn.execute(q)
    batch: list = []
    for row in res:
        batch.append(row)
        if len(batch) >= BATCH:
            yield from _image_batch(conn, batch, sc, key)
            batch = []
    if batch:
        yield from _image_batch(conn, batch, sc, key)


def _first_paths_in_order(f: Filters, sc: Scope, frm, conds: list[ColumnElement], lone: ColumnElement, desc: bool,  # noqa: ANN001
                          cursor: tuple | None, backward: bool):  # noqa: ANN202
    """The image list sorted by path: each image's first matching path (no matching path of the
    same image sorts before it; a file never hashed is an image of its own), read in the order
    of the paths' unique index from the position on, so that a page costs what its rows cost,
    not a grouping of every file; None when no row is beyond the position."""
    FI = s.files  # noqa: N806
    f2 = FI.alias("f2")
    first = ~exists(select(f2.c.id).where(f2.c.image_id == FI.c.image_id, f2.c.path < FI.c.path, *_file_conds(f, f2, sc.dialect)))
    keys = [_Key(FI.c.path, desc)]
    seek = _seek(keys, cursor, backward)
    if seek is None:
        return None
    return (select(FI.c.image_id, lone.label("file_id"), FI.c.path).select_from(frm).where(*conds, first, *seek)
            .order_by(*_order(keys, backward)))


def _image_groups(f: Filters, sc: Scope, frm, conds: list[ColumnElement], lone: ColumnElement, key: str, desc: bool,  # noqa: ANN001
                  cursor: tuple | None, backward: bool):  # noqa: ANN202
    """The image list sorted by something else than the path: the matching files grouped by
    image, then sorted by the sort value and the first path; None when no row is beyond the
    position."""
    FI, I = s.files, s.images  # noqa: N806
    cols = [FI.c.image_id, lone.label("file_id"), func.min(FI.c.path).label("path"), func.min(FI.c.first_seen).label("seen"),
            func.max(I.c.size).label("size"), func.max(I.c.sha256).label("sha256")]
    if key == "faces":  # faces per image in one grouped pass over the analyses, which hold their face counts
        A = s.analyses  # noqa: N806
        nf = select(A.c.image_id, func.sum(A.c.faces).label("n")).where(*_analysis_conds(sc, A)).group_by(A.c.image_id).subquery("nf")
        frm = frm.outerjoin(nf, nf.c.image_id == FI.c.image_id)
        cols.append(func.coalesce(func.max(nf.c.n), 0).label("nfaces"))
    g = select(*cols).select_from(frm).where(*conds).group_by(FI.c.image_id, lone).subquery("g")
    first = _Key(g.c.nfaces, desc) if key == "faces" else {"sha256": _Key(g.c.sha256, desc, True), "size": _Key(g.c.size, desc, True),
                                                          "seen": _Key(g.c.seen, desc)}[key]
    keys = [first, _Key(g.c.path, False)]
    seek = _seek(keys, cursor, backward)
    if seek is None:
        return None
    return select(g).where(*seek).order_by(*_order(keys, backward))


def _image_batch(conn: Connection, groups: list, sc: Scope, key: str) -> Iterator[tuple[dict, tuple]]:
    """Image rows for a batch of groups, each with its sort key (the sort value, the first path)."""
    col = {"path": None, "sha256": "sha256", "size": "size", "seen": "seen", "faces": "nfaces"}[key]
    for g, row in zip(groups, _image_details(conn, groups, sc)):
        yield row, ((g.path,) if col is None else (g._mapping[col], g.path))


def images(conn: Connection, f: Filters, sc: Scope, *, stream: bool = False) -> Iterator[dict]:
    """Image rows (one per distinct content; one per path for files never hashed), with
    ``f.limit`` and ``f.offset`` or the keyset position ``f.after`` / ``f.before`` applied."""
    if f.sort.lstrip("-") not in IMAGE_SORTS:
        raise FilterError([f"--sort: images sort by {', '.join(IMAGE_SORTS)}, got {f.sort!r}"])
    cursor, backward = _position(f, _IMAGE_CURSOR, (("text", False), "PATH"), "image list")
    if backward:
        rows = [r for r, _ in _walk_images(conn, f, sc, limit=f.limit, cursor=cursor, backward=True)]
        yield from reversed(rows)
        return
    for r, _ in _walk_images(conn, f, sc, limit=f.limit, offset=f.offset, cursor=cursor, stream=stream):
        yield r


def image_page(conn: Connection, f: Filters, sc: Scope) -> Page:
    """One page of images with the positions of the next and previous pages (see :func:`face_page`)."""
    if f.sort.lstrip("-") not in IMAGE_SORTS:
        raise FilterError([f"--sort: images sort by {', '.join(IMAGE_SORTS)}, got {f.sort!r}"])

    def walk(**kw) -> Iterator[tuple[dict, tuple]]:  # noqa: ANN003
        return _walk_images(conn, f, sc, **kw)

    return _page(walk, f, _IMAGE_CURSOR, (("text", False), "PATH"), "image list")


def _image_details(conn: Connection, groups: list, sc: Scope) -> Iterator[dict]:
    I, FI, A, F = s.images, s.files, s.analyses, s.faces  # noqa: N806
    ids = [g.image_id for g in groups if g.image_id is not None]
    lone = [g.file_id for g in groups if g.image_id is None]
    info = {r.id: dict(r._mapping) for r in conn.execute(select(I).where(I.c.id.in_(ids)))} if ids else {}
    paths = paths_of(conn, ids) if ids else {}
    lone_rows = {}
    if lone:
        for r in conn.execute(select(FI.c.id, FI.c.image_id, FI.c.path, FI.c.root, FI.c.state, FI.c.reason, FI.c.error, FI.c.size,
                                     FI.c.mtime_ns, FI.c.first_seen, FI.c.last_seen, FI.c.updated, FI.c.attempts).where(FI.c.id.in_(lone))):
            lone_rows[r.id] = dict(r._mapping)
    counts: dict[int, dict] = {}
    if ids:
        D = decision(F.c.p_male, sc.cut)  # noqa: N806
        q = (select(A.c.image_id, func.count(func.distinct(A.c.id)).label("analyses"), func.max(A.c.bundle).label("bundle"),
                    func.max(A.c.created).label("analysed"), func.count(F.c.id).label("faces"),
                    # an analysis without faces joins as one row of NULLs: count faces, not rows
                    *[func.count(F.c.id).filter(D == g).label(g) for g in ("female", "male", "uncertain")])
             .select_from(A.outerjoin(F, F.c.analysis_id == A.c.id))
             .where(A.c.image_id.in_(ids), *_analysis_conds(sc, A)).group_by(A.c.image_id))
        counts = {r.image_id: dict(r._mapping) for r in conn.execute(q)}
    captured = capture.of_images(conn, ids)
    clips = videos.lookup(conn, ids) if sc.videos else {}
    for g in groups:
        if g.image_id is None:
            fr = lone_rows[g.file_id]
            yield {"sha256": None, "md5": None, "size": None, "format": None, "width": None, "height": None,
                   "orientation": None, "frames": None, "notes": None, "first_seen": fr["first_seen"], "image_id": None,
                   "path": fr["path"], "paths": [fr], "status": fr["state"], "reason": fr["reason"], "error": fr["error"],
                   "analyses": 0, "bundle": None, "analysed": None, "faces": 0, "female": 0, "male": 0, "uncertain": 0}
            continue
        im = info[g.image_id]
        ps = paths[g.image_id]
        c = counts.get(g.image_id, {})
        states = list(dict.fromkeys(p["state"] for p in ps))
        reason = next((p["reason"] for p in ps if p["reason"]), None)
        error = next((p["error"] for p in ps if p["error"]), None)
        yield {**{k: im[k] for k in ("sha256", "md5", "size", "format", "width", "height", "orientation", "frames", "notes", "first_seen")},
               "image_id": g.image_id, "path": g.path, "paths": ps, "status": ",".join(states), "reason": reason, "error": error,
               "analyses": c.get("analyses", 0) if c else 0, "bundle": c.get("bundle"), "analysed": c.get("analysed"),
               "faces": int(c.get("faces") or 0), **{k: int(c.get(k) or 0) for k in ("female", "male", "uncertain")},
               **capture_record(captured.get(g.image_id)), **video_record(clips.get(g.image_id))}


# --------------------------------------------------------------------------------------------
# One image: everything known (show, annotate, the image page)


def find_image(conn: Connection, target: str) -> tuple[int | None, list[str]]:
    """The image id for a recorded path or a SHA-256 (or unique prefix of >= 6 hex digits);
    (None, why-not messages) when there is none or several."""
    F, I = s.files, s.images  # noqa: N806
    row = conn.execute(select(F.c.image_id, F.c.state, F.c.reason).where(F.c.path == target)).first()
    if row is not None:
        if row.image_id is None:
            return None, [f"{target} is recorded but its content was never hashed (state {row.state}, reason {row.reason})"]
        return row.image_id, []
    low = target.lower()
    if 6 <= len(low) <= 64 and all(c in "0123456789abcdef" for c in low):
        ids = [r[0] for r in conn.execute(select(I.c.id).where(sha_prefix(I.c.sha256, low)).limit(3))]
        if len(ids) == 1:
            return ids[0], []
        if len(ids) > 1:
            return None, [f"{target} is a prefix of several images' SHA-256; give more digits"]
    return None, [f"{target}: no recorded path or image SHA-256 matches; paths must be given exactly as recorded (absolute)"]


def image_detail(conn: Connection, image_id: int, sc: Scope) -> dict:
    """Image facts, every path (with states and failure reasons), every analysis with its faces
    and their reviews, the review history, and the events about its files."""
    I, A, B, E = s.images, s.analyses, s.bundles, s.events  # noqa: N806
    im = dict(conn.execute(select(I).where(I.c.id == image_id)).one()._mapping)
    ps = paths_of(conn, [image_id])[image_id]
    analyses = [dict(r._mapping) for r in conn.execute(
        select(A, B.c.spec).select_from(A.join(B, B.c.key == A.c.bundle)).where(A.c.image_id == image_id).order_by(A.c.id))]
    all_faces = list(faces(conn, Filters(sha256=(im["sha256"],), bundle="all", sort="sha256"), replace(sc, bundle="all")))
    by_analysis: dict[int, list[dict]] = {}
    for fr in all_faces:
        by_analysis.setdefault(fr["analysis_id"], []).append(fr)
    latest = analyses[-1]["id"] if analyses else None
    for a in analyses:
        a["faces_rows"] = by_analysis.get(a["id"], [])
        a["latest"] = a["id"] == latest
        a["spec"] = json.loads(a["spec"]) if a.get("spec") else None
    history = []
    if sc.reviews:
        R = rv.reviews  # noqa: N806
        history = [dict(r._mapping) for r in conn.execute(select(R).where(R.c.sha256 == im["sha256"]).order_by(R.c.id))]
    file_ids = [p["id"] for p in ps]
    events = []
    if file_ids:
        conds = [E.c.file_id.in_(file_ids)]
        for p in ps:
            conds.append(E.c.detail.contains(json.dumps(p["path"]), autoescape=True))
        events = [dict(r._mapping) for r in conn.execute(select(E).where(or_(*conds)).order_by(E.c.at, E.c.id).limit(500))]
    found = capture.of_images(conn, [image_id]).get(image_id)
    clip = videos.lookup(conn, [image_id]).get(image_id) if sc.videos else None
    if clip is not None:
        clip["frames"] = videos.frames(conn, image_id)
    return {**im, "paths": ps, "analyses": analyses, "reviews": history, "events": events,
            "capture": capture_record(found) if found else None, "video": clip}


def face(conn: Connection, face_id: int, sc: Scope) -> dict | None:
    """One face row (whatever its bundle) with its image's facts."""
    f = Filters(bundle="all", sort="id")
    q = _FaceQuery(f, replace(sc, bundle="all"), correlated=True)
    row = conn.execute(select(*q.columns()).select_from(q.frm).where(*q.where, s.faces.c.id == face_id)).first()
    return dict(row._mapping) if row else None


def review_history(conn: Connection, row: dict) -> list[dict]:
    """Every review (oldest first) that attaches to this face row's content and box."""
    if not rv.has_reviews(conn):
        return []
    R = rv.reviews  # noqa: N806
    q = select(R).where(R.c.sha256 == row["sha256"], rv.overlaps(R, row["x1"], row["y1"], row["x2"], row["y2"])).order_by(R.c.id)
    return [dict(r._mapping) for r in conn.execute(q)]


# --------------------------------------------------------------------------------------------
# Statistics


AGE_BANDS = ((0, 13, "0-12"), (13, 18, "13-17"), (18, 25, "18-24"), (25, 35, "25-34"), (35, 50, "35-49"), (50, 65, "50-64"), (65, 1000, "65+"))


def stats(conn: Connection, f: Filters, sc: Scope, *, now: float | None = None) -> dict:
    """Totals, by root, by state and failure reason, gender and age distributions, backlog,
    throughput over the last hour, model bundles in use, reviews. File filters (root, path,
    seen, status) and the bundle apply; face filters narrow the face distributions.

    Cost: one pass over the matching files (grouped by root, state and reason), one over the
    faces (every distribution as a filtered count in one GROUP BY), one over the analyses (bundles
    and hosts together), and small look-ups (distinct images, leases, reviews)."""
    now = time.time() if now is None else now
    hour = now - 3600
    FI, A, F, B = s.files, s.analyses, s.faces, s.bundles  # noqa: N806
    fc = _file_conds(f, FI, sc.dialect)
    out: dict = {"generated": now}
    finished = ("done", "failed", "quarantined")
    groups = sorted(conn.execute(select(FI.c.root, FI.c.state, FI.c.reason, func.count().label("n"),
                                        func.count().filter(FI.c.updated >= hour).label("recent"))
                                 .where(*fc).group_by(FI.c.root, FI.c.state, FI.c.reason)).all(),
                    key=lambda r: (r.root, r.state, r.reason or ""))
    by_state: dict[str, int] = {}
    failures: dict[str | None, int] = {}
    roots: dict[str, dict] = {}
    fin: dict[str, int] = {}
    for r in groups:
        by_state[r.state] = by_state.get(r.state, 0) + r.n
        if r.state in ("failed", "quarantined"):
            failures[r.reason] = failures.get(r.reason, 0) + r.n
        d = roots.setdefault(r.root, {"files": 0})
        d["files"] += r.n
        d[r.state] = d.get(r.state, 0) + r.n
        if r.state in finished and r.recent:
            fin[r.state] = fin.get(r.state, 0) + r.recent
    out["files"] = sum(by_state.values())
    out["images"] = conn.execute(select(func.count(func.distinct(FI.c.image_id))).where(*fc)).scalar_one()
    out["by_state"] = dict(sorted(by_state.items()))
    out["failures"] = dict(sorted(failures.items(), key=lambda kv: -kv[1]))
    # face distributions, grouped by the root of each face's first matching path (so that the
    # totals are the sums), plus the faces of contents no recorded path holds any more. As few
    # aggregates per face as possible: uncertain and unknown ages are what is left over, and an
    # age band [lo, hi) is count(age < hi) - count(age < lo).
    p, age = F.c.p_male, F.c.age
    spread = func.coalesce(F.c.age_std, 0.0)
    bounds = sorted({x for lo, hi, _ in AGE_BANDS for x in (lo, hi)})
    conds = {"female": _gender_cond(p, sc.cut, ("female",)), "male": _gender_cond(p, sc.cut, ("male",)),
             **{f"below_{i}": age < x for i, x in enumerate(bounds)},
             "likely_minors": age + spread < ADULT_AGE, "possible_minors": age - spread < ADULT_AGE}
    cols = [func.count().label("faces"), func.count(func.distinct(A.c.image_id)).label("images_with_faces"), func.count(age).label("aged"),
            *[func.count().filter(cond).label(k) for k, cond in conds.items()]]
    totals = dict.fromkeys(["faces", "images_with_faces", "aged", *conds], 0)
    fa = replace(f.page(None), sort="id")  # the list's sort plays no part (see _FaceQuery's range filters)
    if sc.dialect == "postgresql":  # one pass driven by the faces; the first path by a (hashed) join
        parts = [_FaceQuery(fa, sc, with_reviews=False, with_images=False, correlated=False)]
    else:  # driven by the files in root order (no sort for the GROUP BY), then the faces without a path
        parts = [_FaceQuery(fa, sc, with_reviews=False, with_images=False, mode="files")]
        if not fc:
            parts.append(_FaceQuery(fa, sc, with_reviews=False, with_images=False, mode="nofile"))
    for part in parts:
        root = part.FL.c.root if part.FL is not None else literal(None)
        q = select(root.label("root"), *cols).select_from(part.frm).where(*part.where)
        q = q.group_by(part.FL.c.root) if part.FL is not None else q
        for r in conn.execute(q):
            m = r._mapping
            if not m["faces"]:
                continue
            for k in totals:
                totals[k] += int(m[k] or 0)
            roots.setdefault(m["root"] or "(no current path)", {"files": 0})["faces"] = int(m["faces"])
    out["by_root"] = dict(sorted(roots.items()))
    out["faces"] = totals["faces"]
    out["images_with_faces"] = totals["images_with_faces"]
    out["cut"] = {"threshold": sc.cut.threshold, "margin": sc.cut.margin}
    uncertain = totals["faces"] - totals["female"] - totals["male"]  # zero without a margin: every face is one or the other
    out["gender"] = {"female": totals["female"], "male": totals["male"], "uncertain": uncertain}
    below = {x: totals[f"below_{i}"] for i, x in enumerate(bounds)}
    out["age"] = {name: below[hi] - below[lo] for lo, hi, name in AGE_BANDS}
    out["age"]["unknown"] = totals["faces"] - totals["aged"]
    out["minors"] = {"likely (age + std < 18)": totals["likely_minors"], "possible (age - std < 18)": totals["possible_minors"]}
    out["backlog"] = {"queued": by_state.get("queued", 0), "working": by_state.get("working", 0)}
    activity = _analysis_activity(conn, now)
    out["last_hour"] = {"files_finished": sum(fin.values()), **{f"files_{k}": v for k, v in sorted(fin.items())},
                        "analyses": sum(r.hour for r in activity), "per_minute": round(sum(fin.values()) / 60.0, 2)}
    per_bundle: dict[str, tuple[int, float | None]] = {}
    for r in activity:
        n, last = per_bundle.get(r.bundle, (0, None))
        per_bundle[r.bundle] = (n + r.n, r.last if last is None or (r.last is not None and r.last > last) else last)
    bundles = []
    for r in conn.execute(select(B.c.key, B.c.created, B.c.spec).order_by(B.c.created)):
        spec = json.loads(r.spec)
        n, last = per_bundle.get(r.key, (0, None))
        bundles.append({"key": r.key, "created": r.created, "analyses": n, "last_analysis": last,
                        "gender_model": (spec.get("gender") or {}).get("model"), "age": "age" in (spec.get("models") or {}),
                        "detector_threshold": (spec.get("detector") or {}).get("threshold")})
    out["bundles"] = bundles
    out["hosts"] = _hosts(conn, activity, now)
    out["reviews"] = {}
    if sc.reviews:  # faces by their current review (the latest that attaches to each)
        rq = _FaceQuery(replace(fa, review=("reviewed",)), sc, with_files=bool(fc), with_reviews=True)
        out["reviews"] = {r.status: r.n for r in conn.execute(
            select(rq.R.c.status, func.count().label("n")).select_from(rq.frm).where(*rq.where).group_by(rq.R.c.status).order_by(rq.R.c.status))}
        out["review_records"] = conn.execute(select(func.count()).select_from(rv.reviews)).scalar_one()
    return out


def _analysis_activity(conn: Connection, now: float) -> list:
    """Analyses per (bundle, host): count, latest, in the last minute and hour, analysis seconds."""
    A = s.analyses  # noqa: N806
    return conn.execute(select(
        A.c.bundle, A.c.host, func.count().label("n"), func.max(A.c.created).label("last"),
        func.count().filter(A.c.created >= now - 60).label("minute"), func.count().filter(A.c.created >= now - 3600).label("hour"),
        func.sum(A.c.seconds).label("secs"),
    ).group_by(A.c.bundle, A.c.host)).all()


def _hosts(conn: Connection, activity: list, now: float) -> dict:
    """Per host, from :func:`_analysis_activity`'s rows: analyses written (all time, last minute,
    last hour), analysis seconds, and the leases it holds now (and how many of them have expired:
    a host that died)."""
    FI = s.files  # noqa: N806
    hosts: dict[str, dict] = {}
    for r in activity:
        d = hosts.setdefault(r.host or "(unknown)", {"analyses": 0, "last_minute": 0, "last_hour": 0, "analysis_seconds": 0.0,
                                                     "leases": 0, "expired_leases": 0})
        d["analyses"] += r.n
        d["last_minute"] += int(r.minute or 0)
        d["last_hour"] += int(r.hour or 0)
        d["analysis_seconds"] += float(r.secs or 0)
    for d in hosts.values():
        d["analysis_seconds"] = round(d["analysis_seconds"], 1)
    for r in conn.execute(select(
        FI.c.lease_owner, func.count().label("n"), func.count().filter(FI.c.lease_expires < now).label("expired"),
    ).where(FI.c.state == "working").group_by(FI.c.lease_owner)):
        d = hosts.setdefault(r.lease_owner or "(unknown)", {"analyses": 0, "last_minute": 0, "last_hour": 0, "analysis_seconds": 0.0})
        d["leases"], d["expired_leases"] = r.n, int(r.expired or 0)
    return dict(sorted(hosts.items()))


def recorded_roots(conn: Connection) -> list[str]:
    """Every distinct evidence root in the files table."""
    return [r[0] for r in conn.execute(select(s.files.c.root).distinct())]
