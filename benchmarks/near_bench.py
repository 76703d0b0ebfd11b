"""Near-duplicates: recall and precision of the perceptual hash per Hamming distance, and the
search time over many stored hashes.

    .venv/bin/python benchmarks/near_bench.py [--dev ../shared/data/dev] [--originals 200] [--search-images 300000]

Takes ``--originals`` dev images (WIDER and LFW, chosen with a fixed seed; read where they are,
never copied into the project) and writes, into a temporary folder, three copies of each:

- ``resized``: half the width and height (area resampling), JPEG quality 90;
- ``jpeg70``: the original re-encoded at JPEG quality 70;
- ``cropped``: a window of 95 % of the width and 95 % of the height at a random place
  (5 % cut off each dimension, split at random between the two sides), JPEG quality 90.

The other dev images are negatives. Every file is hashed as the worker does it (decoded with the
default pipeline's size hint, then :func:`daemon.pipeline.phash.phash` of the upright pixels).
Each original is the query; the pool is every other file. At each distance K: recall = the
copies of the query within K / all copies; precision = those / everything within K. The default
distance is the one with the best recall among those with precision >= 0.99 (the largest such K
on ties). Then the search: ``--search-images`` random hashes in a SQLite database with the
product's schema, loaded and searched as ``forensic-gender near`` does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from daemon.config import PipelineConfig  # noqa: E402
from daemon.pipeline import images  # noqa: E402
from daemon.pipeline.phash import BITS, distances, near_hash, parse  # noqa: E402

KINDS = ("resized", "jpeg70", "cropped")


def worker_hash(data: bytes, cfg: PipelineConfig) -> str:
    """The hash the worker stores for these bytes (same decode, same size hint)."""
    d = cfg.detector
    hint = d.max_side * 2 if d.tile_side else d.max_side
    dec = images.decode(data, max_pixels=cfg.limits.max_pixels, min_side_hint=hint)
    return near_hash(dec.bgr)


def copies(path: Path, out: Path, rng: np.random.Generator) -> list[Path]:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SystemExit(f"{path}: cannot be decoded")
    h, w = bgr.shape[:2]
    made = []
    small = cv2.resize(bgr, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)
    cw, ch = round(w * 0.95), round(h * 0.95)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    for kind, img, q in (("resized", small, 90), ("jpeg70", bgr, 70), ("cropped", bgr[y : y + ch, x : x + cw], 90)):
        p = out / f"{path.stem}.{kind}.jpg"
        cv2.imwrite(str(p), img, [cv2.IMWRITE_JPEG_QUALITY, q])
        made.append(p)
    return made


def accuracy(dev: Path, n_originals: int, max_k: int, seed: int) -> int:
    files = sorted((dev / "wider" / "images").rglob("*.jpg")) + sorted((dev / "lfw" / "images").glob("*.jpg"))
    if len(files) <= n_originals:
        raise SystemExit(f"{dev}: {len(files)} images found, need more than --originals {n_originals}")
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(files))
    originals = [files[i] for i in sorted(pick[:n_originals])]
    negatives = [files[i] for i in sorted(pick[n_originals:])]
    cfg = PipelineConfig()
    with tempfile.TemporaryDirectory(prefix="near-bench-") as tmp:
        t0 = time.perf_counter()
        made = [copies(p, Path(tmp), rng) for p in originals]
        paths = originals + [c for m in made for c in m] + negatives
        group = np.array(list(range(n_originals)) + [i for i in range(n_originals) for _ in KINDS] + [-1 - i for i in range(len(negatives))])
        kind = np.array(["original"] * n_originals + [k for _ in originals for k in KINDS] + ["negative"] * len(negatives))
        t1 = time.perf_counter()
        hashes = np.stack([parse(worker_hash(p.read_bytes(), cfg)) for p in paths])
        t2 = time.perf_counter()
    print(
        f"{n_originals} originals (dev WIDER + LFW), {len(paths) - n_originals - len(negatives)} copies, {len(negatives)} negatives; "
        f"copies made in {t1 - t0:.1f} s; {len(paths)} files decoded and hashed in {t2 - t1:.1f} s "
        f"({1000 * (t2 - t1) / len(paths):.1f} ms per file, decode included)"
    )
    d = np.stack([distances(hashes, hashes[q]) for q in range(n_originals)])  # (queries, pool)
    d[np.arange(n_originals), np.arange(n_originals)] = 999  # a query is not its own match
    same = group[None, :] == np.arange(n_originals)[:, None]
    same[np.arange(n_originals), np.arange(n_originals)] = False
    n_pos = int(same.sum())
    print(f"\ndistance K in bits of {BITS}")
    print(f"{'K':>3} {'recall':>7} {'precision':>9} {'found':>6} {'false':>6}  " + "  ".join(f"{k:>8}" for k in KINDS))
    rows = []
    for k in range(max_k + 1):
        hit = d <= k
        tp, fp = int((hit & same).sum()), int((hit & ~same).sum())
        recall, precision = tp / n_pos, (tp / (tp + fp) if tp + fp else 1.0)
        per = [float((hit & same)[:, kind == kd].sum()) / float(same[:, kind == kd].sum()) for kd in KINDS]
        rows.append((k, recall, precision))
        print(f"{k:>3} {recall:>7.4f} {precision:>9.4f} {tp:>6} {fp:>6}  " + "  ".join(f"{r:>8.4f}" for r in per))
    ok = [r for r in rows if r[2] >= 0.99]
    best = max(ok, key=lambda r: (r[1], r[0]))
    copy_d = d[same]
    print(f"\ncopies' distance to their original: median {np.median(copy_d):.0f}, 99th percentile {np.percentile(copy_d, 99):.0f}, max {copy_d.max()}")
    other = d[~same & (d < 999)]
    print(f"other pairs' distance: 0.01st percentile {np.percentile(other, 0.01):.0f}, 1st {np.percentile(other, 1):.0f}, median {np.median(other):.0f}")
    verdict = "meets" if best[1] >= 0.98 else "does NOT meet"
    print(f"default distance: {best[0]} (recall {best[1]:.4f}, precision {best[2]:.4f}; {verdict} recall >= 0.98 at precision >= 0.99)")
    return best[0]


def search(n: int, k: int) -> None:
    import sqlite3

    from daemon.store import nearcopies
    from daemon.store.engine import open_engine, open_store_engine

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 2**64 - 1, (n, 3), dtype=np.uint64, endpoint=True)
    with tempfile.TemporaryDirectory(prefix="near-bench-db-") as tmp:
        url = f"sqlite:///{tmp}/near.db"
        eng = open_store_engine(url)
        eng.dispose()
        con = sqlite3.connect(f"{tmp}/near.db")
        rows = ((f"{i:064x}", raw[i].astype(">u8").tobytes().hex()) for i in range(n))
        con.executemany("INSERT INTO images (sha256, md5, size, first_seen, near_hash) VALUES (?, '', 0, 0, ?)", rows)
        con.commit()
        con.close()
        eng = open_engine(url, readonly=True)
        times, search_times = [], []
        for q in range(5):
            t0 = time.perf_counter()
            with eng.connect() as conn:
                index = nearcopies.load_index(conn)
            t1 = time.perf_counter()
            found = index.search(raw[q], k)
            t2 = time.perf_counter()
            times.append(t1 - t0)
            search_times.append(t2 - t1)
        eng.dispose()
    print(
        f"\nsearch over {len(index.ids)} stored hashes (SQLite, this machine): loading them {1000 * min(times):.0f} ms (best of 5), "
        f"one search at distance {k} {1000 * min(search_times):.2f} ms (best of 5); {len(found)} found"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dev", type=Path, default=REPO.parent / "shared" / "data" / "dev")
    ap.add_argument("--originals", type=int, default=200)
    ap.add_argument("--max-distance", type=int, default=48)
    ap.add_argument("--seed", type=int, default=14, help="which originals, and where the crops are")
    ap.add_argument("--search-images", type=int, default=300_000, help="0: skip the search timing")
    args = ap.parse_args()
    k = accuracy(args.dev, args.originals, args.max_distance, args.seed)
    if args.search_images:
        search(args.search_images, k)


if __name__ == "__main__":
    main()
