"""Query and review-page timings on a synthetic database of 100,000 faces.

    .venv/bin/python benchmarks/query_bench.py                      # SQLite in a temporary folder
    .venv/bin/python benchmarks/query_bench.py --pg postgresql+psycopg://postgres@127.0.0.1:5432/test
    .venv/bin/python benchmarks/query_bench.py --faces 1000000 --repeat 3

The database is built by inserting rows directly (no models): 40,000 images with 100,000 faces
under the current model bundle (0 to 8 faces per image, WIDER-like), 5,000 of them also analysed
under an older bundle (12,500 more faces), 44,000 paths in two roots (10 % of the contents at a
second path), 1,000 failed files never hashed, 500 reviews. Then each query of the query
commands and each page of the review page (through Starlette's in-process client: routing,
query, template, no network) is timed: the median of ``--repeat`` runs after one warm-up.
Results go to ``benchmarks/out/query_bench-<dialect>.json`` and are printed as a table.

Deep pages: the row halfway down the face list (the 50,000th of 100,000) and the 20,000th image.
The review page's links carry keyset positions (``after=`` the sort key of the last row shown);
the deep page is timed through the "next" link that the page ending just before that row
emits, as an analyst clicking through would get it. The same page by ``offset=`` (still
accepted, for old links and scripts) is timed too, for comparison. The query commands' figures
include the exact count they print; the page counts up to 10,000 ("more than 10,000").
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import create_engine, insert, text  # noqa: E402

from daemon.store import reviews as rv  # noqa: E402
from daemon.store import schema as s  # noqa: E402
from daemon.store.engine import open_engine, open_store_engine  # noqa: E402

NEW, OLD = "feed000000000002", "feed000000000001"
T0 = 1_700_000_000.0


def build(url: str, n_faces: int, seed: int = 7) -> dict:
    """Fill an empty database; returns facts the benchmark needs (a face id, a sha256...)."""
    rnd = random.Random(seed)
    engine = open_store_engine(url)
    n_images = int(n_faces * 0.4)
    counts = [0] * n_images
    for _ in range(n_faces):  # faces spread unevenly over images (many with 1-3, some crowded)
        counts[min(n_images - 1, int(rnd.paretovariate(1.2) * n_images / 6) % n_images)] += 1
    images, files, analyses, faces, reviews = [], [], [], [], []
    fid = aid = file_id = 0
    for i in range(1, n_images + 1):
        sha = hashlib.sha256(f"img{i}".encode()).hexdigest()
        w, h = rnd.choice([(1024, 768), (4000, 3000), (150, 150), (1920, 1080)])
        seen = T0 + i * 10
        images.append({"id": i, "sha256": sha, "md5": hashlib.md5(sha.encode()).hexdigest(), "size": rnd.randint(5_000, 5_000_000),
                       "format": "jpeg", "width": w, "height": h, "orientation": 1, "frames": 1, "first_seen": seen})
        root = "/evidence/case-a" if i % 3 else "/evidence/case-b"
        for copy in range(2 if i % 10 == 0 else 1):
            file_id += 1
            files.append({"id": file_id, "path": f"{root}/{'copy/' if copy else ''}dir{i % 200:03d}/IMG_{i:07d}.jpg", "root": root, "size": 1,
                          "mtime_ns": int(seen * 1e9), "state": "done", "reason": None, "image_id": i, "attempts": 1, "first_seen": seen + copy,
                          "last_seen": seen + copy, "updated": seen + copy})
        bundles = [OLD, NEW] if i % 8 == 0 else [NEW]
        for b in bundles:
            aid += 1
            analyses.append({"id": aid, "image_id": i, "bundle": b, "faces": counts[i - 1], "seconds": 0.2, "host": "bench",
                             "created": seen + (5 if b == NEW else 1)})
            for k in range(counts[i - 1]):
                fid += 1
                bw = max(8.0, rnd.lognormvariate(3.5, 0.8))
                x1, y1 = rnd.uniform(0, max(1, w - bw)), rnd.uniform(0, max(1, h - bw * 1.2))
                p = min(1.0, max(0.0, rnd.betavariate(0.4, 0.4)))
                age = max(0.5, rnd.gauss(32, 14))
                faces.append({"id": fid, "analysis_id": aid, "idx": k, "x1": x1, "y1": y1, "x2": x1 + bw, "y2": y1 + bw * 1.2,
                              "score": rnd.uniform(0.35, 0.99), "landmarks": "[]", "width_px": bw, "p_male": p, "p_female": 1 - p,
                              "gender": "male" if p >= 0.6 else "female" if p <= 0.4 else "uncertain", "age": age,
                              "age_std": rnd.uniform(0.5, 12), })
                if b == NEW and len(reviews) < 500 and rnd.random() < 0.01:
                    reviews.append({"sha256": sha, "x1": x1, "y1": y1, "x2": x1 + bw, "y2": y1 + bw * 1.2, "status": rnd.choice(rv.STATUSES[:3]),
                                    "label": None, "origin": "cli", "created": seen + 50, "bundle": NEW, "face_idx": k, "face_id": fid})
    for r in reviews:
        r["label"] = {"confirmed": "female", "corrected": "male", "ignored": None}[r["status"]]
    for j in range(1000):
        file_id += 1
        files.append({"id": file_id, "path": f"/evidence/case-a/bad/broken-{j:05d}.jpg", "root": "/evidence/case-a", "size": 0, "mtime_ns": 0,
                      "state": "failed", "image_id": None, "attempts": 1, "reason": "truncated", "first_seen": T0, "last_seen": T0, "updated": T0})
    t = time.perf_counter()
    with engine.begin() as c:
        c.execute(insert(s.bundles), [{"key": OLD, "spec": json.dumps({"models": {"age": "a"}, "gender": {"model": "old"}}), "created": T0},
                                      {"key": NEW, "spec": json.dumps({"models": {"age": "a"}, "gender": {"model": "new"}}), "created": T0 + 1}])
        for table, rows in ((s.images, images), (s.files, files), (s.analyses, analyses), (s.faces, faces), (rv.reviews, reviews)):
            for k in range(0, len(rows), 20_000):
                c.execute(insert(table), rows[k:k + 20_000])
        if c.dialect.name == "postgresql":
            for tname in ("images", "files", "analyses", "faces", "reviews"):
                c.execute(text(f"SELECT setval(pg_get_serial_sequence('{tname}', 'id'), (SELECT max(id) FROM {tname}))"))
    with engine.connect() as c:
        c.execute(text("ANALYZE"))
        c.commit()
    engine.dispose()
    latest_faces = sum(counts)
    return {"images": n_images, "files": len(files), "faces_latest": latest_faces, "faces_total": len(faces), "reviews": len(reviews),
            "face_id": faces[len(faces) // 2]["id"], "sha": images[len(images) // 3]["sha256"], "load_seconds": round(time.perf_counter() - t, 1)}


def timed(fn, repeat: int) -> tuple[float, object]:  # noqa: ANN001
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


QUERIES = [
    ("faces: first page (sort path) + count", {}),
    ("faces: female, sort -p_male", {"gender": "female", "sort": "-p_male"}),
    ("faces: uncertain re-cut (t 0.4, m 0.05)", {"uncertain": "1", "threshold": "0.4", "margin": "0.05"}),
    ("faces: p(male) 0.2-0.3, sort age", {"p_male_min": "0.2", "p_male_max": "0.3", "sort": "age"}),
    ("faces: possible minors", {"minors": "possible"}),
    ("faces: likely minors, width >= 40", {"minors": "likely", "width_min": "40"}),
    ("faces: score >= 0.9, sort -score", {"score_min": "0.9", "sort": "-score"}),
    ("faces: path glob */dir01*/*", {"path_glob": "*/dir01*/*"}),
    ("faces: path prefix .../case-b/dir1", {"path_prefix": "/evidence/case-b/dir1"}),
    ("faces: root case-b", {"root": "/evidence/case-b"}),
    ("faces: seen in a window", {"seen_since": str(T0 + 100_000), "seen_until": str(T0 + 150_000)}),
    ("faces: reviewed", {"review": "reviewed"}),
    ("faces: final gender male", {"final_gender": "male"}),
    ("faces: sha256 prefix", {"sha256": "SHA8"}),
    ("faces: every bundle", {"bundle": "all"}),
    ("faces: older bundle", {"bundle": OLD}),
    ("faces: page at offset DEEP", {"offset": "DEEP"}),
    ("faces: page after row DEEP (keyset)", {"after": "ROW"}),
    ("faces: -p_male, page after row DEEP (keyset)", {"sort": "-p_male", "after": "ROW"}),
    ("faces: age, page after row DEEP (keyset)", {"sort": "age", "after": "ROW"}),
    ("faces: final gender male, page at offset DEEP/4", {"final_gender": "male", "offset": "DEEP/4"}),
]


def deep(facts: dict) -> int:
    """The row number of the deep page: halfway down the face list (50,000 of 100,000)."""
    return facts["faces_latest"] // 2


def _vals(vals: dict, facts: dict) -> dict:
    n = deep(facts)
    return {k: {"SHA8": facts["sha"][:8], "DEEP": str(n), "DEEP/4": str(n // 4)}.get(v, v) for k, v in vals.items()}


def _label(name: str, facts: dict) -> str:
    n = deep(facts)
    return name.replace("DEEP/4", f"{n // 4:,}").replace("DEEP", f"{n:,}")


def row_position(c, f, sc, row: int) -> str:  # noqa: ANN001
    """The keyset position of row ``row`` (1-based) of ``f``'s list: what the "next" link of the
    page ending with that row carries."""
    from daemon.queries import read

    return read.face_page(c, f.page(1, row - 1), sc).next  # the page of that one row: "next" is after it


def run_queries(url: str, facts: dict, repeat: int) -> list[tuple[str, float, int, str]]:
    from daemon.queries import read
    from daemon.queries.filters import Cut, parse

    out = []
    engine = open_engine(url, readonly=True)
    with engine.connect() as c:
        for name, vals in QUERIES:
            vals = _vals(vals, facts)
            f = parse({"limit": "50", **{k: v for k, v in vals.items() if v != "ROW"}})
            sc = read.scope(c, f, Cut())
            if "ROW" in vals.values():
                f = f.seek(after=row_position(c, f, sc, deep(facts)))

            def q(f=f, sc=sc):  # noqa: ANN001, ANN202
                rows = list(read.faces(c, f, sc))
                return len(rows), read.count_faces(c, f.page(None), sc)

            sec, (n, total) = timed(q, repeat)
            out.append((_label(name, facts), sec, n, f"{total} match"))
            c.rollback()
        for name, vals in (("images: first page", {}), ("images: with a female face", {"gender": "female"}),
                           ("images: failed", {"status": "failed"}), ("images: most faces first", {"sort": "-faces"})):
            f = parse({"limit": "50", **vals})
            sc = read.scope(c, f, Cut())
            sec, rows = timed(lambda f=f, sc=sc: list(read.images(c, f, sc)), repeat)
            out.append((name, sec, len(rows), ""))
        f = parse({})
        sc = read.scope(c, f, Cut())
        sec, st = timed(lambda: read.stats(c, f, sc), repeat)
        out.append(("stats (everything)", sec, st["faces"], "faces counted"))
        image_id = read.find_image(c, facts["sha"])[0]
        sec, d = timed(lambda: read.image_detail(c, image_id, sc), repeat)
        out.append(("show one image", sec, sum(len(a["faces_rows"]) for a in d["analyses"]), "faces"))
    engine.dispose()
    return out


def run_export(url: str) -> list[tuple[str, float, int, str]]:
    """Whole-database exports to /dev/null: timed untraced; then the CSV export again under
    tracemalloc for its peak Python memory (tracing slows it several times)."""
    from daemon.queries import read, vics
    from daemon.queries.filters import Cut, Filters
    from daemon.queries.formats import FACE_COLUMNS, _media_groups, face_record, write_csv

    def export(fmt: str) -> int:
        with open(os.devnull, "w") as sink, engine.connect() as c, engine.connect() as side:
            sc = read.scope(c, Filters(), Cut())
            rows = read.faces(c, Filters(sort="sha256" if fmt == "vics" else "path"), sc, stream=True)
            if fmt == "vics":
                return vics.write(sink, _media_groups(side, rows, None), cut={"threshold": 0.5, "margin": 0.1})
            return write_csv(sink, FACE_COLUMNS, (face_record(r) for r in rows))

    out = []
    engine = open_engine(url, readonly=True)
    for fmt in ("csv", "vics"):
        t = time.perf_counter()
        n = export(fmt)
        sec = time.perf_counter() - t
        out.append((f"export {fmt}, whole database, streamed", sec, n, f"{n / sec:.0f} records/s"))
    tracemalloc.start()
    n = export("csv")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    out.append(("export csv peak Python memory (traced)", 0.0, n, f"{peak / 1e6:.1f} MB"))
    engine.dispose()
    return out


PAGES = [
    ("page /faces", "/faces"),
    ("page /faces female by -p_male", "/faces?gender=female&sort=-p_male"),
    ("page /faces possible minors, width>=30", "/faces?minors=possible&width_min=30"),
    ("page /faces path glob", "/faces?path_glob=*/dir01*/*"),
    ("page /faces reviewed", "/faces?review=reviewed"),
    ("page /faces final gender male", "/faces?final_gender=male"),
    ("page /faces every bundle", "/faces?bundle=all"),
    ("page /faces next link at row {deep:,}", "NEXT /faces?offset={before}"),
    ("page /faces -p_male, next link at row {deep:,}", "NEXT /faces?sort=-p_male&offset={before}"),
    ("page /faces (old link) offset {deep:,}", "/faces?offset={deep}"),
    ("page /images", "/images"),
    ("page /images with a minor", "/images?minors=likely"),
    ("page /images most faces first", "/images?sort=-faces"),
    ("page /images next link at image {deep_images:,}", "NEXT /images?offset={before_images}"),
    ("page /stats", "/stats"),
    ("page /stats root case-b, female", "/stats?root=/evidence/case-b&gender=female"),
    ("page /faces/{{id}}", "/faces/{face_id}"),
    ("page /images/{{sha256}}", "/images/{sha}"),
]


def run_pages(url: str, facts: dict, repeat: int) -> list[tuple[str, float, int, str]]:
    from starlette.testclient import TestClient

    from daemon import config
    from daemon.web import create_app

    app = create_app(config.parse({"database": url}, check_paths=False), port=8765)
    client = TestClient(app, base_url="http://127.0.0.1:8765")
    n, n_images = deep(facts), facts["images"] // 2
    where = {**facts, "deep": n, "before": n - 50, "deep_images": n_images, "before_images": n_images - 50}
    out = []
    for name, path in PAGES:
        path = path.format(**where)
        if path.startswith("NEXT "):  # the "next" link of the page ending just before the row: a keyset position
            page = client.get(path[5:])
            m = re.search(r'id="next" href="([^"]+)"', page.text)
            assert page.status_code == 200 and m, (path, page.status_code)
            path = path[5:].split("?")[0] + html.unescape(m.group(1))
            assert "after=" in path and "offset=" not in path, path

        def get(path=path):  # noqa: ANN001, ANN202
            r = client.get(path)
            assert r.status_code == 200, (path, r.status_code, r.text[:300])
            return r

        sec, r = timed(get, repeat)
        out.append((name.format(**where), sec, len(r.content), "bytes of HTML"))
    app.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faces", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--db", help="an empty database URL to fill (default: SQLite in a temporary folder)")
    ap.add_argument("--pg", help="a PostgreSQL server URL; a temporary schema is created and dropped")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="fg-qbench-")
    schema = None
    if args.pg:
        schema = f"qbench_{uuid.uuid4().hex[:8]}"
        admin = create_engine(args.pg, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = f"{args.pg}{'&' if '?' in args.pg else '?'}options=-csearch_path%3D{schema}"
    else:
        url = args.db or f"sqlite:///{tmp}/bench.db"
    try:
        facts = build(url, args.faces)
        dialect = "postgresql" if url.startswith("postgresql") else "sqlite"
        print(f"{dialect}: {facts['faces_latest']} faces under the current bundle ({facts['faces_total']} in all), {facts['images']} images, "
              f"{facts['files']} paths, {facts['reviews']} reviews; loaded in {facts['load_seconds']} s", flush=True)
        load_before = os.getloadavg()
        results = []
        for step in (lambda: run_queries(url, facts, args.repeat), lambda: run_pages(url, facts, args.repeat), lambda: run_export(url)):
            part = step()
            results += part
            for name, sec, n, note in part:  # printed as they come: a long run interrupted still reports
                flag = "" if sec < 1.0 or name.startswith("export") else "   <-- over 1 s"
                print(f"{name:<50}  {sec * 1000:9.1f} ms  {n:>8}  {note}{flag}", flush=True)
        load = {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        dest = Path(args.out) / f"query_bench-{dialect}.json"
        dest.write_text(json.dumps({"dialect": dialect, "facts": facts, "repeat": args.repeat, "cpus": os.cpu_count(), "load_average": load,
                                    "results": [{"name": n, "seconds": round(sec, 4), "rows": k, "note": note} for n, sec, k, note in results]},
                                   indent=2))
        print(f"load average (1, 5, 15 min) before {load['before']}, after {load['after']} on {os.cpu_count()} CPUs; written {dest}")
    finally:
        if schema:
            with admin.connect() as c:
                c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
