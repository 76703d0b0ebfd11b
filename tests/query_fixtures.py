"""Databases for the query, export and review-page tests.

* ``dev_db``: a real SQLite database built once per session by ``scan`` (the real models) over a
  small sample of ``../shared/data/dev`` copied into a temporary evidence tree (30 LFW crops and a
  duplicate of one at a second path, a truncated JPEG and a text file under root ``ev``; 5 WIDER
  scenes under root ``ev2``). ``real_db`` copies it into the parametrized ``db_url`` (SQLite or the
  real PostgreSQL) so every read test runs on both.
* ``synth``: a small synthetic database with hand-chosen values at the filter boundaries (two
  model bundles, several paths per content, a file never hashed, a file gone, faces on the
  uncertain-band edges, minors rules), inserted row by row.
* ``reference_faces``: an independent Python implementation of the filter rules, to check the SQL.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import insert, select, text

from daemon.queries.filters import Cut

from daemon.store import reviews as rv
from daemon.store import schema as s
from daemon.store.engine import open_engine, open_store_engine

T0 = 1_700_000_000.0
B1, B2 = "aaaa000000000001", "bbbb000000000002"
TABLES = (s.bundles, s.images, s.files, s.analyses, s.faces, s.events)


@dataclass
class DevDB:
    url: str
    ev: Path  # root with the LFW sample, a duplicate and two bad files
    ev2: Path  # root with the WIDER sample
    out: Path  # a folder outside both roots
    bundle: str = ""
    dup_sha: str = ""


def _sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


@pytest.fixture(scope="session")
def dev_db(tmp_path_factory, dev_data, models_ready) -> DevDB:  # noqa: ANN001
    from daemon import config
    from daemon.scan import scan

    base = tmp_path_factory.mktemp("devdb")
    ev, ev2, out = base / "ev", base / "ev2", base / "out"
    (ev / "lfw").mkdir(parents=True)
    (ev / "copies").mkdir()
    (ev / "bad").mkdir()
    (ev2 / "wider").mkdir(parents=True)
    out.mkdir()
    lfw = sorted((dev_data / "lfw" / "images").iterdir())[:30]
    for p in lfw:
        shutil.copyfile(p, ev / "lfw" / p.name)
    shutil.copyfile(lfw[0], ev / "copies" / ("copy of " + lfw[0].name))
    data = lfw[1].read_bytes()
    (ev / "bad" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (ev / "bad" / "notes.txt").write_text("not an image\n")
    wider = sorted(p for p in (dev_data / "wider" / "images").rglob("*.jpg"))[:5]
    for p in wider:
        shutil.copyfile(p, ev2 / "wider" / p.name)
    url = f"sqlite:///{base / 'dev.db'}"
    cfg = config.parse({"database": url}, check_paths=False)
    summary = scan([str(ev), str(ev2)], cfg, workers=2)
    assert summary.analysed + summary.linked == 36 and summary.faces > 40 and sum(summary.failures.values()) == 2, summary
    return DevDB(url, ev, ev2, out, summary.bundle_key, hashlib.sha256(lfw[0].read_bytes()).hexdigest())


def copy_db(src_url: str, dst_url: str) -> None:
    """Copy every row of the v1 tables (ids kept) into a freshly migrated database."""
    src = open_engine(src_url, readonly=True)
    dst = open_store_engine(dst_url)
    with src.connect() as a, dst.begin() as b:
        for t in TABLES:
            rows = [dict(r._mapping) for r in a.execute(select(t))]
            if rows:
                b.execute(insert(t), rows)
        if b.dialect.name == "postgresql":
            for t in ("images", "files", "analyses", "faces", "events"):
                b.execute(text(f"SELECT setval(pg_get_serial_sequence('{t}', 'id'), COALESCE((SELECT max(id) FROM {t}), 1))"))
    src.dispose()
    dst.dispose()


@pytest.fixture
def real_db(dev_db: DevDB, db_url: str) -> DevDB:
    """The dev database copied into ``db_url`` (SQLite or PostgreSQL)."""
    copy_db(dev_db.url, db_url)
    return DevDB(db_url, dev_db.ev, dev_db.ev2, dev_db.out, dev_db.bundle, dev_db.dup_sha)


# --------------------------------------------------------------------------------------------
# The synthetic database


@dataclass
class Synth:
    url: str
    sha: dict[str, str] = field(default_factory=dict)  # name -> sha256
    face: dict[str, int] = field(default_factory=dict)  # "img1/b1/0" -> face id


def _face(idx: int, box: tuple, p: float, age: float | None, std: float | None, score: float) -> dict:
    x1, y1, x2, y2 = box
    return {"idx": idx, "x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": score, "landmarks": "[]", "width_px": x2 - x1,
            "p_male": p, "p_female": 1 - p, "gender": "male" if p >= 0.6 else "female" if p <= 0.4 else "uncertain",
            "age": age, "age_std": std}


# name -> (paths [(path, root, state, reason, first_seen)], {bundle: [faces]}, width, height)
SYNTH = {
    "img1": ([("/ev/a/one.jpg", "/ev", "done", None, T0)],
             {B1: [_face(0, (10, 10, 50, 60), 0.95, 30.0, 2.0, 0.9), _face(1, (100, 10, 130, 50), 0.4, 15.0, 2.0, 0.6)],
              B2: [_face(0, (11, 11, 51, 61), 0.92, 31.0, 2.5, 0.91), _face(1, (100, 10, 130, 50), 0.6, 16.5, 2.0, 0.62)]}, 640, 480),
    "img2": ([("/ev/b/two%_[x].jpg", "/ev", "done", None, T0 + 100), ("/ev2/copy/two.jpg", "/ev2", "done", None, T0 + 200)],
             {B2: [_face(0, (5, 5, 17, 20), 0.5, None, None, 0.4), _face(1, (200, 100, 280, 200), 0.05, 40.0, 10.0, 0.99)]}, 800, 600),
    "img3": ([("/ev/a/THREE.JPG", "/ev", "done", None, T0 + 300)],
             {B1: [_face(0, (30, 30, 55, 60), 0.55, 25.0, 8.0, 0.7)]}, 320, 240),
    "img4": ([("/ev/c/none.png", "/ev", "done", None, T0 + 400)], {B2: []}, 100, 100),
    "img5": ([("/ev/old/gone.jpg", "/ev", "gone", None, T0 + 500)],
             {B2: [_face(0, (40, 40, 90, 100), 0.99, 70.0, 5.0, 0.95)]}, 200, 200),
    # content no recorded path holds any more (its file changed and now holds other content)
    "img6": ([], {B2: [_face(0, (1, 1, 31, 41), 0.2, 9.0, 1.0, 0.8)]}, 64, 64),
}
LONE = ("/ev/bad/broken.jpg", "/ev", "failed", "truncated", T0 + 600)


def build_synth(url: str) -> Synth:
    engine = open_store_engine(url)
    out = Synth(url)
    with engine.begin() as c:
        c.execute(insert(s.bundles), [{"key": B1, "spec": json.dumps({"models": {"age": "x"}, "gender": {"model": "old"}}), "created": T0},
                                      {"key": B2, "spec": json.dumps({"models": {"age": "x"}, "gender": {"model": "new"}}), "created": T0 + 10}])
        for order, (name, (paths, analyses, w, h)) in enumerate(SYNTH.items()):
            sha = _sha(name)
            out.sha[name] = sha
            iid = c.execute(insert(s.images).values(sha256=sha, md5=hashlib.md5(name.encode()).hexdigest(), size=1000 + order,
                                                    format="jpeg", width=w, height=h, orientation=1, frames=1,
                                                    first_seen=paths[0][4] if paths else T0 + 800)).inserted_primary_key[0]
            for path, root, state, reason, seen in paths:
                c.execute(insert(s.files).values(path=path, root=root, size=1000 + order, mtime_ns=int(seen * 1e9), inode=None, state=state,
                                                 image_id=iid, attempts=1, reason=reason, first_seen=seen, last_seen=seen, updated=seen))
            for k, (bundle, faces) in enumerate(analyses.items()):
                aid = c.execute(insert(s.analyses).values(image_id=iid, bundle=bundle, faces=len(faces), seconds=0.1, host="h",
                                                          created=T0 + 1000 + 10 * k + order)).inserted_primary_key[0]
                for fc in faces:
                    fid = c.execute(insert(s.faces).values(analysis_id=aid, **fc)).inserted_primary_key[0]
                    out.face[f"{name}/{'b1' if bundle == B1 else 'b2'}/{fc['idx']}"] = fid
        path, root, state, reason, seen = LONE
        c.execute(insert(s.files).values(path=path, root=root, size=10, mtime_ns=0, state=state, image_id=None, attempts=1, reason=reason,
                                         error="JPEG data must be complete", first_seen=seen, last_seen=seen, updated=seen))
        c.execute(insert(s.events).values(at=T0 + 700, kind="file_changed", host="h", file_id=None, detail=json.dumps({"path": "/ev/a/one.jpg"})))
    engine.dispose()
    return out


@pytest.fixture
def synth(db_url: str) -> Synth:
    return build_synth(db_url)


def add_review(url: str, face_id: int, status: str, label: str | None = None, note: str | None = None, decision: str = "female") -> int:
    engine = open_store_engine(url)
    with engine.begin() as c:
        rid = rv.record(c, face_id, rv.Review(status, label, note, "tester", "cli"), decision)
    engine.dispose()
    return rid


# --------------------------------------------------------------------------------------------
# An independent implementation of the filter rules


def load_world(url: str) -> dict:
    """Every row of the database as plain Python data."""
    engine = open_engine(url, readonly=True)
    with engine.connect() as c:
        w = {t.name: [dict(r._mapping) for r in c.execute(select(t))] for t in TABLES}
        w["reviews"] = [dict(r._mapping) for r in c.execute(select(rv.reviews))] if rv.has_reviews(c) else []
    engine.dispose()
    return w


def reference_faces(w: dict, f, threshold: float = Cut.threshold, margin: float = Cut.margin) -> list[dict]:  # noqa: ANN001
    """The face rows ``f`` selects, computed in Python (unordered)."""
    import fnmatch

    from daemon.pipeline.classify import decide

    t = f.threshold if f.threshold is not None else threshold
    m = f.margin if f.margin is not None else margin
    images = {i["id"]: i for i in w["images"]}
    analyses = {a["id"]: a for a in w["analyses"]}
    latest: dict[int, int] = {}
    for a in w["analyses"]:
        latest[a["image_id"]] = max(latest.get(a["image_id"], 0), a["id"])
    files_of: dict[int, list[dict]] = {}
    for fl in sorted(w["files"], key=lambda r: r["id"]):
        if fl["image_id"] is not None:
            files_of.setdefault(fl["image_id"], []).append(fl)

    def file_ok(fl: dict) -> bool:
        return ((not f.path_prefix or any(fl["path"].startswith(p) for p in f.path_prefix))
                and (not f.path_glob or any(fnmatch.fnmatchcase(fl["path"], g) for g in f.path_glob))
                and (not f.root or fl["root"] in f.root)
                and (f.seen_since is None or fl["first_seen"] >= f.seen_since)
                and (f.seen_until is None or fl["first_seen"] < f.seen_until)
                and (not f.status or fl["state"] in f.status) and (not f.reason or fl["reason"] in f.reason))

    out = []
    for fc in w["faces"]:
        a = analyses[fc["analysis_id"]]
        im = images[a["image_id"]]
        if f.bundle == "latest" and a["id"] != latest[a["image_id"]]:
            continue
        if f.bundle not in ("latest", "all") and not a["bundle"].startswith(f.bundle):
            continue
        if f.sha256 and not any(im["sha256"].startswith(h) for h in f.sha256):
            continue
        matching = [fl for fl in files_of.get(im["id"], []) if file_ok(fl)]
        file_filters = any((f.path_prefix, f.path_glob, f.root, f.seen_since is not None, f.seen_until is not None, f.status, f.reason))
        if file_filters and not matching:
            continue
        gender = decide([fc["p_male"]], t, m)[0]
        box = (fc["x1"], fc["y1"], fc["x2"], fc["y2"])
        revs = [r for r in w["reviews"] if r["sha256"] == im["sha256"] and rv.iou(box, (r["x1"], r["y1"], r["x2"], r["y2"])) >= 0.5 - 1e-12]
        review = max(revs, key=lambda r: r["id"]) if revs else None
        status = review["status"] if review else None
        final = review["label"] if status in ("confirmed", "corrected") else gender
        age, std = fc["age"], fc["age_std"] or 0.0
        checks = [
            not f.gender or gender in f.gender,
            not f.uncertain or gender == "uncertain",
            not f.final_gender or final in f.final_gender,
            f.p_male_min is None or fc["p_male"] >= f.p_male_min,
            f.p_male_max is None or fc["p_male"] <= f.p_male_max,
            f.age_min is None or (age is not None and age >= f.age_min),
            f.age_max is None or (age is not None and age <= f.age_max),
            not f.minors or (age is not None and (age + f.minor_k * std if f.minors == "likely" else age - f.minor_k * std) < 18),
            f.width_min is None or fc["width_px"] >= f.width_min,
            f.width_max is None or fc["width_px"] <= f.width_max,
            f.score_min is None or fc["score"] >= f.score_min,
            not f.review or any(
                (x == "reviewed" and status in ("confirmed", "corrected", "ignored"))
                or (x == "unreviewed" and status in (None, "cleared")) or x == status for x in f.review),
        ]
        if all(checks):
            out.append({**fc, "face_id": fc["id"], "gender": gender, "final_gender": final, "review": status,
                        "path": matching[0]["path"] if matching else (files_of.get(im["id"]) or [{"path": None}])[0]["path"],
                        "sha256": im["sha256"], "bundle": a["bundle"]})
    return out


# --------------------------------------------------------------------------------------------
# Small databases over real files (no models): media, outputs and hostile names


def image_bytes(w: int, h: int, seed: int = 0, ext: str = ".jpg") -> bytes:
    """A smooth picture with some noise (compresses well even when large), encoded by OpenCV;
    cheap in memory even for 64 MP."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    xs = (np.arange(w, dtype=np.int64) * 255 // max(1, w - 1)).astype(np.uint8)
    ys = (np.arange(h, dtype=np.int64) * 255 // max(1, h - 1)).astype(np.uint8)
    base = np.empty((h, w, 3), np.uint8)  # gradients by broadcasting: no full-size temporaries (64 MP is cheap)
    base[..., 0] = xs[None, :]
    base[..., 1] = ys[:, None]
    base[..., 2] = xs[None, :] // 2
    base[..., 2] += ys[:, None] // 2
    noise = rng.integers(0, 16, (min(h, 64), min(w, 64), 3), dtype=np.uint8)
    base[: noise.shape[0], : noise.shape[1]] += noise
    ok, buf = cv2.imencode(ext, base, [cv2.IMWRITE_JPEG_QUALITY, 85] if ext == ".jpg" else [])
    assert ok
    return buf.tobytes()


def record_file(url: str, path: Path, root: Path, *, faces: tuple = ((0.2, 0.2, 0.5, 0.6, 0.8),), bundle: str = B1,
                size: tuple[int, int] | None = None) -> tuple[str, list[int]]:
    """Record ``path`` (under evidence ``root``) as the scanner would: its image (hash, size,
    dimensions), its file row (recorded path form, inode) and one analysis with ``faces`` given
    as (x1, y1, x2, y2) fractions of the image and p(male). Returns (sha256, face ids)."""
    import cv2
    import numpy as np

    from daemon import paths

    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if size is None:
        im = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        size = (im.shape[1], im.shape[0])
    w, h = size
    st = path.stat()
    engine = open_store_engine(url)
    ids = []
    with engine.begin() as c:
        if c.execute(select(s.bundles.c.key).where(s.bundles.c.key == bundle)).first() is None:
            c.execute(insert(s.bundles).values(key=bundle, spec=json.dumps({"models": {}, "gender": {"model": "m"}}), created=T0))
        iid = c.execute(select(s.images.c.id).where(s.images.c.sha256 == sha)).scalar()
        if iid is None:
            fmt = "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpeg"
            iid = c.execute(insert(s.images).values(sha256=sha, md5=hashlib.md5(data).hexdigest(), size=len(data), format=fmt,
                                                    width=w, height=h, orientation=1, frames=1, first_seen=T0)).inserted_primary_key[0]
        c.execute(insert(s.files).values(path=paths.to_db(os.fspath(path)), root=paths.to_db(os.fspath(root)), size=len(data),
                                         mtime_ns=st.st_mtime_ns, inode=st.st_ino, state="done", image_id=iid, attempts=1,
                                         first_seen=T0, last_seen=T0, updated=T0))
        aid = c.execute(insert(s.analyses).values(image_id=iid, bundle=bundle, faces=len(faces), seconds=0.1, host="h",
                                                  created=T0 + 1)).inserted_primary_key[0]
        for i, (x1, y1, x2, y2, p) in enumerate(faces):
            box = (x1 * w, y1 * h, x2 * w, y2 * h)
            ids.append(c.execute(insert(s.faces).values(analysis_id=aid, **_face(i, box, p, 30.0, 3.0, 0.9))).inserted_primary_key[0])
    engine.dispose()
    return sha, ids


def add_file(url: str, path: str, root: str, sha_seed: str, *, state: str = "done", reason: str | None = None) -> int:
    """A recorded file (and its image) with no file on disk, for names and globs only; returns
    the image id."""
    sha = hashlib.sha256(sha_seed.encode()).hexdigest()
    engine = open_store_engine(url)
    with engine.begin() as c:
        iid = c.execute(insert(s.images).values(sha256=sha, md5="0" * 32, size=1, width=10, height=10, first_seen=T0)).inserted_primary_key[0]
        c.execute(insert(s.files).values(path=path, root=root, size=1, mtime_ns=1, state=state, image_id=iid, attempts=1,
                                         reason=reason, first_seen=T0, last_seen=T0, updated=T0))
    engine.dispose()
    return iid


def cli(argv: list[str]) -> tuple[int, str, str]:
    """``forensic-gender ARGV`` in this process: (exit code, stdout, stderr); an argparse exit
    is returned as its code."""
    import contextlib
    import io

    from daemon.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exit_:
            rc = exit_.code
    return rc, out.getvalue(), err.getvalue()


@dataclass
class Evidence:
    """Real image files under an evidence root ``root``, recorded in the database ``url`` (one
    face each), an output folder ``out`` outside it, and the manifest of the tree taken once
    all was recorded: :meth:`assert_unchanged` proves that nothing in it changed (content,
    mode, size, mtime, ctime, inode of every entry)."""

    url: str
    root: Path
    out: Path
    sha: dict[str, str] = field(default_factory=dict)
    face: dict[str, int] = field(default_factory=dict)
    path: dict[str, Path] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)

    def add(self, name: str | bytes, data: bytes, **kw) -> Path:  # noqa: ANN003
        """Write ``data`` as ``name`` (bytes: any name the OS allows) under the root and record it."""
        p = Path(os.fsdecode(os.path.join(os.fsencode(self.root), os.fsencode(name))))
        p.write_bytes(data)
        key = os.fsdecode(name)
        self.sha[key], ids = record_file(self.url, p, self.root, **kw)
        self.face[key], self.path[key] = ids[0] if ids else None, p
        return p

    def seal(self) -> None:
        from tests.conftest import tree_manifest

        self.manifest = tree_manifest(self.root)

    def assert_unchanged(self) -> None:
        from tests.conftest import tree_manifest

        assert tree_manifest(self.root) == self.manifest, "the evidence tree changed"


def make_evidence(url: str, base: Path, files: dict[str, bytes]) -> Evidence:
    root, out = base / "ev", base / "out"
    root.mkdir()
    out.mkdir()
    ev = Evidence(url, root, out)
    for name, data in files.items():
        ev.add(name, data)
    ev.seal()
    return ev


@pytest.fixture
def evidence(db_url: str, tmp_path: Path) -> Evidence:
    """A small JPEG, a large JPEG (24 MP) and a large PNG (12 MP) under an evidence root, each
    recorded with one face, on SQLite and PostgreSQL."""
    return make_evidence(db_url, tmp_path, {"small.jpg": image_bytes(320, 240, 1), "big.jpg": image_bytes(6000, 4000, 2),
                                            "big.png": image_bytes(4000, 3000, 3, ".png")})


@pytest.fixture
def world(db_url: str, tmp_path: Path) -> Iterator[tuple[Synth, Evidence]]:
    """The synthetic database (names, counts, reviews) plus a small real evidence tree recorded
    in it, so that media routes and commands read real files; the tree is checked unchanged
    after the test."""
    syn = build_synth(db_url)
    ev = make_evidence(db_url, tmp_path, {"a.jpg": image_bytes(640, 480, 5), "b.png": image_bytes(300, 200, 6, ".png")})
    yield syn, ev
    ev.assert_unchanged()
