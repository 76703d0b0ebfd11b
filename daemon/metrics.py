"""Evaluation metrics, pure numpy: box matching, gender confusion, ROC, calibration, age.

Everything here is a plain function over arrays and small frozen dataclasses, so it can be
checked exactly on hand-made cases (``tests/test_metrics.py``). Conventions:

- Boxes follow :mod:`daemon.pipeline.detect` (``x1, y1, x2, y2`` pixels, width ``x2 - x1``).
- Gender: male is the positive class, as in the research project's tables. Each labelled face
  ends up in one column of a :class:`Confusion`: predicted ``male``, ``female``, ``uncertain``
  (inside the configured band) or ``missed`` (no detection matched it).
- An undefined ratio (nothing in its denominator) is ``None``, never NaN, so reports stay valid
  JSON.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from daemon.pipeline.classify import decide
from daemon.pipeline.detect import iou_matrix

MALE, FEMALE, UNCERTAIN, MISSED = "male", "female", "uncertain", "missed"
TRUTH = (MALE, FEMALE)
PREDICTED = (MALE, FEMALE, UNCERTAIN, MISSED)

# Face width thresholds (pixels, "at least") and disjoint bands used in the reports.
WIDTH_MIN = (10, 20, 32, 64)
WIDTH_BANDS: tuple[tuple[float, float, str], ...] = (
    (0, 10, "<10"), (10, 20, "10-19"), (20, 32, "20-31"), (32, 64, "32-63"), (64, math.inf, ">=64"),
)
# Age bands (years, lower bound inclusive). A minor is under MINOR_AGE, both for the label and
# for the estimate (the "minor flag").
AGE_BANDS: tuple[tuple[float, float, str], ...] = (
    (0, 13, "0-12"), (13, 18, "13-17"), (18, 30, "18-29"), (30, 45, "30-44"), (45, 60, "45-59"), (60, math.inf, "60+"),
)
MINOR_AGE = 18.0


def ratio(num: float, den: float) -> float | None:
    """``num / den``, or None when ``den`` is 0."""
    return float(num) / float(den) if den else None


def f1_score(precision: float | None, recall: float | None) -> float | None:
    """Harmonic mean; None when either is undefined, 0 when both are 0."""
    if precision is None or recall is None:
        return None
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def width_band(width: float) -> str:
    """The label of the :data:`WIDTH_BANDS` band holding ``width``."""
    for lo, hi, name in WIDTH_BANDS:
        if lo <= width < hi:
            return name
    raise ValueError(f"face width must be >= 0, got {width}")


def age_band(age: float) -> str:
    """The label of the :data:`AGE_BANDS` band holding ``age`` (years)."""
    for lo, hi, name in AGE_BANDS:
        if lo <= age < hi:
            return name
    raise ValueError(f"age must be >= 0, got {age}")


# --- detection -------------------------------------------------------------------------------

def match_boxes(truth: np.ndarray, boxes: np.ndarray, scores: np.ndarray, iou_min: float = 0.5) -> np.ndarray:
    """Match detections to labelled boxes, greedily by detection score.

    Detections are taken by decreasing score (equal scores: lower index first); each takes the
    still unmatched labelled box with the highest IoU, if that IoU is >= ``iou_min`` (equal IoU:
    lower box index). So one detection matches at most one box and one box at most one detection.
    Returns, for each labelled box, the index of its detection or -1.
    """
    truth = np.asarray(truth, np.float64).reshape(-1, 4)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(f"match_boxes: {len(boxes)} boxes but {len(scores)} scores; pass one score per box")
    matched = np.full(len(truth), -1, np.int64)
    if not len(truth) or not len(boxes):
        return matched
    ious = iou_matrix(boxes, truth)  # (detections, labelled)
    for d in np.argsort(-scores, kind="stable"):
        cand = np.where(matched < 0, ious[d], -1.0)
        t = int(np.argmax(cand))  # first maximum: lowest index among equal IoUs
        if cand[t] >= iou_min:
            matched[t] = d
    return matched


def match_centre(boxes: np.ndarray, width: float, height: float) -> int:
    """The single-face-crop rule: the detection whose box centre is nearest the image centre,
    among those whose box contains the image centre (so a background face never stands in for
    the labelled one). Equal distances: lower index. Returns -1 when no box contains the centre."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    cx, cy = width / 2.0, height / 2.0
    best, best_d = -1, math.inf
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        if not (x1 <= cx <= x2 and y1 <= cy <= y2):
            continue
        d = math.hypot((x1 + x2) / 2 - cx, (y1 + y2) / 2 - cy)
        if d < best_d:
            best, best_d = i, d
    return best


@dataclass(frozen=True)
class DetectionCounts:
    """Detection tallies: labelled faces, how many a detection matched, and all detections."""

    labelled: int
    matched: int
    detections: int
    images: int

    @property
    def recall(self) -> float | None:
        return ratio(self.matched, self.labelled)

    @property
    def precision_lower_bound(self) -> float | None:
        """Matched detections / all detections: unlabelled real faces count as false, so the
        true precision is at least this."""
        return ratio(self.matched, self.detections)

    @property
    def per_image(self) -> float | None:
        return ratio(self.detections, self.images)

    def to_json(self) -> dict:
        return {"labelled": self.labelled, "matched": self.matched, "detections": self.detections, "images": self.images,
                "recall": self.recall, "precision_lower_bound": self.precision_lower_bound, "detections_per_image": self.per_image}


# --- gender ----------------------------------------------------------------------------------

def gender_predictions(p_male: np.ndarray, threshold: float = 0.5, margin: float = 0.0) -> list[str]:
    """Predicted labels from p(male), NaN meaning the face was missed; found faces get the
    product's own rule (:func:`daemon.pipeline.classify.decide`)."""
    p = np.asarray(p_male, np.float64).reshape(-1)
    found = ~np.isnan(p)
    labels = iter(decide(p[found], threshold, margin))
    return [next(labels) if f else MISSED for f in found]


@dataclass(frozen=True)
class Confusion:
    """Counts of labelled faces: rows truth (male, female), columns predicted
    (male, female, uncertain, missed)."""

    counts: tuple[tuple[int, int, int, int], tuple[int, int, int, int]]

    @staticmethod
    def of(truth: Sequence[str], predicted: Sequence[str]) -> Confusion:
        if len(truth) != len(predicted):
            raise ValueError(f"Confusion.of: {len(truth)} truths but {len(predicted)} predictions; pass one of each per face")
        c = np.zeros((2, 4), np.int64)
        for t, p in zip(truth, predicted, strict=True):
            if t not in TRUTH:
                raise ValueError(f"Confusion.of: a true label must be one of {TRUTH}, got {t!r}")
            if p not in PREDICTED:
                raise ValueError(f"Confusion.of: a prediction must be one of {PREDICTED}, got {p!r}")
            c[TRUTH.index(t), PREDICTED.index(p)] += 1
        return Confusion(tuple(tuple(int(v) for v in row) for row in c))  # type: ignore[arg-type]

    def get(self, truth: str, predicted: str) -> int:
        return self.counts[TRUTH.index(truth)][PREDICTED.index(predicted)]

    def row(self, truth: str, columns: Sequence[str]) -> int:
        return sum(self.get(truth, c) for c in columns)

    def to_json(self) -> dict:
        return {t: {p: self.get(t, p) for p in PREDICTED} for t in TRUTH}


@dataclass(frozen=True)
class BinaryMetrics:
    """Male-positive metrics over the faces whose prediction is in ``columns``.

    A face predicted ``uncertain`` or ``missed`` that is counted (its column included) is an
    error: a male one is a false negative, a female one is neither a true negative nor a false
    positive. Precision is unaffected by such faces; recall and accuracy are.
    """

    n: int
    tp: int
    fp: int
    fn: int
    tn: int
    precision: float | None
    recall: float | None
    f1: float | None
    accuracy: float | None
    female_precision: float | None
    female_recall: float | None

    @staticmethod
    def of(conf: Confusion, columns: Sequence[str] = (MALE, FEMALE)) -> BinaryMetrics:
        if MALE not in columns or FEMALE not in columns or not set(columns) <= set(PREDICTED):
            raise ValueError(f"BinaryMetrics.of: columns must include male and female and come from {PREDICTED}, got {tuple(columns)}")
        tp, fp = conf.get(MALE, MALE), conf.get(FEMALE, MALE)
        tn, fn_f = conf.get(FEMALE, FEMALE), conf.get(MALE, FEMALE)  # fn_f: males called female
        males, females = conf.row(MALE, columns), conf.row(FEMALE, columns)
        p, r = ratio(tp, tp + fp), ratio(tp, males)
        return BinaryMetrics(
            n=males + females, tp=tp, fp=fp, fn=males - tp, tn=tn,
            precision=p, recall=r, f1=f1_score(p, r), accuracy=ratio(tp + tn, males + females),
            female_precision=ratio(tn, tn + fn_f), female_recall=ratio(tn, females),
        )

    def to_json(self) -> dict:
        return dict(self.__dict__)


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative, ties counting one half (Mann-Whitney U with average ranks). None without both
    classes."""
    pos = np.asarray(positive, bool).reshape(-1)
    s = np.asarray(scores, np.float64).reshape(-1)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return None
    ranks = _average_ranks(s)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    ranks = np.empty(len(x), np.float64)
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    """ROC points ``(fpr, tpr, thresholds)``, one per distinct score (descending), starting at
    (0, 0) with threshold +inf; a face is called positive when its score >= the threshold."""
    pos = np.asarray(positive, bool).reshape(-1)
    s = np.asarray(scores, np.float64).reshape(-1)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    fpr, tpr, thr = [0.0], [0.0], [math.inf]
    if not n_pos or not n_neg:
        return fpr, tpr, thr
    for t in np.unique(s)[::-1]:
        called = s >= t
        tpr.append(float((called & pos).sum() / n_pos))
        fpr.append(float((called & ~pos).sum() / n_neg))
        thr.append(float(t))
    return fpr, tpr, thr


@dataclass(frozen=True)
class ReliabilityBin:
    """One bin of a reliability diagram: faces with p(male) in [lo, hi) (the last bin is closed)."""

    lo: float
    hi: float
    n: int
    mean_p: float | None
    frac_positive: float | None


def reliability(positive: np.ndarray, p: np.ndarray, n_bins: int = 10) -> tuple[list[ReliabilityBin], float | None]:
    """Reliability diagram over ``n_bins`` equal-width bins of p, and the expected calibration
    error ECE = sum over bins of (n_bin / N) * |fraction positive - mean p|. None when empty."""
    if n_bins < 1:
        raise ValueError(f"reliability: n_bins must be >= 1, got {n_bins}")
    pos = np.asarray(positive, bool).reshape(-1)
    p = np.asarray(p, np.float64).reshape(-1)
    if len(pos) != len(p):
        raise ValueError(f"reliability: {len(pos)} labels but {len(p)} probabilities; pass one of each per face")
    if len(p) and (np.any(p < 0) or np.any(p > 1) or np.any(np.isnan(p))):
        raise ValueError("reliability: probabilities must lie in [0, 1]; drop missed faces (NaN) first")
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        sel = idx == b
        n = int(sel.sum())
        mean_p = float(p[sel].mean()) if n else None
        frac = float(pos[sel].mean()) if n else None
        if n:
            ece += n / len(p) * abs(frac - mean_p)  # type: ignore[operator]
        bins.append(ReliabilityBin(b / n_bins, (b + 1) / n_bins, n, mean_p, frac))
    return bins, (float(ece) if len(p) else None)


# --- age -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AgeMetrics:
    """Age error over faces with a numeric age label and an estimate, and the minor flag
    (estimate < :data:`MINOR_AGE`) against the label (age < :data:`MINOR_AGE`)."""

    n: int
    mae: float | None
    mae_by_band: dict[str, dict]
    minor_tp: int
    minor_fp: int
    minor_fn: int
    minor_precision: float | None
    minor_recall: float | None

    def to_json(self) -> dict:
        return dict(self.__dict__)


def age_metrics(truth: np.ndarray, estimate: np.ndarray) -> AgeMetrics:
    """MAE overall and by :data:`AGE_BANDS` band of the true age, and minor-flag precision/recall."""
    t = np.asarray(truth, np.float64).reshape(-1)
    e = np.asarray(estimate, np.float64).reshape(-1)
    if len(t) != len(e):
        raise ValueError(f"age_metrics: {len(t)} labels but {len(e)} estimates; pass one of each per face")
    err = np.abs(t - e)
    by_band = {}
    for lo, hi, name in AGE_BANDS:
        sel = (t >= lo) & (t < hi)
        if sel.any():
            by_band[name] = {"n": int(sel.sum()), "mae": float(err[sel].mean())}
    tm, em = t < MINOR_AGE, e < MINOR_AGE
    tp, fp, fn = int((tm & em).sum()), int((~tm & em).sum()), int((tm & ~em).sum())
    return AgeMetrics(
        n=len(t), mae=float(err.mean()) if len(t) else None, mae_by_band=by_band,
        minor_tp=tp, minor_fp=fp, minor_fn=fn, minor_precision=ratio(tp, tp + fp), minor_recall=ratio(tp, tp + fn),
    )


def gender_report(truth: Sequence[str], p_male: np.ndarray, threshold: float = 0.5, margin: float = 0.0,
                  groups: Sequence[str] | None = None) -> dict:
    """Everything reported for one group of labelled faces; ``p_male`` is NaN for missed faces.

    - ``found``: faces the detector found, every one called at ``threshold`` (no band): the
      figures comparable with the research project's tables;
    - ``with_misses``: the same, missed faces counted as errors;
    - ``decided``: found faces outside the uncertain band (``margin``), called by the band rule;
    - ``uncertain_share``: share of found faces inside the band;
    - ``confusion``: the band rule's confusion, with ``uncertain`` and ``missed`` columns;
    - ``roc_auc``: over found faces;
    - ``band``: :func:`band_report` (does the uncertain band hold the errors?);
    - ``ci95``: :func:`bootstrap_ci` of F1, accuracy and ROC-AUC over found faces, resampling
      ``groups`` (the image of each face, for scenes) when given.
    """
    p = np.asarray(p_male, np.float64).reshape(-1)
    truth = list(truth)
    hard_pred = gender_predictions(p, threshold, 0.0)
    hard = Confusion.of(truth, hard_pred)
    banded = Confusion.of(truth, gender_predictions(p, threshold, margin))
    found = ~np.isnan(p)
    n_found = int(found.sum())
    positive = np.array([t == MALE for t in truth], bool)
    return {
        "labelled": len(truth),
        "found": n_found,
        "metrics": BinaryMetrics.of(hard, (MALE, FEMALE)).to_json(),
        "with_misses": BinaryMetrics.of(hard, (MALE, FEMALE, MISSED)).to_json(),
        "decided": BinaryMetrics.of(banded, (MALE, FEMALE)).to_json(),
        "uncertain_share": ratio(sum(banded.get(t, UNCERTAIN) for t in TRUTH), n_found),
        "confusion": banded.to_json(),
        "roc_auc": roc_auc(positive[found], p[found]),
        "band": band_report(positive[found], p[found], threshold, margin),
        "ci95": bootstrap_ci(positive[found], p[found], threshold, None if groups is None else np.asarray(groups)[found]),
    }


def band_report(positive: np.ndarray, p: np.ndarray, threshold: float = 0.5, margin: float = 0.0) -> dict:
    """How well the uncertain band catches the errors, over found faces: the share of faces
    inside the band, the error rate of the faces outside it (called by the band rule), and the
    share of all hard-call errors (at ``threshold``) that the band holds."""
    pos = np.asarray(positive, bool)
    p = np.asarray(p, np.float64)
    inside = np.abs(p - threshold) < margin if margin > 0 else np.zeros(len(p), bool)
    wrong = (p >= threshold) != pos
    return {"inside_share": ratio(int(inside.sum()), len(p)),
            "error_outside": ratio(int((wrong & ~inside).sum()), int((~inside).sum())),
            "errors_held": ratio(int((wrong & inside).sum()), int(wrong.sum()))}


def bootstrap_ci(positive: np.ndarray, p: np.ndarray, threshold: float = 0.5, groups: np.ndarray | None = None,
                 n_boot: int = 1000, seed: int = 0) -> dict[str, list[float] | None]:
    """95% percentile-bootstrap intervals of F1 (male positive), accuracy and ROC-AUC over
    found faces. With ``groups`` (e.g. the image of each face in a scene folder) whole groups
    are resampled, since faces of one scene are not independent. Seeded: the same input gives
    the same interval."""
    pos = np.asarray(positive, bool)
    p = np.asarray(p, np.float64)
    if len(p) < 2:
        return {"f1": None, "accuracy": None, "roc_auc": None}
    ids = np.unique(np.asarray(groups), return_inverse=True)[1] if groups is not None else np.arange(len(p))
    n_groups = int(ids.max()) + 1
    rng = np.random.default_rng(seed)
    call = p >= threshold
    order = np.argsort(p, kind="mergesort")
    ps, poss = p[order], pos[order]
    _, first, counts = np.unique(ps, return_index=True, return_counts=True)
    f1s, accs, aucs = [], [], []
    for _ in range(n_boot):
        w = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)[ids].astype(np.float64)
        tp, fp = w[call & pos].sum(), w[call & ~pos].sum()
        fn, tn = w[~call & pos].sum(), w[~call & ~pos].sum()
        if 2 * tp + fp + fn > 0:
            f1s.append(2 * tp / (2 * tp + fp + fn))
        accs.append((tp + tn) / w.sum())
        ws = w[order]
        wp, wn = ws * poss, ws * ~poss
        if wp.sum() > 0 and wn.sum() > 0:  # weighted Mann-Whitney, ties counted half
            neg_tie = np.add.reduceat(wn, first)
            pos_tie = np.add.reduceat(wp, first)
            neg_below = np.cumsum(neg_tie) - neg_tie
            aucs.append(float((pos_tie * (neg_below + neg_tie / 2)).sum() / (wp.sum() * wn.sum())))

    def pct(v: list[float]) -> list[float] | None:
        return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) >= n_boot // 2 else None

    return {"f1": pct(f1s), "accuracy": pct(accs), "roc_auc": pct(aucs)}
