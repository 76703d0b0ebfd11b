"""The results store, one suite run on SQLite and on the real PostgreSQL server."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select, text

from daemon.pipeline.analyze import Face, ImageResult
from daemon.store import schema as s
from daemon.store.engine import SCHEMA_VERSION, StoreError, migrate, open_engine, open_store_engine, schema_version
from daemon.store.writer import FileStat, Store


def result(sha: str, n_faces: int = 2) -> ImageResult:
    faces = tuple(
        Face(box=(10.0 * i, 10.0, 10.0 * i + 30, 40.0), score=0.9, landmarks=((1.0, 2.0),) * 5, width_px=30.0,
             p_male=0.8, p_female=0.2, gender="male", age=30.0, age_std=4.0)
        for i in range(n_faces)
    )
    return ImageResult(path="", size=100, sha256=sha, md5="m" * 32, mtime_ns=1, format="jpeg", width=640, height=480,
                       orientation=1, frames=1, notes=(), faces=faces, seconds={"detect": 0.1})


def count(store: Store, table, *where) -> int:  # noqa: ANN001
    with store.engine.connect() as c:
        return c.execute(select(func.count()).select_from(table).where(*where)).scalar_one()


@pytest.fixture
def store(db_url: str) -> Store:
    eng = open_store_engine(db_url)
    st = Store(eng, "host-a")
    st.ensure_bundle("b1", {"models": {}})
    yield st
    eng.dispose()


def fs(name: str, size: int = 100, mtime: int = 1, inode: int = 7) -> FileStat:
    return FileStat(f"/ev/{name}", "/ev", size, mtime, inode)


def test_schema_version_and_idempotent_migration(db_url: str) -> None:
    eng = open_store_engine(db_url)
    assert migrate(eng) == SCHEMA_VERSION
    with eng.connect() as c:
        assert schema_version(c) == SCHEMA_VERSION
    eng.dispose()


def test_upsert_is_idempotent_and_detects_changes(store: Store) -> None:
    c = store.upsert_files([fs("a.jpg"), fs("b.jpg"), fs("a.jpg")])
    assert (c.new, c.unchanged) == (2, 1)
    c = store.upsert_files([fs("a.jpg"), fs("b.jpg", size=200)])
    assert (c.new, c.unchanged, c.changed) == (0, 1, 1)
    assert count(store, s.files) == 2


def test_claim_lease_and_record(store: Store) -> None:
    store.upsert_files([fs("a.jpg"), fs("b.jpg"), fs("c.jpg")])
    claims = store.claim(2, 60)
    assert [c.path for c in claims] == ["/ev/a.jpg", "/ev/b.jpg"] and all(c.attempts == 1 for c in claims)
    assert store.claim(5, 60)[0].path == "/ev/c.jpg"
    assert store.claim(5, 60) == []
    assert store.record_analysis(claims[0].id, result("1" * 64), "b1")
    assert store.record_analysis(claims[1].id, result("1" * 64), "b1"), "same content, second file"
    assert count(store, s.analyses) == 1 and count(store, s.faces) == 2
    assert count(store, s.files, s.files.c.state == "done") == 2


def test_lost_lease_writes_nothing(store: Store, db_url: str) -> None:
    store.upsert_files([fs("a.jpg")])
    (claim,) = store.claim(1, -1)  # lease already expired
    other = Store(store.engine, "host-b")
    (taken,) = other.claim(1, 60)
    assert taken.id == claim.id and taken.attempts == 2
    assert store.record_analysis(claim.id, result("2" * 64), "b1") is False
    assert count(store, s.analyses) == 0
    assert other.record_analysis(taken.id, result("2" * 64), "b1")
    assert count(store, s.analyses) == 1


def test_failures_and_quarantine(store: Store) -> None:
    store.upsert_files([fs("bad.jpg"), fs("crash.jpg")])
    bad, crash = store.claim(2, 60)
    assert store.record_failure(bad.id, "truncated", "cut at 50%", sha256="3" * 64, md5="x" * 32, size=10) == "failed"
    for attempt in range(1, 4):
        if attempt > 1:
            (crash,) = store.claim(1, 60)
        state = store.record_failure(crash.id, "worker_crashed", "died", max_attempts=3)
        assert state == ("quarantined" if attempt == 3 else "queued")
    with store.engine.connect() as c:
        r = c.execute(select(s.files.c.state, s.files.c.reason, s.files.c.attempts).where(s.files.c.id == crash.id)).one()
    assert tuple(r) == ("quarantined", "worker_crashed", 3)
    assert count(store, s.events, s.events.c.kind == "file_quarantined") == 1


def test_gone_move_and_revive(store: Store) -> None:
    store.upsert_files([fs("a.jpg"), fs("b.jpg")])
    (a, b) = store.claim(2, 60)
    store.record_analysis(a.id, result("4" * 64), "b1")
    assert store.move("/ev/a.jpg", "/ev/renamed.jpg", "/ev")
    assert store.upsert_files([fs("renamed.jpg")]).unchanged == 1, "a moved file is not analysed again"
    assert store.mark_gone(["/ev/renamed.jpg"]) == 1
    assert count(store, s.analyses) == 1, "results of deleted files are kept"
    c = store.upsert_files([fs("renamed.jpg")])
    assert c.revived == 1


def test_requeue_for_new_bundle(store: Store) -> None:
    store.upsert_files([fs("a.jpg")])
    (a,) = store.claim(1, 60)
    store.record_analysis(a.id, result("5" * 64), "b1")
    store.ensure_bundle("b2", {"models": {"x": 1}})
    assert store.requeue_for_bundle("b1") == 0
    assert store.requeue_for_bundle("b2") == 1


def test_concurrent_claims_never_overlap(store: Store, db_url: str) -> None:
    store.upsert_files([fs(f"{i:04d}.jpg") for i in range(300)])
    got: list[list[int]] = [[], [], []]

    def worker(k: int) -> None:
        st = Store(open_store_engine(db_url), f"host-{k}")
        while True:
            claims = st.claim(7, 60)
            if not claims:
                break
            got[k].extend(c.id for c in claims)
        st.engine.dispose()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ids = [i for g in got for i in g]
    assert len(ids) == 300 and len(set(ids)) == 300


def test_bad_url_and_newer_schema(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(StoreError, match="not a database URL"):
        open_engine("nonsense")
    url = f"sqlite:///{tmp_path / 'x.db'}"
    eng = open_store_engine(url)
    with eng.begin() as c:
        c.execute(text("update meta set value = '999' where key = 'schema_version'"))
    with pytest.raises(StoreError, match="upgrade forensic-gender"):
        migrate(eng)
    eng.dispose()
    with pytest.raises(StoreError, match="does not exist"):
        open_engine(f"sqlite:///{tmp_path / 'missing.db'}", readonly=True)


def test_sqlite_settings(tmp_path) -> None:  # noqa: ANN001
    eng = open_store_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with eng.connect() as c:
        assert c.exec_driver_sql("pragma journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("pragma foreign_keys").scalar() == 1
        assert c.exec_driver_sql("pragma busy_timeout").scalar() >= 5000
    eng.dispose()


def test_stats_per_host_throughput_and_leases(store: Store) -> None:
    from daemon.queries import read
    from daemon.queries.filters import Filters

    store.upsert_files([fs("a.jpg"), fs("b.jpg"), fs("c.jpg")])
    (a,) = store.claim(1, 60)
    store.record_analysis(a.id, result("6" * 64), "b1")
    other = Store(store.engine, "host-b")
    other.claim(1, 60)
    other.claim(1, -1)  # a lease that has already expired: a dead host
    with store.engine.connect() as conn:
        st = read.stats(conn, Filters(), read.scope(conn, Filters()))
    assert st["hosts"]["host-a"]["analyses"] == 1 and st["hosts"]["host-a"]["last_minute"] == 1
    assert st["hosts"]["host-b"]["leases"] == 2 and st["hosts"]["host-b"]["expired_leases"] == 1


def test_descriptor_blob_round_trips(store: Store) -> None:
    import numpy as np

    vec = np.linspace(-0.3, 0.3, 128).astype("<f2")
    base = result("d" * 64, 1)
    face = base.faces[0]
    res = ImageResult(**{**base.__dict__, "faces": (Face(**{**face.__dict__, "descriptor": vec.tobytes()}),)})
    store.upsert_files([fs("d.jpg")])
    [claim] = store.claim(1, 60)
    assert store.record_analysis(claim.id, res, "b1")
    with store.engine.connect() as c:
        blob = c.execute(select(s.faces.c.descriptor)).scalar_one()
    assert np.array_equal(np.frombuffer(bytes(blob), "<f2"), vec)
