"""Schema migrations (:mod:`daemon.store.migrations`) on SQLite and PostgreSQL: a database at
every released version, with rows valid at that version, migrates to the current one with its
rows kept and the same tables, columns, keys and indexes as a database created fresh; a second
migration changes nothing."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, MetaData, inspect, select, text

from daemon import paths
from daemon.store import capture as cap
from daemon.store import engine as eng_mod
from daemon.store import migrations
from daemon.store import nearcopies as nc
from daemon.store import persons as ps
from daemon.store import reviews as rv
from daemon.store import schema as s
from daemon.store import videos as vid
from daemon.store.engine import SCHEMA_VERSION, migrate, open_engine, schema_version

RELEASED = range(1, SCHEMA_VERSION)  # every version a database may have been left at
ROWS_UP_TO = 8  # released_database() inserts what each version up to this one allows

SHA = "a" * 64
DESCRIPTOR = bytes(range(256))  # 128 float16, as the writer stores them
# literal backslashes in the folder and the name, one before text that reads as an escape of the recorded form
RAW_PATH, RAW_ROOT = b"/e\\\\v/b\\xe9.jpg", b"/e\\\\v"
BOX = (10.0, 10.0, 40.0, 40.0)


def test_steps_are_numbered_from_one_and_named() -> None:
    steps = migrations.STEPS
    assert [st.version for st in steps] == list(range(1, len(steps) + 1))
    assert all(st.name for st in steps) and len({st.name for st in steps}) == len(steps)
    assert SCHEMA_VERSION == migrations.LATEST == len(steps)
    assert [st.apply for st in steps] == eng_mod.MIGRATIONS  # the engine's list, for its callers
    assert SCHEMA_VERSION - 1 <= ROWS_UP_TO, "a new released version: add its rows to released_database()"


def released_database(conn: Connection, version: int) -> None:
    """A database as forensic-gender left it at ``version``: the first ``version`` steps, then
    rows valid at that version."""
    for st in migrations.STEPS[:version]:
        st.apply(conn)
    conn.execute(s.meta.insert().values(key="schema_version", value=str(version)))
    if version < 5:
        # step 1 creates today's schema.metadata, which gained faces.descriptor with version 5
        conn.execute(text("ALTER TABLE faces DROP COLUMN descriptor"))
    if version < 9:  # ... and faces.frame, faces.frame_time with version 9
        conn.execute(text("ALTER TABLE faces DROP COLUMN frame"))
        conn.execute(text("ALTER TABLE faces DROP COLUMN frame_time"))
    recorded = version >= 4  # before version 4 a path was stored as the OS gave it
    path, root = (paths.to_db(p) if recorded else p.decode() for p in (RAW_PATH, RAW_ROOT))
    conn.execute(s.images.insert().values(id=1, sha256=SHA, md5="m" * 32, size=100, format="jpeg", width=64, height=48, first_seen=1.0))
    conn.execute(s.bundles.insert().values(key="b1", spec="{}", created=1.0))
    file_row = {"size": 100, "mtime_ns": 1, "inode": 7, "state": "done", "attempts": 1, "first_seen": 1.0, "last_seen": 1.0, "updated": 1.0}
    conn.execute(s.files.insert().values(id=1, path="/ev/a.jpg", root="/ev", image_id=1, **file_row))
    conn.execute(s.files.insert().values(id=2, path=path, root=root, image_id=1, **file_row))
    conn.execute(s.analyses.insert().values(id=1, image_id=1, bundle="b1", faces=2, seconds=0.1, host="h", created=1.0))
    insert_face = s.faces.insert() if version >= 9 else text(
        "INSERT INTO faces (id, analysis_id, idx, x1, y1, x2, y2, score, landmarks, width_px, p_male, p_female, gender, age"
        + (", descriptor" if version >= 5 else "") + ") VALUES (:id, :analysis_id, :idx, :x1, :y1, :x2, :y2, :score, :landmarks,"
        " :width_px, :p_male, :p_female, :gender, :age" + (", :descriptor" if version >= 5 else "") + ")"
    )  # fmt: skip
    for idx in (0, 1):
        face = {"id": idx + 1, "analysis_id": 1, "idx": idx, "x1": BOX[0] + 50 * idx, "y1": BOX[1], "x2": BOX[2] + 50 * idx, "y2": BOX[3]}
        face |= {"score": 0.9, "landmarks": "[]", "width_px": 30.0, "p_male": 0.8, "p_female": 0.2, "gender": "male", "age": 30.0}
        if version >= 5 and idx == 0:
            face["descriptor"] = DESCRIPTOR
        if version >= 5:
            face.setdefault("descriptor", None)
        conn.execute(insert_face, face)
    conn.execute(s.events.insert().values(at=1.0, kind="analysed", host="h", file_id=1))
    if version >= 2:
        x1, y1, x2, y2 = BOX
        conn.execute(rv.reviews.insert().values(sha256=SHA, x1=x1, y1=y1, x2=x2, y2=y2, status="corrected", label="female",
                                                reviewer="ana", origin="web", created=2.0, bundle="b1", face_idx=0, face_id=1))  # fmt: skip
    if version >= 6:
        conn.execute(ps.persons.insert().values(id=1, name="P1", created=3.0, updated=3.0))
        conn.execute(ps.face_persons.insert().values(face_id=1, person_id=1, pinned=True))
        conn.execute(ps.decisions.insert().values(at=3.0, action="assign", person_id=1, sha256=SHA, face_id=1, reviewer="ana"))
    if version >= 7:
        conn.execute(nc.images_v7.update().values(near_hash="0" * 48))
    if version >= 8:
        conn.execute(cap.image_capture.insert().values(image_id=1, taken_at="2024-05-01T10:00:00", model="Pixel 8"))


def check_rows(conn: Connection, version: int) -> None:
    """The rows :func:`released_database` inserted at ``version``, as the current schema reads them."""
    files = dict(conn.execute(select(s.files.c.id, s.files.c.path)).all())
    roots = dict(conn.execute(select(s.files.c.id, s.files.c.root)).all())
    assert files[1] == "/ev/a.jpg" and roots[1] == "/ev"
    assert (files[2], roots[2]) == (paths.to_db(RAW_PATH), paths.to_db(RAW_ROOT))  # doubled once (v4), never twice
    assert (paths.to_os(files[2]), paths.to_os(roots[2])) == (RAW_PATH, RAW_ROOT)
    assert conn.execute(select(s.images.c.sha256, s.images.c.width)).all() == [(SHA, 64)]
    assert conn.execute(select(s.analyses.c.image_id, s.analyses.c.bundle, s.analyses.c.faces)).all() == [(1, "b1", 2)]
    faces = conn.execute(select(s.faces.c.idx, s.faces.c.x1, s.faces.c.p_male, s.faces.c.descriptor).order_by(s.faces.c.idx)).all()
    assert [(f.idx, f.x1, f.p_male) for f in faces] == [(0, 10.0, 0.8), (1, 60.0, 0.8)]
    # a descriptor stored at version 5 or later survives; faces analysed before have none
    assert [None if f.descriptor is None else bytes(f.descriptor) for f in faces] == [DESCRIPTOR if version >= 5 else None, None]
    assert conn.execute(select(s.events.c.kind)).scalars().all() == ["analysed"]
    got = conn.execute(select(rv.reviews.c.sha256, rv.reviews.c.status, rv.reviews.c.label, rv.reviews.c.face_id)).all()
    assert got == ([(SHA, "corrected", "female", 1)] if version >= 2 else [])
    assert conn.execute(select(ps.persons.c.id, ps.persons.c.name)).all() == ([(1, "P1")] if version >= 6 else [])
    assert conn.execute(select(ps.face_persons.c.face_id, ps.face_persons.c.pinned)).all() == ([(1, True)] if version >= 6 else [])
    assert len(conn.execute(select(ps.decisions.c.id)).all()) == (1 if version >= 6 else 0)
    hashes = conn.execute(select(nc.images_v7.c.near_hash)).scalars().all()
    assert hashes == (["0" * 48] if version >= 7 else [None])
    index = nc.load_index(conn)  # an image analysed before version 7 counts as not hashed
    assert (len(index.ids), index.unhashed) == ((1, 0) if version >= 7 else (0, 1))
    # images analysed before version 8 have no capture metadata (they get it when analysed again)
    got = conn.execute(select(cap.image_capture.c.image_id, cap.image_capture.c.model)).all()
    assert cap.has_table(conn) and got == ([(1, "Pixel 8")] if version >= 8 else [])
    # faces analysed before version 9 come from images: no frame, no video rows
    assert conn.execute(select(s.faces.c.frame, s.faces.c.frame_time)).all() == [(None, None), (None, None)]
    assert vid.has_tables(conn) and conn.execute(select(vid.videos.c.image_id)).all() == []
    assert rv.has_reviews(conn) and ps.has_persons(conn) and nc.has_hash(conn)


def shape(conn: Connection) -> dict[str, Any]:
    """Every table's columns (type, nullable), primary and foreign keys, unique constraints and
    indexes, by name, as the database reports them."""
    insp = inspect(conn)
    out: dict[str, Any] = {}
    for t in sorted(insp.get_table_names()):
        out[t] = {
            "columns": {c["name"]: (str(c["type"]), c["nullable"]) for c in insp.get_columns(t)},
            "primary key": insp.get_pk_constraint(t)["constrained_columns"],
            "foreign keys": sorted((fk["constrained_columns"], fk["referred_table"], fk["referred_columns"]) for fk in insp.get_foreign_keys(t)),
            "unique": sorted((u["name"] or "", u["column_names"]) for u in insp.get_unique_constraints(t)),
            "indexes": {ix["name"]: (ix["column_names"], bool(ix["unique"])) for ix in insp.get_indexes(t)},
        }
    return out


def contents(conn: Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in primary-key order."""
    md = MetaData()
    md.reflect(conn)
    return {name: [tuple(r) for r in conn.execute(select(t).order_by(*t.primary_key.columns))] for name, t in sorted(md.tables.items())}


def drop_everything(engine: Engine) -> None:
    """An empty database again (the fresh one's shape taken)."""
    with engine.begin() as conn:
        md = MetaData()
        md.reflect(conn)
        md.drop_all(conn)


@pytest.mark.parametrize("version", RELEASED)
def test_a_released_schema_migrates_with_its_rows(db_url: str, version: int, caplog: pytest.LogCaptureFixture) -> None:
    """A database at ``version``, with rows, migrated to the current version: its rows are kept
    and its schema is a fresh database's; migrating it again changes nothing."""
    engine = open_engine(db_url)
    try:
        assert migrate(engine) == SCHEMA_VERSION
        with engine.connect() as conn:
            fresh = shape(conn)
        assert {"meta", "files", "images", "faces", "reviews", "persons", "face_persons", "person_decisions"} <= set(fresh)
        assert "ix_images_near_hash" in fresh["images"]["indexes"] and "ix_faces_p_male_id" in fresh["faces"]["indexes"]
        drop_everything(engine)
        with engine.begin() as conn:
            released_database(conn, version)
        with caplog.at_level(logging.INFO, logger=eng_mod.__name__):
            assert migrate(engine) == SCHEMA_VERSION
        ran = [r.getMessage() for r in caplog.records if r.getMessage().startswith("migrating")]
        assert ran == [f"migrating database schema {st.version - 1} -> {st.version} ({st.name})" for st in migrations.STEPS[version:]]
        with engine.connect() as conn:
            assert schema_version(conn) == SCHEMA_VERSION
            check_rows(conn, version)
            assert shape(conn) == fresh
            before = contents(conn)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=eng_mod.__name__):
            assert migrate(engine) == SCHEMA_VERSION  # the second time: nothing to do
        assert not [r for r in caplog.records if r.getMessage().startswith("migrating")]
        with engine.connect() as conn:
            assert contents(conn) == before and shape(conn) == fresh
    finally:
        engine.dispose()
