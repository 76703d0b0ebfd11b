"""Every schema migration, by number and name: the one place the schema's history is written.

Step ``k`` brings a database at schema version ``k - 1`` to version ``k``; :data:`STEPS` lists
them in order from an empty database (version 0). :func:`daemon.store.engine.migrate` runs each
pending step in a transaction of its own (serialized across hosts on PostgreSQL) and records the
new version in ``meta``. A released step never changes: a change to the schema is a new step at
the end, with a database at every earlier version migrated by ``tests/test_migrations.py``.

Step 1 creates :data:`daemon.store.schema.metadata` as it is declared *today*, which already
holds what a later step added to its tables (``faces.descriptor``, version 5); such a step checks
first, so that a database created fresh passes through it unchanged. Every other addition is
declared apart from ``schema.metadata`` (in the module that uses it), so that step 1 stays
version 1.

The tables and indexes stay declared in the modules that read and write them; only the steps
live here. :mod:`daemon.store.persons`, :mod:`daemon.store.nearcopies` and the others are imported when their
step runs: they pull numpy and the configuration, which the engine of a read-only command does
not need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, Float, Integer, LargeBinary, String, func, inspect, text, update

from daemon.store import reviews, schema


@dataclass(frozen=True)
class Step:
    """One migration: ``apply`` brings the schema from ``version - 1`` to ``version`` (inside
    the transaction it is given; it neither commits nor records the version)."""

    version: int
    name: str
    apply: Callable[[Connection], None]


def create_tables(conn: Connection) -> None:
    """Version 1: the results tables (:mod:`daemon.store.schema`)."""
    schema.metadata.create_all(conn)


def add_reviews(conn: Connection) -> None:
    """Version 2: the analysts' reviews table and the query indexes version 1 lacked
    (:mod:`daemon.store.reviews`)."""
    reviews.reviews.create(conn, checkfirst=True)
    for ix in reviews.EXTRA_INDEXES:
        ix.create(conn, checkfirst=True)


def face_sort_indexes(conn: Connection) -> None:
    """Version 3: the face sort indexes end with the face id, for keyset paging; they replace
    the single-column ones (:data:`daemon.store.schema.SORT_INDEXES`)."""
    for ix in schema.REPLACED_INDEXES:
        ix.drop(conn, checkfirst=True)
    for ix in schema.SORT_INDEXES:
        ix.create(conn, checkfirst=True)


def recorded_paths(conn: Connection) -> None:
    """Version 4: paths are stored in their recorded form (:mod:`daemon.paths`), where a literal
    backslash is written twice; paths recorded before that get theirs doubled (names that were
    not UTF-8 could not be recorded at all)."""
    files = schema.files
    for col in ("path", "root"):
        c = files.c[col]
        conn.execute(update(files).where(c.contains("\\", autoescape=True)).values({col: func.replace(c, "\\", "\\\\")}))


def face_descriptor(conn: Connection) -> None:
    """Version 5: faces carry the backbone's descriptor (null for faces analysed before). A
    database created at this version already has the column (version 1 creates the tables)."""
    if any(c["name"] == "descriptor" for c in inspect(conn).get_columns("faces")):
        return
    kind = LargeBinary().compile(dialect=conn.dialect)
    conn.execute(text(f"ALTER TABLE faces ADD COLUMN descriptor {kind}"))


def add_persons(conn: Connection) -> None:
    """Version 6: persons, their faces and the examiner's decisions (:mod:`daemon.store.persons`).
    Faces analysed before get persons from ``forensic-gender recluster``."""
    from daemon.store import persons

    persons.metadata.create_all(conn, checkfirst=True)


def near_hash(conn: Connection) -> None:
    """Version 7: ``images.near_hash`` and its index (:mod:`daemon.store.nearcopies`); null for
    images analysed before (they get one when analysed again)."""
    from daemon.store import nearcopies

    if not nearcopies.has_hash(conn):
        kind = String(48).compile(dialect=conn.dialect)
        conn.execute(text(f"ALTER TABLE images ADD COLUMN near_hash {kind}"))
    nearcopies.HASH_INDEX.create(conn, checkfirst=True)


def capture(conn: Connection) -> None:
    """Version 8: ``image_capture``, the EXIF capture metadata per image (:mod:`daemon.store.capture`);
    none for images analysed before (they get it when analysed again)."""
    from daemon.store import capture as capture_store

    capture_store.create(conn)


def video(conn: Connection) -> None:
    """Version 9: videos (:mod:`daemon.store.videos`): the ``videos`` and ``video_frames`` tables
    and each face's ``frame`` and ``frame_time`` (null for images and for faces analysed before).
    A database created at this version already has the columns (version 1 creates the tables)."""
    from daemon.store import videos

    have = {c["name"] for c in inspect(conn).get_columns("faces")}
    for name, kind in (("frame", Integer()), ("frame_time", Float())):
        if name not in have:
            conn.execute(text(f"ALTER TABLE faces ADD COLUMN {name} {kind.compile(dialect=conn.dialect)}"))
    videos.create(conn)


STEPS: tuple[Step, ...] = (
    Step(1, "create tables", create_tables),
    Step(2, "reviews", add_reviews),
    Step(3, "face sort indexes", face_sort_indexes),
    Step(4, "recorded paths", recorded_paths),
    Step(5, "face descriptor", face_descriptor),
    Step(6, "persons", add_persons),
    Step(7, "near-copy hash", near_hash),
    Step(8, "capture metadata", capture),
    Step(9, "video", video),
)

LATEST = len(STEPS)
