"""Choose the clustering threshold (``identity.threshold``) by cross-validation on train LFW.

    .venv/bin/python -m training.identity [--data ../shared/data/train/lfw] [--folds 8]

Descriptors come from the product's pipeline (the labelled face is the one at the image centre;
people with two or more images). Pairwise precision and recall of complete-linkage clusters
depend on how many people are in the gallery, so the people are split into folds of about the
size of dev LFW (grouped by person: a person is in one fold) and each fold is clustered on its
own. Printed per threshold: mean precision and recall over folds with their spread, and
verification accuracy at dlib's 0.6 on all of train. The chosen threshold is the one with the
highest mean recall whose mean precision is at least 0.98 (precision first: a wrong merge sends
an examiner to the wrong person; a missed one only leaves two clusters to merge).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO.parent / "shared" / "data" / "train" / "lfw"
THRESHOLDS = (0.45, 0.48, 0.5, 0.52, 0.54, 0.55, 0.56, 0.58, 0.6)


def main(argv: list[str] | None = None) -> int:
    from daemon import identity
    from daemon.identity_eval import centre_descriptors, read_people, verification

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=TRAIN)
    ap.add_argument("--folds", type=int, default=8)
    ap.add_argument("--cache", type=Path, default=REPO / "var" / "identity-train.npz")
    a = ap.parse_args(argv)
    people = read_people(a.data, 2)
    files = sorted(people)
    if a.cache.is_file() and list(np.load(a.cache)["files"]) == files:
        X = np.load(a.cache)["X"]  # noqa: N806
    else:
        X = centre_descriptors(a.data, files)  # noqa: N806
        a.cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(a.cache, X=X, files=np.array(files))
    person = [people[f] for f in files]
    names = sorted(set(person))
    rng = np.random.default_rng(0)
    fold_of = dict(zip(names, rng.permutation(len(names)) % a.folds, strict=True))
    fold = np.array([fold_of[p] for p in person])
    print(
        f"{a.data}: {len(files)} images of {len(names)} people, centre face found in {int((~np.isnan(X[:, 0])).sum())}; "
        f"{a.folds} folds of about {len(names) // a.folds} people"
    )
    v = verification(X, person, 0.6)
    print(f"verification at 0.6 on all of it: {v['balanced_accuracy']:.4f} [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}]")
    print(f"{'threshold':>9} {'precision':>9} {'(min)':>7} {'recall':>7} {'(min)':>7}")
    best = None
    for th in THRESHOLDS:
        ps, rs = [], []
        for k in range(a.folds):
            m = np.flatnonzero(fold == k)
            ok = m[~np.isnan(X[m, 0])]
            lab = np.full(len(m), -1, np.int64)
            lab[np.isin(m, ok)] = identity.clusters(X[ok], th)
            p, r = identity.pair_scores([person[i] for i in m], lab)
            ps.append(p)
            rs.append(r)
        mp, mr = float(np.mean(ps)), float(np.mean(rs))
        print(f"{th:>9.2f} {mp:>9.4f} {min(ps):>7.4f} {mr:>7.4f} {min(rs):>7.4f}")
        if mp >= 0.98 and (best is None or mr > best[1]):
            best = (th, mr)
    print(f"chosen: {best[0] if best else 'none reaches precision 0.98'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
