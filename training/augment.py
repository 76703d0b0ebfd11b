"""Augmentation for evidence photos, on uint8 BGR chips with a margin (numpy + OpenCV only).

Every random choice comes from the ``numpy.random.Generator`` passed in, so a run with the same
seed sees the same images. :func:`augment` takes a ``(size + 2 margin)``-pixel canvas cut by
:func:`training.extract.padded_chips` and returns a ``size``-pixel chip: small affine jitter
around the inference chip, horizontal flip, low resolution (down- then up-sampling), blur, JPEG
recompression, brightness / contrast / gamma / grey, sensor noise and occlusion patches.
"""

from __future__ import annotations

import cv2
import numpy as np

cv2.setNumThreads(1)


def centre(canvas: np.ndarray, size: int) -> np.ndarray:
    """The inference chip inside a canvas (no augmentation)."""
    m = (canvas.shape[0] - size) // 2
    return canvas[m : m + size, m : m + size]


def _affine(canvas: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    full = canvas.shape[0]
    m = (full - size) / 2
    angle = rng.uniform(-12, 12)
    scale = rng.uniform(0.9, 1.1)
    tx, ty = rng.uniform(-0.06, 0.06, 2) * size
    c = (full - 1) / 2
    a = cv2.getRotationMatrix2D((c, c), angle, scale)
    a[:, 2] += (tx - m, ty - m)  # then take the centre crop
    return cv2.warpAffine(canvas, a, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _low_res(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = img.shape[0]
    s = int(round(size * rng.uniform(0.2, 0.7)))
    small = cv2.resize(img, (s, s), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR if rng.random() < 0.7 else cv2.INTER_NEAREST)


def _blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.6:
        return cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.8))
    k = int(rng.integers(3, 8))  # motion blur along a random direction
    kern = np.zeros((k, k), np.float32)
    kern[k // 2] = 1.0 / k
    rot = cv2.getRotationMatrix2D(((k - 1) / 2, (k - 1) / 2), rng.uniform(0, 180), 1.0)
    kern = cv2.warpAffine(kern, rot, (k, k))
    kern /= max(kern.sum(), 1e-6)
    return cv2.filter2D(img, -1, kern)


def _jpeg(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(15, 75))])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR) if ok else img


def _photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = img.astype(np.float32) / 255.0
    if rng.random() < 0.1:
        x = np.repeat(x.mean(axis=2, keepdims=True), 3, axis=2)
    x = x ** rng.uniform(0.6, 1.6)
    x = (x - 0.5) * rng.uniform(0.6, 1.4) + 0.5 + rng.uniform(-0.2, 0.2)
    x = x * rng.uniform(0.9, 1.1, 3).astype(np.float32)  # colour cast
    return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = rng.normal(0, rng.uniform(3, 12), img.shape)
    return np.clip(img.astype(np.float32) + n, 0, 255).astype(np.uint8)


def _occlude(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = img.shape[0]
    out = img.copy()
    area = rng.uniform(0.06, 0.3) * size * size
    aspect = np.exp(rng.uniform(-0.8, 0.8))
    w = int(np.clip(np.sqrt(area * aspect), 4, size))
    h = int(np.clip(np.sqrt(area / aspect), 4, size))
    x = int(rng.integers(0, size - w + 1))
    y = int(rng.integers(0, size - h + 1))
    kind = rng.random()
    if kind < 0.4:
        out[y : y + h, x : x + w] = rng.integers(0, 256, 3, dtype=np.uint8)  # a flat object
    elif kind < 0.7:
        out[y : y + h, x : x + w] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # clutter
    else:
        out[y : y + h, x : x + w] = 0  # dark (hand, shadow, frame edge)
    return out


def augment(canvas: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """One training chip from a canvas."""
    img = _affine(canvas, size, rng) if rng.random() < 0.8 else centre(canvas, size).copy()
    if rng.random() < 0.5:
        img = img[:, ::-1].copy()
    if rng.random() < 0.3:
        img = _low_res(img, rng)
    if rng.random() < 0.25:
        img = _blur(img, rng)
    if rng.random() < 0.6:
        img = _photometric(img, rng)
    if rng.random() < 0.15:
        img = _noise(img, rng)
    if rng.random() < 0.25:
        img = _occlude(img, rng)
    if rng.random() < 0.35:
        img = _jpeg(img, rng)
    return np.ascontiguousarray(img)
