"""`forensic-gender scan` end to end with the real models on real faces: every bad input gets
its reason, re-scans analyse nothing, copies are linked, and the evidence tree is untouched."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import tree_manifest
from tests.hostile import make_tree

FG = [sys.executable, "-m", "daemon.cli"]


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([*FG, *args], capture_output=True, text=True, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}")
    return res


@pytest.fixture(scope="module")
def face_jpeg(dev_data: Path) -> bytes:
    return (dev_data / "lfw" / "images" / "Abdullah_0001.jpg").read_bytes()


def rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return c.execute(sql).fetchall()


def test_scan_hostile_tree(tmp_path: Path, face_jpeg: bytes, models_ready: None) -> None:
    evidence = tmp_path / "evidence"
    expect = make_tree(evidence, face_jpeg)
    before = tree_manifest(evidence)
    db = tmp_path / "out" / "r.db"
    res = run_cli("scan", str(evidence), "--db", f"sqlite:///{db}", "--no-progress", "--workers", "2")
    assert "failures:" in res.stdout and "images/s" in res.stdout
    got = {os.path.relpath(p, evidence): (s, r) for p, s, r in rows(db, "select path, state, reason from files")}
    assert got == expect
    # every decodable variant of the one face finds that face, upright, as a man
    faces = rows(db, """select f.path, count(fa.id), min(fa.gender), max(fa.x2 - fa.x1) from files f
                        join analyses a on a.image_id = f.image_id left join faces fa on fa.analysis_id = a.id
                        where f.state = 'done' group by f.path""")
    assert len(faces) == sum(1 for s, _ in expect.values() if s == "done")
    for path, n, gender, width in faces:
        assert n == 1 and gender == "male", (path, n, gender)
    # orientation recorded, and the box lands in the upright frame: same box for all eight
    boxes = rows(db, """select f.path, i.orientation, fa.x1, fa.y1, fa.x2, fa.y2 from files f join images i on i.id = f.image_id
                        join analyses a on a.image_id = i.id join faces fa on fa.analysis_id = a.id where f.path like '%orientation-%'""")
    assert sorted(o for _, o, *_ in boxes) == list(range(1, 9))
    ref = next(b for p, o, *b in boxes if o == 1)
    for p, o, *b in boxes:
        assert max(abs(x - y) for x, y in zip(b, ref)) < 6, (o, b, ref)
    frames = dict(rows(db, "select f.path, i.frames from files f join images i on i.id = f.image_id where i.frames > 1"))
    assert {os.path.basename(p): n for p, n in frames.items()} == {"animated.gif": 3, "multipage.tif": 3}
    assert rows(db, "pragma integrity_check") == [("ok",)]
    assert tree_manifest(evidence) == before, "the scan changed the evidence tree"


def test_rescan_is_idempotent_and_copies_are_linked(tmp_path: Path, dev_data: Path, models_ready: None) -> None:
    evidence = tmp_path / "evidence"
    (evidence / "a").mkdir(parents=True)
    (evidence / "b" / "c").mkdir(parents=True)
    src = sorted((dev_data / "lfw" / "images").iterdir())[:4]
    for p in src:
        shutil.copy(p, evidence / "a" / p.name)
    shutil.copy(src[0], evidence / "b" / "c" / "copy-of-first.jpg")
    shutil.copy(src[0], evidence / "b" / "another-copy.jpeg")
    before = tree_manifest(evidence)
    db = tmp_path / "r.db"
    url = f"sqlite:///{db}"
    first = run_cli("scan", str(evidence), "--db", url, "--no-progress", "--workers", "1")
    assert "6 new" in first.stdout
    assert rows(db, "select count(*) from files where state='done'") == [(6,)]
    assert rows(db, "select count(*) from images") == [(4,)]
    assert rows(db, "select count(*) from analyses") == [(4,)], "one analysis per content"
    again = run_cli("scan", str(evidence), "--db", url, "--no-progress")
    assert "0 analysed, 0 already known" in again.stdout and "6 unchanged" in again.stdout
    assert rows(db, "select count(*) from analyses") == [(4,)]
    # a modified file is analysed as new content; the old analysis stays
    data = (evidence / "a" / src[1].name).read_bytes()
    (evidence / "a" / src[1].name).write_bytes(data + b"\0")  # trailing bytes after EOI: same picture, new content
    third = run_cli("scan", str(evidence), "--db", url, "--no-progress")
    assert "1 changed" in third.stdout and "1 analysed" in third.stdout
    assert rows(db, "select count(*) from analyses") == [(5,)]
    before.pop(f"a/{src[1].name}")
    after = tree_manifest(evidence)
    after.pop(f"a/{src[1].name}")
    assert after == before


def test_scan_with_new_bundle_reanalyses_and_keeps_old(tmp_path: Path, dev_data: Path, models_ready: None) -> None:
    evidence = tmp_path / "ev"
    evidence.mkdir()
    shutil.copy(dev_data / "lfw" / "images" / "Abdullah_0001.jpg", evidence / "x.jpg")
    url = f"sqlite:///{tmp_path / 'r.db'}"
    run_cli("scan", str(evidence), "--db", url, "--no-progress", "--workers", "1")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pipeline:\n  detector:\n    threshold: 0.5\n")
    res = run_cli("scan", str(evidence), "--db", url, "--config", str(cfg), "--no-progress", "--workers", "1")
    assert "1 analysed" in res.stdout
    assert rows(tmp_path / "r.db", "select count(*), count(distinct bundle) from analyses") == [(2, 2)]


def test_analyze_json_and_annotate(tmp_path: Path, dev_data: Path, models_ready: None) -> None:
    img = dev_data / "lfw" / "images" / "Abdullah_0001.jpg"
    out = tmp_path / "annotated"
    res = run_cli("analyze", str(img), str(tmp_path / "in" / "missing.jpg"), "--json", "--annotate", str(out), check=False)
    assert res.returncode == 1  # one input failed
    docs = [json.loads(line) for line in res.stdout.splitlines()]
    assert docs[0]["status"] == "ok" and docs[0]["width"] == 150 and len(docs[0]["sha256"]) == 64
    (face,) = docs[0]["faces"]
    assert set(face) >= {"box", "score", "landmarks", "p_male", "gender", "age"}
    assert face["gender"] == "male" and len(face["landmarks"]) == 5
    assert docs[1]["status"] == "failed" and docs[1]["reason"] == "unreadable"
    written = list(out.iterdir())
    assert len(written) == 1 and written[0].stat().st_size > 1000
    # refuses to write next to the input
    res = run_cli("analyze", str(img), "--annotate", str(img.parent / "out"), check=False)
    assert res.returncode == 2 and "holds evidence" in res.stderr
    assert not (img.parent / "out").exists()


def test_scan_reports_missing_path(tmp_path: Path) -> None:
    res = run_cli("scan", str(tmp_path / "nope"), "--db", f"sqlite:///{tmp_path / 'r.db'}", check=False)
    assert res.returncode == 2 and "no such file" in res.stderr


def test_postgres_scan(tmp_path: Path, dev_data: Path, models_ready: None, pg_url: str) -> None:
    evidence = tmp_path / "ev"
    evidence.mkdir()
    for p in sorted((dev_data / "lfw" / "images").iterdir())[:3]:
        shutil.copy(p, evidence / p.name)
    shutil.copy(evidence / sorted(os.listdir(evidence))[0], evidence / "dup.jpg")
    run_cli("scan", str(evidence), "--db", pg_url, "--no-progress")
    again = run_cli("scan", str(evidence), "--db", pg_url, "--no-progress")
    assert "4 unchanged" in again.stdout
    eng = create_engine(pg_url)
    with eng.connect() as c:
        assert c.execute(text("select count(*) from files where state='done'")).scalar() == 4
        assert c.execute(text("select count(*) from analyses")).scalar() == 3
    eng.dispose()


def test_worker_crash_hands_queued_tasks_to_the_replacement(tmp_path: Path, models_ready: None, monkeypatch) -> None:  # noqa: ANN001
    """A worker holds two tasks (the one it analyses, the next in its pipe); when it dies on the
    first, only that one comes back as Crashed and the queued one is analysed by the new worker."""
    import io

    import numpy as np
    from PIL import Image

    from daemon.config import parse
    from daemon.workers import ABORT_MARKER_ENV, Analysed, Crashed, Task, WorkerPool

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "CRASHME.jpg").write_bytes(buf.getvalue())
    (tmp_path / "fine.jpg").write_bytes(buf.getvalue())
    monkeypatch.setenv(ABORT_MARKER_ENV, "CRASHME")
    pool = WorkerPool(1, parse({}, check_paths=False).pipeline, db_url=None, depth=2)
    pool.start()
    try:
        assert pool.free() == 2
        pool.submit(Task(1, str(tmp_path / "CRASHME.jpg")))
        pool.submit(Task(2, str(tmp_path / "fine.jpg")))
        assert pool.free() == 0 and [t.file_id for t in pool.busy()] == [1, 2]
        got: list = []
        for _ in range(600):  # bounded: 600 polls of up to 0.5 s
            got += pool.poll(0.5)
            if len(got) == 2:
                break
        assert [type(o) for o in got] == [Crashed, Analysed] and [o.file_id for o in got] == [1, 2]
        assert got[0].reason == "worker_crashed" and pool.restarts == 1 and pool.busy() == []
    finally:
        pool.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_every_face_stores_its_identity_descriptor(tmp_path: Path, dev_data: Path, models_ready: None,
                                                   backend: str, request: pytest.FixtureRequest) -> None:
    """Each face carries the backbone's 128-d descriptor (float16) and the analysis' bundle names
    the backbone; two photos of one person lie within dlib's 0.6, two people farther apart."""
    import numpy as np

    url = request.getfixturevalue("pg_url") if backend == "postgresql" else f"sqlite:///{tmp_path / 'fg.db'}"
    evidence = tmp_path / "ev"
    evidence.mkdir()
    for name in ("William_Macy_0001.jpg", "William_Macy_0002.jpg", "Wayne_Ferreira_0001.jpg"):
        shutil.copy(dev_data / "lfw" / "images" / name, evidence / name)
    run_cli("scan", str(evidence), "--db", url, "--no-progress")
    eng = create_engine(url)
    with eng.connect() as c:
        got = c.execute(text("select f.path, fa.descriptor, b.spec from faces fa join analyses a on a.id = fa.analysis_id "
                             "join bundles b on b.key = a.bundle join files f on f.image_id = a.image_id "
                             "where fa.idx = 0 order by f.path")).all()
    eng.dispose()
    assert len(got) == 3 and all(json.loads(spec)["models"].get("backbone") for _, _, spec in got)
    vec = {Path(p).name: np.frombuffer(bytes(d), "<f2").astype(np.float32) for p, d, _ in got}
    assert {v.shape for v in vec.values()} == {(128,)}
    same = np.linalg.norm(vec["William_Macy_0001.jpg"] - vec["William_Macy_0002.jpg"])
    other = np.linalg.norm(vec["William_Macy_0001.jpg"] - vec["Wayne_Ferreira_0001.jpg"])
    assert same < 0.6 < other, (same, other)
