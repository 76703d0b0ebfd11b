"""Exact tests of the pure pre/post-processing: CenterFace decoding, NMS, input policy,
alignment geometry, classifier normalization, decisions and age statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from daemon.pipeline import align, classify, detect


def outputs(h: int, w: int):  # noqa: ANN201
    return (np.zeros((1, 1, h, w), np.float32), np.zeros((1, 2, h, w), np.float32),
            np.zeros((1, 2, h, w), np.float32), np.zeros((1, 10, h, w), np.float32))


def test_decode_one_peak_exactly() -> None:
    heat, scale, offset, lms = outputs(8, 10)
    heat[0, 0, 3, 5] = 0.9
    scale[0, :, 3, 5] = [math.log(5.0), math.log(4.0)]  # h = 5*4 = 20, w = 4*4 = 16
    offset[0, :, 3, 5] = [0.25, -0.5]  # (dy, dx)
    lms[0, :, 3, 5] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.6, 0.7, 0.8, 0.9]  # pairs (y, x)
    d = detect.decode(heat, scale, offset, lms, threshold=0.35)
    cx, cy = (5 - 0.5 + 0.5) * 4, (3 + 0.25 + 0.5) * 4  # 20, 15
    np.testing.assert_allclose(d.boxes[0], [cx - 8, cy - 10, cx + 8, cy + 10], atol=1e-5)
    assert d.scores[0] == pytest.approx(0.9)
    x1, y1 = cx - 8, cy - 10
    expect = [[0.2 * 16 + x1, 0.1 * 20 + y1], [0.4 * 16 + x1, 0.3 * 20 + y1], [0.5 * 16 + x1, 0.5 * 20 + y1],
              [0.7 * 16 + x1, 0.6 * 20 + y1], [0.9 * 16 + x1, 0.8 * 20 + y1]]
    np.testing.assert_allclose(d.landmarks[0], expect, atol=1e-5)


def test_decode_threshold_is_strict_and_empty() -> None:
    heat, scale, offset, lms = outputs(4, 4)
    heat[0, 0, 1, 1] = 0.35
    assert len(detect.decode(heat, scale, offset, lms, threshold=0.35)) == 0
    heat[0, 0, 1, 1] = 0.3501
    assert len(detect.decode(heat, scale, offset, lms, threshold=0.35)) == 1


def test_decode_clips_to_valid_area() -> None:
    heat, scale, offset, lms = outputs(4, 4)
    heat[0, 0, 0, 0] = 0.9
    scale[0, :, 0, 0] = math.log(10.0)  # 40x40 box centred at (2, 2)
    d = detect.decode(heat, scale, offset, lms, threshold=0.5, valid_hw=(12, 14))
    np.testing.assert_allclose(d.boxes[0], [0, 0, 14, 12])


def test_iou_matrix_by_hand() -> None:
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[5, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    np.testing.assert_allclose(detect.iou_matrix(a, b), [[50 / 150, 1.0, 0.0]])


def test_nms_keeps_best_and_distinct() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.8, 0.9, 0.7, 0.9], np.float32)
    # IoU(1, 0) = 81/119 = 0.68 -> suppressed at 0.3; 3 ties 1 on score, lower index first
    keep = detect.nms(boxes, scores, 0.3)
    assert keep.tolist() == [1, 2]
    # with a threshold above their overlap both survive
    assert detect.nms(boxes[:2], scores[:2], 0.7).tolist() == [1, 0]
    assert detect.nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.3).tolist() == []


def test_input_size_never_upscales() -> None:
    assert detect.input_size(640, 480, 1280) == (640, 480, 1.0)
    w, h, s = detect.input_size(4000, 3000, 1280)
    assert (w, h) == (1280, 960) and s == pytest.approx(0.32)
    with pytest.raises(ValueError):
        detect.input_size(0, 10, 1280)


def test_blob_pads_to_multiple_of_32() -> None:
    rgb = np.full((33, 65, 3), 7, np.uint8)
    blob = detect.to_blob(rgb)
    assert blob.shape == (1, 3, 64, 96) and blob.dtype == np.float32
    assert blob[0, :, :33, :65].min() == 7 and blob[0, :, 33:, :].max() == 0 and blob[0, :, :, 65:].max() == 0


def test_plan_passes_tiles_only_large_images() -> None:
    assert len(detect.plan_passes(1024, 768, 1280, 1280)) == 1
    assert len(detect.plan_passes(4000, 3000, 1280, None)) == 1
    passes = detect.plan_passes(6000, 4000, 1280, 1280)
    glob, tiles = passes[0], passes[1:]
    assert (glob.w, glob.h) == (6000, 4000) and glob.scale == pytest.approx(1280 / 6000)
    assert tiles, "a 24 MP photo gets a tiled second pass"
    covered = np.zeros((4000, 6000), bool)
    for t in tiles:
        assert t.scale == pytest.approx(2560 / 6000)
        assert max(t.w, t.h) * t.scale <= 1280 + 1
        covered[t.y:t.y + t.h, t.x:t.x + t.w] = True
    assert covered.all()


def test_transformed_maps_back_to_image_frame() -> None:
    d = detect.Detections(np.array([[10, 20, 30, 40]], np.float32), np.array([0.9], np.float32),
                          np.full((1, 5, 2), 10, np.float32))
    t = d.transformed(0.5, 100, 200)
    np.testing.assert_allclose(t.boxes[0], [120, 240, 160, 280])
    np.testing.assert_allclose(t.landmarks[0, 0], [120, 220])


def test_similarity_transform_recovers_known_transform() -> None:
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    ang, sc, t = 0.3, 1.7, np.array([5.0, -3.0])
    rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    dst = src @ (sc * rot).T + t
    m = align.similarity_transform(src, dst)
    np.testing.assert_allclose(m[:, :2], sc * rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], t, atol=1e-9)


def test_similarity_transform_refuses_reflection() -> None:
    src = np.random.default_rng(1).uniform(0, 10, (5, 2))
    m = align.similarity_transform(src, src * [-1, 1])  # the mirror image: best proper similarity
    assert np.linalg.det(m[:, :2]) >= 0


def test_align_puts_landmarks_on_template() -> None:
    img = np.zeros((200, 200, 3), np.uint8)
    pts = align.chip_points(64) * 2.5 + [20, 30]  # a face 2.5x the chip, shifted
    for x, y in pts:
        img[int(round(y)) - 3:int(round(y)) + 4, int(round(x)) - 3:int(round(x)) + 4] = 255
    np.testing.assert_allclose(align.chip_matrices(pts[None], 64)[0][:, :2], np.eye(2) / 2.5, atol=1e-9)
    chips = align.align_faces(img, pts[None], 64)
    assert chips.shape == (1, 64, 64, 3)
    for x, y in align.chip_points(64):
        assert chips[0, int(round(y)), int(round(x))].min() > 100, "each landmark lands on its template point"
    assert chips[0].mean() < 40, "and little else is bright"


def test_loose_crop_is_square_grown_by_half_longer_side() -> None:
    img = np.zeros((300, 300, 3), np.uint8)
    img[100:200, 125:175] = 200  # the 50x100 "face" box
    crops = align.loose_crops(img, np.array([[125, 100, 175, 200]], float), 20)
    # square of side 2 * 100 centred on (150, 150): x 50..250, y 50..250 -> box occupies the middle
    c = crops[0]
    assert c.shape == (20, 20, 3)
    assert c[10, 10].max() == 200 and c[1, 1].max() == 0 and c[10, 1].max() == 0


def test_normalize_is_rgb_nchw_with_means_and_scale() -> None:
    chip = np.zeros((1, 2, 2, 3), np.uint8)
    chip[..., 0], chip[..., 1], chip[..., 2] = 10, 20, 30  # B, G, R
    x = classify.normalize(chip, (1.0, 2.0, 3.0), 0.5)
    assert x.shape == (1, 3, 2, 2) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 0, 0], [(30 - 1) * 0.5, (20 - 2) * 0.5, (10 - 3) * 0.5])
    np.testing.assert_allclose(classify.normalize(chip, None, 1 / 255)[0, :, 1, 1], [30 / 255, 20 / 255, 10 / 255], rtol=1e-6)


@pytest.mark.parametrize(("p", "label"), [(0.0, "female"), (0.4, "female"), (0.40001, "uncertain"), (0.5, "uncertain"),
                                          (0.59999, "uncertain"), (0.6, "male"), (1.0, "male")])
def test_decide_band_edges(p: float, label: str) -> None:
    assert classify.decide(np.array([p]), 0.5, 0.1) == [label]


def test_decide_without_band() -> None:
    assert classify.decide(np.array([0.49, 0.5, 0.7]), 0.5, 0.0) == ["female", "male", "male"]
    assert classify.decide(np.array([0.69, 0.71]), 0.7, 0.0) == ["female", "male"]


def test_age_statistics_by_hand() -> None:
    p = np.zeros((2, 81))
    p[0, 30] = 1.0
    p[1, 20], p[1, 40] = 0.5, 0.5
    mean, std = classify.age_statistics(p)
    np.testing.assert_allclose(mean, [30, 30])
    np.testing.assert_allclose(std, [0, 10])
    first = np.zeros((1, 81))
    first[0, 0] = 1
    assert classify.age_statistics(first)[0][0] == pytest.approx(0.25)


def test_check_probabilities_rejects_bad_output() -> None:
    from daemon.pipeline.sessions import ModelOutputError, check_probabilities

    good = np.array([[0.2, 0.8]], np.float32)
    assert check_probabilities(good, 1, 2, "t", rows_sum_to_one=True).shape == (1, 2)
    for bad, rows in [(np.array([[0.2, 0.9]]), 1), (np.array([[np.nan, 1.0]]), 1), (np.array([[1.5, -0.5]]), 1), (good, 2)]:
        with pytest.raises(ModelOutputError):
            check_probabilities(bad, rows, 2, "t", rows_sum_to_one=True)
