"""Does an INT8 face backbone (dlib-face-v1) keep identity and gender while running faster?

Static quantization with onnxruntime's tools (QDQ, per-channel int8 weights, uint8 activations),
calibrated on chips of ``train/lfw`` (the product's detector and alignment), then compared with
the float32 graph on dev LFW chips: LFW pair verification of the descriptors (single pass, dlib's
0.6; :func:`daemon.identity_eval.verification`), the distance between the two descriptors of each
chip, agreement of gender-dlib-v1's decisions on the two graphs' level1 tensors, and milliseconds
per face on one thread (batches of 32 chips, fp32 and int8 runs interleaved).

Everything it writes goes under ``var/quant/`` (the quantized model is never committed)::

    .venv/bin/python benchmarks/quantize_backbone.py [--calib 300]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "var" / "quant"
DEV = ROOT.parent / "shared" / "data" / "dev" / "lfw"
TRAIN = ROOT.parent / "shared" / "data" / "train" / "lfw"


def chips(pipe, folder: Path, files: list[str]) -> tuple[np.ndarray, list[int]]:  # noqa: ANN001
    """Backbone inputs of the centre face of each image, and which files had one."""
    from daemon import metrics
    from daemon.pipeline import align, classify, images, reading

    spec = pipe.backbone.spec
    xs, kept = [], []
    for k, f in enumerate(files):
        dec = images.decode(reading.read_file(folder / "images" / f).data)
        dets = pipe.detector.detect(dec.bgr)
        if not len(dets):
            continue
        c = metrics.match_centre(dets.boxes, dec.bgr.shape[1], dec.bgr.shape[0])
        if c < 0:
            continue
        ch = align.align_faces(dec.bgr, dets.landmarks[c : c + 1], spec.size, padding=spec.padding)
        xs.append(classify.normalize(ch, spec.means_rgb, spec.scale))
        kept.append(k)
    return np.concatenate(xs), kept


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static

    from daemon import models
    from daemon.config import PipelineConfig
    from daemon.identity_eval import read_people, verification
    from daemon.pipeline.analyze import load_pipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib", type=int, default=300, help="train LFW images to calibrate on")
    a = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(PipelineConfig())
    mdir = models.default_models_dir()
    manifest = models.load_manifest(mdir)
    fp32 = models.model_file(mdir, manifest, "dlib-face-v1")
    head = models.model_file(mdir, manifest, "gender-dlib-v1")
    spec = manifest.models["dlib-face-v1"]
    inp, outs = spec.input.name, [o.name for o in spec.outputs]

    with open(TRAIN / "labels.csv", newline="") as fh:
        calib_files = sorted(r["file"] for r in csv.DictReader(fh))[: a.calib]
    calib, _ = chips(pipe, TRAIN, calib_files)
    prep = OUT / "dlib-face-prep.onnx"
    quant_pre_process(str(fp32), str(prep), skip_symbolic_shape=True)
    int8 = OUT / "dlib-face-v1-int8.onnx"

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(range(0, len(calib), 16))

        def get_next(self) -> dict[str, np.ndarray] | None:
            s = next(self.it, None)
            return None if s is None else {inp: calib[s : s + 16]}

    quantize_static(
        str(prep),
        str(int8),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        extra_options={"CalibMovingAverage": False},
    )

    people = read_people(DEV, 2)
    files = sorted(people)
    x, kept = chips(pipe, DEV, files)
    person = [people[files[k]] for k in kept]

    def session(path: Path) -> ort.InferenceSession:
        o = ort.SessionOptions()
        o.intra_op_num_threads = o.inter_op_num_threads = 1
        return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])

    s32, s8, sh = session(fp32), session(int8), session(head)
    r32 = [np.concatenate(v) for v in zip(*[s32.run(outs, {inp: x[i : i + 32]}) for i in range(0, len(x), 32)], strict=True)]
    r8 = [np.concatenate(v) for v in zip(*[s8.run(outs, {inp: x[i : i + 32]}) for i in range(0, len(x), 32)], strict=True)]
    hin = manifest.models["gender-dlib-v1"].input.name
    level = outs.index(str(manifest.models["gender-dlib-v1"].backbone_tensor))
    g32 = sh.run(None, {hin: r32[level]})[0][:, 1]
    g8 = sh.run(None, {hin: r8[level]})[0][:, 1]
    t32, t8 = [], []
    batch = x[:32]
    for _ in range(5):
        t0 = time.perf_counter()
        s32.run(outs, {inp: batch})
        t32.append((time.perf_counter() - t0) / len(batch))
        t0 = time.perf_counter()
        s8.run(outs, {inp: batch})
        t8.append((time.perf_counter() - t0) / len(batch))
    v32, v8 = verification(r32[0], person, 0.6), verification(r8[0], person, 0.6)
    gap = np.linalg.norm(r32[0] - r8[0], axis=1)
    same = float(((g32 >= 0.5) == (g8 >= 0.5)).mean())
    print(f"dev LFW chips: {len(x)} (people with 2+ images); calibration: {len(calib)} train LFW chips")
    print(f"verification at 0.6, single pass: fp32 {v32['balanced_accuracy']:.4f} {v32['ci95']}, int8 {v8['balanced_accuracy']:.4f} {v8['ci95']}")
    print(f"descriptor distance fp32 vs int8: median {np.median(gap):.3f}, p95 {np.percentile(gap, 95):.3f} (same-person threshold 0.55-0.6)")
    print(f"gender-dlib-v1 decisions at 0.5 equal on {same:.3f} of faces; |p(male) difference| median {np.median(np.abs(g32 - g8)):.4f}")
    print(f"ms per face, one thread, batch 32: fp32 {statistics.median(t32) * 1000:.1f}, int8 {statistics.median(t8) * 1000:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
