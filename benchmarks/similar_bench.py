"""Search by face over a million stored descriptors.

    .venv/bin/python benchmarks/similar_bench.py [--faces 1000000] [--images 300000] [--db var/similar-1m.db]

Builds (once; kept at ``--db``) a SQLite database with the product's schema holding ``--faces``
faces in ``--images`` images, each face with a random 128-d descriptor drawn around one of
``faces / 4`` identities (so that searches have real neighbours). Then measures, on this machine:

- loading the index (every current face's descriptor) from the database, as the review page does
  once and ``similar`` does per run;
- one search in a loaded index (the review page's cost per search): p50 / p95 over 50 queries;
- the ``similar --face-id`` command end to end (a fresh process: start-up, load, search, print),
  without and with its cache file.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(path: Path, n_faces: int, n_images: int) -> None:
    from daemon.store.engine import open_store_engine

    path.parent.mkdir(parents=True, exist_ok=True)
    open_store_engine(f"sqlite:///{path}").dispose()
    rng = np.random.default_rng(0)
    people = rng.normal(0, 1, (max(1, n_faces // 4), 128)).astype(np.float32)
    people *= 0.6 / np.linalg.norm(people, axis=1, keepdims=True)
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("INSERT INTO bundles VALUES ('bench', '{}', 0)")
    con.executemany("INSERT INTO images (id, sha256, md5, size, first_seen) VALUES (?, ?, '', 0, 0)", ((i + 1, f"{i:064x}") for i in range(n_images)))
    con.executemany("INSERT INTO analyses (id, image_id, bundle, faces, created) VALUES (?, ?, 'bench', 0, 0)", ((i + 1, i + 1) for i in range(n_images)))
    chunk = 100_000
    for s in range(0, n_faces, chunk):
        k = np.arange(s, min(n_faces, s + chunk))
        who = rng.integers(0, len(people), len(k))
        noise = rng.normal(0, 1, (len(k), 128)).astype(np.float32)
        vec = (people[who] + 0.15 * noise / np.linalg.norm(noise, axis=1, keepdims=True)).astype("<f2")
        img = rng.integers(1, n_images + 1, len(k))
        con.executemany(
            "INSERT INTO faces (id, analysis_id, idx, x1, y1, x2, y2, score, landmarks, width_px, p_male, p_female, "
            "gender, descriptor) VALUES (?, ?, ?, 0, 0, 50, 50, 0.9, '[]', 50, 0.5, 0.5, 'uncertain', ?)",
            ((int(i) + 1, int(a), int(i), v.tobytes()) for i, a, v in zip(k, img, vec, strict=True)),
        )
        con.commit()
    con.close()


def main(argv: list[str] | None = None) -> int:
    from daemon.queries.similar import FaceIndex, default_cache, face_descriptor
    from daemon.store.engine import open_engine

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faces", type=int, default=1_000_000)
    ap.add_argument("--images", type=int, default=300_000)
    ap.add_argument("--db", type=Path, default=REPO / "var" / "similar-1m.db")
    a = ap.parse_args(argv)
    if not a.db.exists():
        t0 = time.perf_counter()
        build(a.db, a.faces, a.images)
        print(f"built {a.db}: {a.faces} faces in {a.images} images in {time.perf_counter() - t0:.0f} s")
    url = f"sqlite:///{a.db}"
    engine = open_engine(url, readonly=True)
    with engine.connect() as conn:
        index = FaceIndex()
        t0 = time.perf_counter()
        index.refresh(conn)
        load = time.perf_counter() - t0
        t0 = time.perf_counter()
        index.refresh(conn)
        again = time.perf_counter() - t0
        rng = np.random.default_rng(1)
        times = []
        for fid in rng.integers(1, len(index.ids) + 1, 50).tolist():
            q = face_descriptor(conn, fid)
            t0 = time.perf_counter()
            hits = index.search(q, limit=20, exclude=fid)
            times.append(time.perf_counter() - t0)
    engine.dispose()
    cmd = [sys.executable, "-m", "daemon.cli", "similar", "--face-id", "12345", "--db", url]
    cache = default_cache(url)
    if cache is not None and cache.exists():
        shutil.rmtree(cache)
    clis = []
    for _ in range(3):  # the first run builds the cache file, the others read it
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        clis.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "daemon.cli", "--help"], capture_output=True, check=True)
    start = time.perf_counter() - t0
    p50, p95 = statistics.median(times), float(np.percentile(times, 95))
    print(f"faces in the index: {len(index.ids)} ({index.vectors.nbytes / 2**20:.0f} MiB in memory)")
    print(f"load from SQLite: {load:.2f} s; refresh with nothing new: {again * 1000:.0f} ms")
    print(f"one search in the loaded index: p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms (last: {len(hits)} faces within 0.6)")
    print(
        f"`similar --face-id` end to end (a new process: start-up, load, search, print): {clis[0]:.2f} s with no cache file "
        f"(it writes one), then {clis[1]:.2f} / {clis[2]:.2f} s from it; `forensic-gender --help` alone takes {start:.2f} s"
    )
    print(f"first line: {out.stdout.splitlines()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
