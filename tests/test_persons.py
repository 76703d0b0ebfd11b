"""Persons: the clustering maths (pure), placement by the one writer, recluster and the
examiner's decisions on SQLite and the real PostgreSQL server, and the identity commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from daemon import identity
from daemon.config import IdentityConfig
from daemon.pipeline.analyze import Face, ImageResult
from daemon.store import persons as ps
from daemon.store import schema as s
from daemon.store.engine import open_store_engine
from daemon.store.writer import FileStat, Store

RNG = np.random.default_rng(7)
CENTRES = RNG.normal(0, 1, (6, 128)).astype(np.float32)
CENTRES *= 0.6 / np.linalg.norm(CENTRES, axis=1, keepdims=True)  # people ~0.85 apart, like dlib's


def face_vec(person: int, k: int) -> np.ndarray:
    """A descriptor of ``person``: within 0.2 of its centre (same person < 0.4 apart)."""
    noise = np.random.default_rng(1000 * person + k).normal(0, 1, 128).astype(np.float32)
    return CENTRES[person] + 0.15 * noise / np.linalg.norm(noise)


# -- pure ---------------------------------------------------------------------------------------


def test_clusters_are_complete_linkage_and_deterministic() -> None:
    # a chain 0 - 1 - 2 with steps 0.4: single linkage would join all three, complete linkage
    # (every pair < 0.6) must not put 0 and 2 together
    X = np.zeros((3, 128), np.float32)  # noqa: N806
    X[1, 0], X[2, 0] = 0.4, 0.8
    lab = identity.clusters(X, 0.6)
    assert lab[0] != lab[2] and len(set(lab.tolist())) == 2
    pts = np.stack([face_vec(p, k) for p in range(4) for k in range(5)])
    a = identity.clusters(pts, 0.6)
    assert identity.adjusted_rand(a, np.repeat(np.arange(4), 5)) == 1.0
    assert (identity.clusters(pts, 0.6) == a).all(), "same faces, same clusters"
    seeds = np.ones(len(pts), bool)
    seeds[3] = False
    assert identity.clusters(pts, 0.6, seeds=seeds)[3] == -1


def test_join_takes_the_cluster_whose_farthest_face_is_nearest() -> None:
    X = np.stack([face_vec(0, k) for k in range(3)] + [face_vec(1, k) for k in range(3)])  # noqa: N806
    lab = np.array([0, 0, 0, 1, 1, 1])
    assert identity.join(X, lab, face_vec(1, 9), 0.6) == 1
    assert identity.join(X, lab, CENTRES[5], 0.6) == -1, "nobody near: no cluster"


def test_pair_scores_and_adjusted_rand_on_known_values() -> None:
    truth = ["a", "a", "b", "b"]
    assert identity.pair_scores(truth, np.array([0, 0, 1, 1])) == (1.0, 1.0)
    p, r = identity.pair_scores(truth, np.array([0, 0, 0, 0]))  # 6 pairs together, 2 right
    assert (p, r) == (pytest.approx(2 / 6), 1.0)
    p, r = identity.pair_scores(truth, np.array([0, -1, 1, 1]))  # unplaced face joins nothing
    assert (p, r) == (1.0, 0.5)
    assert identity.adjusted_rand(np.array([0, 0, 1, 1]), np.array([5, 5, 7, 7])) == 1.0
    # sklearn.metrics.adjusted_rand_score([0, 0, 1, 1], [0, 1, 0, 1]) == -0.5
    assert identity.adjusted_rand(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])) == pytest.approx(-0.5)


# -- the store, both databases -------------------------------------------------------------------


def _result(sha: str, vecs: list[np.ndarray], widths: list[float] | None = None) -> ImageResult:
    faces = tuple(
        Face(
            box=(100.0 * i, 10.0, 100.0 * i + (widths[i] if widths else 60.0), 70.0),
            score=0.95,
            landmarks=((1.0, 2.0),) * 5,
            width_px=widths[i] if widths else 60.0,
            p_male=0.8,
            p_female=0.2,
            gender="male",
            age=30.0,
            age_std=4.0,
            descriptor=v.astype("<f2").tobytes(),
        )
        for i, v in enumerate(vecs)
    )
    return ImageResult(
        path="",
        size=100,
        sha256=sha,
        md5="m" * 32,
        mtime_ns=1,
        format="jpeg",
        width=640,
        height=480,
        orientation=1,
        frames=1,
        notes=(),
        faces=faces,
        seconds={"detect": 0.1},
    )


def _record(store: Store, name: str, res: ImageResult, bundle: str = "b1") -> None:
    store.upsert_files([FileStat(f"/ev/{name}", "/ev", 100, 1, 7)])
    (claim,) = store.claim(1, 60)
    assert store.record_analysis(claim.id, res, bundle)


def _face_id(engine, sha: str) -> int:  # noqa: ANN001
    f, a, i = s.faces, s.analyses, s.images
    with engine.connect() as c:
        return c.execute(
            select(f.c.id)
            .select_from(f.join(a, a.c.id == f.c.analysis_id).join(i, i.c.id == a.c.image_id))
            .where(i.c.sha256 == sha)
            .order_by(f.c.id.desc())
            .limit(1)
        ).scalar_one()


def _persons_of(engine, sha: str) -> list[int | None]:  # noqa: ANN001
    f, a, i, fp = s.faces, s.analyses, s.images, ps.face_persons
    with engine.connect() as c:
        latest = select(func.max(a.c.id)).join(i, i.c.id == a.c.image_id).where(i.c.sha256 == sha).scalar_subquery()
        return [
            r[0]
            for r in c.execute(select(fp.c.person_id).select_from(f.outerjoin(fp, fp.c.face_id == f.c.id)).where(f.c.analysis_id == latest).order_by(f.c.idx))
        ]


@pytest.fixture
def store(db_url: str):  # noqa: ANN201
    eng = open_store_engine(db_url)
    st = Store(eng, "host-a", IdentityConfig())
    st.ensure_bundle("b1", {"models": {}})
    st.ensure_bundle("b2", {"models": {}})
    yield st
    eng.dispose()


def _sha(k: int) -> str:
    return f"{k:064x}"


def test_writer_places_faces_and_recluster_agrees(store: Store) -> None:
    # 4 people x 3 images, one face each; person 3's images also hold a small face of person 2
    k = 0
    for person in range(4):
        for j in range(3):
            vecs, widths = [face_vec(person, j)], [60.0]
            if person == 3:
                vecs.append(face_vec(2, 10 + j))
                widths.append(20.0)  # too small to seed, may join
            _record(store, f"{person}-{j}.jpg", _result(_sha(k := k + 1), vecs, widths))
    placed = [_persons_of(store.engine, _sha(i + 1)) for i in range(12)]
    first = [p[0] for p in placed]
    assert len(set(first)) == 4 and all(first[3 * q] == first[3 * q + 1] == first[3 * q + 2] for q in range(4))
    assert {p[1] for p in placed[9:]} == {first[6]}, "small faces join their person"
    st = ps.recluster(store.engine, IdentityConfig())
    assert st["faces"] == 15 and st["persons"] == 4
    assert [_persons_of(store.engine, _sha(i + 1)) for i in range(12)] == placed, "recluster keeps the incremental persons and ids"
    assert ps.recluster(store.engine, IdentityConfig())["persons"] == 4
    # a small face alone seeds nothing
    _record(store, "lonely.jpg", _result(_sha(99), [face_vec(5, 0)], [20.0]))
    assert _persons_of(store.engine, _sha(99)) == [None]


def test_decisions_are_audited_and_survive_recluster_and_reanalysis(store: Store) -> None:
    for j in range(3):
        _record(store, f"a{j}.jpg", _result(_sha(10 + j), [face_vec(0, j)]))
        _record(store, f"b{j}.jpg", _result(_sha(20 + j), [face_vec(1, j)]))
    pa, pb = _persons_of(store.engine, _sha(10))[0], _persons_of(store.engine, _sha(20))[0]
    assert pa != pb and pa is not None and pb is not None
    ps.rename(store.engine, pa, "Suspect A", reviewer="ex1")
    face_b2 = _face_id(store.engine, _sha(22))
    new = ps.assign(store.engine, face_b2, None, reviewer="ex1")  # split a face off
    assert new not in (pa, pb) and _persons_of(store.engine, _sha(22)) == [new]
    moved = ps.merge(store.engine, pa, pb, reviewer="ex2")
    assert moved == 5  # 3 of A, 2 left in B
    with pytest.raises(ps.PersonError, match="merged into person"):
        ps.rename(store.engine, pb, "x")
    with pytest.raises(ps.PersonError, match="control characters"):
        ps.rename(store.engine, pa, "a\nb")
    for _ in range(2):
        ps.recluster(store.engine, IdentityConfig())
        assert _persons_of(store.engine, _sha(21)) == [pa], "merged face stays merged"
        assert _persons_of(store.engine, _sha(22)) == [new], "split face stays split"
    # re-analysis with a new bundle: the new faces inherit the examiner's decisions by box
    store.upsert_files([FileStat("/ev/b2.jpg", "/ev", 100, 2, 7)])  # changed: queued again
    (claim,) = store.claim(1, 60)
    assert store.record_analysis(claim.id, _result(_sha(22), [face_vec(1, 2)]), "b2")
    assert _persons_of(store.engine, _sha(22)) == [new]
    ps.recluster(store.engine, IdentityConfig())
    assert _persons_of(store.engine, _sha(22)) == [new]
    with store.engine.connect() as c:
        acts = [r.action for r in c.execute(select(ps.decisions).order_by(ps.decisions.c.id))]
        name = c.execute(select(ps.persons.c.name).where(ps.persons.c.id == pa)).scalar_one()
        events = c.execute(select(func.count()).select_from(s.events).where(s.events.c.kind == "recluster")).scalar_one()
    assert acts[:2] == ["name", "assign"] and acts[2] == "merge" and acts.count("assign") == 6
    assert name == "Suspect A" and events == 3


def test_released_face_joins_no_one(store: Store) -> None:
    for j in range(3):
        _record(store, f"a{j}.jpg", _result(_sha(30 + j), [face_vec(2, j)]))
    fid = _face_id(store.engine, _sha(31))
    ps.release(store.engine, fid, reviewer="ex")
    ps.recluster(store.engine, IdentityConfig())
    assert _persons_of(store.engine, _sha(31)) == [None]
    assert _persons_of(store.engine, _sha(30)) == _persons_of(store.engine, _sha(32))


def test_similar_search_by_stored_face(store: Store) -> None:
    from daemon.queries.similar import FaceIndex, SimilarError, similar_to_face

    for j in range(4):
        _record(store, f"s{j}.jpg", _result(_sha(40 + j), [face_vec(3, j), face_vec(4, j)]))
    with store.engine.connect() as c:
        ids = [r[0] for r in c.execute(select(s.faces.c.id).order_by(s.faces.c.id))]
        index = FaceIndex()
        hits = similar_to_face(c, ids[0], index=index)
        assert [h.face_id for h in hits] == [ids[2], ids[4], ids[6]] or sorted(h.face_id for h in hits) == [ids[2], ids[4], ids[6]]
        assert [h.distance for h in hits] == sorted(h.distance for h in hits) and hits[0].distance < 0.6
        with pytest.raises(SimilarError, match="does not exist"):
            similar_to_face(c, 10**9, index=index)
    # re-analysis: the old faces leave the index
    store.upsert_files([FileStat("/ev/s0.jpg", "/ev", 100, 2, 7)])
    (claim,) = store.claim(1, 60)
    store.record_analysis(claim.id, _result(_sha(40), [face_vec(3, 0)]), "b2")
    with store.engine.connect() as c:
        index.refresh(c)
        assert len(index.ids) == 7 and ids[0] not in index.ids.tolist()


def test_face_index_cache_is_reused_and_checked(store: Store, tmp_path: Path) -> None:
    from daemon.queries.similar import FaceIndex

    for j in range(3):
        _record(store, f"c{j}.jpg", _result(_sha(70 + j), [face_vec(0, j)]))
    cache = tmp_path / "cache"
    with store.engine.connect() as c:
        first = FaceIndex(cache, save_after=1)
        first.refresh(c)
        assert (cache / "meta.json").exists()
        again = FaceIndex(cache)
        again.refresh(c)
        assert again.ids.tolist() == first.ids.tolist() and isinstance(again.vectors, np.memmap)
        assert again.search(face_vec(0, 0))[0].face_id == first.ids[0]
    other = open_store_engine(f"sqlite:///{tmp_path / 'other.db'}")  # another database, the same cache file
    st2 = Store(other, "h")
    st2.ensure_bundle("b1", {"models": {}})
    for j in range(3):
        _record(st2, f"o{j}.jpg", _result(_sha(80 + j), [face_vec(1, j)]))
    with other.connect() as c:
        idx = FaceIndex(cache)
        idx.refresh(c)
        assert not isinstance(idx.vectors, np.memmap) and idx.search(face_vec(1, 0))[0].distance < 0.3
    other.dispose()


# -- commands --------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], capture_output=True, text=True, timeout=120)


def test_persons_commands(db_url: str) -> None:
    eng = open_store_engine(db_url)
    st = Store(eng, "h")
    st.ensure_bundle("b1", {"models": {}})
    for j in range(2):
        _record(st, f"p{j}.jpg", _result(_sha(50 + j), [face_vec(0, j)]))
        _record(st, f"q{j}.jpg", _result(_sha(60 + j), [face_vec(1, j)]))
    eng.dispose()
    out = _cli("persons", "list", "--db", db_url, "--format", "json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["faces"] for r in rows] == [2, 2]
    a, b = rows[0]["person_id"], rows[1]["person_id"]
    assert _cli("persons", "name", str(a), "Witness\u202e1", "--db", db_url).returncode == 0
    assert _cli("persons", "merge", str(a), str(b), "--db", db_url, "--reviewer", "ex").returncode == 0
    bad = _cli("persons", "merge", str(a), str(b), "--db", db_url)
    assert bad.returncode == 2 and "merged into person" in bad.stderr and "Traceback" not in bad.stderr
    listing = _cli("persons", "--db", db_url)
    assert listing.returncode == 0 and "\u202e" not in listing.stdout and "Witness" in listing.stdout
    assert _cli("recluster", "--db", db_url).returncode == 0
    sim = _cli("similar", "--face-id", "1", "--db", db_url, "--format", "json")
    assert sim.returncode == 0, sim.stderr
    assert {m["person_id"] for m in json.loads(sim.stdout)["matches"]} == {a}
    none = _cli("similar", "--db", db_url)
    assert none.returncode == 2 and "PHOTO or --face-id" in none.stderr


def test_queries_and_exports_carry_the_person(db_url: str) -> None:
    import csv
    import io

    eng = open_store_engine(db_url)
    st = Store(eng, "h")
    st.ensure_bundle("b1", {"models": {}})
    for j in range(2):
        _record(st, f"e{j}.jpg", _result(_sha(90 + j), [face_vec(2, j)]))
    person = _persons_of(eng, _sha(90))[0]
    assert person is not None
    ps.rename(eng, person, "Victim 1")
    eng.dispose()
    rows = json.loads(_cli("faces", "--db", db_url, "--format", "json").stdout)["faces"]
    assert {(r["person_id"], r["person_name"]) for r in rows} == {(person, "Victim 1")}
    out = _cli("export", "--db", db_url, "--format", "csv")
    assert out.returncode == 0, out.stderr
    assert {(r["person_id"], r["person_name"]) for r in csv.DictReader(io.StringIO(out.stdout))} == {(str(person), "Victim 1")}
    vics = _cli("export", "--db", db_url, "--format", "vics")
    assert vics.returncode == 0 and f"person {person} (Victim 1)" in vics.stdout


@pytest.mark.models
def test_similar_photo_needs_one_face(tmp_path: Path, models_ready: None) -> None:
    import cv2

    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((200, 200, 3), 128, np.uint8))
    url = f"sqlite:///{tmp_path / 'x.db'}"
    open_store_engine(url).dispose()
    out = _cli("similar", str(blank), "--db", url)
    assert out.returncode == 1 and "no face found" in out.stderr
