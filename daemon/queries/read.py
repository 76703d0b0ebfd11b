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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from sqlalchemy import Connection, and_, case, exists, false, func, literal, or_, select, text, true
from sqlalchemy.sql.elements import ColumnElement

from daemon.queries.filters import ADULT_AGE, FACE_SORTS, IMAGE_SORTS, Cut, FilterError, Filters, check_cut, glob_to_regex
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
    return Scope(cut, rv.has_reviews(conn), resolve_bundle(conn, f.bundle), conn.dialect.name)


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


def _file_conds(f: Filters, files) -> list[ColumnElement]:  # noqa: ANN001
    c = []
    if f.path_prefix:
        c.append(or_(*[func.substr(files.c.path, 1, len(p)) == p for p in f.path_prefix]))
    if f.path_glob:
        c.append(or_(*[files.c.path.regexp_match(glob_to_regex(g)) for g in f.path_glob]))
    if f.root:
        c.append(files.c.root.in_(f.root))
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


def _analysis_conds(sc: Scope, a) -> list[ColumnElement]:  # noqa: ANN001
    if sc.bundle == "all":
        return []
    if sc.bundle is None:  # the image's latest analysis: no later one exists
        a2 = s.analyses.alias("a_later")
        return [~exists(select(a2.c.id).where(a2.c.image_id == a.c.image_id, a2.c.id > a.c.id))]
    return [a.c.bundle == sc.bundle]


class _FaceQuery:
    """FROM + WHERE of a face query, with named expressions for the select list and sorting.

    The first matching path (``FL``) and the current review (``R``) are correlated lookups per
    face; they are joined only when asked for (``with_files``/``with_reviews``) or when a filter
    needs them. A page (``limit``) is selected in two steps: the ids and sort keys of the page
    with only what the filters and the sort need, then the full columns for those rows alone."""

    def __init__(self, f: Filters, sc: Scope, *, with_files: bool = True, with_reviews: bool = True, mode: str = "faces",
                 correlated: bool | None = None) -> None:
        F, A, I = s.faces, s.analyses, s.images  # noqa: N806
        self.f, self.sc, self.mode = f, sc, mode
        # per-row lookups of the first path suit SQLite, and PostgreSQL too when few rows qualify
        self.correlated = (sc.dialect != "postgresql" or bool(f.sha256)) if correlated is None else correlated
        self.fconds = bool(_file_conds(f, s.files))
        self.has_review = sc.reviews and (with_reviews or bool(f.review or f.final_gender))
        w: list[ColumnElement] = []
        if mode == "files" and sc.dialect == "postgresql":  # PostgreSQL plans the join itself
            self.has_path = True
            self.frm, self.FL, self.R = self.joins(F.join(A, A.c.id == F.c.analysis_id).join(I, I.c.id == A.c.image_id),
                                                   True, self.has_review, inner=True)
        elif mode == "files":  # driven by the files table (SQLite): its path index gives the order
            FL, f2 = s.files.alias("fl"), s.files.alias("f2")  # noqa: N806
            first = select(func.min(f2.c.id)).where(f2.c.image_id == FL.c.image_id, *_file_conds(f, f2)).scalar_subquery()
            base = FL.join(A, A.c.image_id == FL.c.image_id).join(F, F.c.analysis_id == A.c.id).join(I, I.c.id == A.c.image_id)
            self.frm, _, self.R = self.joins(base, False, self.has_review)
            self.FL = FL
            self.has_path = True
            w += [FL.c.id == first, *_file_conds(f, FL)]
        else:
            self.has_path = mode == "faces" and (with_files or self.fconds)
            self.frm, self.FL, self.R = self.joins(F.join(A, A.c.id == F.c.analysis_id).join(I, I.c.id == A.c.image_id),
                                                   self.has_path, self.has_review)
            if mode == "nofile":  # faces of contents no recorded path holds any more
                w.append(~exists(select(s.files.c.id).where(s.files.c.image_id == A.c.image_id)))
        self.D = D = decision(F.c.p_male, sc.cut)  # noqa: N806
        self.final = case((self.R.c.status.in_(("confirmed", "corrected")), self.R.c.label), else_=D) if self.R is not None else D
        w += [*_analysis_conds(sc, A), *_sha_conds(f, I)]
        if f.gender:
            w.append(D.in_(f.gender))
        if f.uncertain:
            w.append(D == "uncertain" if sc.cut.margin > 0 else false())
        if f.final_gender:
            w.append(self.final.in_(f.final_gender))
        # Range filters are written as ``col + 0`` so that no planner drives a query from a range
        # index whose selectivity it cannot know (SQLite without STAT4 would walk half the table
        # through an index); the indexes still serve the sorts. A full scan is the bounded case.
        p_male, age, width, score = (F.c.p_male + 0), (F.c.age + 0), (F.c.width_px + 0), (F.c.score + 0)
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
            w.append((age + spread if f.minors == "likely" else age - spread) < ADULT_AGE)
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

    def joins(self, frm, with_path: bool, with_review: bool, *, inner: bool = False, correlated: bool | None = None):  # noqa: ANN001, ANN201
        """``frm`` (which holds faces and images) joined to the first matching path (an inner
        join when file filters or ``inner`` ask for a path) and the current review. The first
        path is a correlated lookup per row on SQLite (and for a page's few rows), a join to the
        grouped files on PostgreSQL, whose planner hashes it once."""
        F, I = s.faces, s.images  # noqa: N806
        FL = R = None  # noqa: N806
        if with_path:
            FL = s.files.alias("fl")  # noqa: N806
            f2 = s.files.alias("f2")
            outer = not (inner or self.fconds)
            if correlated is None:
                correlated = self.correlated
            if correlated:
                first = select(func.min(f2.c.id)).where(f2.c.image_id == I.c.id, *_file_conds(self.f, f2)).scalar_subquery()
                frm = frm.join(FL, FL.c.id == first, isouter=outer)
            else:
                ff = (select(f2.c.image_id, func.min(f2.c.id).label("id")).where(f2.c.image_id.is_not(None), *_file_conds(self.f, f2))
                      .group_by(f2.c.image_id).subquery("ff"))
                frm = frm.join(ff, ff.c.image_id == I.c.id, isouter=outer).join(FL, FL.c.id == ff.c.id, isouter=outer)
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
        return cols

    def keys(self) -> list[tuple[ColumnElement, bool]]:
        """The sort: (expression, descending) pairs, ending with the face id (a total order)."""
        F, A, I = s.faces, s.analyses, s.images  # noqa: N806
        key = self.f.sort.lstrip("-")
        desc = self.f.sort.startswith("-")
        if key not in FACE_SORTS:
            raise FilterError([f"--sort: faces sort by {', '.join(FACE_SORTS)}, got {self.f.sort!r}"])
        path = self.FL.c.path if self.FL is not None else I.c.sha256
        seen = self.FL.c.first_seen if self.FL is not None else I.c.first_seen
        primary = {"path": [path, A.c.id, F.c.idx], "sha256": [I.c.sha256, A.c.id, F.c.idx], "p_male": [F.c.p_male],
                   "age": [F.c.age], "width": [F.c.width_px], "score": [F.c.score], "seen": [seen], "id": []}[key]
        return [(c, desc) for c in primary] + [(F.c.id, desc and key == "id")]

    @staticmethod
    def _order(keys) -> list:  # noqa: ANN001
        return [(c.desc() if d else c.asc()).nulls_last() for c, d in keys[:-1]] + [keys[-1][0].desc() if keys[-1][1] else keys[-1][0].asc()]

    def select(self, limit: int | None, offset: int):  # noqa: ANN201
        if not limit:
            q = select(*self.columns()).select_from(self.frm).where(*self.where).order_by(*self._order(self.keys()))
            return q.offset(offset) if offset else q
        # step 1: the page's face ids and sort keys, joining only what filters and sort need
        key = self.f.sort.lstrip("-")
        slim = _FaceQuery(self.f, self.sc, with_files=key in ("path", "seen"), with_reviews=False, mode=self.mode)
        keys = slim.keys()
        page = (select(*[c.label(f"k{i}") for i, (c, _) in enumerate(keys)]).select_from(slim.frm).where(*slim.where)
                .order_by(*self._order(keys)).limit(limit).offset(offset or None).subquery("pg"))
        # step 2: every column for those rows only
        F, A, I = s.faces, s.analyses, s.images  # noqa: N806
        n = len(keys) - 1
        frm = page.join(F, F.c.id == page.c[f"k{n}"]).join(A, A.c.id == F.c.analysis_id).join(I, I.c.id == A.c.image_id)
        frm, FL, R = self.joins(frm, self.mode != "nofile", self.sc.reviews, correlated=True)  # noqa: N806
        order = [(page.c[f"k{i}"], d) for i, (_, d) in enumerate(keys)]
        return select(*self.columns(FL, R)).select_from(frm).order_by(*self._order(order))

    def count(self):  # noqa: ANN201
        return select(func.count()).select_from(self.frm).where(*self.where)

    def image_exists(self, image_id_col) -> ColumnElement:  # noqa: ANN001
        """EXISTS a matching face in the image ``image_id_col`` (for the images command)."""
        q = select(s.faces.c.id).select_from(self.frm).where(*self.where, s.images.c.id == image_id_col)
        return exists(q)


def faces(conn: Connection, f: Filters, sc: Scope, *, stream: bool = False) -> Iterator[dict]:
    """Face rows matching ``f`` in ``f.sort`` order, ``f.limit``/``f.offset`` applied.

    Sorted by path or by when the path was seen, the rows come in two parts: faces whose content
    is at a recorded path (found through the files table, whose indexes give the order), then
    faces of contents no path holds any more (path None; these sort last either way)."""
    if f.sort.lstrip("-") in ("path", "seen"):
        parts = [_FaceQuery(f, sc, mode="files")]
        if not _file_conds(f, s.files):
            parts.append(_FaceQuery(f, sc, mode="nofile"))
    else:
        parts = [_FaceQuery(f, sc)]
    limit, offset = f.limit, f.offset
    for i, part in enumerate(parts):
        if i > 0 and offset:  # the earlier parts' rows all came before the offset
            offset = max(0, offset - conn.execute(parts[i - 1].count()).scalar_one())
        q = part.select(limit, offset)
        res = conn.execution_options(yield_per=BATCH).execute(q) if stream else conn.execute(q)
        got = 0
        for row in res:
            got += 1
            yield dict(row._mapping)
        if limit:
            limit -= got
            if limit <= 0:
                return
        if got:
            offset = 0


def count_faces(conn: Connection, f: Filters, sc: Scope) -> int:
    return conn.execute(_FaceQuery(f, sc, with_files=False, with_reviews=False).count()).scalar_one()


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


def images(conn: Connection, f: Filters, sc: Scope, *, stream: bool = False) -> Iterator[dict]:
    """Image rows (one per distinct content; one per path for files never hashed)."""
    FI, I = s.files, s.images  # noqa: N806
    key = f.sort.lstrip("-")
    if key not in IMAGE_SORTS:
        raise FilterError([f"--sort: images sort by {', '.join(IMAGE_SORTS)}, got {f.sort!r}"])
    lone = case((FI.c.image_id.is_(None), FI.c.id))
    conds = [*_file_conds(f, FI), *_sha_conds(f, I)]
    if f.sha256:
        conds.append(FI.c.image_id.is_not(None))
    if f.face_level or sc.bundle not in (None, "all"):
        fq = _FaceQuery(f.page(None), sc, with_files=False, with_reviews=False)
        if f.face_level:
            conds.append(fq.image_exists(FI.c.image_id))
        else:  # a bundle was named: images analysed under it
            A = s.analyses  # noqa: N806
            conds.append(exists(select(A.c.id).where(A.c.image_id == FI.c.image_id, A.c.bundle == sc.bundle)))
    path = func.min(FI.c.path)
    cols = [FI.c.image_id, lone.label("file_id"), path.label("path"), func.min(FI.c.first_seen).label("seen"),
            func.max(I.c.size).label("size"), func.max(I.c.sha256).label("sha256")]
    desc = f.sort.startswith("-")
    if key == "faces":
        A, F = s.analyses, s.faces  # noqa: N806
        nf = (select(func.count(F.c.id)).select_from(F.join(A, A.c.id == F.c.analysis_id))
              .where(A.c.image_id == FI.c.image_id, *_analysis_conds(sc, A)).scalar_subquery())
        cols.append(nf.label("nfaces"))
        sort_col = nf
    else:
        sort_col = {"path": path, "sha256": func.max(I.c.sha256), "size": func.max(I.c.size), "seen": func.min(FI.c.first_seen)}[key]
    q = (select(*cols).select_from(FI.outerjoin(I, I.c.id == FI.c.image_id)).where(*conds)
         .group_by(FI.c.image_id, lone)
         .order_by((sort_col.desc() if desc else sort_col.asc()).nulls_last(), path.asc()))
    if f.limit:
        q = q.limit(f.limit)
    if f.offset:
        q = q.offset(f.offset)
    res = conn.execution_options(yield_per=BATCH).execute(q) if stream else conn.execute(q)
    batch: list = []
    for row in res:
        batch.append(row)
        if len(batch) >= BATCH:
            yield from _image_details(conn, batch, sc)
            batch = []
    if batch:
        yield from _image_details(conn, batch, sc)


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
                    *[func.sum(case((D == g, 1), else_=0)).label(g) for g in ("female", "male", "uncertain")])
             .select_from(A.outerjoin(F, F.c.analysis_id == A.c.id))
             .where(A.c.image_id.in_(ids), *_analysis_conds(sc, A)).group_by(A.c.image_id))
        counts = {r.image_id: dict(r._mapping) for r in conn.execute(q)}
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
               "faces": int(c.get("faces") or 0), **{k: int(c.get(k) or 0) for k in ("female", "male", "uncertain")}}


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
    all_faces = list(faces(conn, Filters(sha256=(im["sha256"],), bundle="all", sort="sha256"), Scope(sc.cut, sc.reviews, "all", sc.dialect)))
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
    return {**im, "paths": ps, "analyses": analyses, "reviews": history, "events": events}


def face(conn: Connection, face_id: int, sc: Scope) -> dict | None:
    """One face row (whatever its bundle) with its image's facts."""
    f = Filters(bundle="all", sort="id")
    q = _FaceQuery(f, Scope(sc.cut, sc.reviews, "all", sc.dialect), correlated=True)
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
    seen, status) and the bundle apply; face filters narrow the face distributions."""
    now = time.time() if now is None else now
    FI, A, F, B = s.files, s.analyses, s.faces, s.bundles  # noqa: N806
    fc = _file_conds(f, FI)
    one = lambda q: conn.execute(q).scalar_one()  # noqa: E731
    out: dict = {"generated": now}
    out["files"] = one(select(func.count()).select_from(FI).where(*fc))
    out["images"] = one(select(func.count(func.distinct(FI.c.image_id))).where(*fc))
    by_state = {r.state: r.n for r in conn.execute(select(FI.c.state, func.count().label("n")).where(*fc).group_by(FI.c.state))}
    out["by_state"] = dict(sorted(by_state.items()))
    out["failures"] = {r.reason: r.n for r in conn.execute(
        select(FI.c.reason, func.count().label("n")).where(*fc, FI.c.state.in_(("failed", "quarantined")))
        .group_by(FI.c.reason).order_by(func.count().desc()))}
    roots = {}
    for r in conn.execute(select(FI.c.root, FI.c.state, func.count().label("n")).where(*fc).group_by(FI.c.root, FI.c.state)):
        d = roots.setdefault(r.root, {"files": 0})
        d["files"] += r.n
        d[r.state] = r.n
    # face distributions, grouped by the root of each face's first matching path (so that the
    # totals are the sums), plus the faces of contents no recorded path holds any more
    t_, m_ = sc.cut.threshold, sc.cut.margin
    p = F.c.p_male
    if m_ > 0:
        gsum = {"female": p <= t_ - m_, "male": p >= t_ + m_, "uncertain": and_(p > t_ - m_, p < t_ + m_)}
    else:
        gsum = {"female": p < t_, "male": p >= t_, "uncertain": false()}
    spread = func.coalesce(F.c.age_std, 0.0)
    sums = {**gsum, **{name: and_(F.c.age >= lo, F.c.age < hi) for lo, hi, name in AGE_BANDS}, "no_age": F.c.age.is_(None),
            "likely_minors": F.c.age + spread < ADULT_AGE, "possible_minors": F.c.age - spread < ADULT_AGE}
    cols = [func.count().label("faces"), func.count(func.distinct(A.c.image_id)).label("images_with_faces"),
            *[func.sum(case((cond, 1), else_=0)).label(k) for k, cond in sums.items()]]
    totals = dict.fromkeys(["faces", "images_with_faces", *sums], 0)
    parts = [_FaceQuery(f.page(None), sc, with_reviews=False, mode="files")]
    if not fc:
        parts.append(_FaceQuery(f.page(None), sc, with_reviews=False, mode="nofile"))
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
    out["gender"] = {g: totals[g] for g in ("female", "male", "uncertain")}
    out["age"] = {name: totals[name] for _, _, name in AGE_BANDS}
    out["age"]["unknown"] = totals["no_age"]
    out["minors"] = {"likely (age + std < 18)": totals["likely_minors"], "possible (age - std < 18)": totals["possible_minors"]}
    out["backlog"] = {"queued": by_state.get("queued", 0), "working": by_state.get("working", 0)}
    hour = now - 3600
    fin = {r.state: r.n for r in conn.execute(select(FI.c.state, func.count().label("n"))
                                              .where(*fc, FI.c.updated >= hour, FI.c.state.in_(("done", "failed", "quarantined")))
                                              .group_by(FI.c.state))}
    analysed_hour = one(select(func.count()).select_from(A).where(A.c.created >= hour))
    out["last_hour"] = {"files_finished": sum(fin.values()), **{f"files_{k}": v for k, v in sorted(fin.items())},
                        "analyses": analysed_hour, "per_minute": round(sum(fin.values()) / 60.0, 2)}
    bundles = []
    for r in conn.execute(select(B.c.key, B.c.created, B.c.spec, func.count(A.c.id).label("analyses"), func.max(A.c.created).label("last"))
                          .select_from(B.outerjoin(A, A.c.bundle == B.c.key)).group_by(B.c.key, B.c.created, B.c.spec).order_by(B.c.created)):
        spec = json.loads(r.spec)
        bundles.append({"key": r.key, "created": r.created, "analyses": r.analyses, "last_analysis": r.last,
                        "gender_model": (spec.get("gender") or {}).get("model"), "age": "age" in (spec.get("models") or {}),
                        "detector_threshold": (spec.get("detector") or {}).get("threshold")})
    out["bundles"] = bundles
    out["hosts"] = host_activity(conn, now)
    out["reviews"] = {}
    if sc.reviews:  # faces by their current review (the latest that attaches to each)
        rq = _FaceQuery(replace(f, review=("reviewed",), limit=None), sc, with_files=bool(fc), with_reviews=True)
        out["reviews"] = {r.status: r.n for r in conn.execute(
            select(rq.R.c.status, func.count().label("n")).select_from(rq.frm).where(*rq.where).group_by(rq.R.c.status).order_by(rq.R.c.status))}
        out["review_records"] = conn.execute(select(func.count()).select_from(rv.reviews)).scalar_one()
    return out


def host_activity(conn: Connection, now: float) -> dict:
    """Per host: analyses written (all time, last minute, last hour), analysis seconds, and the
    leases it holds now (and how many of them have expired: a host that died)."""
    A, FI = s.analyses, s.files  # noqa: N806
    hosts: dict[str, dict] = {}
    for r in conn.execute(select(
        A.c.host, func.count().label("n"),
        func.sum(case((A.c.created >= now - 60, 1), else_=0)).label("minute"),
        func.sum(case((A.c.created >= now - 3600, 1), else_=0)).label("hour"),
        func.sum(A.c.seconds).label("secs"),
    ).group_by(A.c.host)):
        hosts[r.host or "(unknown)"] = {"analyses": r.n, "last_minute": int(r.minute or 0), "last_hour": int(r.hour or 0),
                                        "analysis_seconds": round(float(r.secs or 0), 1), "leases": 0, "expired_leases": 0}
    for r in conn.execute(select(
        FI.c.lease_owner, func.count().label("n"), func.sum(case((FI.c.lease_expires < now, 1), else_=0)).label("expired"),
    ).where(FI.c.state == "working").group_by(FI.c.lease_owner)):
        d = hosts.setdefault(r.lease_owner or "(unknown)", {"analyses": 0, "last_minute": 0, "last_hour": 0, "analysis_seconds": 0.0})
        d["leases"], d["expired_leases"] = r.n, int(r.expired or 0)
    return dict(sorted(hosts.items()))


def recorded_roots(conn: Connection) -> list[str]:
    """Every distinct evidence root in the files table."""
    return [r[0] for r in conn.execute(select(s.files.c.root).distinct())]
