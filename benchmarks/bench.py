"""``make bench``: throughput, bounds, memory and a research reference, side by side in one run.

See ``benchmarks/README.md`` for what every figure means. In short, one run:

1. builds (once, cached) an image set under ``var/bench/set-S-C/`` from ``../shared/data/dev/wider``
   scenes (re-encoded, 1024 px wide) plus camera-sized 4000x3000 JPEGs made from them (scenes
   upscaled or tiled 2x2, sensor-like noise, quality 90, 3-5 MB, every third stored sideways
   with EXIF orientation 6), with the ground-truth boxes mapped into each image;
2. repeats, ``--reps`` times, in a rotating order so that load drift hits every figure alike:
   decode-only and detector-only bounds (1 and N processes), ``forensic-gender scan`` into a
   fresh SQLite database with 1 and N workers (the library call the command makes, in a child
   process whose whole tree is measured), and the research project's pipeline
   (``research_reference.py``);
3. detection recall at IoU 0.5 on ``dev/wider`` (faces >= 32 px) and on the bench set, for the
   product and the reference;
4. a video minute (``var/bench/video/``, built once: 60 s of 1080p30 H.264 made of dev/wider
   scenes): decode-only frames/s, the pipeline's seconds per video minute at the configured
   interval, and peak RSS of a one-thread process on the video against 12 MP photos;
5. optionally: the service (``forensic-gender run``) figure, an RSS curve through one worker
   (``--rss N``), and an onnxruntime-arena check (``--memcheck``);
6. writes ``var/bench/result.json`` and ``var/bench/result.md`` and prints the ratios.

    .venv/bin/python benchmarks/bench.py            # full (make bench)
    .venv/bin/python benchmarks/bench.py --quick    # small set, 2 repetitions
    .venv/bin/python benchmarks/bench.py --only rss --rss 5000
    .venv/bin/python benchmarks/bench.py --only video
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

WIDER = (ROOT / ".." / "shared" / "data" / "dev" / "wider").resolve()
OUT = ROOT / "var" / "bench"
PY = sys.executable
SET_VERSION = 3


# ============================================================================================
# The image set


def read_wider_labels(folder: Path = WIDER) -> dict[str, list[list[float]]]:
    boxes: dict[str, list[list[float]]] = {}
    with open(folder / "labels.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            boxes.setdefault(row["file"], []).append([float(row[k]) for k in ("x1", "y1", "x2", "y2")])
    return boxes


def _pick(n: int, total: int) -> list[int]:
    if n >= total:
        return list(range(total))
    return sorted({int(round(i * (total - 1) / max(1, n - 1))) for i in range(n)})


def _noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    return rng.normal(0.0, sigma, size=shape).astype(np.float32)


def _camera_image(cv2, scenes: list[tuple[np.ndarray, list[list[float]]]], layout: str,
                  rng: np.random.Generator) -> tuple[np.ndarray, list[list[float]]]:
    """A 4000x3000 upright BGR canvas: one scene upscaled to fit, or four scenes on a 2x2 grid."""
    W, H = 4000, 3000
    canvas = np.empty((H, W, 3), np.uint8)
    canvas[:] = rng.integers(60, 200, size=3, dtype=np.uint8)
    cells = [(0, 0, W, H)] if layout == "single" else [(x, y, W // 2, H // 2) for y in (0, H // 2) for x in (0, W // 2)]
    truth = []
    for (cx, cy, cw, ch), (img, boxes) in zip(cells, scenes):
        h, w = img.shape[:2]
        s = min(cw / w, ch / h)
        nw, nh = int(round(w * s)), int(round(h * s))
        ox, oy = cx + (cw - nw) // 2, cy + (ch - nh) // 2
        canvas[oy:oy + nh, ox:ox + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_CUBIC)
        truth += [[b[0] * s + ox, b[1] * s + oy, b[2] * s + ox, b[3] * s + oy] for b in boxes]
    # sensor-like noise so that the file size is a camera's (3-5 MB at quality 90), not a render's
    noisy = canvas.astype(np.float32)
    noisy += _noise(rng, (H, W, 1), 5.0)  # luminance noise
    noisy += _noise(rng, (H, W, 3), 3.0)  # colour noise
    np.clip(noisy, 0, 255, out=noisy)
    return noisy.astype(np.uint8), truth


def build_set(out: Path, n_scenes: int, n_camera: int, seed: int = 0) -> list[dict]:
    """Build (or reuse) the bench set; returns the manifest items (upright truth boxes)."""
    import cv2
    from PIL import Image

    params = {"version": SET_VERSION, "scenes": n_scenes, "camera": n_camera, "seed": seed}
    mpath = out / "manifest.json"
    if mpath.exists():
        m = json.loads(mpath.read_text())
        if m.get("params") == params and all((out / it["file"]).exists() for it in m["items"]):
            return [dict(it, path=str(out / it["file"])) for it in m["items"]]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    labels = read_wider_labels()
    files = sorted(labels)
    rng = np.random.default_rng(seed)
    items = []
    for k, i in enumerate(_pick(n_scenes, len(files))):
        src = WIDER / "images" / files[i]
        img = cv2.imread(str(src), cv2.IMREAD_COLOR)
        name = f"scene_{k:03d}.jpg"
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 92])  # re-encoded, not a copy
        (out / name).write_bytes(buf.tobytes())
        items.append({"file": name, "kind": "scene", "source": files[i], "width": img.shape[1], "height": img.shape[0],
                      "orientation": 1, "bytes": len(buf), "truth": labels[files[i]]})
    pool = [files[i] for i in rng.permutation(len(files))]
    for j in range(n_camera):
        layout = "single" if j % 2 else "grid"
        take = 1 if layout == "single" else 4
        srcs = [pool.pop() for _ in range(take)]
        scenes = [(cv2.imread(str(WIDER / "images" / f), cv2.IMREAD_COLOR), labels[f]) for f in srcs]
        upright, truth = _camera_image(cv2, scenes, layout, rng)
        orientation = 6 if j % 3 == 2 else 1
        stored = np.rot90(upright, 1) if orientation == 6 else upright  # 6: a viewer turns it 90 deg clockwise
        exif = Image.Exif()
        exif[0x010F] = "BenchCam"  # Make
        exif[0x0110] = "BC-12"  # Model
        exif[0x0112] = orientation
        bio = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(stored[..., ::-1])).save(bio, "JPEG", quality=90, exif=exif.tobytes())
        name = f"camera_{j:03d}.jpg"
        (out / name).write_bytes(bio.getvalue())
        items.append({"file": name, "kind": "camera", "layout": layout, "source": srcs, "width": 4000, "height": 3000,
                      "orientation": orientation, "bytes": bio.tell(), "truth": [[round(v, 1) for v in b] for b in truth]})
    mpath.write_text(json.dumps({"params": params, "items": items}, indent=1))
    return [dict(it, path=str(out / it["file"])) for it in items]


# ============================================================================================
# Process-tree memory and CPU monitor (reads /proc; no dependency)


def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            parts = fh.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _children(pid: int) -> list[int]:
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                kids += [int(x) for x in fh.read().split()]
    except OSError:
        pass
    return kids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class TreeMonitor:
    """Samples a process tree: per-process peak RSS (VmHWM), peak of the summed RSS and PSS.

    Once a second: ``VmHWM`` is the kernel's own high-water mark, so the per-process peaks are
    exact at any rate; only the summed figures are sampled. At 5 Hz, reading ``smaps_rollup``
    (which walks the workers' page tables under their memory-map lock) cost the benchmark ~10%
    of a core, taken from the workers it was measuring."""

    def __init__(self, root: int, interval: float = 1.0, pss: bool = True) -> None:
        self.root, self.interval, self.pss = root, interval, pss
        self.peak: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self.role: dict[int, str] = {}
        self.peak_sum_rss = 0
        self.peak_sum_pss = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMonitor:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    def _tree(self) -> list[int]:
        out, todo = [], [self.root]
        while todo:
            p = todo.pop()
            out.append(p)
            todo += _children(p)
        return out

    def sample(self) -> None:
        rss_sum = pss_sum = 0
        for p in self._tree():
            st = _proc_status(p)
            if not st:
                continue
            if p not in self.role:
                cmd = _cmdline(p)
                self.role[p] = ("root" if p == self.root else "tracker" if "resource_tracker" in cmd
                                else "worker" if "multiprocessing" in cmd else "other")
            self.peak[p] = max(self.peak.get(p, 0), st.get("VmHWM", 0))
            self.cpu[p] = max(self.cpu.get(p, 0.0), _cpu_seconds(p))
            rss_sum += st.get("VmRSS", 0)
            if self.pss:
                pss_sum += _pss(p)
        self.peak_sum_rss = max(self.peak_sum_rss, rss_sum)
        self.peak_sum_pss = max(self.peak_sum_pss, pss_sum)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def summary(self) -> dict:
        workers = [p for p, r in self.role.items() if r == "worker"]
        return {
            "worker_peak_rss_bytes": [self.peak[p] for p in workers],
            "worker_cpu_seconds": [round(self.cpu[p], 2) for p in workers],
            "root_peak_rss_bytes": self.peak.get(self.root, 0),
            "root_cpu_seconds": round(self.cpu.get(self.root, 0.0), 2),
            "service_peak_rss_sum_bytes": self.peak_sum_rss,
            "service_peak_pss_sum_bytes": self.peak_sum_pss,
        }


def run_monitored(cmd: list[str], *, timeout: float = 3600, pss: bool = True) -> tuple[int, dict, str]:
    """Run ``cmd`` with its process tree monitored; returns (rc, monitor summary, stderr tail)."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with TreeMonitor(p.pid, pss=pss) as mon:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        mon.sample()
    return p.returncode, mon.summary(), (err or "")[-3000:]


# ============================================================================================
# Child commands (run by the orchestrator in subprocesses)


# Scan variants, for side-by-side A/B figures of a change in the same run (``--variants``).
# ``prev`` is the code as it was before the performance work: onnxruntime arena off with memory
# patterns on, subnormal weights kept, one task per worker. ``int8`` swaps the detector for a quantized file
# (benchmarks/quantize.py) - for measurement only, its bundle still names the fp32 model.
VARIANTS = {
    "prev": {"depth": 1, "sess": {"enable_cpu_mem_arena": False, "enable_mem_pattern": True}, "flush": False, "trim": False},
    "depth1": {"depth": 1},
    "no_flush": {"flush": False},
    "own_arenas": {"shared_arena": False},
    "arena_off": {"sess": {"enable_cpu_mem_arena": False, "enable_mem_pattern": True}},
    "int8": {"detector_model": "var/quant/centerface-int8-minmax.onnx"},
    # what the infrastructure costs without the optional models: gender once per face, no age
    "lean": {"pipeline": {"gender": {"flip_tta": False}, "age": {"enabled": False}}},
    # the scan before the face backbone (issue 19): no descriptor, gender from pixels
    "no_backbone": {"pipeline": {"gender": {"model": "gender-wild-v1", "kind": "project-chip"}, "backbone": {"enabled": False}}},
    # the descriptor of the face alone, without its mirror image (issue 13: one backbone pass per face)
    "no_flip": {"pipeline": {"backbone": {"flip": False}}},
    # the GPU (issue 16): on a host with onnxruntime-gpu and a GPU, next to the CPU scan of the same
    # run; elsewhere it warns and runs on the CPU (the start-up log says which provider ran)
    "gpu": {"pipeline": {"providers": ["cuda", "cpu"]}},
}
VARIANT_ENV = "FORENSIC_GENDER_BENCH_VARIANT"


def apply_variant_in_process(v: dict) -> None:
    """Patch this process's session options / detector file as the variant says."""
    if v.get("flush") is False:
        from daemon.pipeline import sessions

        sessions.flush_denormals = lambda path: None
    if v.get("trim") is False:
        from daemon.pipeline import sessions

        sessions._trim_heap = lambda: None
    if v.get("shared_arena") is False or v.get("sess"):  # forced options: each session its own arena
        from daemon.pipeline import sessions

        sessions._shared_arena = lambda: False
    if v.get("sess"):
        import onnxruntime as _ort

        from daemon.pipeline import sessions

        real, force = _ort.InferenceSession, v["sess"]

        def forced(path, sess_options=None, providers=None):  # noqa: ANN001, ANN202
            for k, val in force.items():
                setattr(sess_options, k, val)
            return real(path, sess_options=sess_options, providers=providers)

        import types

        sessions.ort = types.SimpleNamespace(**{k: getattr(_ort, k) for k in dir(_ort) if not k.startswith("__")})
        sessions.ort.InferenceSession = forced
    if v.get("detector_model"):
        from daemon.pipeline import analyze

        real_mf, det = analyze.model_store.model_file, (ROOT / v["detector_model"]).resolve()

        def model_file(mdir, manifest, name):  # noqa: ANN001, ANN202
            return det if name == "centerface" else real_mf(mdir, manifest, name)

        import types

        analyze.model_store = types.SimpleNamespace(**{k: getattr(analyze.model_store, k) for k in dir(analyze.model_store) if not k.startswith("__")})
        analyze.model_store.model_file = model_file


def _variant_worker_main(conn, cfg, db_url, threads):  # noqa: ANN001, ANN201
    """A product worker with the variant (from the environment) applied first."""
    from daemon import workers

    apply_variant_in_process(json.loads(os.environ.get(VARIANT_ENV, "{}")))
    return workers._worker_main(conn, cfg, db_url, threads)  # unpatched in this (spawned) process


def child_scan(args: argparse.Namespace) -> int:
    """``forensic-gender scan`` as the command runs it (the library call), instrumented."""
    import resource

    from daemon import scan as scan_mod
    from daemon.config import parse

    pipe = json.loads(args.pipeline or "{}")
    for section, values in json.loads(args.variant or "{}").get("pipeline", {}).items():
        pipe[section] = {**pipe.get(section, {}), **values} if isinstance(values, dict) else values  # providers: a list
    cfg = parse({"database": args.db, "pipeline": pipe}, check_paths=False)
    seconds: dict[str, float] = {}
    faces: dict[str, list] = {}
    per_image: dict[str, float] = {}
    writer = [0.0, 0]
    orig = scan_mod.record

    def record(store, outcome, *a, **k):  # noqa: ANN001, ANN002, ANN003
        t = time.perf_counter()
        orig(store, outcome, *a, **k)
        writer[0] += time.perf_counter() - t
        writer[1] += 1
        res = getattr(outcome, "result", None)
        if res is not None:
            for key, v in res.seconds.items():
                seconds[key] = seconds.get(key, 0.0) + v
            faces[res.path] = [list(f.box) for f in res.faces]
            per_image[res.path] = sum(res.seconds.values())

    scan_mod.record = record
    variant = json.loads(args.variant or "{}")
    if variant:
        import functools

        from daemon import workers

        os.environ[VARIANT_ENV] = json.dumps(variant)
        workers._worker_main = _variant_worker_main  # what _Worker starts; pickled by reference
        if "depth" in variant:
            scan_mod.WorkerPool = functools.partial(workers.WorkerPool, depth=variant["depth"])
    marks: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    s = scan_mod.scan([args.set], cfg, workers=args.workers, progress=lambda d, n: marks.append((time.perf_counter(), d)))
    t1 = time.perf_counter()
    ru_c = resource.getrusage(resource.RUSAGE_CHILDREN)
    ru_s = resource.getrusage(resource.RUSAGE_SELF)
    ready = marks[0][0] if marks else t0
    Path(args.out).write_text(json.dumps({
        "workers": args.workers, "analysed": s.analysed, "linked": s.linked, "failed": dict(s.failures), "faces": s.faces,
        "seconds_total": t1 - t0, "seconds_startup": ready - t0, "seconds_steady": marks[-1][0] - ready if marks else 0.0,
        "stage_seconds": seconds, "writer_seconds": writer[0], "writes": writer[1],
        "children_cpu_seconds": ru_c.ru_utime + ru_c.ru_stime, "parent_cpu_seconds": ru_s.ru_utime + ru_s.ru_stime,
        "children_max_rss_bytes": ru_c.ru_maxrss * 1024, "parent_max_rss_bytes": ru_s.ru_maxrss * 1024,
        "detections": faces, "per_image_seconds": per_image,
    }))
    return 0


def _bound_proc(kind: str, paths: list[str], pipeline_json: str, counter, barrier, q) -> None:  # noqa: ANN001
    """One process of a bound: prepare inputs, wait for the others, then claim work dynamically."""
    from daemon.config import parse
    from daemon.pipeline import align, detect, images, reading
    from daemon.pipeline.analyze import load_pipeline

    cfg = parse({"pipeline": json.loads(pipeline_json)}, check_paths=False).pipeline
    pipe = load_pipeline(cfg, threads=1)
    hint = pipe.decode_hint()
    lim = cfg.limits
    prepared: list = []
    if kind in ("detect", "session"):
        for p in paths:
            dec = images.decode(reading.read_file(p).data, max_pixels=lim.max_pixels, min_side_hint=hint)
            if kind == "detect":
                prepared.append(dec.bgr)
            else:  # the detector's own input tensors, made exactly as Detector.detect makes them
                blobs = []
                h, w = dec.bgr.shape[:2]
                for ps in detect.plan_passes(w, h, cfg.detector.max_side, cfg.detector.tile_side):
                    crop = dec.bgr[ps.y:ps.y + ps.h, ps.x:ps.x + ps.w]
                    tw, th, _ = detect.input_size(ps.w, ps.h, int(round(max(ps.w, ps.h) * ps.scale)))
                    blobs.append(detect.to_blob(align.resize(crop, tw, th)[..., ::-1]))
                prepared.append(blobs)
    n_done = faces = 0
    barrier.wait()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    while True:
        with counter.get_lock():
            i = counter.value
            counter.value += 1
        if i >= len(paths):
            break
        if kind == "decode":
            fb = reading.read_file(paths[i], max_bytes=lim.max_file_bytes)
            images.decode(fb.data, max_pixels=lim.max_pixels, min_side_hint=hint)
        elif kind == "detect":
            faces += len(pipe.detector.detect(prepared[i]))
        elif kind == "session":
            for b in prepared[i]:
                pipe.detector.session.run({"input.1": b})
        n_done += 1
    t1 = time.perf_counter()
    q.put({"t0": t0, "t1": t1, "n": n_done, "faces": faces, "cpu": time.process_time() - cpu0,
           "peak_rss_bytes": _proc_status(os.getpid()).get("VmHWM", 0)})


def measure_bound(kind: str, paths: list[str], procs: int, pipeline_json: str) -> dict:
    ctx = mp.get_context("spawn")
    counter = ctx.Value("i", 0)
    barrier = ctx.Barrier(procs)
    q = ctx.Queue()
    ps = [ctx.Process(target=_bound_proc, args=(kind, paths, pipeline_json, counter, barrier, q)) for _ in range(procs)]
    for p in ps:
        p.start()
    res = [q.get(timeout=3600) for _ in ps]
    for p in ps:
        p.join()
    wall = max(r["t1"] for r in res) - min(r["t0"] for r in res)
    n = sum(r["n"] for r in res)
    return {"kind": kind, "procs": procs, "images": n, "seconds": wall, "images_per_s": n / wall,
            "faces": sum(r["faces"] for r in res), "cpu_seconds": sum(r["cpu"] for r in res),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in res)}


def measure_scan(set_dir: Path, workers: int, pipeline_json: str, tag: str, variant: str = "") -> dict:
    run_dir = OUT / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    db = run_dir / f"scan-{tag}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    out = run_dir / f"scan-{tag}.json"
    cmd = [PY, __file__, "_scan", "--set", str(set_dir), "--db", f"sqlite:///{db}", "--workers", str(workers),
           "--out", str(out), "--pipeline", pipeline_json, "--variant", json.dumps(VARIANTS[variant] if variant else {})]
    rc, mon, err = run_monitored(cmd)
    if rc != 0:
        raise RuntimeError(f"scan child failed ({rc}):\n{err}")
    r = json.loads(out.read_text())
    import sqlite3

    with sqlite3.connect(db) as c:
        r["db_files_done"] = c.execute("SELECT count(*) FROM files WHERE state = 'done'").fetchone()[0]
        r["db_faces"] = c.execute("SELECT count(*) FROM faces").fetchone()[0]
    n = r["analysed"] + r["linked"] + sum(r["failed"].values())
    r.update(images=n, images_per_s=n / r["seconds_steady"], faces_per_s=r["faces"] / r["seconds_steady"],
             images_per_s_with_startup=n / r["seconds_total"], memory=mon)
    return r


def measure_reference(paths: list[str], tag: str) -> dict:
    run_dir = OUT / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    lst, out, db = run_dir / "ref-list.json", run_dir / f"ref-{tag}.json", run_dir / f"ref-{tag}.db"
    lst.write_text(json.dumps(paths))
    db.unlink(missing_ok=True)
    rc, mon, err = run_monitored([PY, str(Path(__file__).parent / "research_reference.py"), "--list", str(lst),
                                  "--out", str(out), "--db", str(db)])
    if rc != 0:
        raise RuntimeError(f"reference failed ({rc}):\n{err}")
    r = json.loads(out.read_text())
    r["memory"] = mon
    return r


# ============================================================================================
# Recall


def recall(truth_by_path: dict[str, list], dets_by_path: dict[str, list], min_width: float) -> dict:
    from daemon.metrics import match_boxes

    found = total = 0
    for p, truth in truth_by_path.items():
        t = np.asarray(truth, np.float64).reshape(-1, 4)
        keep = (t[:, 2] - t[:, 0]) >= min_width
        if not keep.any():
            continue
        d = dets_by_path.get(p) or {"boxes": [], "scores": []}
        boxes = np.asarray(d["boxes"], np.float64).reshape(-1, 4)
        scores = np.asarray(d["scores"], np.float64) if "scores" in d else np.ones(len(boxes))
        m = match_boxes(t, boxes, scores)
        found += int((m[keep] >= 0).sum())
        total += int(keep.sum())
    return {"found": found, "total": total, "recall": found / total if total else float("nan")}


def product_detections(paths: list[str], pipeline_json: str) -> dict[str, dict]:
    """The product pipeline's faces (full-resolution upright frame) for ``paths``."""
    from daemon.config import parse
    from daemon.pipeline.analyze import load_pipeline

    pipe = load_pipeline(parse({"pipeline": json.loads(pipeline_json)}, check_paths=False).pipeline, threads=1)
    out = {}
    for p in paths:
        r = pipe.analyze_file(p)
        out[p] = {"boxes": [list(f.box) for f in r.faces], "scores": [f.score for f in r.faces]}
    return out


def reference_detections(paths: list[str]) -> dict[str, dict]:
    lst, out = OUT / "run" / "recall-list.json", OUT / "run" / "recall-ref.json"
    lst.parent.mkdir(parents=True, exist_ok=True)
    lst.write_text(json.dumps(paths))
    subprocess.run([PY, str(Path(__file__).parent / "research_reference.py"), "--list", str(lst), "--out", str(out),
                    "--detect-only"], cwd=ROOT, check=True)
    return json.loads(out.read_text())["detections"]


# ============================================================================================
# Service (forensic-gender run), RSS curve, arena check


def service_available() -> bool:
    if not (ROOT / "daemon" / "service.py").exists():
        return False
    fg = Path(PY).parent / "forensic-gender"
    r = subprocess.run([str(fg), "run", "--help"], cwd=ROOT, capture_output=True, text=True)
    return r.returncode == 0 and "--watch" in r.stdout


def _db_count(db: Path, sql: str) -> int:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as c:
            return c.execute(sql).fetchone()[0]
    except sqlite3.Error:
        return -1


def measure_service(items: list[dict], workers: int, tag: str, idle_seconds: float = 10.0) -> dict:
    """Start ``forensic-gender run`` on an empty watched folder and wait for READY=1 (its
    sd_notify message, received on a socket of ours); measure idle CPU; drop one image into the
    idle folder (latency to its row); then drop the whole set (time until the last row)."""
    import socket
    import tempfile

    run_dir = OUT / "run"
    watch, db = run_dir / f"watch-{tag}", run_dir / f"service-{tag}.db"
    shutil.rmtree(watch, ignore_errors=True)
    watch.mkdir(parents=True)
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    cfg_file = run_dir / f"service-{tag}.yaml"
    cfg_file.write_text(json.dumps({"service": {"workers": workers}}))  # JSON is YAML
    fg = Path(PY).parent / "forensic-gender"
    cmd = [str(fg), "run", "--config", str(cfg_file), "--watch", str(watch), "--db", f"sqlite:///{db}"]
    sock_dir = tempfile.mkdtemp(prefix="fg-bench-")
    sock_path = os.path.join(sock_dir, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.5)
    env = dict(os.environ, NOTIFY_SOCKET=sock_path)
    t_start = time.monotonic()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    done_sql = "SELECT count(*) FROM files WHERE state IN ('done', 'failed', 'quarantined')"
    res: dict = {"workers": workers, "command": " ".join(cmd)}
    try:
        with TreeMonitor(p.pid, pss=False) as mon:
            ready = False
            while not ready and time.monotonic() - t_start < 300 and p.poll() is None:
                try:
                    ready = b"READY=1" in sock.recv(4096)
                except TimeoutError:
                    pass
            if not ready:
                raise RuntimeError(f"forensic-gender run did not report READY=1 ({p.poll()}): {p.stderr.read()[-2000:] if p.poll() is not None else ''}")
            res["startup_seconds"] = time.monotonic() - t_start
            time.sleep(2.0)  # let the start-up scan and log lines settle
            cpu_a = sum(_cpu_seconds(q) for q in mon._tree())
            time.sleep(idle_seconds)
            cpu_b = sum(_cpu_seconds(q) for q in mon._tree())
            res["idle_cpu_percent"] = 100.0 * (cpu_b - cpu_a) / idle_seconds
            res["idle_seconds"] = idle_seconds
            # one image into the idle folder
            first = next(it for it in items if it["kind"] == "scene")
            t = time.monotonic()
            shutil.copy(first["path"], watch / "single.jpg")
            while _db_count(db, done_sql) < 1 and time.monotonic() - t < 120:
                time.sleep(0.02)
            res["single_image_latency_seconds"] = time.monotonic() - t
            # the whole set
            sub = watch / "set"
            sub.mkdir()
            t = time.monotonic()
            for it in items:
                shutil.copy(it["path"], sub / it["file"])
            t_copied = time.monotonic()
            n = len(items) + 1
            while _db_count(db, done_sql) < n and time.monotonic() - t < 3600:
                time.sleep(0.05)
            t_end = time.monotonic()
            res.update(images=len(items), seconds=t_end - t, copy_seconds=t_copied - t,
                       images_per_s=len(items) / (t_end - t), faces=_db_count(db, "SELECT count(*) FROM faces"))
            res["faces_per_s"] = res["faces"] / (t_end - t)
            res["memory"] = mon.summary()
    finally:
        p.terminate()
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
        sock.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
    return res


def child_rss(args: argparse.Namespace) -> int:
    """Run ``--n`` images through ONE worker of the product's WorkerPool; RSS curve of the worker."""
    from daemon.config import parse
    from daemon.workers import Analysed, Task, WorkerPool

    paths = json.loads(Path(args.list).read_text())
    cfg = parse({"pipeline": json.loads(args.pipeline or "{}")}, check_paths=False).pipeline
    pool = WorkerPool(1, cfg, db_url=None)
    pool.start()
    pid = pool._workers[0].proc.pid
    curve = [(0, _proc_status(pid).get("VmRSS", 0))]
    every = max(1, args.n // 100)
    done = failed = 0
    t0 = time.perf_counter()
    i = 0
    while done < args.n:
        if pool.free() and i < args.n:
            pool.submit(Task(i, paths[i % len(paths)]))
            i += 1
        for o in pool.poll(1.0):
            done += 1
            failed += not isinstance(o, Analysed)
            if done % every == 0:
                curve.append((done, _proc_status(pool._workers[0].proc.pid).get("VmRSS", 0)))
    seconds = time.perf_counter() - t0
    hwm = _proc_status(pool._workers[0].proc.pid).get("VmHWM", 0)
    pool.close()
    Path(args.out).write_text(json.dumps({"n": args.n, "failed": failed, "seconds": seconds, "curve": curve,
                                          "peak_rss_bytes": hwm, "restarts": pool.restarts, "worker_pid": pid}))
    return 0


def small_copies(items: list[dict], side: int = 480) -> list[str]:
    """Scenes of the set shrunk to ``side`` px (for long RSS runs that must stay short)."""
    import cv2

    d = OUT / "small"
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for it in items:
        if it["kind"] != "scene":
            continue
        p = d / it["file"]
        if not p.exists():
            img = cv2.imread(it["path"], cv2.IMREAD_COLOR)
            s = side / max(img.shape[:2])
            cv2.imwrite(str(p), cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA), [cv2.IMWRITE_JPEG_QUALITY, 90])
        out.append(str(p))
    return out


def measure_rss(items: list[dict], n: int, pipeline_json: str, camera_every: int = 100) -> dict:
    """Many images through ONE product worker: scenes shrunk to 480 px, with a 12 MP photo of
    the set every ``camera_every`` images (so the big-image peak is revisited all along)."""
    small = small_copies(items)
    cams = [it["path"] for it in items if it["kind"] == "camera"]
    seq = []
    for k in range(max(n, 1)):
        big = cams and camera_every and k % camera_every == camera_every - 1
        seq.append(cams[(k // camera_every) % len(cams)] if big else small[k % len(small)])
    lst, out = OUT / "run" / "rss-list.json", OUT / "run" / "rss.json"
    lst.parent.mkdir(parents=True, exist_ok=True)
    lst.write_text(json.dumps(seq))
    subprocess.run([PY, __file__, "_rss", "--list", str(lst), "--n", str(n), "--out", str(out),
                    "--pipeline", pipeline_json], cwd=ROOT, check=True)
    r = json.loads(out.read_text())
    r["camera_every"] = camera_every
    c = np.array(r["curve"], np.float64)
    warm = c[c[:, 0] >= max(50, n * 0.1)]
    if len(warm) >= 3:
        slope = np.polyfit(warm[:, 0], warm[:, 1], 1)[0]
        r["slope_bytes_per_1000_images"] = float(slope * 1000)
        r["rss_first_warm_bytes"], r["rss_last_bytes"] = int(warm[0, 1]), int(warm[-1, 1])
        r["rss_range_after_warmup_bytes"] = int(warm[:, 1].max() - warm[:, 1].min())
    return r


MEM_VARIANTS = {
    "product": None,  # whatever daemon/pipeline/sessions.py sets
    "arena_off": {"enable_cpu_mem_arena": False, "enable_mem_pattern": True},  # the first release (denormals kept too)
    "ort_defaults": {"enable_cpu_mem_arena": True, "enable_mem_pattern": True},  # one arena per session, patterns
    "own_arenas": {"enable_cpu_mem_arena": True, "enable_mem_pattern": False},  # one arena per session, no patterns
    "off_no_patterns": {"enable_cpu_mem_arena": False, "enable_mem_pattern": False},
}


def child_memseq(args: argparse.Namespace) -> int:
    """VmRSS after each image of a small/large/small sequence, and the CPU it took, with the
    product's onnxruntime memory options or a variant forced on every session."""
    from daemon.config import parse
    from daemon.pipeline.analyze import load_pipeline

    force = MEM_VARIANTS[args.variant]
    if force:
        first = args.variant == "arena_off"
        apply_variant_in_process({"sess": force, "flush": not first, "trim": not first})
    cfg = parse({"pipeline": json.loads(args.pipeline or "{}")}, check_paths=False).pipeline
    pipe = load_pipeline(cfg, threads=1)
    seq = json.loads(Path(args.list).read_text())
    rows = [("loaded", _proc_status(os.getpid()).get("VmRSS", 0))]
    c0, w0 = os.times(), time.perf_counter()
    for p in seq:
        pipe.analyze_file(p)
        rows.append((Path(p).name, _proc_status(os.getpid()).get("VmRSS", 0)))
    c1, w1 = os.times(), time.perf_counter()
    Path(args.out).write_text(json.dumps({"variant": args.variant, "options": force, "rows": rows,
                                          "user_seconds": c1.user - c0.user, "system_seconds": c1.system - c0.system,
                                          "seconds": w1 - w0, "loadavg": os.getloadavg(),
                                          "peak_rss_bytes": _proc_status(os.getpid()).get("VmHWM", 0)}))
    return 0


def memcheck_sequence(items: list[dict]) -> list[str]:
    """Shapes in the order that is hardest on an allocator: scenes by increasing size, then 12 MP
    photos (4:3 landscape, EXIF-rotated), a square and a portrait crop of one (detector inputs
    1280x1280 and 939x1280), then the small scenes again."""
    import cv2

    d = OUT / "memcheck"
    d.mkdir(parents=True, exist_ok=True)
    scenes = sorted((it for it in items if it["kind"] == "scene"), key=lambda it: it["width"] * it["height"])
    cams = [it["path"] for it in items if it["kind"] == "camera"][:3]
    extra = []
    if cams:
        full = cv2.imread(cams[0], cv2.IMREAD_COLOR)
        for name, w in (("square.jpg", 3000), ("portrait.jpg", 2200)):
            p = d / name
            if not p.exists():
                cv2.imwrite(str(p), full[:, :w], [cv2.IMWRITE_JPEG_QUALITY, 90])
            extra.append(str(p))
    small = [it["path"] for it in scenes[:: max(1, len(scenes) // 8)]]
    return small + cams + extra + small[:4]


def measure_memseq(items: list[dict], pipeline_json: str, reps: int = 2) -> dict:
    """``memcheck_sequence`` twice over, per variant; the variants alternate so that load drift
    hits them alike."""
    seq = memcheck_sequence(items) * 2
    lst = OUT / "run" / "memseq-list.json"
    lst.parent.mkdir(parents=True, exist_ok=True)
    lst.write_text(json.dumps(seq))
    out: dict = {}
    for r in range(reps):
        for variant in MEM_VARIANTS:
            o = OUT / "run" / f"memseq-{variant}.json"
            subprocess.run([PY, __file__, "_memseq", "--list", str(lst), "--out", str(o), "--variant", variant,
                            "--pipeline", pipeline_json], cwd=ROOT, check=True)
            out.setdefault(variant, []).append(json.loads(o.read_text()))
    return out


# ============================================================================================
# Video: a minute of 1080p H.264 made of dev/wider scenes; decode-only bound, the pipeline, memory

VIDEO_VERSION = 1


def _video_window(sc: dict, j: int, per: int, margin: int) -> tuple[int, int]:
    """Top-left corner, on the scene's canvas, of frame ``j`` of a scene held ``per`` frames (a slow pan)."""
    a = j / max(1, per - 1)
    x0, y0, x1, y1 = sc["pan"]
    return margin + int(round(x0 + (x1 - x0) * a)), margin + int(round(y0 + (y1 - y0) * a))


def video_truth(m: dict, index: int) -> list[list[float]]:
    """The ground-truth boxes of frame ``index`` (an ordinal, as ``Face.frame``) of the bench video."""
    p = m["params"]
    per = int(round(p["hold"] * p["fps"]))
    k, j = divmod(index, per)
    if k >= len(m["scenes"]):
        return []
    sc = m["scenes"][k]
    cx, cy = _video_window(sc, j, per, p["margin"])
    s, (ox, oy) = sc["scale"], sc["offset"]
    return [[b[0] * s + ox - cx, b[1] * s + oy - cy, b[2] * s + ox - cx, b[3] * s + oy - cy] for b in sc["truth"]]


def build_video(out: Path, seconds: int = 60, fps: int = 30, hold: float = 2.0, seed: int = 0, noise_sigma: tuple[float, float] = (8.0, 4.0)) -> dict:
    """Build (or reuse) ``out/scenes-<seconds>s-1080p<fps>.mp4``: H.264 (libx264, yuv420p, CRF 23,
    preset veryfast) at 1920x1080, one dev/wider scene every ``hold`` seconds (evenly spread over
    the sorted label file), each letterboxed (black bars) into a canvas slightly larger than the
    frame that the frame window pans over slowly (< 1 px per frame), with sensor-like noise that
    changes every frame, so that it compresses like camera footage and not like a slide show:
    luminance sigma 8 + colour sigma 4 make ~18 Mbit/s, what phones record at 1080p30 in H.264
    (decoding cost grows with the bitrate: sigma 3 + 2 make 1.2 Mbit/s and decode ~4x faster).
    Returns the manifest (the truth boxes of every scene and where they move: ``video_truth``)."""
    import av
    import cv2

    W, H, M = 1920, 1080, 24  # frame size; the margin the pan moves in
    params = {"version": VIDEO_VERSION, "seconds": seconds, "fps": fps, "hold": hold, "seed": seed, "size": [W, H],
              "margin": M, "noise_sigma": list(noise_sigma), "codec": "libx264", "pix_fmt": "yuv420p", "crf": 23, "preset": "veryfast"}
    path, mpath = out / f"scenes-{seconds}s-{H}p{fps}.mp4", out / f"scenes-{seconds}s-{H}p{fps}.json"
    if path.exists() and mpath.exists():
        m = json.loads(mpath.read_text())
        if m.get("params") == params and m.get("bytes") == path.stat().st_size:
            return dict(m, path=str(path))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    labels = read_wider_labels()
    files = sorted(labels)
    per = int(round(hold * fps))
    n_frames = int(seconds * fps)
    n_scenes = -(-n_frames // per)
    rng = np.random.default_rng(seed)
    # a few noise fields (luminance and colour sigma), cycled: drawing 6 M normal samples
    # per frame would cost more than encoding it; kept as the saturating +/- parts for cv2.add/subtract
    noise = []
    for _ in range(7):
        n = rng.normal(0.0, noise_sigma[0], (H, W, 1)) + rng.normal(0.0, noise_sigma[1], (H, W, 3))
        noise.append((np.clip(n, 0, 255).astype(np.uint8), np.clip(-n, 0, 255).astype(np.uint8)))
    scenes, canvases = [], []
    for i in _pick(n_scenes, len(files)):
        img = cv2.imread(str(WIDER / "images" / files[i]), cv2.IMREAD_COLOR)
        h, w = img.shape[:2]
        s = min((W + 2 * M) / w, (H + 2 * M) / h)
        nw, nh = int(round(w * s)), int(round(h * s))
        ox, oy = (W + 2 * M - nw) // 2, (H + 2 * M - nh) // 2
        canvas = np.zeros((H + 2 * M, W + 2 * M, 3), np.uint8)
        canvas[oy:oy + nh, ox:ox + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_CUBIC if s > 1 else cv2.INTER_AREA)
        canvases.append(canvas)
        scenes.append({"source": files[i], "scale": s, "offset": [ox, oy], "pan": [int(v) for v in rng.integers(-M, M + 1, 4)],
                       "truth": labels[files[i]]})
    tmp = path.with_name(path.stem + ".part.mp4")
    from fractions import Fraction

    with av.open(str(tmp), "w") as oc:
        st = oc.add_stream("libx264", rate=fps, options={"crf": str(params["crf"]), "preset": params["preset"]})
        st.width, st.height, st.pix_fmt = W, H, "yuv420p"
        for f in range(n_frames):
            k, j = divmod(f, per)
            cx, cy = _video_window(scenes[k], j, per, M)
            img = canvases[k][cy:cy + H, cx:cx + W]
            plus, minus = noise[f % len(noise)]
            img = cv2.subtract(cv2.add(img, plus), minus)
            frame = av.VideoFrame.from_ndarray(img, format="bgr24")
            frame.pts, frame.time_base = f, Fraction(1, fps)
            for pkt in st.encode(frame):
                oc.mux(pkt)
        for pkt in st.encode():
            oc.mux(pkt)
    tmp.replace(path)
    size = path.stat().st_size
    m = {"params": params, "bytes": size, "frames": n_frames, "mbit_per_s": size * 8 / 1e6 / seconds,
         "build_seconds": time.perf_counter() - t0, "scenes": scenes}
    mpath.write_text(json.dumps(m, indent=1))
    return dict(m, path=str(path))


def child_video(args: argparse.Namespace) -> int:
    """One process as a worker runs (one thread): ``decode`` = the video's frames decoded as the
    pipeline decodes them (every frame; the sampled ones converted to BGR), no models loaded;
    ``pipeline`` = ``load_pipeline(threads=1)``, one dev/wider scene to warm up, then
    ``Pipeline.analyze_file`` on each of ``--paths`` (the video, or 12 MP photos)."""
    from daemon.config import parse

    cfg = parse({"pipeline": json.loads(args.pipeline or "{}")}, check_paths=False).pipeline
    paths = json.loads(args.paths)
    res: dict = {"mode": args.mode, "rss_start_bytes": _proc_status(os.getpid()).get("VmRSS", 0), "files": []}
    if args.mode == "decode":
        from daemon.pipeline import video

        for p in paths:
            with open(p, "rb") as fo:
                fmt = video.sniff(fo.read(video.SNIFF_BYTES))
                c0, t0 = time.process_time(), time.perf_counter()
                with video.open_clip(fo, fmt, max_pixels=cfg.limits.max_pixels) as clip:  # threads=1, as the pipeline
                    decoded = [0]
                    every = clip._decoded

                    def counted(every=every, decoded=decoded):  # noqa: ANN202
                        for x in every():
                            decoded[0] = x[0] + 1
                            yield x

                    clip._decoded = counted
                    sampled = sum(1 for _ in clip.sample(cfg.video.interval, max_frames=10**9, deadline=float("inf")))
                    info = clip.info
                res["files"].append({"path": p, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                                     "decoded": decoded[0], "sampled": sampled, "duration": info.duration, "fps": info.fps,
                                     "codec": info.codec, "width": info.width, "height": info.height})
    else:
        from daemon.pipeline.analyze import load_pipeline

        pipe = load_pipeline(cfg, threads=1)
        res["rss_loaded_bytes"] = _proc_status(os.getpid()).get("VmRSS", 0)
        if args.warm:
            pipe.analyze_file(args.warm)
        res["rss_warm_bytes"] = _proc_status(os.getpid()).get("VmRSS", 0)
        res["hwm_before_bytes"] = _proc_status(os.getpid()).get("VmHWM", 0)
        for p in paths:
            c0, t0 = time.process_time(), time.perf_counter()
            r = pipe.analyze_file(p)
            v = r.video
            res["files"].append({"path": p, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                                 "format": r.format, "width": r.width, "height": r.height, "stage_seconds": r.seconds,
                                 "faces": [{"frame": f.frame, "box": list(f.box), "score": f.score} for f in r.faces],
                                 "sampled": len(v.sampled) if v else None, "sampled_frames": [x.frame for x in v.sampled] if v else None,
                                 "duration": v.duration if v else None,
                                 "cut": v.cut if v else None, "cut_detail": v.cut_detail if v else None,
                                 "rss_after_bytes": _proc_status(os.getpid()).get("VmRSS", 0)})
    st = _proc_status(os.getpid())
    res.update(peak_rss_bytes=st.get("VmHWM", 0), rss_end_bytes=st.get("VmRSS", 0), loadavg=os.getloadavg())
    Path(args.out).write_text(json.dumps(res, default=str))
    return 0


def measure_video(items: list[dict], pipeline_json: str, reps: int = 1, seconds: int = 60) -> dict:
    """Side by side, in fresh processes (one thread each, as a worker): decode only, the pipeline
    on the video at the configured interval, and the pipeline on three 12 MP photos of the set
    (peak RSS compared). Each run ``reps`` times, in rotating order."""
    from daemon.config import parse

    m = build_video(OUT / "video", seconds=seconds)
    vpath = m["path"]
    scene = next(it["path"] for it in items if it["kind"] == "scene")
    cams = [it["path"] for it in items if it["kind"] == "camera"][:3]
    interval = parse({"pipeline": json.loads(pipeline_json)}, check_paths=False).pipeline.video.interval
    run_dir = OUT / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    steps = [("decode", [vpath], ""), ("pipeline", [vpath], scene)] + ([("image", cams, scene)] if cams else [])
    runs: dict[str, list[dict]] = {}
    for r in range(reps):
        k = r % len(steps)
        for key, paths, warm in steps[k:] + steps[:k]:
            out = run_dir / f"video-{key}.json"
            la = os.getloadavg()
            t = time.perf_counter()
            subprocess.run([PY, __file__, "_video", "--mode", "decode" if key == "decode" else "pipeline", "--paths", json.dumps(paths),
                            "--warm", warm, "--out", str(out), "--pipeline", pipeline_json], cwd=ROOT, check=True)
            res = json.loads(out.read_text())
            res["loadavg_before"] = la
            runs.setdefault(key, []).append(res)
            f0 = res["files"][0]
            what = (f"{f0['decoded'] / f0['seconds']:7.1f} frames/s decoded" if key == "decode" else
                    f"{f0['seconds'] * 60 / f0['duration']:7.1f} s per video minute, {len(f0['faces'])} faces" if key == "pipeline" else
                    f"{statistics.mean(x['seconds'] for x in res['files']):7.2f} s per 12 MP photo")
            print(f"  rep {r + 1}/{reps} video/{key:8s} {what}, peak RSS {gib(res['peak_rss_bytes']):.3f} GiB "
                  f"({time.perf_counter() - t:5.1f} s, load {la[0]:.2f})", flush=True)
    fig: dict = {"file": {k: m[k] for k in ("path", "bytes", "frames", "mbit_per_s", "params")}, "interval": interval, "runs": runs}
    if "decode" in runs:
        d = [x["files"][0] for x in runs["decode"]]
        fig["decode"] = {"frames_per_s": stats([x["decoded"] / x["seconds"] for x in d]),
                         "seconds_per_video_minute": stats([x["seconds"] * 60 / x["duration"] for x in d]),
                         "cpu_seconds_per_video_minute": stats([x["cpu_seconds"] * 60 / x["duration"] for x in d]),
                         "decoded": d[0]["decoded"], "sampled": d[0]["sampled"], "duration": d[0]["duration"],
                         "peak_rss_bytes": stats([x["peak_rss_bytes"] for x in runs["decode"]])}
    if "pipeline" in runs:
        p = [x["files"][0] for x in runs["pipeline"]]
        found = {}
        for f in p[0]["faces"]:
            found.setdefault(str(f["frame"]), {"boxes": [], "scores": []})
            found[str(f["frame"])]["boxes"].append(f["box"])
            found[str(f["frame"])]["scores"].append(f["score"])
        truth = {str(i): video_truth(m, i) for i in p[0]["sampled_frames"]}
        fig["pipeline"] = {"seconds_per_video_minute": stats([x["seconds"] * 60 / x["duration"] for x in p]),
                           "cpu_seconds_per_video_minute": stats([x["cpu_seconds"] * 60 / x["duration"] for x in p]),
                           "sampled_frames_per_s": stats([x["sampled"] / x["seconds"] for x in p]),
                           "sampled": p[0]["sampled"], "faces": len(p[0]["faces"]), "cut": p[0]["cut"],
                           "stage_seconds": p[0]["stage_seconds"], "recall_ge32": recall(truth, found, 32),
                           "peak_rss_bytes": stats([x["peak_rss_bytes"] for x in runs["pipeline"]]),
                           "rss_loaded_bytes": stats([x["rss_loaded_bytes"] for x in runs["pipeline"]]),
                           "rss_warm_bytes": stats([x["rss_warm_bytes"] for x in runs["pipeline"]])}
    if "image" in runs:
        fig["image"] = {"seconds_per_image": stats([statistics.mean(f["seconds"] for f in x["files"]) for x in runs["image"]]),
                        "images": len(cams), "peak_rss_bytes": stats([x["peak_rss_bytes"] for x in runs["image"]]),
                        "rss_loaded_bytes": stats([x["rss_loaded_bytes"] for x in runs["image"]]),
                        "rss_warm_bytes": stats([x["rss_warm_bytes"] for x in runs["image"]])}
    return fig


# ============================================================================================
# Orchestration and reporting


def stats(values: list[float]) -> dict:
    v = [x for x in values if x is not None]
    if not v:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def gib(b: float | None) -> float | None:
    return None if b is None else b / 2**30


@dataclass
class Figures:
    runs: dict[str, list[dict]] = field(default_factory=dict)

    def add(self, key: str, r: dict) -> None:
        self.runs.setdefault(key, []).append(r)

    def series(self, key: str, field_: str) -> list[float]:
        return [r[field_] for r in self.runs.get(key, [])]


def main(argv: list[str] | None = None) -> int:
    global OUT
    ap = argparse.ArgumentParser(description="forensic-gender benchmark (see benchmarks/README.md)")
    sub = ap.add_subparsers(dest="child")
    c = sub.add_parser("_scan")
    c.add_argument("--set"), c.add_argument("--db"), c.add_argument("--workers", type=int), c.add_argument("--out")
    c.add_argument("--pipeline", default="{}"), c.add_argument("--variant", default="{}")
    c = sub.add_parser("_rss")
    c.add_argument("--list"), c.add_argument("--n", type=int), c.add_argument("--out"), c.add_argument("--pipeline", default="{}")
    c = sub.add_parser("_memseq")
    c.add_argument("--list"), c.add_argument("--out"), c.add_argument("--variant", choices=list(MEM_VARIANTS)), c.add_argument("--pipeline", default="{}")
    c = sub.add_parser("_video")
    c.add_argument("--mode", choices=["decode", "pipeline"]), c.add_argument("--paths"), c.add_argument("--warm", default="")
    c.add_argument("--out"), c.add_argument("--pipeline", default="{}")
    ap.add_argument("--quick", action="store_true", help="small set (16 scenes + 6 camera images), 2 repetitions (reference and service once), recall on a third of dev/wider")
    ap.add_argument("--scenes", type=int, help="dev/wider scenes in the set (default 36; quick 16)")
    ap.add_argument("--camera", type=int, help="4000x3000 camera images in the set (default 12; quick 6)")
    ap.add_argument("--reps", type=int, help="repetitions of every timed figure (default 3; quick 2)")
    ap.add_argument("--workers", type=int, default=0, help="N for the N-worker figures (default: one per core)")
    ap.add_argument("--pipeline", default="{}", help="pipeline configuration overrides as JSON, e.g. '{\"detector\": {\"max_side\": 960}}'")
    ap.add_argument("--only", default="", help="comma list of: bounds,scan,reference,recall,service,video,rss,memcheck (default: all but rss/memcheck unless asked)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip")
    ap.add_argument("--variants", default="", help=f"comma list of scan variants measured beside the product, side by side: {', '.join(VARIANTS)}")
    ap.add_argument("--service-reps", type=int, help="repetitions of the service figure (default 2, quick 1)")
    ap.add_argument("--ref-reps", type=int, help="repetitions of the (slow) reference (default: 2, quick 1)")
    ap.add_argument("--rss", type=int, default=0, help="images through one worker for the RSS curve (e.g. 5000); 0: not run")
    ap.add_argument("--memcheck", action="store_true", help="run the onnxruntime arena on/off memory check")
    ap.add_argument("--video-reps", type=int, default=1, help="repetitions of the video figures (default 1: ~1.5 min each on a busy 2-core box)")
    ap.add_argument("--video-seconds", type=int, default=60, help="length of the bench video (default 60: the figures are per video minute)")
    ap.add_argument("--recall-every", type=int, help="use every k-th dev/wider scene for recall (default 1; quick 3)")
    ap.add_argument("--out", default=str(OUT), help="output folder (default var/bench)")
    args = ap.parse_args(argv)
    if args.child == "_scan":
        return child_scan(args)
    if args.child == "_rss":
        return child_rss(args)
    if args.child == "_memseq":
        return child_memseq(args)
    if args.child == "_video":
        return child_video(args)

    OUT = Path(args.out).resolve()
    q = args.quick
    n_scenes = args.scenes or (16 if q else 36)
    n_camera = args.camera if args.camera is not None else (6 if q else 12)
    reps = args.reps or (2 if q else 3)
    recall_every = args.recall_every or (3 if q else 1)
    nw = args.workers or len(os.sched_getaffinity(0))
    parts = {"bounds", "scan", "reference", "recall", "service", "video"}
    if args.only:
        parts = set(args.only.split(","))
    parts -= set(filter(None, args.skip.split(",")))
    if args.rss:
        parts.add("rss")
    if args.memcheck:
        parts.add("memcheck")

    t_begin = time.time()
    load_start = os.getloadavg()
    print(f"load average at start: {load_start}", flush=True)
    set_dir = OUT / f"set-{n_scenes}-{n_camera}"
    items = build_set(set_dir, n_scenes, n_camera)
    paths = [it["path"] for it in items]
    sizes = [it["bytes"] for it in items if it["kind"] == "camera"]
    print(f"set: {len(items)} images ({n_scenes} scenes, {n_camera} camera 4000x3000"
          f"{', %.1f-%.1f MB' % (min(sizes) / 1e6, max(sizes) / 1e6) if sizes else ''}) in {set_dir}", flush=True)
    if "reference" in parts:
        import research_reference

        if not research_reference.EFNET_PATH.exists():
            research_reference.build_efficientnet_b0()

    figs = Figures()
    loads = []
    steps = []
    if "bounds" in parts:
        steps += [("decode_1", lambda: measure_bound("decode", paths, 1, args.pipeline)),
                  (f"decode_{nw}", lambda: measure_bound("decode", paths, nw, args.pipeline)),
                  ("detector_1", lambda: measure_bound("detect", paths, 1, args.pipeline)),
                  (f"detector_{nw}", lambda: measure_bound("detect", paths, nw, args.pipeline)),
                  ("session_1", lambda: measure_bound("session", paths, 1, args.pipeline))]
    if "scan" in parts:
        steps += [("scan_1", lambda: measure_scan(set_dir, 1, args.pipeline, "1")),
                  (f"scan_{nw}", lambda: measure_scan(set_dir, nw, args.pipeline, str(nw)))]
        for v in filter(None, args.variants.split(",")):
            steps += [(f"scan_1_{v}", lambda v=v: measure_scan(set_dir, 1, args.pipeline, f"1-{v}", v)),
                      (f"scan_{nw}_{v}", lambda v=v: measure_scan(set_dir, nw, args.pipeline, f"{nw}-{v}", v))]
    ref_reps = args.ref_reps or (1 if q else min(reps, 2))
    if "reference" in parts:
        steps += [("reference", lambda: measure_reference(paths, "ref"))]
    for r in range(reps if steps else 0):
        k = r % len(steps)
        for key, fn in steps[k:] + steps[:k]:
            if key == "reference" and len(figs.runs.get("reference", [])) >= ref_reps:
                continue
            la = os.getloadavg()
            t = time.perf_counter()
            res = fn()
            res["loadavg_before"] = la
            loads.append(la[0])
            figs.add(key, res)
            print(f"  rep {r + 1}/{reps} {key:12s} {res.get('images_per_s', 0):7.2f} img/s  "
                  f"({time.perf_counter() - t:5.1f} s, load {la[0]:.2f})", flush=True)

    result: dict = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)), "python": platform.python_version(),
        "command": " ".join([Path(PY).name, "benchmarks/bench.py"] + (argv if argv is not None else sys.argv[1:])),
        "loadavg_start": load_start, "set": {"dir": str(set_dir), "images": len(items), "scenes": n_scenes, "camera": n_camera,
                                             "camera_bytes": sizes, "bytes": sum(it["bytes"] for it in items),
                                             "truth_faces": sum(len(it["truth"]) for it in items)},
        "reps": reps, "workers_n": nw, "pipeline_overrides": json.loads(args.pipeline), "figures": {},
    }
    try:
        import cv2
        import onnxruntime

        result["versions"] = {"onnxruntime": onnxruntime.__version__, "opencv": cv2.__version__, "numpy": np.__version__}
    except ImportError:
        pass
    F = result["figures"]
    for key, runs in figs.runs.items():
        F[key] = {"images_per_s": stats([r["images_per_s"] for r in runs])}
        if "faces_per_s" in runs[0]:
            F[key]["faces_per_s"] = stats([r["faces_per_s"] for r in runs])
        F[key]["runs"] = [{k: v for k, v in r.items() if k != "detections"} for r in runs]

    def med(key: str, f: str = "images_per_s") -> float | None:
        return F.get(key, {}).get(f, {}).get("median")

    ratios = {}

    def ratio(name: str, a: str, b: str) -> None:
        # per repetition (same rep, side by side) and of medians
        ra = figs.series(a, "images_per_s")
        rb = figs.series(b, "images_per_s")
        if ra and rb:
            per = [x / y for x, y in zip(ra, rb)]
            ratios[name] = {"of_medians": med(a) / med(b), **{k: v for k, v in stats(per).items()}, "per_rep": per}

    ratio(f"scan_{nw}_over_scan_1", f"scan_{nw}", "scan_1")
    ratio("scan_1_over_detector_1", "scan_1", "detector_1")
    ratio(f"scan_{nw}_over_detector_{nw}", f"scan_{nw}", f"detector_{nw}")
    ratio("scan_1_over_decode_1", "scan_1", "decode_1")
    ratio(f"scan_{nw}_over_decode_{nw}", f"scan_{nw}", f"decode_{nw}")
    ratio(f"scan_{nw}_over_reference", f"scan_{nw}", "reference")
    ratio("scan_1_over_reference", "scan_1", "reference")
    ratio("detector_1_over_session_1", "detector_1", "session_1")
    for v in filter(None, args.variants.split(",")):
        ratio(f"scan_1_over_scan_1_{v}", "scan_1", f"scan_1_{v}")
        ratio(f"scan_{nw}_over_scan_{nw}_{v}", f"scan_{nw}", f"scan_{nw}_{v}")
        ratio(f"scan_{nw}_{v}_over_scan_1_{v}", f"scan_{nw}_{v}", f"scan_1_{v}")
    ratio(f"detector_{nw}_over_detector_1", f"detector_{nw}", "detector_1")
    ratio(f"decode_{nw}_over_decode_1", f"decode_{nw}", "decode_1")
    result["ratios"] = ratios

    # stage shares and CPU per image (load-independent complement of wall-clock scaling)
    for key in [k for k in figs.runs if k.startswith("scan_")]:
        runs = figs.runs.get(key)
        if not runs:
            continue
        shares = []
        for r in runs:
            w = r["workers"] * r["seconds_steady"]
            st = dict(r["stage_seconds"])
            busy = sum(st.values())
            shares.append({**{k: v / w for k, v in st.items()}, "worker_idle_or_ipc": max(0.0, (w - busy) / w),
                           "writer_in_parent": r["writer_seconds"] / r["seconds_steady"]})
        F[key]["stage_shares"] = {k: statistics.median(s[k] for s in shares) for k in shares[0]}
        F[key]["worker_cpu_seconds_per_image"] = stats([r["children_cpu_seconds"] / r["images"] for r in runs])
        F[key]["worker_peak_rss_bytes"] = stats([max(r["memory"]["worker_peak_rss_bytes"] or [r["children_max_rss_bytes"]]) for r in runs])
        F[key]["service_peak_pss_bytes"] = stats([r["memory"]["service_peak_pss_sum_bytes"] for r in runs])
        F[key]["service_peak_rss_sum_bytes"] = stats([r["memory"]["service_peak_rss_sum_bytes"] for r in runs])
        F[key]["parent_peak_rss_bytes"] = stats([r["parent_max_rss_bytes"] for r in runs])
        F[key]["startup_seconds"] = stats([r["seconds_startup"] for r in runs])
    # per image class: seconds per image (worker time for the product, wall time for the
    # reference, which uses every core), so that the ratio can be read for another mix
    kind_of = {it["path"]: it["kind"] for it in items}
    per_class: dict = {}
    for key in [k for k in figs.runs if k.startswith("scan_1")] + (["reference"] if "reference" in figs.runs else []):
        for kind in ("scene", "camera"):
            vals = []
            for r in figs.runs[key]:
                src = r.get("per_image_seconds") or {p: d["seconds"] for p, d in r.get("detections", {}).items() if isinstance(d, dict) and "seconds" in d}
                v = [t for p, t in src.items() if kind_of.get(p) == kind]
                if v:
                    vals.append(sum(v) / len(v))
            if vals:
                per_class.setdefault(kind, {})[key] = stats(vals)
    result["seconds_per_image_by_class"] = per_class
    if "reference" in figs.runs:
        runs = figs.runs["reference"]
        F["reference"]["peak_rss_bytes"] = stats([r["memory"]["root_peak_rss_bytes"] for r in runs])
        F["reference"]["cpu_seconds_per_image"] = stats([r["cpu_seconds"] / r["images"] for r in runs])

    # recall on the bench set (from the timed runs) and on dev/wider
    rec: dict = {}
    truth = {it["path"]: it["truth"] for it in items}
    by_kind = {k: {it["path"]: it["truth"] for it in items if it["kind"] == k} for k in ("scene", "camera")}
    for key in [k for k in figs.runs if k.startswith("scan_1")]:
        det = {p: {"boxes": b, "scores": [1.0] * len(b)} for p, b in figs.runs[key][0]["detections"].items()}
        name = "bench_product" + key[len("scan_1"):]
        rec[name] = {f"{k}_ge32": recall(v, det, 32) for k, v in by_kind.items()}
        rec[name]["all_ge32"] = recall(truth, det, 32)
    if figs.runs.get("reference"):
        det = figs.runs["reference"][0]["detections"]
        rec["bench_reference"] = {f"{k}_ge32": recall(v, det, 32) for k, v in by_kind.items()}
        rec["bench_reference"]["all_ge32"] = recall(truth, det, 32)
    if "recall" in parts:
        labels = read_wider_labels()
        files = sorted(labels)[::recall_every]
        wpaths = [str(WIDER / "images" / f) for f in files]
        wt = {str(WIDER / "images" / f): labels[f] for f in files}
        print(f"recall on dev/wider: {len(files)} scenes", flush=True)
        t = time.perf_counter()
        prod = product_detections(wpaths, args.pipeline)
        ref = reference_detections(wpaths) if "reference" in parts else None
        rec["dev_wider"] = {"scenes": len(files), "every": recall_every, "seconds": time.perf_counter() - t}
        for mw in (20, 32, 64):
            rec["dev_wider"][f"product_ge{mw}"] = recall(wt, prod, mw)
            if ref is not None:
                rec["dev_wider"][f"reference_ge{mw}"] = recall(wt, ref, mw)
    result["recall"] = rec

    if "service" in parts:
        if service_available():
            print("service figure: forensic-gender run", flush=True)
            svc = [measure_service(items, nw, f"{r}") for r in range(args.service_reps or (1 if q else min(reps, 2)))]
            F["service"] = {"images_per_s": stats([s["images_per_s"] for s in svc]),
                            "faces_per_s": stats([s["faces_per_s"] for s in svc]),
                            "idle_cpu_percent": stats([s["idle_cpu_percent"] for s in svc]),
                            "single_image_latency_seconds": stats([s["single_image_latency_seconds"] for s in svc]),
                            "worker_peak_rss_bytes": stats([max(s["memory"]["worker_peak_rss_bytes"] or [0]) for s in svc]),
                            "service_peak_rss_sum_bytes": stats([s["memory"]["service_peak_rss_sum_bytes"] for s in svc]),
                            "startup_seconds": stats([s["startup_seconds"] for s in svc]), "runs": svc}
        else:
            F["service"] = {"pending": "daemon/service.py (forensic-gender run) is not in this checkout yet"}
    if "video" in parts:
        print(f"video: {args.video_seconds} s of 1080p30 H.264 from dev/wider scenes; decode only, pipeline, 12 MP photos (one thread each)", flush=True)
        result["video"] = measure_video(items, args.pipeline, args.video_reps, args.video_seconds)
        loads += [x["loadavg_before"][0] for runs in result["video"]["runs"].values() for x in runs]
    if "rss" in parts:
        n = args.rss or 300
        print(f"RSS curve: {n} images through one worker", flush=True)
        result["rss_curve"] = measure_rss(items, n, args.pipeline)
    if "memcheck" in parts:
        print("memory check: onnxruntime arena off (product) vs on", flush=True)
        result["memcheck"] = measure_memseq(items, args.pipeline)

    result["loadavg_end"] = os.getloadavg()
    result["loadavg_during_median"] = statistics.median(loads) if loads else None
    result["seconds"] = time.time() - t_begin
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "result.json").write_text(json.dumps(result, indent=1, default=float))
    md = render_markdown(result, nw)
    (OUT / "result.md").write_text(md)
    print(md)
    return 0


def _fmt(s: dict | None, f: str = "{:.2f}") -> str:
    if not s or s.get("median") is None:
        return "-"
    return f"{f.format(s['median'])} ({f.format(s['min'])}-{f.format(s['max'])})"


def render_video(v: dict) -> list[str]:
    fl, p = v["file"], v["file"]["params"]
    lines = [f"video: {fl['path'].rsplit('/', 1)[-1]}, {p['seconds']} s {p['size'][0]}x{p['size'][1]} {p['fps']} fps "
             f"{p['codec']} {p['pix_fmt']} CRF {p['crf']} {p['preset']}, {fl['bytes'] / 1e6:.1f} MB ({fl['mbit_per_s']:.1f} Mbit/s), "
             f"a dev/wider scene every {p['hold']:g} s; one process, one thread each (as a worker), "
             f"{len(next(iter(v['runs'].values())))} run(s); sampling interval {v['interval']:g} s", "",
             "| video figure | s per video minute, median (min-max) | frames/s | CPU s per video minute | peak RSS GiB |", "|---|---|---|---|---|"]
    g = lambda s: _fmt({k: gib(x) if k != "n" and x is not None else x for k, x in s.items()}, "{:.3f}")  # noqa: E731
    if "decode" in v:
        d = v["decode"]
        lines.append(f"| decode only ({d['decoded']} frames decoded, {d['sampled']} converted) | {_fmt(d['seconds_per_video_minute'])} | "
                     f"{_fmt(d['frames_per_s'], '{:.1f}')} decoded | {_fmt(d['cpu_seconds_per_video_minute'])} | {g(d['peak_rss_bytes'])} |")
    if "pipeline" in v:
        q = v["pipeline"]
        rc = q["recall_ge32"]
        lines.append(f"| pipeline, `analyze_file` ({q['sampled']} frames sampled, {q['faces']} faces; recall >= 32 px {rc['recall']:.3f} "
                     f"({rc['found']}/{rc['total']}); cut: {q['cut'] or 'none'}) | {_fmt(q['seconds_per_video_minute'])} | "
                     f"{_fmt(q['sampled_frames_per_s'], '{:.2f}')} sampled | {_fmt(q['cpu_seconds_per_video_minute'])} | {g(q['peak_rss_bytes'])} |")
    if "image" in v:
        im = v["image"]
        lines.append(f"| pipeline, {im['images']} 12 MP photos (for comparison) | {_fmt(im['seconds_per_image'])} s per photo | | | {g(im['peak_rss_bytes'])} |")
    if "pipeline" in v:
        st = v["pipeline"]["stage_seconds"]
        lines.append("")
        lines.append("video pipeline stages (s): " + ", ".join(f"{k} {x:.1f}" for k, x in st.items())
                     + f"; RSS after loading the models {g(v['pipeline']['rss_loaded_bytes'])} GiB, after one warm-up scene "
                     + f"{g(v['pipeline']['rss_warm_bytes'])} GiB (then the video, or the photos: peak RSS above)")
    return lines


def render_markdown(r: dict, nw: int) -> str:
    F, R = r["figures"], r["ratios"]
    lines = [f"# forensic-gender bench ({r['when']})", "",
             f"`{r['command']}` - {r['set']['images']} images ({r['set']['scenes']} dev/wider scenes + {r['set']['camera']} 4000x3000 camera JPEGs), "
             f"{r['reps']} repetitions, N = {nw}; load average {r['loadavg_start'][0]:.2f} at start, "
             f"{(r['loadavg_during_median'] or 0):.2f} median during, {r['loadavg_end'][0]:.2f} at end ({r['affinity']} CPUs).", ""]
    if any("images_per_s" in f for f in F.values()):
        lines += ["| figure | images/s median (min-max) | faces/s | peak RSS / worker (GiB) |", "|---|---|---|---|"]
    order = ["decode_1", f"decode_{nw}", "session_1", "detector_1", f"detector_{nw}", "scan_1", f"scan_{nw}"]
    order += sorted(k for k in F if k.startswith("scan_") and k not in order) + ["service", "reference"]
    for key in order:
        if key not in F or "images_per_s" not in F[key]:
            continue
        f = F[key]
        mem = f.get("worker_peak_rss_bytes") or f.get("peak_rss_bytes")
        mem_s = "-" if not mem else f"{gib(mem['median']):.2f} ({gib(mem['min']):.2f}-{gib(mem['max']):.2f})"
        if "worker_peak_rss_bytes" not in f and "runs" in f and f["runs"] and "peak_rss_bytes" in f["runs"][0]:
            mem_s = f"{gib(max(x['peak_rss_bytes'] for x in f['runs'])):.2f}"
        lines.append(f"| {key} | {_fmt(f['images_per_s'])} | {_fmt(f.get('faces_per_s'), '{:.1f}')} | {mem_s} |")
    if "service" in F and "pending" in F["service"]:
        lines.append(f"| service | pending: {F['service']['pending']} | | |")
    if "service" in F and "idle_cpu_percent" in F["service"]:
        sv = F["service"]
        lines += ["", f"service (`forensic-gender run`, N = {nw}, default stability window): idle CPU {_fmt(sv['idle_cpu_percent'])} %, "
                  f"one image into an idle folder -> row in {_fmt(sv['single_image_latency_seconds'])} s, "
                  f"READY=1 after {_fmt(sv['startup_seconds'])} s, whole service peak RSS (sum) "
                  f"{gib(sv['service_peak_rss_sum_bytes']['median']):.2f} GiB"]
    if R:
        lines += ["", "| ratio | of medians | per repetition median (min-max) |", "|---|---|---|"]
    for k, v in R.items():
        lines.append(f"| {k} | {v['of_medians']:.3f} | {v['median']:.3f} ({v['min']:.3f}-{v['max']:.3f}) |")
    for key in [k for k in order if k.startswith("scan_")]:
        if key in F and "stage_shares" in F[key]:
            sh = ", ".join(f"{k} {v:.1%}" for k, v in F[key]["stage_shares"].items())
            lines.append("")
            lines.append(f"{key}: worker time shares: {sh}; worker CPU/image {_fmt(F[key]['worker_cpu_seconds_per_image'], '{:.3f}')} s; "
                         f"whole service peak PSS {_fmt({k: gib(v) if isinstance(v, (int, float)) and k != 'n' else v for k, v in F[key]['service_peak_pss_bytes'].items()})} GiB; "
                         f"start-up {_fmt(F[key]['startup_seconds'])} s")
    pc = r.get("seconds_per_image_by_class", {})
    if pc:
        lines += ["", "| seconds per image by class (median) | " + " | ".join(pc[next(iter(pc))]) + " |",
                  "|---|" + "---|" * len(pc[next(iter(pc))])]
        for kind, d in pc.items():
            lines.append(f"| {kind} | " + " | ".join(f"{v['median']:.3f}" for v in d.values()) + " |")
        lines.append("(product: one worker's busy time per image; reference: wall time per image using every core)")
    rec = r.get("recall", {})
    if rec:
        lines += ["", "| recall at IoU 0.5 | product | reference |", "|---|---|---|"]
        for where, pk, rk in (("dev/wider >= 20 px", "product_ge20", "reference_ge20"),
                              ("dev/wider >= 32 px", "product_ge32", "reference_ge32"),
                              ("dev/wider >= 64 px", "product_ge64", "reference_ge64")):
            d = rec.get("dev_wider", {})
            if pk in d:
                ref = d.get(rk)
                lines.append(f"| {where} | {d[pk]['recall']:.3f} ({d[pk]['found']}/{d[pk]['total']}) | "
                             + (f"{ref['recall']:.3f} ({ref['found']}/{ref['total']}) |" if ref else "- |"))
        for prod in [k for k in rec if k.startswith("bench_product")]:
            tag = prod[len("bench_product"):].lstrip("_")
            for sub in ("scene_ge32", "camera_ge32", "all_ge32"):
                p, q = rec.get(prod, {}).get(sub), rec.get("bench_reference", {}).get(sub)
                if p or q:
                    lines.append(f"| bench set {sub.replace('_ge32', '')} >= 32 px{' (' + tag + ')' if tag else ''} | "
                                 + (f"{p['recall']:.3f} ({p['found']}/{p['total']})" if p else "-") + " | "
                                 + (f"{q['recall']:.3f} ({q['found']}/{q['total']})" if q else "-") + " |")
    if "video" in r:
        lines += [""] + render_video(r["video"])
    if "rss_curve" in r:
        c = r["rss_curve"]
        lines += ["", f"RSS curve, one worker, {c['n']} images: peak {gib(c['peak_rss_bytes']):.3f} GiB, "
                  f"slope after warm-up {c.get('slope_bytes_per_1000_images', 0) / 2**20:.2f} MiB per 1000 images, "
                  f"range after warm-up {c.get('rss_range_after_warmup_bytes', 0) / 2**20:.1f} MiB, {c['seconds']:.0f} s"]
    if "memcheck" in r:
        lines += ["", "| onnxruntime memory options | peak RSS GiB | RSS at end GiB | after loading GiB | user CPU s | system CPU s |",
                  "|---|---|---|---|---|---|"]
        for k, runs in r["memcheck"].items():
            med = lambda f: statistics.median(f(v) for v in runs)  # noqa: E731
            lines.append(f"| {k} {runs[0]['options'] or '(sessions.py)'} | {gib(med(lambda v: v['peak_rss_bytes'])):.3f} | "
                         f"{gib(med(lambda v: v['rows'][-1][1])):.3f} | {gib(med(lambda v: v['rows'][0][1])):.3f} | "
                         f"{med(lambda v: v['user_seconds']):.2f} | {med(lambda v: v['system_seconds']):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
