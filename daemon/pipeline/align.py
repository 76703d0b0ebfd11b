"""Five-point face alignment to the classifiers' chip geometry.

The gender and age models were trained on dlib chips (``get_face_chip_details(shape, size,
padding=0.2)``). CenterFace's five points (eye centres, nose tip, mouth corners) are not dlib's
(eye corners, nose base), so :data:`TEMPLATE` holds where CenterFace's points fall in dlib's
*unpadded* unit chip, fitted on ``../shared/data/train/lfw`` by
``benchmarks/alignment_agreement.py fit`` (each face's CenterFace points mapped into the
reference chip through dlib's own similarity transform, then the median taken). A chip of
``size`` pixels with ``padding`` p places unit point t at ``(t + p) / (1 + 2p) * size`` (pixel
indices, centres at integers). dlib itself maps to ``size - 1``; the template is fitted for the
32-pixel gender chip in this convention, so it is exact there and off by under one pixel on the
64-pixel age chip (measured: 0.05 years of age agreement).
"""

from __future__ import annotations

import cv2
import numpy as np

# CenterFace points in dlib's unpadded unit chip frame: left eye, right eye, nose tip,
# left mouth corner, right mouth corner (fitted on train/lfw; see the module docstring).
TEMPLATE = np.array(
    [
        [0.2145, 0.2109],
        [0.7478, 0.2021],
        [0.4756, 0.5238],
        [0.2476, 0.7688],
        [0.6959, 0.7604],
    ],
    dtype=np.float64,
)
PADDING = 0.2


def set_threads(n: int) -> None:
    """OpenCV's own thread pool: one per worker process (parallelism comes from processes)."""
    cv2.setNumThreads(n)


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize to ``width`` x ``height``: area averaging when shrinking by 2 or more, bilinear
    otherwise. Bilinear is how CenterFace's authors feed it; below a factor of 2 it drops no
    pixel, and OpenCV's area averaging at a fractional ratio costs 8x more (19 ms against 2.5 ms
    from a 2000x1500 DCT-reduced 12 MP decode to 1280x960: 6% of such a photo's analysis)."""
    if image.shape[1] == width and image.shape[0] == height:
        return image
    area = width * 2 <= image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if area else cv2.INTER_LINEAR)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping
    ``src`` (K, 2) onto ``dst`` (K, 2), as a 2x3 matrix (Umeyama 1991)."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s**2).sum() / len(src)
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    scale = (sig * np.diag(sign)).sum() / var_s if var_s > 0 else 1.0
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def chip_points(size: int, template: np.ndarray | None = None, padding: float = PADDING) -> np.ndarray:
    """Where the template's points lie in a ``size`` x ``size`` chip, in pixel indices."""
    template = TEMPLATE if template is None else template
    return (template + padding) / (1 + 2 * padding) * size


def chip_matrices(landmarks: np.ndarray, size: int, template: np.ndarray | None = None, padding: float = PADDING) -> np.ndarray:
    """Image -> chip 2x3 matrices for landmarks (N, 5, 2); returns (N, 2, 3)."""
    dst = chip_points(size, template, padding)
    return np.array([similarity_transform(lm, dst) for lm in landmarks]).reshape(-1, 2, 3)


def align_faces(
    image: np.ndarray,
    landmarks: np.ndarray,
    size: int,
    *,
    template: np.ndarray | None = None,
    padding: float = PADDING,
) -> np.ndarray:
    """Cut one aligned ``size`` x ``size`` chip per face (bilinear sampling, black outside the
    image). ``landmarks`` (N, 5, 2) are in ``image``'s pixel frame. Returns (N, size, size, C)."""
    chans = image.shape[2] if image.ndim == 3 else 1
    out = np.zeros((len(landmarks), size, size, chans), image.dtype)
    for i, m in enumerate(chip_matrices(landmarks, size, template, padding)):
        chip = cv2.warpAffine(
            image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )
        out[i] = chip.reshape(size, size, chans)
    return out


def loose_crops(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """The research project's crop: a square around each box grown by half its longer side on
    each side, clipped to the image, resized to ``size`` (used by the seed's EfficientNet)."""
    h, w = image.shape[:2]
    out = np.zeros((len(boxes), size, size, image.shape[2]), image.dtype)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        side = max(x2 - x1, y2 - y1)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        half = side / 2 + side / 2
        ax1, ay1 = int(max(0, np.floor(cx - half))), int(max(0, np.floor(cy - half)))
        ax2, ay2 = int(min(w, np.ceil(cx + half))), int(min(h, np.ceil(cy + half)))
        if ax2 <= ax1 or ay2 <= ay1:
            continue
        out[i] = cv2.resize(image[ay1:ay2, ax1:ax2], (size, size), interpolation=cv2.INTER_AREA)
    return out
