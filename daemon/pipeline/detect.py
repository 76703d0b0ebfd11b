"""CenterFace pre- and post-processing, pure numpy.

Geometry convention (used everywhere in the project): boxes are ``(x1, y1, x2, y2)`` floats in
pixels of the decoded, *upright* (EXIF orientation applied), *full-resolution* image; ``(x1, y1)``
is the top-left corner and ``(x2, y2)`` the bottom-right corner of a continuous rectangle, so the
width is ``x2 - x1``. Landmarks are ``(x, y)`` in the same frame, ordered left eye, right eye,
nose, left mouth corner, right mouth corner (left/right as seen in the image).

Input policy: the detector sees the image scaled so that its longer side is at most
``max_side`` (never upscaled), zero-padded on the right and bottom to multiples of 32. Images
much larger than ``max_side`` may additionally be covered by overlapping tiles at a finer scale
(``tile_side``) so that small faces in large photos are not lost; see :func:`plan_passes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STRIDE = 4
ALIGN = 32


@dataclass(frozen=True)
class Detections:
    """Faces found in one image: ``boxes`` (N, 4), ``scores`` (N,), ``landmarks`` (N, 5, 2)."""

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray

    @staticmethod
    def empty() -> Detections:
        return Detections(
            np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32)
        )

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def take(self, keep: np.ndarray) -> Detections:
        return Detections(self.boxes[keep], self.scores[keep], self.landmarks[keep])

    def transformed(self, scale: float, dx: float = 0.0, dy: float = 0.0) -> Detections:
        """Map detector coordinates to image coordinates: ``p / scale + (dx, dy)``."""
        offset = np.array([dx, dy], np.float32)
        boxes = self.boxes / scale + np.tile(offset, 2)
        return Detections(boxes.astype(np.float32), self.scores, (self.landmarks / scale + offset).astype(np.float32))

    @staticmethod
    def concat(parts: list[Detections]) -> Detections:
        if not parts:
            return Detections.empty()
        return Detections(
            np.concatenate([p.boxes for p in parts]),
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.landmarks for p in parts]),
        )


def input_size(width: int, height: int, max_side: int) -> tuple[int, int, float]:
    """Scaled size ``(w, h, scale)`` for the detector: longer side <= max_side, no upscaling."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    scale = min(1.0, max_side / max(width, height))
    w = max(1, int(round(width * scale)))
    h = max(1, int(round(height * scale)))
    return w, h, scale


def to_blob(rgb: np.ndarray) -> np.ndarray:
    """An HxWx3 uint8 RGB image -> a 1x3xH'xW' float32 tensor, zero-padded to multiples of 32."""
    h, w = rgb.shape[:2]
    hp, wp = -(-h // ALIGN) * ALIGN, -(-w // ALIGN) * ALIGN
    blob = np.zeros((1, 3, hp, wp), np.float32)
    blob[0, :, :h, :w] = rgb.transpose(2, 0, 1)
    return blob


def decode(
    heatmap: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    landmarks: np.ndarray,
    threshold: float,
    valid_hw: tuple[int, int] | None = None,
) -> Detections:
    """Turn CenterFace's raw outputs for one image into detections (before NMS).

    Shapes: heatmap (1,1,h,w), scale (1,2,h,w), offset (1,2,h,w), landmarks (1,10,h,w); all
    pairs ordered (y, x). ``valid_hw`` clips boxes to the unpadded input size.
    """
    heat = heatmap[0, 0]
    ys, xs = np.nonzero(heat > threshold)
    if ys.size == 0:
        return Detections.empty()
    scores = heat[ys, xs].astype(np.float32)
    bh = np.exp(scale[0, 0, ys, xs]) * STRIDE
    bw = np.exp(scale[0, 1, ys, xs]) * STRIDE
    cy = (ys + offset[0, 0, ys, xs] + 0.5) * STRIDE
    cx = (xs + offset[0, 1, ys, xs] + 0.5) * STRIDE
    x1, y1 = cx - bw / 2, cy - bh / 2
    lm = landmarks[0][:, ys, xs].T.reshape(-1, 5, 2)  # (N, 5, [y, x]) relative to the box
    points = np.stack([lm[:, :, 1] * bw[:, None] + x1[:, None], lm[:, :, 0] * bh[:, None] + y1[:, None]], axis=2)
    boxes = np.stack([x1, y1, x1 + bw, y1 + bh], axis=1)
    if valid_hw is not None:
        h, w = valid_hw
        boxes = np.clip(boxes, 0, [w, h, w, h])
    return Detections(boxes.astype(np.float32), scores, points.astype(np.float32))


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes ``a`` (N,4) and ``b`` (M,4) -> (N, M)."""
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, highest score first.

    A box is suppressed when its IoU with a kept, higher-scoring box is >= ``iou_threshold``.
    Ties in score keep the lower index first (stable order).
    """
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    suppressed = np.zeros(len(order), bool)
    ious = iou_matrix(boxes, boxes) if len(order) else np.zeros((0, 0))
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        suppressed |= ious[i] >= iou_threshold
    return np.array(keep, dtype=np.int64)


@dataclass(frozen=True)
class Pass:
    """One detector pass: a crop ``(x, y, w, h)`` of the image, resized by ``scale``."""

    x: int
    y: int
    w: int
    h: int
    scale: float


def plan_passes(width: int, height: int, max_side: int, tile_side: int | None) -> list[Pass]:
    """The detector passes for an image of ``width`` x ``height``.

    Always one global pass with the longer side capped at ``max_side``. When ``tile_side`` is set
    and the image's longer side exceeds twice ``max_side``, a second set of overlapping tiles
    covers the image at the scale where the longer side would be ``2 * max_side``, each tile at
    most ``tile_side`` pixels on its longer side after scaling, so faces half the size the global
    pass can see are found too. Tiles overlap by a quarter of a tile.
    """
    _, _, s = input_size(width, height, max_side)
    passes = [Pass(0, 0, width, height, s)]
    if tile_side is None or max(width, height) <= 2 * max_side:
        return passes
    fine = min(1.0, 2 * max_side / max(width, height))
    tile = int(tile_side / fine)  # tile size in image pixels
    step = max(1, int(tile * 0.75))
    for y in _starts(height, tile, step):
        for x in _starts(width, tile, step):
            passes.append(Pass(x, y, min(tile, width - x), min(tile, height - y), fine))
    return passes


def _starts(length: int, tile: int, step: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return starts
