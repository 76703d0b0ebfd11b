"""Milliseconds per face on one core for each face model, measured side by side in one run.

    .venv/bin/python benchmarks/face_cost.py [--faces 64] [--reps 5]

Chips are dev LFW images resized to each model's input (or random pixels when the data is
absent); each model runs in one batch of ``--faces`` chips on a single-threaded
onnxruntime session (the product's per-worker setting); the figure is the median over ``--reps``
batches divided by the batch size. The backbone's row is its whole network (descriptor and the
tensor a head reads, one pass); a head's row is the head alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from daemon import models  # noqa: E402
from daemon.pipeline import classify  # noqa: E402
from daemon.pipeline.sessions import Session  # noqa: E402


def chips(size: int, n: int) -> np.ndarray:
    """(n, size, size, 3) BGR chips: dev LFW crops resized (the cost does not depend on the
    alignment), else noise."""
    import cv2

    folder = REPO.parent / "shared" / "data" / "dev" / "lfw" / "images"
    files = sorted(folder.glob("*.jpg"))[:n] if folder.is_dir() else []
    if len(files) < n:
        return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return np.stack([cv2.resize(cv2.imread(str(f)), (size, size), interpolation=cv2.INTER_AREA) for f in files])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faces", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args(argv)
    mdir = models.default_models_dir()
    manifest = models.load_manifest(mdir)
    rows = {}
    feats: dict[str, np.ndarray] = {}
    order = sorted(manifest.models.values(), key=lambda s: (s.backbone is not None, s.role != "backbone"))
    for spec in order:
        if spec.role == "detector":
            continue
        path = models.model_file(mdir, manifest, spec.name)
        outs = [o.name for o in spec.outputs]
        sess = Session(path, inputs={spec.input.name: 4}, outputs=outs, threads=1, name=spec.name)
        if spec.backbone:
            x = feats[spec.backbone_tensor or ""]
        else:
            size = int(spec.input.shape[-1])
            x = classify.normalize(chips(size, a.faces), spec.normalization.means, spec.normalization.scale)
        res = sess.run({spec.input.name: x})
        if spec.role == "backbone":
            feats.update(zip(outs, res, strict=True))
        times = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            sess.run({spec.input.name: x})
            times.append((time.perf_counter() - t0) / a.faces * 1000)
        rows[spec.name] = {"role": spec.role, "ms_per_face": round(statistics.median(times), 2),
                           "input": list(x.shape[1:])}
        print(f"{spec.name:16s} {spec.role:9s} {rows[spec.name]['ms_per_face']:7.2f} ms/face  input {rows[spec.name]['input']}",
              flush=True)
    print(json.dumps({"faces": a.faces, "reps": a.reps, "threads": 1, "models": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
