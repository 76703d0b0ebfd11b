"""Does an INT8 CenterFace keep recall on dev/wider while running faster on this CPU?

Static quantization with onnxruntime's tools (QDQ format, per-channel int8 weights, uint8
activations), calibrated on a few ``dev/wider`` scenes at the product's detector input policy,
then compared with the fp32 model on the OTHER dev/wider scenes (recall at IoU 0.5 for faces
>= 20/32/64 px, detections matched between the two models) and on speed (one thread, the same
prepared input tensors, fp32 and int8 runs interleaved).

Everything it writes goes under ``var/quant/`` (the quantized model is never committed)::

    .venv/bin/python benchmarks/quantize.py                      # 16 calibration scenes, MinMax
    .venv/bin/python benchmarks/quantize.py --method percentile --keep-heads-fp32
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import WIDER, read_wider_labels, recall  # noqa: E402

OUT = ROOT / "var" / "quant"
HEAD_OUTPUTS = ("536", "538", "539", "540")  # the four 1x1 head convolutions (heatmap logit, scale, offset, landmarks)


def split_scenes(n_calib: int) -> tuple[list[str], list[str]]:
    """Calibration and evaluation scenes, disjoint, chosen by a hash of the file name."""
    files = sorted(read_wider_labels(), key=lambda f: hashlib.sha256(f.encode()).hexdigest())
    return files[:n_calib], sorted(files[n_calib:])


def detector_inputs(pipe, path: str) -> list[np.ndarray]:  # noqa: ANN001
    """The detector's input tensors for one file, made as the product makes them."""
    from daemon.pipeline import align, detect, images, reading

    cfg = pipe.cfg
    dec = images.decode(reading.read_file(path).data, max_pixels=cfg.limits.max_pixels, min_side_hint=pipe.decode_hint())
    h, w = dec.bgr.shape[:2]
    out = []
    for ps in detect.plan_passes(w, h, cfg.detector.max_side, cfg.detector.tile_side):
        crop = dec.bgr[ps.y:ps.y + ps.h, ps.x:ps.x + ps.w]
        tw, th, _ = detect.input_size(ps.w, ps.h, int(round(max(ps.w, ps.h) * ps.scale)))
        out.append(detect.to_blob(align.resize(crop, tw, th)[..., ::-1]))
    return out


def prepare(src: Path, dst: Path) -> Path:
    """Name every node (so heads can be excluded) and run onnxruntime's quantization pre-processing."""
    import onnx
    import onnx.version_converter
    from onnxruntime.quantization import quant_pre_process

    m = onnx.load(str(src))
    if m.opset_import[0].version < 13:  # per-channel QDQ needs opset 13 (the graph is opset 9)
        m = onnx.version_converter.convert_version(m, 13)
    for n in m.graph.node:
        if not n.name:
            n.name = f"{n.op_type}_{n.output[0]}"
    named = dst.with_name("centerface-named.onnx")
    onnx.save(m, str(named))
    quant_pre_process(str(named), str(dst), skip_symbolic_shape=True)  # symbolic inference gives up on the ConvTranspose dims
    return dst


def quantize(args: argparse.Namespace, pipe, calib: list[str]) -> Path:  # noqa: ANN001
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    OUT.mkdir(parents=True, exist_ok=True)
    prep = prepare(ROOT / "models" / "centerface-dynamic.onnx", OUT / "centerface-prep.onnx")
    blobs = [b for f in calib for b in detector_inputs(pipe, str(WIDER / "images" / f))]
    if args.method != "minmax":  # histogram calibrators need one shape: zero-pad to the largest
        hmax, wmax = max(b.shape[2] for b in blobs), max(b.shape[3] for b in blobs)
        padded = []
        for b in blobs:
            z = np.zeros((1, 3, hmax, wmax), np.float32)
            z[:, :, : b.shape[2], : b.shape[3]] = b
            padded.append(z)
        blobs = padded

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(blobs)

        def get_next(self):  # noqa: ANN201
            b = next(self.it, None)
            return None if b is None else {"input.1": b}

    exclude = []
    if args.keep_heads_fp32:
        m = onnx.load(str(prep))
        exclude = [n.name for n in m.graph.node if n.op_type == "Conv" and n.output[0] in HEAD_OUTPUTS]
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[args.method]
    out = OUT / f"centerface-int8-{args.method}{'-fp32heads' if args.keep_heads_fp32 else ''}.onnx"
    quantize_static(str(prep), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                    nodes_to_exclude=exclude, extra_options={"CalibMovingAverage": False})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib", type=int, default=16, help="dev/wider scenes used for calibration (excluded from evaluation)")
    ap.add_argument("--method", choices=("minmax", "entropy", "percentile"), default="minmax")
    ap.add_argument("--keep-heads-fp32", action="store_true", help="leave the four output convolutions in fp32")
    ap.add_argument("--eval", type=int, default=0, help="evaluate on this many scenes (0: all the others)")
    ap.add_argument("--speed-images", type=int, default=12, help="scenes (+ bench camera images) timed for speed")
    ap.add_argument("--model", help="evaluate this quantized file instead of making one")
    ap.add_argument("--int8-threshold", type=float, help="heatmap threshold for the int8 model (default: the product's)")
    a = ap.parse_args(argv)

    from daemon.config import parse
    from daemon.pipeline.analyze import Detector, load_pipeline
    from daemon.pipeline.sessions import Session

    load0 = os.getloadavg()
    cfg = parse({}, check_paths=False).pipeline
    pipe = load_pipeline(cfg, threads=1)
    calib, evals = split_scenes(a.calib)
    if a.eval:
        evals = evals[:: max(1, len(evals) // a.eval)][: a.eval]
    t = time.perf_counter()
    qpath = Path(a.model) if a.model else quantize(a, pipe, calib)
    t_quant = time.perf_counter() - t
    outs = ["537", "538", "539", "540"]
    from dataclasses import replace

    qcfg = replace(cfg.detector, threshold=a.int8_threshold) if a.int8_threshold else cfg.detector
    q = Detector(Session(qpath, inputs={"input.1": 4}, outputs=outs, threads=1, name="centerface-int8"), qcfg)
    f = pipe.detector

    # recall on the evaluation scenes, product policy (decode, input size, threshold, NMS)
    from daemon.pipeline import images, reading

    labels = read_wider_labels()
    truth, det_f, det_q = {}, {}, {}
    for name in evals:
        p = str(WIDER / "images" / name)
        dec = images.decode(reading.read_file(p).data, min_side_hint=pipe.decode_hint())
        for tag, d, store in (("fp32", f, det_f), ("int8", q, det_q)):
            r = d.detect(dec.bgr).transformed(dec.scale)
            store[p] = {"boxes": r.boxes.tolist(), "scores": r.scores.tolist()}
        truth[p] = labels[name]
    rec = {f"{tag}_ge{mw}": recall(truth, store, mw) for tag, store in (("fp32", det_f), ("int8", det_q)) for mw in (20, 32, 64)}
    for tag, store in (("fp32", det_f), ("int8", det_q)):
        # detections and the share that match a labelled box (a lower bound of precision: WIDER
        # leaves some faces unlabelled)
        n_det = sum(len(v["boxes"]) for v in store.values())
        matched = recall(truth, store, 0)["found"]
        rec[f"{tag}_detections"] = {"detections": n_det, "matched": matched, "precision_lower_bound": matched / max(1, n_det)}
    # agreement: int8 detections matched to fp32 detections (IoU >= 0.5)
    agree = recall({p: v["boxes"] for p, v in det_f.items()}, det_q, 0)

    # speed: the same prepared tensors, fp32 and int8 interleaved, one thread
    speed_files = [str(WIDER / "images" / n) for n in evals[: a.speed_images]]
    bench_cams = sorted((ROOT / "var" / "bench" / "set").glob("camera_*.jpg"))[:4]
    speed_files += [str(p) for p in bench_cams]
    blobs = [b for p in speed_files for b in detector_inputs(pipe, p)]
    times = {"fp32": [], "int8": []}
    cpu = {"fp32": 0.0, "int8": 0.0}
    for s in (f.session, q.session):  # warm-up
        s.run({"input.1": blobs[0]})
    for rep in range(3):
        for b in blobs:
            for tag, s in (("fp32", f.session), ("int8", q.session)) if rep % 2 == 0 else (("int8", q.session), ("fp32", f.session)):
                c, w = time.process_time(), time.perf_counter()
                s.run({"input.1": b})
                times[tag].append(time.perf_counter() - w)
                cpu[tag] += time.process_time() - c
    per = [x / y for x, y in zip(times["fp32"], times["int8"])]
    result = {
        "model": str(qpath), "bytes": qpath.stat().st_size, "method": a.method,
        "threshold_fp32": cfg.detector.threshold, "threshold_int8": qcfg.threshold, "keep_heads_fp32": a.keep_heads_fp32,
        "calibration_scenes": len(calib), "evaluation_scenes": len(evals), "quantize_seconds": t_quant,
        "recall": rec, "int8_found_fp32_detections": agree,
        "speed": {"tensors": len(blobs), "fp32_ms_median": 1000 * statistics.median(times["fp32"]),
                  "int8_ms_median": 1000 * statistics.median(times["int8"]),
                  "speedup_per_tensor_median": statistics.median(per), "speedup_cpu_total": cpu["fp32"] / cpu["int8"]},
        "loadavg": [load0, os.getloadavg()],
        "command": " ".join(["benchmarks/quantize.py"] + (argv if argv is not None else sys.argv[1:])),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"result-{qpath.stem}{'-t' + str(qcfg.threshold) if a.int8_threshold else ''}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
