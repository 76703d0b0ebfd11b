"""Drawing faces onto images and encoding the result (annotated copies, face crops)."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

COLOURS = {"male": (255, 128, 0), "female": (60, 60, 255), "uncertain": (0, 200, 255)}  # BGR


def draw_faces(bgr: np.ndarray, faces: Sequence[dict]) -> np.ndarray:
    """A copy of ``bgr`` with each face's box, landmarks and ``gender p_male age`` label.
    Each face is a mapping with ``box`` (x1, y1, x2, y2), ``gender``, ``p_male``, ``score``,
    optional ``age`` and ``landmarks``, in ``bgr``'s pixel frame."""
    out = bgr.copy()
    h, w = out.shape[:2]
    thick = max(1, round(max(h, w) / 800))
    font = max(0.4, max(h, w) / 2000)
    for i, f in enumerate(faces):
        x1, y1, x2, y2 = (int(round(v)) for v in f["box"])
        colour = COLOURS.get(f.get("gender", ""), (200, 200, 200))
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thick)
        for x, y in f.get("landmarks") or ():
            cv2.circle(out, (int(round(x)), int(round(y))), thick + 1, colour, -1)
        age = f.get("age")
        label = f"{i} {f.get('gender', '?')} {f.get('p_male', 0):.2f}" + (f" ~{age:.0f}y" if age is not None else "") + f" [{f.get('score', 0):.2f}]"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font, thick)
        ty = y1 - 4 if y1 - th - 6 > 0 else min(h - 2, y2 + th + 4)
        cv2.rectangle(out, (x1, ty - th - 3), (x1 + tw + 2, ty + base - 1), colour, -1)
        cv2.putText(out, label, (x1 + 1, ty - 1), cv2.FONT_HERSHEY_SIMPLEX, font, (0, 0, 0), thick, cv2.LINE_AA)
    return out


def crop(bgr: np.ndarray, box: Sequence[float], margin: float = 0.3, min_side: int = 96) -> np.ndarray:
    """The face box grown by ``margin`` of its size on each side, clipped, upscaled to at least
    ``min_side`` pixels on its shorter side for viewing."""
    h, w = bgr.shape[:2]
    x1, y1, x2, y2 = box
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    a, b = int(max(0, x1 - mx)), int(max(0, y1 - my))
    c, d = int(min(w, x2 + mx)), int(min(h, y2 + my))
    out = bgr[b:max(d, b + 1), a:max(c, a + 1)]
    short = min(out.shape[:2])
    if 0 < short < min_side:
        f = min_side / short
        out = cv2.resize(out, (round(out.shape[1] * f), round(out.shape[0] * f)), interpolation=cv2.INTER_CUBIC)
    return out


def encode(bgr: np.ndarray, ext: str = ".jpg", quality: int = 92) -> bytes:
    """Encode to JPEG (default) or PNG bytes."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext.lower() in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, bgr, params)
    if not ok:
        raise ValueError(f"could not encode the image as {ext}")
    return buf.tobytes()
