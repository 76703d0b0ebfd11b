"""dlib's own face descriptors, as the reference for ``daemon/dlibnet.py``'s ONNX conversion.

Runs INSIDE a throw-away virtual environment that has dlib (it needs ``dlib-bin``, which the
project does not depend on); it imports only ``dlib``, ``numpy``, ``PIL`` and, for ``--lfw``,
``onnxruntime``. Nothing in the product imports it::

    python3 -m venv /tmp/dlibenv && /tmp/dlibenv/bin/pip install dlib-bin numpy pillow onnxruntime
    /tmp/dlibenv/bin/python benchmarks/dlib_reference.py fixture     # -> tests/fixtures/dlib_face_reference.json
    /tmp/dlibenv/bin/python benchmarks/dlib_reference.py lfw --limit 50   # dev check, prints max |diff|

``fixture``: computes dlib's descriptors for the synthetic chips of :func:`reference_chips` with
``face_recognition_model_v1(dat).compute_face_descriptor(chip)`` (the overload for an aligned
150x150 chip) and writes them with the chips' sha256, so that ``tests/test_dlibnet.py``, which
carries the same recipe, can prove that it regenerated the very same pixels.

``lfw``: on ``../shared/data/dev/lfw`` (read in place; nothing is written) finds each face with
dlib's HOG detector (whole image when none), takes dlib's 5-point landmarks
(``shape_predictor_5_face_landmarks.dat``, from the same ``face_recognition_models`` sdist) and
``get_face_chip(img, shape, size=150, padding=0.25)``, and compares dlib's descriptor of that
chip (also the one-call ``compute_face_descriptor(img, shape)``) with the ONNX graph on the same
chip, normalised as the manifest says.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
MEANS = np.array([122.782, 117.001, 104.298], np.float32)


def _ellipse(h: int, w: int, cy: int, cx: int, ry: int, rx: int) -> np.ndarray:
    """Integer-exact filled ellipse mask (no floating point: identical on every machine)."""
    y, x = np.mgrid[:h, :w].astype(np.int64)
    return (x - cx) ** 2 * ry * ry + (y - cy) ** 2 * rx * rx <= rx * rx * ry * ry


def _face(skin: tuple[int, int, int], hair: tuple[int, int, int], dx: int, dy: int) -> np.ndarray:
    """A cartoon frontal face placed roughly where dlib's 150px/0.25-padding chip puts one."""
    s = 150
    y, x = np.mgrid[:s, :s].astype(np.int64)
    img = np.stack([60 + x // 3, 70 + y // 3, 90 + (x + y) // 6], -1)  # background ramp
    def paint(mask: np.ndarray, rgb: tuple[int, int, int]) -> None:
        img[mask] = rgb
    paint(_ellipse(s, s, 70 + dy, 75 + dx, 62, 50), hair)
    face = _ellipse(s, s, 82 + dy, 75 + dx, 56, 44)
    paint(face, skin)
    shade = (np.abs(x - 75 - dx) // 6).clip(0, 12)  # darker towards the cheeks
    img[face] -= np.stack([shade, shade, shade], -1)[face]
    for ex in (57, 93):
        paint(_ellipse(s, s, 68 + dy, ex + dx, 5, 10), (235, 235, 230))
        paint(_ellipse(s, s, 68 + dy, ex + dx, 4, 4), (50, 35, 25))
        paint(_ellipse(s, s, 57 + dy, ex + dx, 2, 11), tuple(c // 2 for c in hair))
    paint(_ellipse(s, s, 92 + dy, 75 + dx, 10, 4), tuple(max(c - 35, 0) for c in skin))
    paint(_ellipse(s, s, 112 + dy, 75 + dx, 5, 16), (170, 60, 60))
    return img.clip(0, 255).astype(np.uint8)


def reference_chips() -> list[tuple[str, np.ndarray]]:
    """Eight deterministic 150x150 RGB uint8 chips: noise, smooth fields, patterns, cartoon faces."""
    s = 150
    y, x = np.mgrid[:s, :s].astype(np.int64)
    rng = np.random.default_rng(20240601)
    out = [("uniform-noise", rng.integers(0, 256, (s, s, 3), dtype=np.uint8)),
           ("grey-noise", (128 + rng.integers(-40, 41, (s, s, 3))).astype(np.uint8))]
    out.append(("gradients", np.stack([x * 255 // 149, y * 255 // 149, (x + y) * 255 // 298], -1)
                .astype(np.uint8)))
    blobs = np.full((s, s, 3), 40, np.int64)
    for cy, cx, r, rgb in ((40, 50, 35, (200, 30, 30)), (100, 60, 45, (30, 180, 60)),
                           (75, 115, 30, (40, 60, 220)), (120, 120, 25, (220, 200, 40))):
        cone = np.maximum(0, r * r - (x - cx) ** 2 - (y - cy) ** 2)
        blobs += np.stack([cone * c // (r * r) for c in rgb], -1)
    out.append(("blobs", blobs.clip(0, 255).astype(np.uint8)))
    checker = ((x // 10 + y // 10) % 2) * 200 + 25
    out.append(("checker-stripes", np.stack([checker, (x % 7) * 36, (y % 13) * 19], -1).astype(np.uint8)))
    rings = ((x - 75) ** 2 + (y - 75) ** 2) // 60 % 2 * 180 + 40
    out.append(("rings", np.stack([rings, 255 - rings, (x * y) % 256], -1).astype(np.uint8)))
    out.append(("cartoon-face-light", _face((225, 185, 160), (70, 50, 30), 0, 0)))
    out.append(("cartoon-face-dark", _face((140, 95, 70), (25, 20, 20), 4, -3)))
    return out


def chips_sha256(chips: list[tuple[str, np.ndarray]]) -> str:
    h = hashlib.sha256()
    for _, chip in chips:
        h.update(np.ascontiguousarray(chip, np.uint8).tobytes())
    return h.hexdigest()


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fixture(args: argparse.Namespace) -> int:
    import dlib

    dat = Path(args.model)
    rec = dlib.face_recognition_model_v1(str(dat))
    chips = reference_chips()
    descriptors = [[float(v) for v in rec.compute_face_descriptor(chip)] for _, chip in chips]
    doc = {
        "about": "dlib's own descriptors of the synthetic chips regenerated by tests/test_dlibnet.py "
                 "(reference_chips); made by benchmarks/dlib_reference.py in a throw-away venv",
        "command": "/tmp/dlibenv/bin/python benchmarks/dlib_reference.py fixture",
        "call": "dlib.face_recognition_model_v1(dat).compute_face_descriptor(chip)  # aligned 150x150 RGB uint8",
        "dlib_version": dlib.__version__,
        "dlib_use_cuda": bool(dlib.DLIB_USE_CUDA),
        "model": dat.name, "model_sha256": _sha256(dat),
        "chips_sha256": chips_sha256(chips),
        "chips": [name for name, _ in chips],
        "descriptors": descriptors,
    }
    head = json.dumps({k: v for k, v in doc.items() if k != "descriptors"}, indent=1)[:-2]
    rows = ",\n".join("  " + json.dumps(row) for row in descriptors)
    Path(args.out).write_text(f'{head},\n "descriptors": [\n{rows}\n ]\n}}\n')
    print(f"wrote {args.out}: {len(chips)} descriptors, dlib {dlib.__version__}")
    return 0


def lfw(args: argparse.Namespace) -> int:
    import dlib
    import onnxruntime as ort
    from PIL import Image

    folder = Path(args.data)
    rows = list(csv.DictReader((folder / "labels.csv").open()))[: args.limit]
    detector = dlib.get_frontal_face_detector()
    sp = dlib.shape_predictor(str(Path(args.shape_model)))
    rec = dlib.face_recognition_model_v1(str(Path(args.model)))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(Path(args.onnx)), so, providers=["CPUExecutionProvider"])
    worst_chip = worst_full = 0.0
    fallbacks = 0
    saved: dict[str, np.ndarray] = {}
    for row in rows:
        img = np.asarray(Image.open(folder / "images" / row["file"]).convert("RGB"))
        dets = detector(img, 1)
        if len(dets):
            rect = max(dets, key=lambda r: r.area())
        else:
            fallbacks += 1
            rect = dlib.rectangle(0, 0, img.shape[1] - 1, img.shape[0] - 1)
        shape = sp(img, rect)
        chip = dlib.get_face_chip(img, shape, size=150, padding=0.25)
        ref_chip = np.array(rec.compute_face_descriptor(chip))
        ref_full = np.array(rec.compute_face_descriptor(img, shape))
        x = ((chip.astype(np.float32) - MEANS) / 256).transpose(2, 0, 1)[None]
        got = sess.run(["descriptor"], {"chips": x})[0][0]
        saved[row["file"]] = ref_full
        worst_chip = max(worst_chip, float(np.abs(got - ref_chip).max()))
        worst_full = max(worst_full, float(np.abs(got - ref_full).max()))
    if args.save:
        np.savez(args.save, files=np.array(list(saved)), descriptors=np.stack(list(saved.values())),
                 fallback=np.array([fallbacks]))
    print(json.dumps({"images": len(rows), "no_detection_whole_image": fallbacks,
                      "max_abs_diff_vs_dlib_on_chip": worst_chip,
                      "max_abs_diff_vs_dlib_img_plus_shape": worst_full}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fixture")
    f.add_argument("--model", default=MODELS / "dlib_face_recognition_resnet_model_v1.dat")
    f.add_argument("--out", default=REPO / "tests" / "fixtures" / "dlib_face_reference.json")
    f.set_defaults(func=fixture)
    g = sub.add_parser("lfw")
    g.add_argument("--data", default=REPO.parent / "shared" / "data" / "dev" / "lfw")
    g.add_argument("--limit", type=int, default=50)
    g.add_argument("--model", default=MODELS / "dlib_face_recognition_resnet_model_v1.dat")
    g.add_argument("--shape-model", required=True,
                   help="shape_predictor_5_face_landmarks.dat (from the face_recognition_models sdist)")
    g.add_argument("--onnx", default=MODELS / "dlib-face-v1.onnx")
    g.add_argument("--save", help="write dlib's descriptors (dlib's HOG face + 5-point landmarks) to this .npz, "
                                  "for benchmarks/identity_lfw.py --dlib")
    g.set_defaults(func=lfw)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rc = args.func(args)
    print(f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
