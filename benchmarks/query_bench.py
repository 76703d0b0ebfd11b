"""Query, review-page and export timings on a synthetic case (default 100,000 faces; 1,000,000 for issue 16).

    .venv/bin/python benchmarks/query_bench.py                      # SQLite in a temporary folder
    .venv/bin/python benchmarks/query_bench.py --pg postgresql+psycopg://postgres@127.0.0.1:5432/test
    .venv/bin/python benchmarks/query_bench.py --faces 1000000 --db sqlite:///var/qbench/1m.db    # filled once, then reused
    .venv/bin/python benchmarks/query_bench.py --faces 1000000 --db postgresql+psycopg://postgres@127.0.0.1:5432/bench1m

The database is filled by inserting rows directly (no models), drawn with numpy and written with
one executemany per table on SQLite, COPY on PostgreSQL (1,000,000 faces: about 5 s to draw,
1 to 3 minutes to load): ``--faces`` current faces in ``--images`` images (default 30 % of the
faces: 30 % of the images without a face, most with 1-4, a crowded tail up to 150); image
dimensions from phone, camera, social-media and thumbnail sizes, file sizes that follow the
pixels; three evidence roots (a laptop's user folders by year and event, a phone's DCIM and
messenger folders, a USB stick) with folder sizes by a Zipf law; first seen over a two-week
scan in folder order; 10 % of the contents at a second path on the USB stick; failed and queued
files never hashed; EXIF capture rows for 70 % of the images (taken 2012-2024, 20 devices by
popularity, a third with a position); one image in 8 analysed under an older bundle too (no
ages there); faces whose width follows the image size and the crowd, detection scores, p(male)
in two confident modes and an uncertain band, ages with 12 % children; persons for 70 % of the
current faces at least 40 px wide and scored >= 0.7 (one per 25 faces, sizes by a Zipf-like law,
300 named, 200 merged away); reviews of one face in 500; an event per failed file. No
descriptors or near-copy hashes (their benchmarks are ``similar_bench.py`` and ``near_bench.py``).
SQLite gets no ANALYZE (the product never runs one); PostgreSQL gets VACUUM ANALYZE, as
autovacuum would soon after such a load. ``--db`` given again reuses the database (its facts are
kept in ``meta``).

Then each query of the query commands (the functions they call: a page of 50, and, timed apart,
the exact count the ``faces`` table prints), each page of the review page (through Starlette's
in-process client: routing, query, template, no network) and each ``forensic-gender export``
format of the whole database are run. Queries and pages: one warm-up, then up to ``--repeat``
runs (stopping after ``--budget`` seconds, 3 runs at least); p50 and p95 by nearest rank (with
few runs p95 is the slowest). Exports: one run each as a child process writing to /dev/null,
with its peak RSS (``ru_maxrss`` from ``wait4``). Results go to
``benchmarks/out/query_bench-<dialect>-<faces>.json`` and are printed as they come.

Deep pages: the row halfway down the face list and the image halfway down the image list. The
review page's links carry keyset positions (``after=`` the sort key of the last row shown);
the deep page is timed through the "next" link that the page ending just before that row
emits, as an analyst clicking through would get it. The same page by ``offset=`` (still
accepted, for old links and scripts) is timed too, for comparison. The page counts up to
10,000 ("more than 10,000").
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy import inspect as sa_inspect  # noqa: E402

from daemon.store.engine import open_engine, open_store_engine  # noqa: E402

NEW, OLD = "feed000000000002", "feed000000000001"
T0 = 1_700_000_000.0
DAY = 86_400.0
ROOTS = (("/evidence/case-a/laptop", 0.5), ("/evidence/case-a/phone", 0.35), ("/evidence/case-b/usb", 0.15))
DEVICES = (("Apple", "iPhone 12"), ("Apple", "iPhone 13 Pro"), ("Apple", "iPhone 8"), ("Apple", "iPhone X"), ("Samsung", "SM-G991B"),
           ("Samsung", "SM-A515F"), ("Samsung", "SM-G973F"), ("Google", "Pixel 6"), ("Google", "Pixel 4a"), ("Huawei", "P30 Pro"),
           ("Xiaomi", "Redmi Note 9"), ("Canon", "Canon EOS 5D Mark IV"), ("Canon", "Canon EOS 80D"), ("NIKON CORPORATION", "NIKON D750"),
           ("SONY", "ILCE-7M3"), ("OnePlus", "ONEPLUS A6003"), ("Motorola", "moto g(8)"), ("FUJIFILM", "X-T3"), ("Apple", "iPad Air"),
           ("Samsung", "SM-T510"))
FORMATS = (("jpeg", 0.84), ("png", 0.09), ("heif", 0.05), ("webp", 0.02))
SIZES = (((4032, 3024), 0.30), ((3024, 4032), 0.12), ((1600, 1200), 0.14), ((1080, 1350), 0.14), ((1280, 720), 0.10),
         ((640, 480), 0.10), ((6000, 4000), 0.05), ((150, 150), 0.05))


def _pick(rng, table, n):  # noqa: ANN001, ANN202
    """n indices into ``table`` ((value, weight) pairs), by weight."""
    w = np.array([p for _, p in table], float)
    return rng.choice(len(table), size=n, p=w / w.sum())


def _folders(rng, n_folders: int):  # noqa: ANN001, ANN202
    """(root index, folder path) of ``n_folders`` folders: a laptop's user trees by year and event,
    a phone's DCIM and messenger folders, a USB stick's dumps; sizes follow a Zipf law."""
    out = []
    roots = _pick(rng, ROOTS, n_folders)
    for k, r in enumerate(roots.tolist()):
        root = ROOTS[r][0]
        if r == 0:
            year = 2012 + k % 13
            out.append((r, f"{root}/Users/user{k % 7}/Pictures/{year}/event-{k:05d}"))
        elif r == 1:
            kind = k % 4
            out.append((r, f"{root}/DCIM/{100 + k % 900:03d}APPLE" if kind < 2 else
                        f"{root}/WhatsApp/Media/WhatsApp Images/{'Sent/' if kind == 2 else ''}batch-{k:05d}"))
        else:
            out.append((r, f"{root}/dump-{k % 40:02d}/dir{k:05d}"))
    return out


def build(url: str, n_faces: int, n_images: int | None = None, seed: int = 7) -> dict:
    """Fill an empty database with ``n_faces`` current faces in ``n_images`` images (default
    30 % of the faces) and what goes with them; returns facts the benchmark needs. Columns are
    drawn with numpy and written with executemany (SQLite) or COPY (PostgreSQL)."""
    t_start = time.perf_counter()
    rng = np.random.default_rng(seed)
    n_images = n_images or int(n_faces * 0.3)
    engine = open_store_engine(url)
    engine.dispose()
    # ---- images: faces per image (30 % none, most 1-4, a crowded tail), dimensions, sizes
    has = rng.random(n_images) >= 0.3
    crowd = rng.random(n_images) < 0.12
    counts = np.where(has, np.where(crowd, 1 + np.minimum(rng.pareto(1.3, n_images) * 6, 150).astype(int), rng.geometric(0.45, n_images)), 0)
    diff = n_faces - int(counts.sum())  # exactly n_faces: add to or take from images that have faces
    while diff != 0:
        idx = rng.choice(np.flatnonzero(counts > (0 if diff > 0 else 1)), size=min(abs(diff), n_images // 4), replace=False)
        counts[idx] += 1 if diff > 0 else -1
        diff = n_faces - int(counts.sum())
    dims = np.array([wh for wh, _ in SIZES])[_pick(rng, SIZES, n_images)]
    wid, hei = dims[:, 0], dims[:, 1]
    nbytes = (wid * hei * rng.lognormal(np.log(0.25), 0.4, n_images)).astype(np.int64) + 2_000
    fmt = np.array([f for f, _ in FORMATS])[_pick(rng, FORMATS, n_images)]
    # ---- folders: images are placed in folder order (a scan walks folder by folder), so that
    # image ids, file ids and first_seen rise together as in a real case
    n_folders = max(10, n_images // 100)
    folders = _folders(rng, n_folders)
    rank_w = 1.0 / np.arange(1, n_folders + 1) ** 0.8
    folder = np.sort(rng.choice(n_folders, size=n_images, p=rank_w / rank_w.sum()))
    seen = T0 + np.sort(rng.uniform(0, 14 * DAY, n_images))  # the case was scanned over two weeks
    shas = [hashlib.sha256(f"img{i}".encode()).hexdigest() for i in range(1, n_images + 1)]
    md5s = [hashlib.md5(f"img{i}".encode(), usedforsecurity=False).hexdigest() for i in range(1, n_images + 1)]
    images = list(zip(range(1, n_images + 1), shas, md5s, nbytes.tolist(), fmt.tolist(), wid.tolist(), hei.tolist(),
                      [1] * n_images, [1] * n_images, seen.tolist(), strict=True))
    # ---- files: one path per image, 10 % of the contents at a second path (a copy on the USB
    # stick, found later), failed files never hashed, a few still queued
    files = []
    fid = 0
    copy = rng.random(n_images) < 0.10
    for i in range(n_images):
        r, d = folders[folder[i]]
        fid += 1
        files.append((fid, f"{d}/IMG_{i + 1:07d}.{'JPG' if fmt[i] == 'jpeg' else fmt[i].upper()}", ROOTS[r][0], int(nbytes[i]),
                      int(seen[i] * 1e9), "done", i + 1, 1, None, float(seen[i]), float(seen[i]), float(seen[i])))
    for i in np.flatnonzero(copy).tolist():
        fid += 1
        t = float(seen[i]) + 3 * DAY
        files.append((fid, f"{ROOTS[2][0]}/copies/{i % 500:03d}/IMG_{i + 1:07d}.JPG", ROOTS[2][0], int(nbytes[i]), int(t * 1e9), "done",
                      i + 1, 1, None, t, t, t))
    n_failed, n_queued = max(10, n_images // 300), max(5, n_images // 600)
    for j in range(n_failed + n_queued):
        fid += 1
        failed = j < n_failed
        t = T0 + (j / (n_failed + n_queued)) * 14 * DAY
        files.append((fid, f"{ROOTS[0][0]}/{'broken' if failed else 'incoming'}/file-{j:06d}.jpg", ROOTS[0][0], 1000, int(t * 1e9),
                      "failed" if failed else "queued", None, 1 if failed else 0, "truncated" if failed else None, t, t, t))
    # ---- capture metadata for 70 % of the images: taken 2012-2024 (more recent more often),
    # 20 devices by popularity, a position for a third of them
    cap_ids = np.flatnonzero(rng.random(n_images) < 0.7)
    taken = T0 - (1 - rng.power(2.5, len(cap_ids))) * 12 * 365 * DAY
    dev_w = 1.0 / np.arange(1, len(DEVICES) + 1)
    dev = rng.choice(len(DEVICES), size=len(cap_ids), p=dev_w / dev_w.sum())
    gps = rng.random(len(cap_ids)) < 0.33
    lat, lon = rng.uniform(35, 60, len(cap_ids)), rng.uniform(-10, 30, len(cap_ids))
    captures = [(int(i) + 1, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)), None, DEVICES[d][0], DEVICES[d][1], None, None, None,
                 float(la) if g else None, float(lo) if g else None, None)
                for i, t, d, g, la, lo in zip(cap_ids.tolist(), taken.tolist(), dev.tolist(), gps.tolist(), lat.tolist(), lon.tolist(), strict=True)]
    # ---- analyses: every image under the current bundle, one in 8 under an older one first
    old = (np.arange(1, n_images + 1) % 8) == 0
    analyses, a_img, a_new = [], [], []
    aid = 0
    for i in range(n_images):
        for b in ((OLD, NEW) if old[i] else (NEW,)):
            aid += 1
            analyses.append((aid, i + 1, b, int(counts[i]), 0.2, "bench", float(seen[i]) + (60.0 if b == NEW else 1.0)))
            a_img.append(i)
            a_new.append(b == NEW)
    # ---- faces, per analysis in order: width relative to the image (smaller in crowds),
    # detection score, p(male) (two confident modes and an uncertain band), age (adults and
    # about 12 % children; none under the older bundle, which had no age model)
    a_img_arr, a_new_arr = np.array(a_img), np.array(a_new)
    per_a = counts[a_img_arr]
    f_aid = np.repeat(np.arange(1, aid + 1), per_a)
    f_img = np.repeat(a_img_arr, per_a)
    f_new = np.repeat(a_new_arr, per_a)
    n_all = len(f_aid)
    starts = np.cumsum(per_a) - per_a
    f_idx = np.arange(n_all) - np.repeat(starts, per_a)
    side = np.minimum(wid[f_img], hei[f_img]).astype(float)
    bw = np.clip(np.exp(rng.normal(np.log(0.15 * side) - 0.35 * np.log(counts[f_img]), 0.6)), 8.0, side * 0.9)
    x1 = rng.uniform(0, 1, n_all) * (wid[f_img] - bw)
    y1 = rng.uniform(0, 1, n_all) * np.maximum(1.0, hei[f_img] - bw * 1.25)
    score = 0.35 + 0.64 * rng.beta(5, 1.5, n_all)
    mode = rng.random(n_all)
    p = np.where(mode < 0.48, rng.beta(12, 1.5, n_all), np.where(mode < 0.94, rng.beta(1.5, 12, n_all), rng.uniform(0.3, 0.7, n_all)))
    child = rng.random(n_all) < 0.12
    age = np.where(child, np.clip(rng.normal(9, 4, n_all), 0.5, 17.9), np.clip(rng.normal(34, 13, n_all), 14, 90))
    age_std = rng.uniform(1.5, 8.0, n_all)
    gender = np.where(p >= 0.6, "male", np.where(p <= 0.4, "female", "uncertain"))
    lm = "[" + ", ".join(["%.1f"] * 10) + "]"

    def face_rows(lo: int, hi: int):  # noqa: ANN202
        for k, a, ix, xa, ya, w, sc, pm, g, ag, sd, nw in zip(
                range(lo + 1, hi + 1), f_aid[lo:hi].tolist(), f_idx[lo:hi].tolist(), x1[lo:hi].tolist(), y1[lo:hi].tolist(),
                bw[lo:hi].tolist(), score[lo:hi].tolist(), p[lo:hi].tolist(), gender[lo:hi].tolist(), age[lo:hi].tolist(),
                age_std[lo:hi].tolist(), f_new[lo:hi].tolist(), strict=True):
            h = w * 1.25
            yield (k, a, ix, xa, ya, xa + w, ya + h, sc, lm % (xa + w * .3, ya + h * .4, xa + w * .7, ya + h * .4, xa + w * .5, ya + h * .6,
                                                                 xa + w * .35, ya + h * .8, xa + w * .65, ya + h * .8),
                   w, pm, 1 - pm, g, ag if nw else None, sd if nw else None)
    # ---- persons: 70 % of the current faces at least 40 px wide and scored >= 0.7 are placed;
    # one person per 25 current faces, sizes by a Zipf-like law (a few with thousands of faces);
    # 300 named, 200 more merged into others (no faces left), 1 % of placements pinned
    eligible = np.flatnonzero(f_new & (bw >= 40) & (score >= 0.7) & (rng.random(n_all) < 0.7))
    n_persons = max(10, n_faces // 25)
    pw = 1.0 / np.arange(1, n_persons + 1) ** 0.9
    who = rng.choice(n_persons, size=len(eligible), p=pw / pw.sum()) + 1
    pinned = rng.random(len(eligible)) < 0.01
    face_persons = list(zip((eligible + 1).tolist(), who.tolist(), pinned.tolist(), strict=True))
    persons = [(k, f"person {k}" if k <= 300 else None, None, T0 + 15 * DAY, T0 + 15 * DAY) for k in range(1, n_persons + 1)]
    persons += [(n_persons + k, None, 1 + k % 50, T0 + 15 * DAY, T0 + 16 * DAY) for k in range(1, 201)]
    # ---- reviews of 2,000 current faces (one in 500 at 1M), events for the failed files
    n_reviews = max(20, n_faces // 500)
    rev_faces = np.sort(rng.choice(np.flatnonzero(f_new), size=n_reviews, replace=False))
    reviews = []
    for j, k in enumerate(rev_faces.tolist()):
        status = ("confirmed", "corrected", "ignored", "confirmed")[j % 4]
        label = {"confirmed": str(gender[k]) if gender[k] != "uncertain" else "female", "corrected": "male", "ignored": None}[status]
        reviews.append((j + 1, shas[f_img[k]], float(x1[k]), float(y1[k]), float(x1[k] + bw[k]), float(y1[k] + bw[k] * 1.25), status,
                        label, None, "analyst", "web", T0 + 15 * DAY + j, NEW, int(f_idx[k]), k + 1, float(p[k]), str(gender[k])))
    events = [(j + 1, T0 + j, "file_failed", "bench", None, json.dumps({"path": files[n_images + int(copy.sum()) + j][1], "reason": "truncated"}))
              for j in range(n_failed)]
    t_gen = time.perf_counter() - t_start
    tables = [
        ("bundles", ("key", "spec", "created"), [(OLD, json.dumps({"models": {}, "gender": {"model": "old"}}), T0),
                                                 (NEW, json.dumps({"models": {"age": "a"}, "gender": {"model": "new"}}), T0 + 1)]),
        ("images", ("id", "sha256", "md5", "size", "format", "width", "height", "orientation", "frames", "first_seen"), images),
        ("files", ("id", "path", "root", "size", "mtime_ns", "state", "image_id", "attempts", "reason", "first_seen", "last_seen", "updated"), files),
        ("image_capture", ("image_id", "taken_at", "taken_offset", "make", "model", "software", "lens", "serial", "gps_lat", "gps_lon", "gps_alt"),
         captures),
        ("analyses", ("id", "image_id", "bundle", "faces", "seconds", "host", "created"), analyses),
        ("faces", ("id", "analysis_id", "idx", "x1", "y1", "x2", "y2", "score", "landmarks", "width_px", "p_male", "p_female", "gender", "age",
                   "age_std"), None),
        ("persons", ("id", "name", "merged_into", "created", "updated"), persons),
        ("face_persons", ("face_id", "person_id", "pinned"), face_persons),
        ("reviews", ("id", "sha256", "x1", "y1", "x2", "y2", "status", "label", "note", "reviewer", "origin", "created", "bundle", "face_idx",
                     "face_id", "model_p_male", "model_gender"), reviews),
        ("events", ("id", "at", "kind", "host", "file_id", "detail"), events),
    ]
    mid = int(np.flatnonzero(f_new)[n_faces // 2])  # a current face halfway down; its image is the one shown
    t = time.perf_counter()
    raw = create_engine(url).raw_connection() if url.startswith("postgresql") else open_engine(url).raw_connection()
    try:
        cur = raw.cursor()
        pg = url.startswith("postgresql")
        if not pg:
            cur.execute("BEGIN")  # the product's engine leaves SQLite in autocommit mode: one transaction for the load
        for name, cols, rows in tables:
            chunks = ((face_rows(lo, min(lo + 100_000, n_all)) for lo in range(0, n_all, 100_000)) if rows is None else [rows])
            for chunk in chunks:
                if pg:
                    with cur.copy(f"COPY {name} ({', '.join(cols)}) FROM STDIN") as cp:
                        for row in chunk:
                            cp.write_row(row)
                else:
                    cur.executemany(f"INSERT INTO {name} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", chunk)
        if pg:
            for tname in ("images", "files", "analyses", "faces", "reviews", "persons", "events"):
                cur.execute(f"SELECT setval(pg_get_serial_sequence('{tname}', 'id'), (SELECT max(id) FROM {tname}))")
        facts = {"images": n_images, "files": len(files), "faces_latest": n_faces, "faces_total": n_all, "reviews": len(reviews),
                 "persons": n_persons, "placed_faces": len(face_persons), "captures": len(captures), "failed": n_failed,
                 "face_id": mid + 1, "sha": shas[f_img[mid]],
                 "person_id": int(who[0]), "generate_seconds": round(t_gen, 1)}
        facts["load_seconds"] = round(time.perf_counter() - t, 1)
        cur.execute("INSERT INTO meta (key, value) VALUES ('bench:facts', %s)" if pg else "INSERT INTO meta (key, value) VALUES ('bench:facts', ?)",
                    (json.dumps(facts),))
        raw.commit()
        if pg:  # what autovacuum would do soon after such a load (SQLite: nothing gathers statistics in the product, nor here)
            raw.driver_connection.autocommit = True
            raw.driver_connection.execute("VACUUM ANALYZE")
    finally:
        raw.close()
    facts["load_seconds"] = round(time.perf_counter() - t, 1)
    return facts


def timed(fn, repeat: int, budget: float) -> tuple[list[float], object]:  # noqa: ANN001
    """``fn`` once to warm up, then up to ``repeat`` timed runs, stopping early (after 3 runs at
    least) once ``budget`` seconds have gone by: the per-run times and the last result."""
    fn()
    times: list[float] = []
    out = None
    t_all = time.perf_counter()
    while len(times) < repeat and (len(times) < 3 or time.perf_counter() - t_all < budget):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return times, out


def pct(times: list[float], q: float) -> float:
    """The ``q`` quantile by nearest rank (with few runs, p95 is the slowest run)."""
    xs = sorted(times)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


TAKEN = ("2020-01-01", "2020-07-01")
QUERIES = [
    ("faces: first page (sort path)", {}),
    ("faces: female, sort -p_male", {"gender": "female", "sort": "-p_male"}),
    ("faces: uncertain re-cut (t 0.4, m 0.05)", {"uncertain": "1", "threshold": "0.4", "margin": "0.05"}),
    ("faces: p(male) 0.2-0.3, sort age", {"p_male_min": "0.2", "p_male_max": "0.3", "sort": "age"}),
    ("faces: possible minors", {"minors": "possible"}),
    ("faces: likely minors, width >= 40", {"minors": "likely", "width_min": "40"}),
    ("faces: score >= 0.9, sort -score", {"score_min": "0.9", "sort": "-score"}),
    ("faces: sort -width", {"sort": "-width"}),
    ("faces: path glob */Pictures/2019/*", {"path_glob": "*/Pictures/2019/*"}),
    ("faces: path prefix .../phone/DCIM", {"path_prefix": "/evidence/case-a/phone/DCIM"}),
    ("faces: root case-b/usb", {"root": "/evidence/case-b/usb"}),
    ("faces: seen in a window (one day)", {"seen_since": str(T0 + 3 * DAY), "seen_until": str(T0 + 4 * DAY)}),
    ("faces: taken in the first half of 2020", {"taken_from": TAKEN[0], "taken_to": TAKEN[1]}),
    ("faces: device pixel", {"device": "pixel"}),
    ("faces: with GPS, female", {"has_gps": "1", "gender": "female"}),
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
IMAGE_QUERIES = [
    ("images: first page", {}),
    ("images: with a female face", {"gender": "female"}),
    ("images: failed", {"status": "failed"}),
    ("images: most faces first", {"sort": "-faces"}),
    ("images: largest first", {"sort": "-size"}),
    ("images: path prefix .../phone/DCIM", {"path_prefix": "/evidence/case-a/phone/DCIM"}),
    ("images: device iphone", {"device": "iphone"}),
]


def deep(facts: dict) -> int:
    """The row number of the deep page: halfway down the face list."""
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


Result = tuple[str, list[float], int, str]


class Results(list):
    """The figures of a group, each printed as it comes (a long run interrupted still reports)."""

    def append(self, r: Result) -> None:
        super().append(r)
        name, times, n, note = r
        p95 = pct(times, 0.95)
        flag = "" if p95 <= 0.3 or name.startswith("export") else "   <-- p95 over 300 ms"
        print(f"{name:<52}  {pct(times, 0.5) * 1000:9.1f}  {p95 * 1000:9.1f}  {len(times):>4}  {n:>8}  {note}{flag}", flush=True)


def run_queries(url: str, facts: dict, repeat: int, budget: float, want, count: bool) -> list[Result]:  # noqa: ANN001
    """What the query commands run: ``faces`` (a page of 50, then, with ``count``, the exact
    count its table prints, timed apart),
    ``images``, ``stats``, ``show``, ``persons list`` / ``persons show``."""
    from daemon.queries import persons as pq
    from daemon.queries import read
    from daemon.queries.filters import Cut, parse

    out = Results()
    engine = open_engine(url, readonly=True)
    with engine.connect() as c:
        for name, vals in QUERIES:
            name = _label(name, facts)
            if not want(name):
                continue
            vals = _vals(vals, facts)
            f = parse({"limit": "50", **{k: v for k, v in vals.items() if v != "ROW"}})
            sc = read.scope(c, f, Cut())
            if "ROW" in vals.values():
                f = f.seek(after=row_position(c, f, sc, deep(facts)))

            times, rows = timed(lambda f=f, sc=sc: list(read.faces(c, f, sc)), repeat, budget)
            out.append((name, times, len(rows), "rows of the page"))
            if count:  # the exact count that the faces command's table prints after the rows
                times, total = timed(lambda f=f, sc=sc: read.count_faces(c, f.page(None), sc), repeat, budget)
                out.append((f"{name}: exact count", times, total, "match"))
            c.rollback()
        for name, vals in IMAGE_QUERIES:
            if not want(name):
                continue
            f = parse({"limit": "50", **vals})
            sc = read.scope(c, f, Cut())
            times, rows = timed(lambda f=f, sc=sc: list(read.images(c, f, sc)), repeat, budget)
            out.append((name, times, len(rows), ""))
            c.rollback()
        f = parse({})
        sc = read.scope(c, f, Cut())
        if want("stats (everything)"):
            times, st = timed(lambda: read.stats(c, f, sc), repeat, budget)
            out.append(("stats (everything)", times, st["faces"], "faces counted"))
        if want("stats root case-b/usb, female"):
            f2 = parse({"root": "/evidence/case-b/usb", "gender": "female"})
            times, st = timed(lambda: read.stats(c, f2, read.scope(c, f2, Cut())), repeat, budget)
            out.append(("stats root case-b/usb, female", times, st["faces"], "faces counted"))
        if want("show one image"):
            image_id = read.find_image(c, facts["sha"])[0]
            times, d = timed(lambda: read.image_detail(c, image_id, sc), repeat, budget)
            out.append(("show one image", times, sum(len(a["faces_rows"]) for a in d["analyses"]), "faces"))
        if want("persons: list, first page"):
            times, pl = timed(lambda: pq.list_persons(c, limit=50), repeat, budget)
            out.append(("persons: list, first page", times, len(pl.rows), "persons"))
        if want("persons: list, page 2"):
            first = pq.list_persons(c, limit=50).next
            times, pl = timed(lambda: pq.list_persons(c, limit=50, after=first), repeat, budget)
            out.append(("persons: list, page 2", times, len(pl.rows), "persons"))
        for label, pid in (("the largest", 1), ("a small one", facts["persons"] // 2)):
            name = f"persons: show {label}"
            if want(name):
                times, pd = timed(lambda pid=pid: pq.person(c, pid), repeat, budget)
                out.append((name, times, pd.faces_total if pd else 0, "faces"))
    engine.dispose()
    return out


PAGES = [
    ("page /faces", "/faces"),
    ("page /faces female by -p_male", "/faces?gender=female&sort=-p_male"),
    ("page /faces possible minors, width>=30", "/faces?minors=possible&width_min=30"),
    ("page /faces path glob", "/faces?path_glob=*/Pictures/2019/*"),
    ("page /faces root case-b/usb", "/faces?root=/evidence/case-b/usb"),
    ("page /faces taken in the first half of 2020", f"/faces?taken_from={TAKEN[0]}&taken_to={TAKEN[1]}"),
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
    ("page /stats root case-b/usb, female", "/stats?root=/evidence/case-b/usb&gender=female"),
    ("page /faces/{{id}}", "/faces/{face_id}"),
    ("page /images/{{sha256}}", "/images/{sha}"),
    ("page /persons", "/persons"),
    ("page /persons/{{id}} (the largest)", "/persons/1"),
    ("page /persons/{{id}} (a small one)", "/persons/{small_person}"),
]


def run_pages(url: str, facts: dict, repeat: int, budget: float, want) -> list[Result]:  # noqa: ANN001
    from starlette.testclient import TestClient

    from daemon import config
    from daemon.web import create_app

    app = create_app(config.parse({"database": url}, check_paths=False), port=8765)
    client = TestClient(app, base_url="http://127.0.0.1:8765")
    n, n_images = deep(facts), facts["images"] // 2
    where = {**facts, "deep": n, "before": n - 50, "deep_images": n_images, "before_images": n_images - 50,
             "small_person": facts["persons"] // 2}
    out = Results()
    for name, path in PAGES:
        name = name.format(**where)
        if not want(name):
            continue
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

        times, r = timed(get, repeat, budget)
        out.append((name, times, len(r.content), "bytes of HTML"))
    app.close()
    return out


def run_export(url: str, want, formats: list[str]) -> list[Result]:  # noqa: ANN001
    """``forensic-gender export`` of the whole database (every current face) in each format, as
    a child process writing to /dev/null: its wall time and its peak RSS. The peak is the
    kernel's high-water mark of the child's own memory (``VmHWM`` in /proc, read every 0.1 s
    while it runs): ``ru_maxrss`` from ``wait4`` would not do, as a child that was forked from
    this (large) process and then exec'd reports at least the RSS this one had at the fork."""
    out = Results()
    exe = str(REPO / ".venv" / "bin" / "forensic-gender")
    if not os.path.exists(exe):
        exe = "forensic-gender"
    for fmt in formats:
        name = f"export {fmt}, whole database"
        if not want(name):
            continue
        t = time.perf_counter()
        peak = 0
        with open(os.devnull, "wb") as sink, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen([exe, "export", "--db", url, "--format", fmt], stdout=sink, stderr=err)
            while proc.poll() is None:
                try:
                    with open(f"/proc/{proc.pid}/status") as st:
                        peak = max([peak, *[int(line.split()[1]) for line in st if line.startswith("VmHWM:")]])
                except (OSError, ValueError):
                    pass
                time.sleep(0.1)
            sec = time.perf_counter() - t
            err.seek(0)
            assert proc.returncode == 0, (fmt, err.read()[-2000:])
        out.append((name, [sec], facts_faces(url), f"peak RSS {peak / 1024:.0f} MiB"))
    return out


def facts_faces(url: str) -> int:
    engine = open_engine(url, readonly=True)
    with engine.connect() as c:
        n = json.loads(c.execute(text("SELECT value FROM meta WHERE key = 'bench:facts'")).scalar_one())["faces_latest"]
    engine.dispose()
    return n


def stored_facts(url: str) -> dict | None:
    """The facts of a database this benchmark filled before (``--db`` given again), else None."""
    engine = open_engine(url)
    try:
        with engine.connect() as c:
            if not sa_inspect(c).has_table("meta"):
                return None
            v = c.execute(text("SELECT value FROM meta WHERE key = 'bench:facts'")).scalar()
            return json.loads(v) if v else None
    finally:
        engine.dispose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faces", type=int, default=100_000, help="current faces (default 100,000)")
    ap.add_argument("--images", type=int, help="images (default: 30 %% of --faces)")
    ap.add_argument("--repeat", type=int, default=20, help="timed runs per figure at most (default 20)")
    ap.add_argument("--budget", type=float, default=5.0, help="seconds per figure after which no further run starts (at least 3 runs)")
    ap.add_argument("--db", help="a database URL to fill when empty, or to reuse when this benchmark filled it before "
                                 "(default: SQLite in a temporary folder)")
    ap.add_argument("--pg", help="a PostgreSQL server URL; a temporary schema is created and dropped")
    ap.add_argument("--only", default="queries,pages,exports", help="which groups to run (comma-separated)")
    ap.add_argument("--exports", default="csv,json", help="export formats to run (csv,json,jsonl,vics)")
    ap.add_argument("--no-count", action="store_true", help="leave out the faces command's exact counts")
    ap.add_argument("--match", help="only the figures whose name contains this text (or one of several, separated by |)")
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

    def want(name: str) -> bool:
        return not args.match or any(m.lower() in name.lower() for m in args.match.split("|"))

    try:
        facts = stored_facts(url) if args.db else None
        if facts is None:
            facts = build(url, args.faces, args.images)
            how = f"generated in {facts['generate_seconds']} s, loaded in {facts['load_seconds']} s"
        else:
            how = "reused"
        dialect = "postgresql" if url.startswith("postgresql") else "sqlite"
        print(f"{dialect}: {facts['faces_latest']} faces under the current bundle ({facts['faces_total']} in all), {facts['images']} images, "
              f"{facts['files']} paths, {facts['persons']} persons, {facts['reviews']} reviews; {how}", flush=True)
        load_before = os.getloadavg()
        results: list[Result] = []
        groups = {"queries": lambda: run_queries(url, facts, args.repeat, args.budget, want, not args.no_count),
                  "pages": lambda: run_pages(url, facts, args.repeat, args.budget, want), "exports": lambda: run_export(url, want, args.exports.split(","))}
        print(f"{'':<52}  {'p50 ms':>9}  {'p95 ms':>9}  {'runs':>4}  {'rows':>8}", flush=True)
        for g in args.only.split(","):
            results += groups[g]()
        load = {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        dest = Path(args.out) / f"query_bench-{dialect}-{facts['faces_latest']}.json"
        dest.write_text(json.dumps({"dialect": dialect, "facts": facts, "repeat": args.repeat, "budget": args.budget, "cpus": os.cpu_count(),
                                    "load_average": load, "results": [
                                        {"name": n, "p50": round(pct(t, 0.5), 4), "p95": round(pct(t, 0.95), 4), "runs": [round(x, 4) for x in t],
                                         "rows": k, "note": note} for n, t, k, note in results]}, indent=2))
        print(f"load average (1, 5, 15 min) before {load['before']}, after {load['after']} on {os.cpu_count()} CPUs; written {dest}")
    finally:
        if schema:
            with admin.connect() as c:
                c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
