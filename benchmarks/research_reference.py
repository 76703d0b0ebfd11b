"""The research project's pipeline, reproduced as a cost reference for ``benchmarks/bench.py``.

What the research did, per image: read the file, decode it at FULL resolution with OpenCV
(``cv2.imdecode``, which applies the EXIF orientation itself), run CenterFace through OpenCV's
``dnn`` module on the whole image (padded to multiples of 32), keep heatmap > 0.35 and NMS at 0.3,
then for every face a loose square crop (the box grown by half its longer side on each side,
clipped), resized to 150x150, RGB scaled to 0..1, through an EfficientNet-B0 (one sigmoid, p male)
with onnxruntime, one face per run, and store the rows in SQLite.

* The detector is the ORIGINAL ``models/centerface.onnx`` (fixed ``[10,3,32,32]`` input dims,
  weights listed as graph inputs): OpenCV 5's ``readNetFromONNX`` accepts it and runs any input
  size (checked: outputs equal onnxruntime's to 1e-7), so the derived dynamic model is not needed.
* The EfficientNet-B0 is built here with ``onnx.helper`` (the standard B0 topology: stem 3x3/2 32,
  16 MBConv blocks with squeeze-excitation and SiLU, head 1x1 1280, global pool, 1 logit,
  sigmoid; batch norms already folded into the convolutions, as onnxruntime folds them anyway)
  with random weights (He-scaled, seeded), input ``input.1`` ``[1,3,150,150]``. Weights do not
  change its cost. It is written to ``var/bench/efnet_b0_random.onnx`` (never committed).
* Threads: library defaults (OpenCV and onnxruntime use every core), as the research ran it.

Run as a script (``bench.py`` does this in a subprocess so its memory is measured apart)::

    .venv/bin/python benchmarks/research_reference.py --list var/bench/list.json --out r.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sqlite3
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.pipeline import detect  # noqa: E402  (decode + NMS: the same arithmetic as the seed's)

THRESHOLD, NMS_IOU, SEED_SIZE = 0.35, 0.3, 150
EFNET_PATH = ROOT / "var" / "bench" / "efnet_b0_random.onnx"

# EfficientNet-B0 stages: (expand ratio, kernel, stride, output channels, repeats)
B0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
             (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))


def build_efficientnet_b0(path: Path = EFNET_PATH, size: int = SEED_SIZE, seed: int = 0) -> Path:
    """Write an EfficientNet-B0 (random weights, p-male sigmoid head) as ONNX; returns the path."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    counter = [0]

    def name(prefix: str) -> str:
        counter[0] += 1
        return f"{prefix}{counter[0]}"

    def conv(x: str, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> str:
        w = name("w")
        b = name("b")
        fan_in = cin // groups * k * k
        inits.append(numpy_helper.from_array((rng.standard_normal((cout, cin // groups, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32), w))
        inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), b))
        y = name("conv")
        p = k // 2
        nodes.append(helper.make_node("Conv", [x, w, b], [y], kernel_shape=[k, k], strides=[stride, stride], pads=[p, p, p, p], group=groups))
        return silu(y) if act else y

    def silu(x: str) -> str:
        s, y = name("sig"), name("silu")
        nodes.append(helper.make_node("Sigmoid", [x], [s]))
        nodes.append(helper.make_node("Mul", [x, s], [y]))
        return y

    def mbconv(x: str, cin: int, cout: int, expand: int, k: int, stride: int) -> str:
        mid = cin * expand
        h = conv(x, cin, mid, 1) if expand != 1 else x
        h = conv(h, mid, mid, k, stride, groups=mid)
        # squeeze-excitation on the depthwise output, squeeze = cin / 4
        sq = max(1, cin // 4)
        g = name("gap")
        nodes.append(helper.make_node("GlobalAveragePool", [h], [g]))
        s = conv(g, mid, sq, 1)
        e = conv(s, sq, mid, 1, act=False)
        es, y = name("sesig"), name("se")
        nodes.append(helper.make_node("Sigmoid", [e], [es]))
        nodes.append(helper.make_node("Mul", [h, es], [y]))
        out = conv(y, mid, cout, 1, act=False)
        if stride == 1 and cin == cout:
            r = name("res")
            nodes.append(helper.make_node("Add", [out, x], [r]))
            out = r
        return out

    x = conv("input.1", 3, 32, 3, 2)
    cin = 32
    for expand, k, stride, cout, repeats in B0_STAGES:
        for i in range(repeats):
            x = mbconv(x, cin, cout, expand, k, stride if i == 0 else 1)
            cin = cout
    x = conv(x, cin, 1280, 1)
    g, f = name("gap"), name("flat")
    nodes.append(helper.make_node("GlobalAveragePool", [x], [g]))
    nodes.append(helper.make_node("Flatten", [g], [f], axis=1))
    inits.append(numpy_helper.from_array((rng.standard_normal((1280, 1)) * 0.01).astype(np.float32), "fc_w"))
    inits.append(numpy_helper.from_array(np.zeros(1, np.float32), "fc_b"))
    nodes.append(helper.make_node("Gemm", [f, "fc_w", "fc_b"], ["logit"]))
    nodes.append(helper.make_node("Sigmoid", ["logit"], ["p_male"]))
    graph = helper.make_graph(
        nodes, "efficientnet_b0_random",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("p_male", TensorProto.FLOAT, [1, 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="forensic-gender-bench")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    return path


class ResearchPipeline:
    """CenterFace (OpenCV dnn, full resolution) + EfficientNet-B0 150x150 per face (onnxruntime)."""

    def __init__(self, models_dir: Path = ROOT / "models", efnet: Path = EFNET_PATH) -> None:
        import onnxruntime as ort

        if not efnet.exists():
            build_efficientnet_b0(efnet)
        self.net = cv2.dnn.readNetFromONNX(str(models_dir / "centerface.onnx"))
        self.outputs = ["537", "538", "539", "540"]
        self.efnet = ort.InferenceSession(str(efnet), providers=["CPUExecutionProvider"])  # defaults, as the research

    def detect(self, bgr: np.ndarray) -> detect.Detections:
        h, w = bgr.shape[:2]
        blob = detect.to_blob(np.ascontiguousarray(bgr[..., ::-1]))  # RGB, raw 0..255, padded to /32
        self.net.setInput(blob, "input.1")
        outs = self.net.forward(self.outputs)
        dets = detect.decode(*outs, threshold=THRESHOLD, valid_hw=(h, w))
        return dets.take(detect.nms(dets.boxes, dets.scores, NMS_IOU))

    def classify(self, bgr: np.ndarray, boxes: np.ndarray) -> list[float]:
        h, w = bgr.shape[:2]
        out = []
        for x1, y1, x2, y2 in boxes:
            grow = max(x2 - x1, y2 - y1) / 2
            a, b = int(max(0, x1 - grow)), int(max(0, y1 - grow))
            c, d = int(min(w, x2 + grow)), int(min(h, y2 + grow))
            if c <= a or d <= b:
                out.append(0.5)
                continue
            crop = cv2.resize(bgr[b:d, a:c], (SEED_SIZE, SEED_SIZE))
            x = (crop[..., ::-1].astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
            out.append(float(self.efnet.run(None, {"input.1": np.ascontiguousarray(x)})[0].ravel()[0]))
        return out

    def analyze(self, path: str) -> tuple[str, np.ndarray, np.ndarray, list[float]]:
        with open(path, "rb") as fh:
            data = fh.read()
        sha = hashlib.sha256(data).hexdigest()
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # full resolution, EXIF applied
        dets = self.detect(bgr)
        return sha, dets.boxes, dets.scores, self.classify(bgr, dets.boxes)


def run(paths: list[str], db: str | None = None) -> dict:
    """Analyse ``paths`` in order (into SQLite when ``db``); timings, detections, peak memory."""
    t_load = time.perf_counter()
    rp = ResearchPipeline()
    conn = None
    if db:
        conn = sqlite3.connect(db)
        conn.execute("CREATE TABLE IF NOT EXISTS faces (sha256 TEXT, path TEXT, x1 REAL, y1 REAL, x2 REAL, y2 REAL, score REAL, p_male REAL)")
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    per, nfaces = {}, 0
    for p in paths:
        a = time.perf_counter()
        sha, boxes, scores, pm = rp.analyze(p)
        nfaces += len(boxes)
        if conn is not None:
            conn.executemany("INSERT INTO faces VALUES (?,?,?,?,?,?,?,?)",
                             [(sha, p, *map(float, b), float(s), m) for b, s, m in zip(boxes, scores, pm)])
            conn.commit()
        per[p] = {"boxes": boxes.round(1).tolist(), "scores": scores.round(4).tolist(), "seconds": time.perf_counter() - a}
    t1 = time.perf_counter()
    if conn is not None:
        conn.close()
    return {"images": len(paths), "faces": nfaces, "seconds": t1 - t0, "cpu_seconds": time.process_time() - cpu0,
            "load_seconds": t0 - t_load, "detections": per, "threads_cv2": cv2.getNumThreads(),
            "peak_rss_bytes": _vm("VmHWM"), "images_per_s": len(paths) / (t1 - t0), "faces_per_s": nfaces / (t1 - t0)}


def detect_only(paths: list[str]) -> dict:
    """Reference detections (no classifier) for recall on labelled scenes."""
    rp = ResearchPipeline()
    per = {}
    for p in paths:
        bgr = cv2.imdecode(np.fromfile(p, np.uint8), cv2.IMREAD_COLOR)
        d = rp.detect(bgr)
        per[p] = {"boxes": d.boxes.round(1).tolist(), "scores": d.scores.round(4).tolist()}
    return {"detections": per}


def _vm(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--list", required=True, help="JSON list of image paths")
    ap.add_argument("--out", required=True, help="JSON result")
    ap.add_argument("--db", help="SQLite file to write the rows into")
    ap.add_argument("--detect-only", action="store_true", help="detections only (for recall)")
    ap.add_argument("--build-only", action="store_true", help="only write the EfficientNet-B0 ONNX file")
    a = ap.parse_args(argv)
    if a.build_only:
        print(build_efficientnet_b0())
        return 0
    paths = json.loads(Path(a.list).read_text())
    res = detect_only(paths) if a.detect_only else run(paths, a.db)
    Path(a.out).write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
