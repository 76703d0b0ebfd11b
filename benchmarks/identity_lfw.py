"""Identity descriptors on dev LFW: pair verification with the product's chips, and what the
CenterFace + template alignment costs against dlib's own landmarks.

    .venv/bin/python benchmarks/identity_lfw.py [--dlib var/dlib-lfw.npz] [--threshold 0.6]

The product's descriptors come from the pipeline itself (CenterFace, the face nearest the image
centre, the template alignment at 150 px / padding 0.25, the converted dlib network). Pairs: every
pair of images of one person (positives) and, seeded, ten times as many random pairs of two
people (negatives); a pair is "same" when the Euclidean distance < threshold (dlib's 0.6).
Printed: accuracy (balanced over positives and negatives) with a 95% bootstrap interval over
people, the true-accept and false-accept rates. With ``--dlib`` (made in a throw-away venv by
``benchmarks/dlib_reference.py lfw --limit 600 --save var/dlib-lfw.npz``: dlib's HOG detector,
its 5-point landmarks and ``get_face_chip``), the same figures for dlib's chips and the distance
between the two descriptors of each image.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEV = REPO.parent / "shared" / "data" / "dev" / "lfw"


def product_descriptors(folder: Path, files: list[str]) -> dict[str, np.ndarray]:
    from daemon.identity_eval import centre_descriptors

    x = centre_descriptors(folder, files)
    return {f: v for f, v in zip(files, x, strict=True) if not np.isnan(v[0])}


def pairs(person: dict[str, str], files: list[str], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) index pairs and whether they are the same person."""
    by: dict[str, list[int]] = {}
    for k, f in enumerate(files):
        by.setdefault(person[f], []).append(k)
    pos = [(a, b) for ks in by.values() for x, a in enumerate(ks) for b in ks[x + 1:]]
    rng = np.random.default_rng(seed)
    neg: set[tuple[int, int]] = set()
    while len(neg) < 10 * len(pos):
        a, b = (int(v) for v in rng.integers(0, len(files), 2))
        if person[files[a]] != person[files[b]]:
            neg.add((min(a, b), max(a, b)))
    idx = np.array(pos + sorted(neg))
    return idx, np.array([True] * len(pos) + [False] * len(neg))


def verification(desc: dict[str, np.ndarray], person: dict[str, str], threshold: float) -> dict:
    files = sorted(desc)
    x = np.stack([desc[f] for f in files])
    idx, same = pairs(person, files)
    dist = np.linalg.norm(x[idx[:, 0]] - x[idx[:, 1]], axis=1)
    accept = dist < threshold
    tar, far = float(accept[same].mean()), float(accept[~same].mean())
    people = np.array([person[files[i]] for i in idx[:, 0]])
    uniq, inv = np.unique(people, return_inverse=True)
    rng = np.random.default_rng(0)
    boots = []
    for _ in range(1000):
        w = np.bincount(rng.integers(0, len(uniq), len(uniq)), minlength=len(uniq))[inv]
        ws, wd = w * same, w * ~same
        if ws.sum() and wd.sum():
            boots.append(((ws * accept).sum() / ws.sum() + (wd * ~accept).sum() / wd.sum()) / 2)
    return {"images": len(files), "positive_pairs": int(same.sum()), "negative_pairs": int((~same).sum()),
            "balanced_accuracy": round((tar + 1 - far) / 2, 4),
            "ci95": [round(float(np.percentile(boots, 2.5)), 4), round(float(np.percentile(boots, 97.5)), 4)],
            "true_accept_rate": round(tar, 4), "false_accept_rate": round(far, 4), "threshold": threshold}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEV)
    ap.add_argument("--dlib", type=Path, help=".npz of dlib's own descriptors (see the module docstring)")
    ap.add_argument("--threshold", type=float, default=0.6)
    a = ap.parse_args(argv)
    with open(a.data / "labels.csv", newline="") as fh:
        person = {r["file"]: r["person"] for r in csv.DictReader(fh)}
    files = sorted(person)
    ours = product_descriptors(a.data, files)
    report = {"product": verification(ours, person, a.threshold)}
    if a.dlib:
        d = np.load(a.dlib)
        theirs = dict(zip((str(f) for f in d["files"]), d["descriptors"].astype(np.float32), strict=True))
        report["dlib_landmarks"] = verification(theirs, person, a.threshold)
        both = sorted(set(ours) & set(theirs))
        gap = np.array([np.linalg.norm(ours[f] - theirs[f]) for f in both])
        report["same_image_distance"] = {"images": len(both), "median": round(float(np.median(gap)), 4),
                                         "p95": round(float(np.percentile(gap, 95)), 4),
                                         "share_below_0.3": round(float((gap < 0.3).mean()), 4)}
        common = {f: ours[f] for f in both}
        report["product_on_common_images"] = verification(common, person, a.threshold)
        report["dlib_on_common_images"] = verification({f: theirs[f] for f in both}, person, a.threshold)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
