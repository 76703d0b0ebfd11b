"""The results schema (SQLAlchemy Core). Its versions, step by step, are in :mod:`daemon.store.migrations`.

- ``images``: one row per distinct content (sha256 unique).
- ``files``: one row per absolute path seen (unique); this is the work queue. States:
  ``queued`` (to analyse), ``working`` (claimed under a lease), ``done``, ``failed`` (bad input,
  with ``reason``), ``quarantined`` (crashed or hung its worker ``max_attempts`` times), ``gone``
  (deleted from disk; results kept).
- ``bundles``: a model bundle = model hashes + the parameters that change results.
- ``analyses``: one per (image, bundle); re-analysis with a new bundle adds rows.
- ``faces``: per analysis.
- ``events``: append-only audit trail.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from daemon.states import FileState

metadata = MetaData()

FILE_STATES = tuple(FileState)  # daemon.states

meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

images = Table(
    "images",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sha256", String(64), nullable=False, unique=True),
    Column("md5", String(32), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("format", String(16)),
    Column("width", Integer),
    Column("height", Integer),
    Column("orientation", Integer),
    Column("frames", Integer),
    Column("notes", Text),
    Column("first_seen", Float, nullable=False),
)

files = Table(
    "files",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("path", Text, nullable=False, unique=True),
    Column("root", Text, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("inode", BigInteger),
    Column("state", String(16), nullable=False),
    Column("image_id", Integer, ForeignKey("images.id")),
    Column("attempts", Integer, nullable=False, default=0),
    Column("reason", String(32)),
    Column("error", Text),
    Column("lease_owner", String(128)),
    Column("lease_expires", Float),
    Column("first_seen", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("updated", Float, nullable=False),
    Index("ix_files_state", "state"),
    Index("ix_files_root", "root"),
    Index("ix_files_image", "image_id"),
)

bundles = Table(
    "bundles",
    metadata,
    Column("key", String(32), primary_key=True),
    Column("spec", Text, nullable=False),
    Column("created", Float, nullable=False),
)

analyses = Table(
    "analyses",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("image_id", Integer, ForeignKey("images.id"), nullable=False),
    Column("bundle", String(32), ForeignKey("bundles.key"), nullable=False),
    Column("faces", Integer, nullable=False),
    Column("seconds", Float),
    Column("host", String(128)),
    Column("created", Float, nullable=False),
    UniqueConstraint("image_id", "bundle", name="uq_analysis_image_bundle"),
)

faces = Table(
    "faces",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("analysis_id", Integer, ForeignKey("analyses.id", ondelete="CASCADE"), nullable=False),
    Column("idx", Integer, nullable=False),
    Column("x1", Float, nullable=False),
    Column("y1", Float, nullable=False),
    Column("x2", Float, nullable=False),
    Column("y2", Float, nullable=False),
    Column("score", Float, nullable=False),
    Column("landmarks", Text, nullable=False),
    Column("width_px", Float, nullable=False),
    Column("p_male", Float, nullable=False),
    Column("p_female", Float, nullable=False),
    Column("gender", String(16), nullable=False),
    Column("age", Float),
    Column("age_std", Float),
    # the face backbone's identity vector (128 float16, little-endian; the analysis' bundle names
    # the backbone that made it); null when the backbone was disabled
    Column("descriptor", LargeBinary),
    # a video's faces: the frame they were found in and its time in seconds (version 9,
    # daemon.store.videos); null for images
    Column("frame", Integer),
    Column("frame_time", Float),
    UniqueConstraint("analysis_id", "idx", name="uq_face_analysis_idx"),
    Index("ix_faces_p_male", "p_male"),
    Index("ix_faces_gender", "gender"),
    Index("ix_faces_age", "age"),
    Index("ix_faces_width", "width_px"),
)

events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("at", Float, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("host", String(128)),
    Column("file_id", Integer),
    Column("detail", Text),
    Index("ix_events_at", "at"),
)


# --------------------------------------------------------------------------------------------
# Schema version 3: the indexes of the face lists' sorts end with the face id, the tiebreak of
# every sort, so that a page of faces sorted by p(male), age, width or score starts at its
# position (keyset paging) straight from the index, even among many equal values (every face of
# a bundle without the age model has no age). They replace the single-column indexes, which they
# serve as well. SQLite's indexes end with the row id anyway; the same indexes keep both
# databases alike. Declared on a private copy of the table: ``metadata`` stays version 1.

_faces_v3 = Table("faces", MetaData(), Column("id", Integer, primary_key=True), Column("p_male", Float), Column("age", Float),
                  Column("width_px", Float), Column("score", Float))
_SORTED = (("p_male", "p_male"), ("age", "age"), ("width", "width_px"), ("score", "score"))
SORT_INDEXES = tuple(Index(f"ix_faces_{name}_id", _faces_v3.c[col], _faces_v3.c.id) for name, col in _SORTED)
REPLACED_INDEXES = tuple(Index(f"ix_faces_{name}", _faces_v3.c[col]) for name, col in _SORTED)
