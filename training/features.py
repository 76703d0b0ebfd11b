"""Frozen-trunk features of every train face, for the gender branch on dlib's face backbone.

For each source of ``../shared/data/train`` the labelled faces found by the product's detector
(:func:`training.extract.detect_faces`, cached) are cut as the product cuts them for the backbone
(150 px, padding 0.25, :func:`daemon.pipeline.align.align_faces`'s transform, with a margin for
jitter) and run through the converted dlib network (``daemon.dlibnet``) once per *view*:

* view 0: the inference chip; view 1: the same chip mirrored;
* views 2..: :func:`training.augment.augment` (jitter, flip, low resolution, blur, JPEG,
  photometric, noise, occlusion), a different random draw per view (seeded);
* with ``--contexts 0.6 1.0``: wider-context chips (same transform, that padding instead of
  0.25: hair, ears, neck), ``CONTEXT_VIEWS`` per padding (the clean chip, then an augmented draw),
  ``level1`` only, for the ``ctx*`` candidates of :mod:`training.branch` (they did not beat the
  face chip alone: models/gender-dlib-v1.md), so off by default (they double the extraction time).

Stored per view: ``level2`` [128, 8, 8] and ``level1`` [256, 4, 4] (the trunk's outputs a gender
branch may read, float16)
and ``descriptor`` (dlib's 128-d vector); per face: labels, source, group (WIDER scene, LFW
person, UTKFace file, FairFace image), width, age, race, and ``p_v1`` (``gender-v1``'s p(male) on
its own 32 px chip, view 0) for the ensemble candidate. One ``feats-<source>-<key>.npz`` per
source under ``var/train-cache/`` (gitignored; the data stays where it is)::

    python -m training.features --sources wider lfw --views 3      # one process per core
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from daemon import dlibnet, models
from daemon.pipeline import classify
from daemon.pipeline.sessions import Session
from training import augment, extract

log = logging.getLogger("training.features")

SOURCES = ("wider", "utkface", "lfw", "fairface")
SIZE, PADDING, MARGIN = 150, 0.25, 15
FEATURE = "level1"
FEATURES = ("level2", "level1")
CONTEXTS: tuple[float, ...] = ()  # paddings of wider-context chips (--contexts 0.6 1.0; 1.0 covers twice the width)
CONTEXT_VIEWS = 2  # per context padding: the clean chip and one augmented draw
VERSION = 2


def context_key(padding: float) -> str:
    """The array name of the context chips' ``level1`` at ``padding`` (``ctx100_level1`` for 1.0)."""
    return f"ctx{round(padding * 100):03d}_level1"


def backbone_session(threads: int = 1) -> tuple[ort.InferenceSession, models.ModelSpec]:
    """The converted dlib network with the ``level2`` and ``level1`` tensors as extra outputs."""
    mdir = models.default_models_dir()
    spec = models.load_manifest(mdir).models["dlib-face-v1"]
    net = dlibnet.parse((mdir / spec.filename).read_bytes())
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    model = dlibnet.to_onnx(net, extra_outputs=FEATURES)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]), spec


def _extra(data: Path, src: str) -> dict[str, dict[str, str]]:
    with open(data / src / "labels.csv", newline="") as fh:
        return {f"{src}/{r['file']}": r for r in csv.DictReader(fh)}


def run(data: Path, cache: Path, src: str, views: int, batch: int = 32, seed: int = 0,
        contexts: tuple[float, ...] = CONTEXTS) -> Path:
    key = hashlib.sha256(json.dumps([VERSION, SIZE, PADDING, MARGIN, FEATURES, views, seed, list(contexts),
                                     CONTEXT_VIEWS]).encode()).hexdigest()[:10]
    dets_path = extract.detect_faces(data, cache, sources=(src,))
    out = cache / f"feats-{src}-{key}-{dets_path.stem.split('-')[-1]}.npz"
    if out.exists():
        log.info("cached: %s", out)
        return out
    d = np.load(dets_path)
    sess, spec = backbone_session()
    mdir = models.default_models_dir()
    manifest = models.load_manifest(mdir)
    g1 = manifest.models["gender-v1"]
    g1s = Session(models.model_file(mdir, manifest, "gender-v1"), inputs={g1.input.name: 4},
                  outputs=[g1.outputs[0].name], threads=1, name="gender-v1")
    from daemon.pipeline import align

    rows = _extra(data, src)
    n = len(d["labels"])
    level1 = np.zeros((views, n, 256, 4, 4), np.float16)
    level2 = np.zeros((views, n, 128, 8, 8), np.float16)
    desc = np.zeros((views, n, 128), np.float32)
    ctx = {c: np.zeros((CONTEXT_VIEWS, n, 256, 4, 4), np.float16) for c in contexts}
    p_v1 = np.zeros(n, np.float32)
    means, scale = np.array(spec.normalization.means, np.float32), spec.normalization.scale
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        idx = range(start, min(n, start + batch))
        canv, small = [], []
        ccanv: dict[float, list[np.ndarray]] = {c: [] for c in contexts}
        for k in idx:
            s, file = str(d["names"][k]).split("/", 1)
            bgr = extract._load_bgr(data / s / "images" / file)
            lm = d["landmarks"][k][None]
            canv.append(extract.padded_chips(bgr, lm, SIZE, MARGIN, PADDING)[0])
            for c in contexts:
                ccanv[c].append(extract.padded_chips(bgr, lm, SIZE, MARGIN, c)[0])
            small.append(align.align_faces(bgr, lm, 32)[0])
        p = g1s.run({g1.input.name: classify.normalize(np.stack(small), g1.normalization.means, g1.normalization.scale)})[0]
        p_v1[start:start + len(idx)] = np.asarray(p)[:, 1]
        for v in range(views):
            if v == 0:
                chips = [augment.centre(c, SIZE) for c in canv]
            elif v == 1:
                chips = [augment.centre(c, SIZE)[:, ::-1] for c in canv]
            else:
                chips = [augment.augment(c, SIZE, rng) for c in canv]
            x = ((np.stack(chips)[..., ::-1].astype(np.float32) - means) * scale).transpose(0, 3, 1, 2)
            de, l2, l1 = sess.run(["descriptor", *FEATURES], {"chips": np.ascontiguousarray(x)})
            level2[v, start:start + len(idx)] = l2.astype(np.float16)
            desc[v, start:start + len(idx)] = de
            level1[v, start:start + len(idx)] = l1.astype(np.float16)
        for c in contexts:
            for v in range(CONTEXT_VIEWS):
                chips = [augment.centre(cc, SIZE) if v == 0 else augment.augment(cc, SIZE, rng) for cc in ccanv[c]]
                x = ((np.stack(chips)[..., ::-1].astype(np.float32) - means) * scale).transpose(0, 3, 1, 2)
                (l1,) = sess.run(["level1"], {"chips": np.ascontiguousarray(x)})
                ctx[c][v, start:start + len(idx)] = l1.astype(np.float16)
        if (start // batch) % 20 == 0:
            log.info("%s: %d/%d (%.0f s)", src, start + len(idx), n, time.perf_counter() - t0)
    meta = {"source": src, "views": views, "seed": seed, "contexts": list(contexts), "context_views": CONTEXT_VIEWS}
    race = np.array([rows.get(str(nm), {}).get("race", "") for nm in d["names"]])
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, level1=level1, level2=level2, descriptor=desc, p_v1=p_v1, race=race,
             **{context_key(c): a for c, a in ctx.items()},
             **{k: d[k] for k in ("labels", "source", "group", "names", "width", "age", "score", "blur")},
             meta=np.array(json.dumps({**meta, "seconds": time.perf_counter() - t0, "detections": dets_path.name})))
    tmp.replace(out)
    log.info("wrote %s (%d faces, %.0f s)", out, n, time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=extract.DEFAULT_DATA)
    ap.add_argument("--cache", type=Path, default=extract.DEFAULT_CACHE)
    ap.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    ap.add_argument("--views", type=int, default=3)
    ap.add_argument("--contexts", type=float, nargs="*", default=list(CONTEXTS),
                    help="paddings of extra wider-context chips (the ctx* candidates of training.branch)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for src in a.sources:
        print(run(a.data.resolve(), a.cache, src, a.views, contexts=tuple(a.contexts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
