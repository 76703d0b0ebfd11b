"""The metric code, checked exactly on hand-made cases you can count on paper."""

from __future__ import annotations

import math

import numpy as np
import pytest

from daemon import metrics as m
from daemon.pipeline import classify

M, F, U, X = m.MALE, m.FEMALE, m.UNCERTAIN, m.MISSED


# --- confusion and the metrics derived from it ------------------------------------------------

TRUTH = [M, M, M, M, F, F, F]
PRED = [M, M, F, X, M, F, U]


def test_confusion_counts_by_hand() -> None:
    c = m.Confusion.of(TRUTH, PRED)
    #              male female uncertain missed
    assert c.counts == ((2, 1, 0, 1),   # truth male
                        (1, 1, 1, 0))   # truth female
    assert c.to_json() == {M: {M: 2, F: 1, U: 0, X: 1}, F: {M: 1, F: 1, U: 1, X: 0}}


def test_binary_metrics_found_faces_only() -> None:
    b = m.BinaryMetrics.of(m.Confusion.of(TRUTH, PRED), (M, F))
    # 3 males called male or female (2 right), 2 females (1 right), 1 female called male.
    assert (b.n, b.tp, b.fp, b.fn, b.tn) == (5, 2, 1, 1, 1)
    assert b.precision == pytest.approx(2 / 3)
    assert b.recall == pytest.approx(2 / 3)
    assert b.f1 == pytest.approx(2 / 3)
    assert b.accuracy == pytest.approx(3 / 5)
    assert b.female_precision == pytest.approx(1 / 2)
    assert b.female_recall == pytest.approx(1 / 2)


def test_binary_metrics_with_misses_as_errors() -> None:
    b = m.BinaryMetrics.of(m.Confusion.of(TRUTH, PRED), (M, F, X))
    assert (b.n, b.tp, b.fp, b.fn, b.tn) == (6, 2, 1, 2, 1)
    assert b.precision == pytest.approx(2 / 3)  # a miss is never a male call
    assert b.recall == pytest.approx(2 / 4)
    assert b.f1 == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))  # 4/7
    assert b.accuracy == pytest.approx(3 / 6)
    everything = m.BinaryMetrics.of(m.Confusion.of(TRUTH, PRED), (M, F, U, X))
    assert everything.accuracy == pytest.approx(3 / 7)
    assert everything.female_recall == pytest.approx(1 / 3)


def test_binary_metrics_undefined_ratios_are_none() -> None:
    b = m.BinaryMetrics.of(m.Confusion.of([F, F], [F, F]))
    assert b.precision is None and b.recall is None and b.f1 is None
    assert b.accuracy == 1.0 and b.female_recall == 1.0
    assert m.f1_score(0.0, 0.0) == 0.0


@pytest.mark.parametrize("truth, pred, match", [
    ([M], [M, F], "1 truths but 2"), (["man"], [M], "true label"), ([M], ["yes"], "prediction"),
])
def test_confusion_rejects_bad_input(truth: list, pred: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        m.Confusion.of(truth, pred)


def test_gender_predictions_follow_the_pipeline_rule() -> None:
    p = np.array([0.0, 0.39, 0.4, 0.41, 0.5, 0.59, 0.6, 1.0, math.nan])
    assert m.gender_predictions(p, 0.5, 0.1) == [F, F, F, U, U, U, M, M, X]
    assert m.gender_predictions(p, 0.5, 0.0) == [F, F, F, F, M, M, M, M, X]
    grid = np.linspace(0, 1, 201)
    for margin in (0.0, 0.05, 0.1, 0.2):
        assert m.gender_predictions(grid, 0.5, margin) == classify.decide(grid, 0.5, margin)


def test_gender_report_by_hand() -> None:
    truth = [M, M, M, F, F]
    p = np.array([0.9, 0.55, math.nan, 0.2, 0.45])
    r = m.gender_report(truth, p, 0.5, 0.1)
    assert (r["labelled"], r["found"]) == (5, 4)
    # At 0.5 without a band: males 0.9, 0.55 -> male; females 0.2, 0.45 -> female.
    assert r["metrics"]["accuracy"] == 1.0 and r["metrics"]["f1"] == 1.0
    assert r["with_misses"]["recall"] == pytest.approx(2 / 3)
    assert r["with_misses"]["accuracy"] == pytest.approx(4 / 5)
    # With the band: 0.55 and 0.45 are uncertain; the other two are right.
    assert r["uncertain_share"] == pytest.approx(2 / 4)
    assert r["decided"]["n"] == 2 and r["decided"]["accuracy"] == 1.0
    assert r["confusion"] == {M: {M: 1, F: 0, U: 1, X: 1}, F: {M: 0, F: 1, U: 1, X: 0}}
    assert r["roc_auc"] == 1.0


# --- ROC -------------------------------------------------------------------------------------

def test_roc_auc_by_hand_with_ties() -> None:
    # positives 0.9, 0.5, 0.5; negatives 0.5, 0.2. Pairs (pos, neg): 0.9>0.5, 0.9>0.2, 0.5=0.5 (half),
    # 0.5>0.2, 0.5=0.5 (half), 0.5>0.2 -> (1+1+0.5+1+0.5+1) / 6 = 5/6.
    pos = np.array([1, 1, 1, 0, 0], bool)
    s = np.array([0.9, 0.5, 0.5, 0.5, 0.2])
    assert m.roc_auc(pos, s) == pytest.approx(5 / 6)
    assert m.roc_auc(pos, s[::-1].copy()) is not None


@pytest.mark.parametrize("pos, s, expected", [
    ([1, 0], [0.8, 0.2], 1.0),
    ([1, 0], [0.2, 0.8], 0.0),
    ([1, 1, 0, 0], [0.5, 0.5, 0.5, 0.5], 0.5),  # all tied: a coin toss
    ([1, 0, 1, 0], [0.7, 0.6, 0.4, 0.3], 0.75),  # 3 of 4 pairs ordered right
    ([1, 1], [0.1, 0.9], None),  # one class only: undefined
])
def test_roc_auc_table(pos: list, s: list, expected: float | None) -> None:
    got = m.roc_auc(np.array(pos, bool), np.array(s))
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_roc_curve_by_hand() -> None:
    fpr, tpr, thr = m.roc_curve(np.array([1, 1, 1, 0, 0], bool), np.array([0.9, 0.5, 0.5, 0.5, 0.2]))
    assert thr == [math.inf, 0.9, 0.5, 0.2]
    assert tpr == pytest.approx([0, 1 / 3, 1, 1])
    assert fpr == pytest.approx([0, 0, 0.5, 1])
    # The trapezoid area under these points is the Mann-Whitney AUC.
    assert np.trapezoid(tpr, fpr) == pytest.approx(5 / 6)


# --- IoU matching ----------------------------------------------------------------------------

def test_match_boxes_two_equal_detections_two_overlapping_boxes() -> None:
    truth = np.array([[0, 0, 10, 10], [2, 0, 12, 10]])  # IoU with the detection: 90/110 each
    dets = np.array([[1, 0, 11, 10], [1, 0, 11, 10]])
    # Equal scores: detection 0 goes first; equal IoU: it takes the lower box index.
    assert m.match_boxes(truth, dets, np.array([0.8, 0.8])).tolist() == [0, 1]
    # A higher score for detection 1 makes it choose first.
    assert m.match_boxes(truth, dets, np.array([0.7, 0.8])).tolist() == [1, 0]


def test_match_boxes_greedy_by_score_not_by_iou() -> None:
    truth = np.array([[0, 0, 10, 10]])
    dets = np.array([[0, 0, 10, 16], [0, 0, 10, 11]])  # IoU 100/160 = 0.625 and 100/110 = 0.91
    assert m.match_boxes(truth, dets, np.array([0.9, 0.8])).tolist() == [0]  # the higher score wins
    assert m.match_boxes(truth, dets, np.array([0.8, 0.9])).tolist() == [1]


def test_match_boxes_one_detection_per_box_and_threshold_inclusive() -> None:
    truth = np.array([[0, 0, 10, 10], [100, 100, 110, 110]])
    dets = np.array([[0, 0, 10, 20], [0, 0, 10, 10], [0, 0, 10, 21]])  # IoU 0.5 exactly, 1.0, 100/210
    assert m.match_boxes(truth, dets, np.array([0.9, 0.5, 0.95])).tolist() == [0, -1]
    assert m.match_boxes(truth, dets[2:], np.array([0.9])).tolist() == [-1, -1]  # 0.476 < 0.5
    assert m.match_boxes(truth, np.zeros((0, 4)), np.zeros(0)).tolist() == [-1, -1]
    assert m.match_boxes(np.zeros((0, 4)), dets, np.ones(3)).tolist() == []


def test_match_centre_takes_the_nearest_box_containing_the_centre() -> None:
    boxes = np.array([[0, 0, 40, 40],       # does not contain the centre (50, 50)
                      [20, 20, 90, 90],     # contains it, box centre (55, 55)
                      [30, 30, 72, 72],     # contains it, box centre (51, 51): nearest
                      [28, 28, 74, 74]])    # same centre as the previous one: loses the tie
    assert m.match_centre(boxes, 100, 100) == 2
    assert m.match_centre(boxes[:1], 100, 100) == -1
    assert m.match_centre(np.zeros((0, 4)), 100, 100) == -1


def test_detection_counts() -> None:
    d = m.DetectionCounts(labelled=4, matched=3, detections=5, images=2)
    assert (d.recall, d.precision_lower_bound, d.per_image) == (0.75, 0.6, 2.5)
    assert m.DetectionCounts(0, 0, 0, 0).recall is None


# --- calibration -----------------------------------------------------------------------------

def test_ece_by_hand() -> None:
    p = np.array([0.1, 0.15, 0.8, 0.85, 0.9])
    pos = np.array([0, 1, 1, 1, 0], bool)
    bins, ece = m.reliability(pos, p, n_bins=10)
    # bin [0.1,0.2): mean 0.125, 1/2 male -> gap 0.375; bin [0.8,0.9): mean 0.825, 2/2 -> 0.175;
    # bin [0.9,1.0]: 0.9, 0/1 -> 0.9.  ECE = (2*0.375 + 2*0.175 + 1*0.9) / 5 = 0.4
    assert ece == pytest.approx(0.4)
    assert [b.n for b in bins] == [0, 2, 0, 0, 0, 0, 0, 0, 2, 1]
    assert bins[1].mean_p == pytest.approx(0.125) and bins[1].frac_positive == 0.5
    assert bins[0].mean_p is None


def test_ece_edges_and_perfect_calibration() -> None:
    bins, ece = m.reliability(np.array([1, 0], bool), np.array([1.0, 0.0]), n_bins=2)
    assert ece == 0.0 and [b.n for b in bins] == [1, 1]  # p = 1.0 falls in the last, closed bin
    bins, ece = m.reliability(np.array([1, 0, 1, 0], bool), np.array([0.5, 0.5, 0.75, 0.75]), n_bins=2)
    assert ece == pytest.approx(0.5 * 0 + 0.5 * 0.25)
    assert m.reliability(np.zeros(0, bool), np.zeros(0))[1] is None
    with pytest.raises(ValueError, match="NaN"):
        m.reliability(np.array([True]), np.array([math.nan]))


# --- age and bands ---------------------------------------------------------------------------

def test_age_metrics_by_hand() -> None:
    a = m.age_metrics(np.array([10, 16, 20, 40]), np.array([12, 19, 15, 40]))
    assert a.n == 4 and a.mae == pytest.approx((2 + 3 + 5 + 0) / 4)
    assert a.mae_by_band == {"0-12": {"n": 1, "mae": 2.0}, "13-17": {"n": 1, "mae": 3.0},
                             "18-29": {"n": 1, "mae": 5.0}, "30-44": {"n": 1, "mae": 0.0}}
    # label minor: 10, 16; estimate minor: 12, 15 -> one right (10), one false alarm (20), one missed (16)
    assert (a.minor_tp, a.minor_fp, a.minor_fn) == (1, 1, 1)
    assert a.minor_precision == 0.5 and a.minor_recall == 0.5


@pytest.mark.parametrize("width, band", [(0, "<10"), (9.99, "<10"), (10, "10-19"), (31.9, "20-31"), (32, "32-63"), (64, ">=64")])
def test_width_bands(width: float, band: str) -> None:
    assert m.width_band(width) == band


@pytest.mark.parametrize("age, band", [(0, "0-12"), (12.9, "0-12"), (13, "13-17"), (17.99, "13-17"), (18, "18-29"), (90, "60+")])
def test_age_bands(age: float, band: str) -> None:
    assert m.age_band(age) == band


def test_bootstrap_interval_brackets_the_point_estimate_and_is_seeded() -> None:
    rng = np.random.default_rng(3)
    pos = rng.random(400) < 0.5
    p = np.clip(pos * 0.35 + rng.random(400) * 0.65, 0, 1)
    ci = m.bootstrap_ci(pos, p, 0.5, n_boot=400)
    f1 = m.BinaryMetrics.of(m.Confusion.of(["male" if x else "female" for x in pos],
                                                       m.gender_predictions(p, 0.5)), ("male", "female")).f1
    auc = m.roc_auc(pos, p)
    assert ci["f1"][0] < f1 < ci["f1"][1] and ci["roc_auc"][0] < auc < ci["roc_auc"][1]
    assert ci == m.bootstrap_ci(pos, p, 0.5, n_boot=400)
    # resampling whole groups (faces of one scene) can only widen the interval here: 40 scenes
    # whose faces all share one score and one label
    grouped = m.bootstrap_ci(np.repeat(pos[:40], 10), np.repeat(p[:40], 10), 0.5, np.repeat(np.arange(40), 10), n_boot=400)
    flat = m.bootstrap_ci(np.repeat(pos[:40], 10), np.repeat(p[:40], 10), 0.5, n_boot=400)
    assert grouped["f1"][1] - grouped["f1"][0] > 2 * (flat["f1"][1] - flat["f1"][0])


def test_band_report_counts_errors_inside_and_outside() -> None:
    pos = np.array([1, 1, 0, 0, 1, 0], bool)
    p = np.array([0.9, 0.45, 0.55, 0.1, 0.2, 0.8])  # errors: 0.45 (in band), 0.55 (in band), 0.2, 0.8
    b = m.band_report(pos, p, 0.5, 0.1)
    assert b == {"inside_share": 2 / 6, "error_outside": 2 / 4, "errors_held": 2 / 4}
