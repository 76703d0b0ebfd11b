"""How well the stored descriptors tell people apart, measured the way the product runs.

A folder of identity-labelled face images (``labels.csv`` with ``file`` and ``person``, as
``../shared/data/dev/lfw``) is scanned into a fresh SQLite database by the product's own scan,
which places every face into a person as it is recorded (incremental). The labelled face of an
image is the detection at its centre (:func:`daemon.metrics.match_centre`); an image where none is
found counts as a miss: its pairs are not accepted and it is in no cluster. Then:

- **verification**: every same-person pair and, seeded, ten times as many different-person pairs;
  "same" when the distance is below the threshold; balanced accuracy with a 95% bootstrap interval
  over people, at dlib's 0.6 and at the clustering threshold;
- **clustering**: pairwise precision and recall of the persons, as placed incrementally during the
  scan and after ``recluster``, and their agreement (adjusted Rand index).
"""

from __future__ import annotations

import csv
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from daemon import identity, metrics
from daemon.config import Config, PipelineConfig
from daemon.paths import from_db

VERIFY_THRESHOLD = 0.6


class IdentityEvalError(ValueError):
    """The folder cannot be evaluated (no labels, no identities with enough images)."""


def read_people(folder: Path, min_images: int) -> dict[str, str]:
    """file -> person for the people with at least ``min_images`` images."""
    labels = folder / "labels.csv"
    if not labels.is_file():
        raise IdentityEvalError(f"{folder}: expected labels.csv with the columns file and person (as the dev lfw folder); it is missing")
    with open(labels, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "person" not in rows[0] or "file" not in rows[0]:
        raise IdentityEvalError(f"{labels}: expected the columns file and person, got {', '.join(rows[0]) if rows else 'no rows'}")
    count: dict[str, int] = {}
    for r in rows:
        count[r["person"]] = count.get(r["person"], 0) + 1
    people = {r["file"]: r["person"] for r in rows if count[r["person"]] >= min_images}
    if not people:
        raise IdentityEvalError(f"{labels}: no person has {min_images} or more images")
    return people


def centre_descriptors(folder: Path, files: list[str], cfg: PipelineConfig | None = None) -> np.ndarray:
    """The product's descriptor of the centre face of each of ``folder/images/<file>`` (the
    pipeline alone, no database; NaN where none was found)."""
    from daemon.pipeline.analyze import load_pipeline
    from daemon.pipeline.images import ImageError

    pipe = load_pipeline(cfg or PipelineConfig())
    out = np.full((len(files), identity.DIM), np.nan, np.float32)
    for k, f in enumerate(files):
        try:
            res = pipe.analyze_file(folder / "images" / f)
        except ImageError:
            continue
        if not res.faces:
            continue
        c = metrics.match_centre(np.array([fc.box for fc in res.faces]), res.width, res.height)
        blob = res.faces[c].descriptor if c >= 0 else None
        if blob:
            out[k] = identity.unpack(blob)
    return out


def pairs(person: list[str], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) index pairs: every same-person pair, then ten times as many seeded random
    different-person pairs; and whether each pair is the same person."""
    by: dict[str, list[int]] = {}
    for k, p in enumerate(person):
        by.setdefault(p, []).append(k)
    pos = [(a, b) for ks in by.values() for x, a in enumerate(ks) for b in ks[x + 1 :]]
    rng = np.random.default_rng(seed)
    neg: set[tuple[int, int]] = set()
    n_people = len(by)
    target = min(10 * len(pos), len(person) * (len(person) - 1) // 2 - len(pos)) if n_people > 1 else 0
    while len(neg) < target:
        a, b = (int(v) for v in rng.integers(0, len(person), 2))
        if person[a] != person[b]:
            neg.add((min(a, b), max(a, b)))
    idx = np.array(pos + sorted(neg), np.int64).reshape(-1, 2)
    return idx, np.array([True] * len(pos) + [False] * len(neg))


def verification(X: np.ndarray, person: list[str], threshold: float, *, boots: int = 1000) -> dict[str, Any]:  # noqa: N803
    """Balanced accuracy (true-accept and true-reject rates averaged) of ``distance <
    threshold``; rows of ``X`` that are NaN (missed faces) never match. 95% interval by a
    bootstrap over people."""
    idx, same = pairs(person)
    dist = np.linalg.norm(X[idx[:, 0]] - X[idx[:, 1]], axis=1)
    accept = np.nan_to_num(dist, nan=np.inf) < threshold
    tar, far = float(accept[same].mean()), float(accept[~same].mean())
    who = np.array([person[i] for i in idx[:, 0]])
    _, inv = np.unique(who, return_inverse=True)
    rng = np.random.default_rng(0)
    values = []
    n = int(inv.max()) + 1
    for _ in range(boots):
        w = np.bincount(rng.integers(0, n, n), minlength=n)[inv]
        ws, wd = w * same, w * ~same
        if ws.sum() and wd.sum():
            values.append(((ws * accept).sum() / ws.sum() + (wd * ~accept).sum() / wd.sum()) / 2)
    return {
        "threshold": threshold,
        "balanced_accuracy": round((tar + 1 - far) / 2, 4),
        "ci95": [round(float(np.percentile(values, 2.5)), 4), round(float(np.percentile(values, 97.5)), 4)],
        "true_accept_rate": round(tar, 4),
        "false_accept_rate": round(far, 5),
        "positive_pairs": int(same.sum()),
        "negative_pairs": int((~same).sum()),
    }


def evaluate(folder: Path, cfg: Config, *, min_images: int = 2, workers: int = 0, db: str | None = None) -> dict[str, Any]:
    """Scan ``folder/images`` (the labelled images of people with ``min_images`` or more) into a
    fresh database and report verification and clustering (see the module doc)."""
    from daemon.scan import scan
    from daemon.store import persons as ps
    from daemon.store import schema as s
    from daemon.store.engine import open_store_engine

    people = read_people(folder, min_images)
    files = sorted(people)
    with tempfile.TemporaryDirectory(prefix="fg-identity-") as tmp:
        url = db or f"sqlite:///{os.path.join(tmp, 'identity.db')}"
        run = replace(cfg, database=url)
        summary = scan([str(folder / "images" / f) for f in files], run, workers=workers)
        engine = open_store_engine(url)
        try:

            def labelled() -> tuple[np.ndarray, np.ndarray]:
                f, a, i, fl, fp = s.faces, s.analyses, s.images, s.files, ps.face_persons
                q = select(fl.c.path, i.c.width, i.c.height, f.c.x1, f.c.y1, f.c.x2, f.c.y2, f.c.descriptor, fp.c.person_id).select_from(
                    fl.join(i, i.c.id == fl.c.image_id).join(a, a.c.image_id == i.c.id).join(f, f.c.analysis_id == a.c.id).outerjoin(fp, fp.c.face_id == f.c.id)
                )
                with engine.connect() as conn:
                    rows = conn.execute(q).all()
                by: dict[str, list[Any]] = {}
                for r in rows:
                    by.setdefault(os.path.basename(from_db(r.path)), []).append(r)
                X = np.full((len(files), identity.DIM), np.nan, np.float32)  # noqa: N806
                lab = np.full(len(files), -1, np.int64)
                for k, name in enumerate(files):
                    faces = by.get(name, [])
                    if not faces:
                        continue
                    c = metrics.match_centre(np.array([[r.x1, r.y1, r.x2, r.y2] for r in faces]), faces[0].width, faces[0].height)
                    if c >= 0 and faces[c].descriptor is not None:
                        X[k] = identity.unpack(faces[c].descriptor)
                        lab[k] = faces[c].person_id if faces[c].person_id is not None else -1
                return X, lab

            X, incremental = labelled()  # noqa: N806
            stats = ps.recluster(engine, cfg.identity)
            _, rebuilt = labelled()
        finally:
            engine.dispose()
    person = [people[f] for f in files]
    found = int((~np.isnan(X[:, 0])).sum())
    out: dict[str, Any] = {
        "folder": str(folder),
        "images": len(files),
        "people": len(set(person)),
        "labelled_faces_found": found,
        "scan": {"analysed": summary.analysed, "seconds": round(summary.seconds, 1)},
        "verification": [verification(X, person, VERIFY_THRESHOLD)]
        + ([verification(X, person, cfg.identity.threshold)] if cfg.identity.threshold != VERIFY_THRESHOLD else []),
        "clustering": {"threshold": cfg.identity.threshold, "min_face_px": cfg.identity.min_face_px, "min_score": cfg.identity.min_score},
        "recluster": stats,
    }
    for name, lab in (("incremental", incremental), ("recluster", rebuilt)):
        p, r = identity.pair_scores(person, lab)
        out["clustering"][name] = {
            "pairwise_precision": round(p, 4),
            "pairwise_recall": round(r, 4),
            "persons": len(set(lab.tolist()) - {-1}),
            "unplaced": int((lab < 0).sum()),
        }
    out["clustering"]["agreement_ari"] = round(identity.adjusted_rand(incremental, rebuilt), 4)
    return out


def format_report(rep: dict[str, Any]) -> str:
    """The report as the lines ``evaluate-identity`` prints."""
    lines = [f"{rep['folder']}: {rep['images']} images of {rep['people']} people, labelled face found in {rep['labelled_faces_found']}"]
    for v in rep["verification"]:
        lines.append(
            f"verification at {v['threshold']}: balanced accuracy {v['balanced_accuracy']:.4f} "
            f"[{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}] (true accept {v['true_accept_rate']:.4f}, false accept "
            f"{v['false_accept_rate']:.5f}; {v['positive_pairs']} same / {v['negative_pairs']} different pairs)"
        )
    c = rep["clustering"]
    for name in ("incremental", "recluster"):
        k = c[name]
        lines.append(
            f"clusters ({name}, threshold {c['threshold']}): pairwise precision {k['pairwise_precision']:.4f}, "
            f"recall {k['pairwise_recall']:.4f}, {k['persons']} persons, {k['unplaced']} labelled faces unplaced"
        )
    lines.append(f"incremental vs recluster: adjusted Rand index {c['agreement_ari']:.4f}")
    return "\n".join(lines)
