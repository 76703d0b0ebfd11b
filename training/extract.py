"""Face chips for training, cut by the product's own detector and alignment.

For every labelled image of ``../shared/data/train/{wider,utkface,lfw}``:

1. read and decode it with :mod:`daemon.pipeline.images` (as the service does);
2. detect faces with the product's CenterFace :class:`~daemon.pipeline.analyze.Detector`
   (default :class:`~daemon.config.DetectorConfig`);
3. pick the labelled face: WIDER crops carry the face box in crop pixels (``x1..y2``), so the
   detection with the highest IoU (>= ``--min-iou``) wins; UTKFace/LFW crops hold one centred
   face, so the detection whose box centre is nearest the image centre wins;
4. cut the chip with exactly :func:`daemon.pipeline.align.align_faces`'s transform at ``size``
   pixels and padding 0.2, on a canvas ``margin`` pixels larger on every side, so the centre
   ``size`` x ``size`` crop *is* the inference chip and training can jitter around it.

Two caches under ``var/train-cache/`` (gitignored; nothing is written next to the data): the
detections (``dets-*.npz``: landmarks, box width, score, labels; keyed by the detector settings,
the extractor version and a hash of the data: labels files, image names and sizes) and the chips
(``chips-*.npz``: uint8 BGR canvases plus the same columns; keyed also by the alignment template
and the chip geometry), so a new template re-cuts the chips in a minute without re-detecting.

    python -m training.extract --data ../shared/data/train        # prints the cache path
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np

from daemon.config import PipelineConfig
from daemon.pipeline import align, detect, images, reading

log = logging.getLogger("training.extract")

VERSION = 1
SOURCES = ("wider", "utkface", "lfw")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "train"
DEFAULT_CACHE = ROOT / "var" / "train-cache"
GENDERS = {"female": 0, "male": 1}


def _data_hash(data: Path, sources: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for src in sources:
        lab = data / src / "labels.csv"
        h.update(src.encode())
        h.update(lab.read_bytes())
        for row in _rows(lab):
            p = data / src / "images" / row["file"]
            h.update(f"{row['file']}:{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _rows(labels: Path) -> list[dict]:
    with open(labels, newline="") as fh:
        return list(csv.DictReader(fh))


def cache_key(data: Path, size: int, margin: int, min_iou: float, sources: tuple[str, ...] = SOURCES,
              padding: float = align.PADDING) -> str:
    """The cache key: template, chip geometry, detector settings, extractor version, data."""
    det = asdict(PipelineConfig().detector)
    spec = {
        "version": VERSION,
        "template": np.round(align.TEMPLATE, 6).tolist(),
        "padding": padding,
        "size": size,
        "margin": margin,
        "min_iou": min_iou,
        "detector": det,
        "sources": list(sources),
    }
    k = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return f"chips-s{size}m{margin}-{k}-{_data_hash(data, sources)}"


def padded_chips(bgr: np.ndarray, landmarks: np.ndarray, size: int, margin: int, padding: float = align.PADDING) -> np.ndarray:
    """align_faces' chips with ``margin`` extra pixels on each side: ``out[:, m:m+size, m:m+size]``
    equals ``align.align_faces(bgr, landmarks, size, padding=padding)`` exactly (same matrix,
    shifted output)."""
    full = size + 2 * margin
    out = np.zeros((len(landmarks), full, full, 3), np.uint8)
    for i, m in enumerate(align.chip_matrices(landmarks, size, padding=padding)):
        m = m.copy()
        m[:, 2] += margin
        out[i] = cv2.warpAffine(bgr, m, (full, full), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out


def _pick(src: str, dets: detect.Detections, row: dict, w: int, h: int, min_iou: float) -> tuple[int, float]:
    """Index of the labelled face among ``dets`` (or -1) and the match quality (IoU or centre
    distance in image widths)."""
    if not len(dets):
        return -1, 0.0
    if src == "wider":
        box = np.array([[float(row[k]) for k in ("x1", "y1", "x2", "y2")]], np.float32)
        iou = detect.iou_matrix(dets.boxes, box)[:, 0]
        i = int(np.argmax(iou))
        return (i, float(iou[i])) if iou[i] >= min_iou else (-1, float(iou[i]))
    centres = (dets.boxes[:, :2] + dets.boxes[:, 2:]) / 2
    d = np.hypot(centres[:, 0] - w / 2, centres[:, 1] - h / 2) / max(w, h)
    i = int(np.argmin(d))
    return (i, float(d[i])) if d[i] < 0.25 else (-1, float(d[i]))


def _det_key(data: Path, min_iou: float, sources: tuple[str, ...]) -> str:
    spec = {"version": VERSION, "min_iou": min_iou, "detector": asdict(PipelineConfig().detector), "sources": list(sources)}
    k = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return f"dets-{k}-{_data_hash(data, sources)}"


def _load_bgr(path: Path) -> np.ndarray:
    return images.decode(reading.read_file(path).data).bgr


def detect_faces(data: Path, out: Path, min_iou: float = 0.4, limit: int | None = None,
                 sources: tuple[str, ...] = SOURCES) -> Path:
    """Stage 1 (slow, independent of the alignment template): the labelled face's detection
    (box, score, five landmarks) for every usable row, cached as ``dets-*.npz``."""
    from daemon.pipeline.analyze import load_pipeline  # loads the models

    path = out / (_det_key(data, min_iou, sources) + (f"-limit{limit}" if limit else "") + ".npz")
    if path.exists():
        log.info("detections cached: %s", path)
        return path
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(PipelineConfig(), threads=1)
    cols: dict[str, list] = {k: [] for k in ("landmarks", "labels", "source", "age", "width", "score", "quality",
                                             "group", "names", "blur", "occlusion")}
    stats: dict[str, dict[str, int]] = {}
    t0 = time.perf_counter()
    for s_idx, src in enumerate(sources):
        rows = [r for r in _rows(data / src / "labels.csv") if r["gender"] in GENDERS]
        if limit:
            rows = rows[:limit]
        st = stats.setdefault(src, {"rows": len(rows), "kept": 0, "no_detection": 0, "no_match": 0, "unreadable": 0})
        for n, row in enumerate(rows):
            try:
                bgr = _load_bgr(data / src / "images" / row["file"])
            except images.ImageError:
                st["unreadable"] += 1
                continue
            dets = pipe.detector.detect(bgr)
            h, w = bgr.shape[:2]
            i, q = _pick(src, dets, row, w, h, min_iou)
            if i < 0:
                st["no_detection" if not len(dets) else "no_match"] += 1
                continue
            cols["landmarks"].append(dets.landmarks[i])
            cols["labels"].append(GENDERS[row["gender"]])
            cols["source"].append(s_idx)
            cols["age"].append(float(row["age"]) if row.get("age") else -1.0)
            cols["width"].append(float(dets.boxes[i, 2] - dets.boxes[i, 0]))
            cols["score"].append(float(dets.scores[i]))
            cols["quality"].append(q)
            # the group that must not straddle the fit/held-out split: the WIDER scene, the LFW
            # person, the UTKFace file
            cols["group"].append(f"{src}:{row.get('source_file') or row.get('person') or row['file']}")
            cols["names"].append(f"{src}/{row['file']}")
            cols["blur"].append(int(row.get("blur") or -1))
            cols["occlusion"].append(int(row.get("occlusion") or -1))
            st["kept"] += 1
            if (n + 1) % 1000 == 0:
                log.info("%s: %d/%d (%.0f s)", src, n + 1, len(rows), time.perf_counter() - t0)
    meta = {"stats": stats, "sources": list(sources), "min_iou": min_iou, "data": str(data),
            "seconds": round(time.perf_counter() - t0, 1)}
    arrays = {k: np.array(v) for k, v in cols.items()}
    arrays["landmarks"] = np.array(cols["landmarks"], np.float32).reshape(-1, 5, 2)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)
    tmp.replace(path)
    log.info("wrote %s: %s", path, json.dumps(stats))
    return path


def extract(data: Path, out: Path, size: int = 64, margin: int = 8, min_iou: float = 0.4,
            limit: int | None = None, sources: tuple[str, ...] = SOURCES, padding: float = align.PADDING) -> Path:
    """Cut and cache the chips; returns the ``.npz`` path (reused when it already exists).
    Stage 1 (:func:`detect_faces`) is cached on its own, so a new template only re-cuts."""
    key = cache_key(data, size, margin, min_iou, sources, padding) + (f"-limit{limit}" if limit else "")
    path = out / f"{key}.npz"
    if path.exists():
        log.info("cache hit: %s", path)
        return path
    dpath = detect_faces(data, out, min_iou, limit, sources)
    d = np.load(dpath)
    dmeta = json.loads(str(d["meta"]))
    t0 = time.perf_counter()
    chips = np.zeros((len(d["labels"]), size + 2 * margin, size + 2 * margin, 3), np.uint8)
    for k, (name, lm) in enumerate(zip(d["names"], d["landmarks"], strict=True)):
        src, file = str(name).split("/", 1)
        chips[k] = padded_chips(_load_bgr(data / src / "images" / file), lm[None], size, margin, padding)[0]
    meta = {"key": key, "size": size, "margin": margin, "padding": padding, "min_iou": min_iou, "sources": dmeta["sources"],
            "template": align.TEMPLATE.tolist(), "stats": dmeta["stats"], "detections": dpath.name,
            "seconds": {"detect": dmeta["seconds"], "cut": round(time.perf_counter() - t0, 1)}, "data": str(data)}
    tmp = path.with_suffix(".tmp.npz")
    rest = {k: d[k] for k in d.files if k not in ("meta",)}
    np.savez(tmp, chips=chips, meta=np.array(json.dumps(meta)), **rest)
    tmp.replace(path)
    log.info("wrote %s (%d chips)", path, len(chips))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--margin", type=int, default=8)
    ap.add_argument("--min-iou", type=float, default=0.4)
    ap.add_argument("--limit", type=int, default=None, help="first N rows per source (smoke tests)")
    ap.add_argument("--detect-only", action="store_true", help="stage 1 only (the detections, template-independent)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.detect_only:
        print(detect_faces(a.data.resolve(), a.cache, a.min_iou, a.limit))
    else:
        print(extract(a.data.resolve(), a.cache, a.size, a.margin, a.min_iou, a.limit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
