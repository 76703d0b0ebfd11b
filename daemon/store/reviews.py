"""Analyst reviews of faces, stored beside the model's output (schema version 2).

A review never changes ``faces``: it is a row of its own, and the table is append-only (a later
review of the same face supersedes an earlier one; ``status = 'cleared'`` withdraws it), so the
full history of who decided what, and when, is kept.

Identity of a reviewed face
    Face ids belong to one analysis; a re-analysis with a new model bundle creates new face rows
    whose boxes differ slightly. A review is therefore keyed on what survives re-analysis: the
    **content hash of the image** (``sha256``, the same at every path and copy) and the **face box**
    in the upright, full-resolution image frame (the frame every analysis stores boxes in). A face
    carries the latest review of the same content whose box overlaps it with IoU >= 0.5
    (:data:`REVIEW_IOU`). Under the bundle that was reviewed the box is identical (IoU 1). Two faces
    of one analysis overlap far less than that (the detector's NMS removes boxes above IoU 0.3), so
    one review attaches to at most one face of an analysis in practice. The bundle, face index,
    face id and the model output the analyst saw are recorded too, for the audit trail.

The migration also adds the indexes the query commands and review page filter on that version 1
did not have.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import Column, Connection, Float, Index, Integer, MetaData, String, Table, Text, and_, case, insert, select

from daemon.store import schema as s

REVIEW_IOU = 0.5
STATUSES = ("confirmed", "corrected", "ignored", "cleared")
LABELS = ("female", "male", "not_face")

# A MetaData of its own: schema version 1 is ``schema.metadata.create_all`` and must stay what it was.
metadata = MetaData()

reviews = Table(
    "reviews",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("x1", Float, nullable=False),
    Column("y1", Float, nullable=False),
    Column("x2", Float, nullable=False),
    Column("y2", Float, nullable=False),
    Column("status", String(16), nullable=False),
    Column("label", String(16)),
    Column("note", Text),
    Column("reviewer", String(128)),
    Column("origin", String(16), nullable=False),
    Column("created", Float, nullable=False),
    # what the analyst was looking at (audit only; matching uses sha256 + box)
    Column("bundle", String(32)),
    Column("face_idx", Integer),
    Column("face_id", Integer),
    Column("model_p_male", Float),
    Column("model_gender", String(16)),
    Index("ix_reviews_sha256", "sha256"),
)

# Indexes for the query filters that schema version 1 lacks.
EXTRA_INDEXES = (
    Index("ix_faces_score", s.faces.c.score),
    Index("ix_files_first_seen", s.files.c.first_seen),
    Index("ix_images_first_seen", s.images.c.first_seen),
    Index("ix_analyses_created", s.analyses.c.created),
)


def has_reviews(conn: Connection) -> bool:
    """Whether this database has the reviews table (read-only commands work without it)."""
    return conn.dialect.has_table(conn, "reviews")


def _least(a, b):  # noqa: ANN001, ANN202 - portable min() of two SQL expressions
    return case((a < b, a), else_=b)


def _greatest(a, b):  # noqa: ANN001, ANN202
    return case((a > b, a), else_=b)


def overlaps(r: Table, x1, y1, x2, y2):  # noqa: ANN001, ANN201
    """SQL condition: review box of ``r`` and the box (x1, y1, x2, y2) have IoU >= 0.5.
    IoU >= 1/2  <=>  inter >= (A + B - inter) / 2  <=>  3 * inter >= A + B (no division)."""
    iw = _least(r.c.x2, x2) - _greatest(r.c.x1, x1)
    ih = _least(r.c.y2, y2) - _greatest(r.c.y1, y1)
    area_r = (r.c.x2 - r.c.x1) * (r.c.y2 - r.c.y1)
    area_f = (x2 - x1) * (y2 - y1)
    k = 1.0 / REVIEW_IOU + 1.0  # 3 for IoU 0.5
    return and_(iw > 0, ih > 0, iw * ih * k >= area_r + area_f)


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two boxes (x1, y1, x2, y2)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


class ReviewError(ValueError):
    """A review that cannot be recorded (unknown face, bad status/label combination)."""


@dataclass(frozen=True)
class Review:
    """One review as entered. ``label`` is required for ``corrected``; for ``confirmed`` it is
    the label the analyst confirmed (the model's decision they were shown)."""

    status: str
    label: str | None = None
    note: str | None = None
    reviewer: str | None = None
    origin: str = "cli"

    def problems(self) -> list[str]:
        out = []
        if self.status not in STATUSES:
            out.append(f"status must be one of {', '.join(STATUSES)}, got {self.status!r}")
        if self.label is not None and self.label not in LABELS:
            out.append(f"label must be one of {', '.join(LABELS)}, got {self.label!r}")
        if self.status == "corrected" and self.label is None:
            out.append("a correction needs a label (female, male or not_face)")
        if self.status == "confirmed" and self.label not in ("female", "male"):
            out.append("only a female or male decision can be confirmed; for an uncertain face record a correction with the label you see")
        if self.status in ("ignored", "cleared") and self.label is not None:
            out.append(f"a review with status {self.status} takes no label")
        if self.note is not None and len(self.note) > 2000:
            out.append(f"note must be at most 2000 characters, got {len(self.note)}")
        if self.reviewer is not None and len(self.reviewer) > 128:
            out.append(f"reviewer must be at most 128 characters, got {len(self.reviewer)}")
        for name, value in (("note", self.note), ("reviewer", self.reviewer)):
            if value is not None and "\x00" in value:
                out.append(f"{name} must not contain a NUL character; remove it")
            if value is not None and any("\ud800" <= c <= "\udfff" for c in value):
                out.append(f"{name} must be valid text (UTF-8), got undecodable bytes; retype it")
        return out


def record(conn: Connection, face_id: int, review: Review, decision: str) -> int:
    """Append ``review`` for face ``face_id`` (in the caller's write transaction). ``decision``
    is the model's label the analyst was shown (used as the label of a confirmation when none
    is given). Returns the new review id."""
    if review.status == "confirmed" and review.label is None:
        review = Review(review.status, decision, review.note, review.reviewer, review.origin)
    bad = review.problems()
    if bad:
        raise ReviewError("; ".join(bad))
    f, a, i = s.faces, s.analyses, s.images
    row = conn.execute(
        select(f.c.id, f.c.idx, f.c.x1, f.c.y1, f.c.x2, f.c.y2, f.c.p_male, a.c.bundle, i.c.sha256)
        .select_from(f.join(a, a.c.id == f.c.analysis_id).join(i, i.c.id == a.c.image_id))
        .where(f.c.id == face_id)
    ).first()
    if row is None:
        raise ReviewError(f"face {face_id} does not exist; list faces with `forensic-gender faces` to find its id")
    note = (review.note or "").strip() or None
    res = conn.execute(insert(reviews).values(
        sha256=row.sha256, x1=row.x1, y1=row.y1, x2=row.x2, y2=row.y2, status=review.status, label=review.label,
        note=note, reviewer=(review.reviewer or "").strip() or None, origin=review.origin, created=time.time(),
        bundle=row.bundle, face_idx=row.idx, face_id=row.id, model_p_male=row.p_male, model_gender=decision,
    ))
    return int(res.inserted_primary_key[0])
