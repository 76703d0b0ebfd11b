"""The analysis pipeline as a library: bytes -> decoded upright image -> faces with gender and age.

No database and no watcher here. ``load_pipeline(config)`` loads the models once (eagerly, so a
missing or wrong model fails at start-up); ``Pipeline.analyze_file(path)`` reads the file once,
hashes it, decodes it safely and returns an :class:`ImageResult`. Per-file problems raise
:class:`daemon.pipeline.images.ImageError` with a machine-readable ``reason``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from daemon import models as model_store
from daemon.config import PipelineConfig
from daemon.pipeline import align, classify, detect, images, phash, reading, video
from daemon.pipeline.exif import Capture
from daemon.pipeline.sessions import PROVIDER, ModelLoadError, Session, check_probabilities, choose_providers

log = logging.getLogger(__name__)

DLIB_MEANS = (122.782, 117.001, 104.298)
SEED_SIZE = 150


@dataclass(frozen=True)
class Face:
    """One face. Geometry in the upright, full-resolution image (see :mod:`detect`)."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: tuple[tuple[float, float], ...]
    width_px: float
    p_male: float
    p_female: float
    gender: str
    age: float | None
    age_std: float | None
    descriptor: bytes | None = None  # the backbone's identity vector, float16 little-endian
    frame: int | None = None  # a video's frame (ordinal among its decoded frames); None in an image
    time: float | None = None  # that frame's time in seconds from the video's start

    def to_json(self) -> dict:
        """The face as JSON (the descriptor is stored in the database, not printed)."""
        d = asdict(self)
        del d["descriptor"]
        d["box"] = [round(v, 1) for v in self.box]
        d["landmarks"] = [[round(x, 1), round(y, 1)] for x, y in self.landmarks]
        if self.frame is None:
            del d["frame"], d["time"]
        for k in ("score", "p_male", "p_female", "width_px", "age", "age_std"):
            if d[k] is not None:
                d[k] = round(d[k], 4)
        return d


@dataclass(frozen=True)
class SampledFrame:
    """One sampled frame of a video: where it is, how many faces it has, its perceptual hash."""

    frame: int
    time: float
    faces: int
    near_hash: str | None


@dataclass(frozen=True)
class VideoResult:
    """What a video adds to its :class:`ImageResult`: the container's facts, the frames sampled
    and, when sampling stopped before the end, why (``cut``, a :class:`daemon.states.VideoCut`)."""

    codec: str
    duration: float | None
    fps: float | None
    rotation: int
    interval: float
    sampled: tuple[SampledFrame, ...]
    cut: str | None = None
    cut_detail: str | None = None


@dataclass(frozen=True)
class ImageResult:
    """Everything the pipeline learned about one file."""

    path: str
    size: int
    sha256: str
    md5: str
    mtime_ns: int
    format: str
    width: int
    height: int
    orientation: int
    frames: int
    notes: tuple[str, ...]
    faces: tuple[Face, ...]
    seconds: dict[str, float] = field(default_factory=dict)
    near_hash: str | None = None  # perceptual hash of the decoded, upright image (daemon.pipeline.phash)
    capture: Capture | None = None  # EXIF: when, on which device, where (daemon.pipeline.exif)
    video: VideoResult | None = None  # for a video: its facts and sampled frames (faces carry their frame)


@dataclass(frozen=True)
class ChipSpec:
    """How a classifier wants its input: aligned chips or loose crops, size and normalization."""

    kind: str  # "aligned" | "loose"
    size: int
    means_rgb: tuple[float, float, float] | None
    scale: float
    output: str  # "softmax2" (female, male) | "sigmoid1" (p male) | "softmax-age"
    input_name: str
    output_name: str
    padding: float = align.PADDING


class Detector:
    """CenterFace through onnxruntime, with the configured input policy."""

    def __init__(self, session: Session, cfg) -> None:
        self.session = session
        self.cfg = cfg

    def detect(self, bgr: np.ndarray) -> detect.Detections:
        """Faces in ``bgr``'s own pixel frame, after NMS."""
        h, w = bgr.shape[:2]
        found = []
        for p in detect.plan_passes(w, h, self.cfg.max_side, self.cfg.tile_side):
            crop = bgr[p.y : p.y + p.h, p.x : p.x + p.w]
            tw, th, _ = detect.input_size(p.w, p.h, int(round(max(p.w, p.h) * p.scale)))
            small = align.resize(crop, tw, th)
            outs = self.session.run({"input.1": detect.to_blob(small[..., ::-1])})
            dets = detect.decode(*outs, threshold=self.cfg.threshold, valid_hw=(th, tw))
            found.append(dets.transformed(tw / p.w, p.x, p.y))
        dets = detect.Detections.concat(found)
        keep = detect.nms(dets.boxes, dets.scores, self.cfg.nms_iou)
        dets = dets.take(keep)
        if self.cfg.min_face_px > 0 and len(dets):
            dets = dets.take(np.nonzero(dets.boxes[:, 2] - dets.boxes[:, 0] >= self.cfg.min_face_px)[0])
        return dets


class Classifier:
    """A gender or age network with its chip specification."""

    def __init__(self, session: Session, spec: ChipSpec, *, flip_tta: bool = False) -> None:
        self.session, self.spec, self.flip_tta = session, spec, flip_tta

    def chips(self, bgr: np.ndarray, dets: detect.Detections) -> np.ndarray:
        if self.spec.kind == "loose":
            return align.loose_crops(bgr, dets.boxes, self.spec.size)
        return align.align_faces(bgr, dets.landmarks, self.spec.size, padding=self.spec.padding)

    def same_chips(self, other: Classifier) -> bool:
        """Whether ``other`` cuts the same chips (then they are cut once for both)."""
        a, b = self.spec, other.spec
        return (a.kind, a.size, a.padding) == (b.kind, b.size, b.padding)

    def probabilities(self, chips: np.ndarray) -> np.ndarray:
        """(N, K) checked probabilities for uint8 BGR chips, one batch for all faces."""
        s = self.spec
        x = classify.normalize(chips, s.means_rgb, s.scale)
        n = len(chips)
        if self.flip_tta:
            x = np.concatenate([x, x[..., ::-1].copy()])
        (raw,) = self.session.run({s.input_name: x})
        where = f"{self.session.name} output {s.output_name!r}"
        if s.output == "sigmoid1":
            p = check_probabilities(np.asarray(raw, np.float32).reshape(len(x), -1), len(x), 1, where, rows_sum_to_one=False)
            p = np.concatenate([1 - p, p], axis=1)
        else:
            k = 2 if s.output == "softmax2" else 81
            p = check_probabilities(np.asarray(raw), len(x), k, where, rows_sum_to_one=True)
        if self.flip_tta:
            p = (p[:n] + p[n:]) / 2
        return p  # calibrated already: the project's models carry their temperature inside the graph


class Backbone:
    """The face backbone: one batched pass over its chips gives the identity descriptor and the
    tensors heads read (``outputs``: the descriptor first)."""

    def __init__(self, session: Session, spec: ChipSpec, outputs: tuple[str, ...]) -> None:
        self.session, self.spec, self.outputs = session, spec, outputs

    def run(self, bgr: np.ndarray, dets: detect.Detections, *, flip: bool = False) -> dict[str, np.ndarray]:
        """Output name -> (N, ...) array for the faces ``dets`` (mirrored chips when ``flip``)."""
        chips = align.align_faces(bgr, dets.landmarks, self.spec.size, padding=self.spec.padding)
        if flip:
            chips = chips[:, :, ::-1]
        x = classify.normalize(chips, self.spec.means_rgb, self.spec.scale)
        return dict(zip(self.outputs, self.session.run({self.spec.input_name: x}), strict=True))

    def run_both(self, bgr: np.ndarray, dets: detect.Detections) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """:meth:`run` for the chips and their mirror images in one batched pass."""
        chips = align.align_faces(bgr, dets.landmarks, self.spec.size, padding=self.spec.padding)
        x = classify.normalize(np.concatenate([chips, chips[:, :, ::-1]]), self.spec.means_rgb, self.spec.scale)
        n = len(chips)
        outs = self.session.run({self.spec.input_name: x})
        return ({k: v[:n] for k, v in zip(self.outputs, outs, strict=True)},
                {k: v[n:] for k, v in zip(self.outputs, outs, strict=True)})


class Head:
    """A gender model that reads a backbone tensor instead of pixels (``[female, male]`` out,
    calibrated inside the graph)."""

    def __init__(self, session: Session, tensor: str, input_name: str, *, flip_tta: bool = False) -> None:
        self.session, self.tensor, self.input_name, self.flip_tta = session, tensor, input_name, flip_tta

    def probabilities(self, feats: dict[str, np.ndarray], flipped: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """(N, 2) checked probabilities; averaged with the mirrored faces' when given."""
        where = f"{self.session.name} output {self.session.output_names[0]!r}"

        def run(f: dict[str, np.ndarray]) -> np.ndarray:
            x = np.ascontiguousarray(f[self.tensor], np.float32)
            return check_probabilities(np.asarray(self.session.run({self.input_name: x})[0]), len(x), 2, where,
                                       rows_sum_to_one=True)
        p = run(feats)
        if flipped is not None:
            p = (p + run(flipped)) / 2
        return p


class Pipeline:
    """Detector + gender classifier (+ age estimator, + face backbone) with the parameters that
    shape results."""

    def __init__(self, cfg: PipelineConfig, detector: Detector, gender: Classifier | Head, age: Classifier | None,
                 bundle: dict, backbone: Backbone | None = None) -> None:
        self.cfg, self.detector, self.gender, self.age, self.backbone = cfg, detector, gender, age, backbone
        self.bundle = bundle
        self.bundle_key = hashlib.sha256(json.dumps(bundle, sort_keys=True).encode()).hexdigest()[:16]
        # the execution providers the sessions run on, in order (the bundle names them unless CPU)
        self.providers: list[str] = bundle.get("providers", [PROVIDER])

    def decode_hint(self) -> int:
        d = self.cfg.detector
        return d.max_side * 2 if d.tile_side else d.max_side

    def analyze_file(self, path: str | os.PathLike) -> ImageResult:
        """Read once, hash, decode, analyse an image or video the user named (symlinks followed)."""
        result = self.analyze_path(path)
        assert isinstance(result, ImageResult)
        return result

    def analyze_path(
        self, path: str | os.PathLike, *, root: str | None = None, inode: int | None = None,
        known: Callable[[reading.FileHash], bool] | None = None, progress: Callable[[], None] | None = None,
    ) -> ImageResult | reading.FileHash:
        """Read once (a video: hash streaming, then decode from the same open file), analyse.
        ``known`` sees the hashes first: when it says the content was analysed already, only
        they come back.
        Raises ``images.ImageError`` for bad input."""
        t0 = time.perf_counter()
        with reading.opened(path, root=root, inode=inode) as f:
            fmt = video.sniff(f.head(video.SNIFF_BYTES))
            fh: reading.FileHash
            if fmt is None:
                fh = f.read_all(self.cfg.limits.max_file_bytes)
            else:
                fh = f.hash_all(self.cfg.video.max_file_bytes)
            if known is not None and known(fh):
                return fh
            if isinstance(fh, reading.FileBytes):
                return self.analyze_bytes(fh, str(path), t0)
            assert fmt is not None
            result = self.analyze_video(f, fh, fmt, str(path), t0, progress)
            f.check_unchanged()
            return result

    def analyze_video(self, f: reading.Opened, fh: reading.FileHash, fmt: str, path: str, t0: float,
                      progress: Callable[[], None] | None = None) -> ImageResult:
        """Sample a video's frames (:mod:`daemon.pipeline.video`) and analyse each like an image;
        ``progress()`` after each frame (a worker tells its pool it is not hung)."""
        vc = self.cfg.video
        faces: list[Face] = []
        sampled: list[SampledFrame] = []
        secs = {"detect": 0.0, "classify": 0.0, "near_hash": 0.0}
        deadline = time.monotonic() + vc.budget_seconds - (time.perf_counter() - t0)
        with f.reader() as fo, video.open_clip(fo, fmt, max_pixels=self.cfg.limits.max_pixels) as clip:
            for fr in clip.sample(vc.interval, max_frames=vc.max_frames, deadline=deadline):
                found, s = self.analyze_array(fr.bgr)
                faces.extend(replace(fc, frame=fr.index, time=fr.time) for fc in found)
                t = time.perf_counter()
                sampled.append(SampledFrame(fr.index, fr.time, len(found), phash.near_hash(fr.bgr)))
                secs["near_hash"] += time.perf_counter() - t
                secs["detect"] += s["detect"]
                secs["classify"] += s["classify"]
                if progress is not None:
                    progress()
            info = clip.info
            cut, detail = clip.cut, clip.cut_detail
        secs["read_decode"] = max(0.0, time.perf_counter() - t0 - sum(secs.values()))
        notes = list(info.notes)
        notes.append(f"video: {len(sampled)} frames sampled every {vc.interval:g} s")
        if cut is not None:
            notes.append(f"video cut ({cut}): {detail}")
        return ImageResult(
            path=path, size=fh.size, sha256=fh.sha256, md5=fh.md5, mtime_ns=fh.mtime_ns, format=fmt,
            width=info.width, height=info.height, orientation=1, frames=info.frames or len(sampled),
            notes=tuple(notes), faces=tuple(faces), seconds=secs, near_hash=sampled[0].near_hash,
            capture=info.capture,
            video=VideoResult(codec=info.codec, duration=info.duration, fps=info.fps, rotation=info.rotation,
                              interval=vc.interval, sampled=tuple(sampled), cut=cut, cut_detail=detail),
        )  # fmt: skip

    def analyze_bytes(self, fb: reading.FileBytes, path: str = "", t0: float | None = None) -> ImageResult:
        t0 = time.perf_counter() if t0 is None else t0
        dec = images.decode(fb.data, max_pixels=self.cfg.limits.max_pixels, min_side_hint=self.decode_hint())
        t1 = time.perf_counter()
        faces, secs = self.analyze_array(dec.bgr, dec.scale)
        secs["read_decode"] = t1 - t0
        t2 = time.perf_counter()
        near = phash.near_hash(dec.bgr)
        secs["near_hash"] = time.perf_counter() - t2
        return ImageResult(
            path=path, size=fb.size, sha256=fb.sha256, md5=fb.md5, mtime_ns=fb.mtime_ns,
            format=dec.format, width=dec.width, height=dec.height, orientation=dec.orientation,
            frames=dec.frames, notes=tuple(dec.notes), faces=tuple(faces), seconds=secs, near_hash=near,
            capture=dec.capture,
        )

    def analyze_array(self, bgr: np.ndarray, scale: float = 1.0) -> tuple[list[Face], dict[str, float]]:
        """Faces in an upright BGR image that is ``scale`` times the full-resolution image."""
        t0 = time.perf_counter()
        dets = self.detector.detect(bgr)
        t1 = time.perf_counter()
        if not len(dets):
            return [], {"detect": t1 - t0, "classify": 0.0}
        feats = mirrored = descriptors = None
        if self.backbone is not None:
            if self.cfg.backbone.flip or (isinstance(self.gender, Head) and self.gender.flip_tta):
                feats, mirrored = self.backbone.run_both(bgr, dets)
            else:
                feats = self.backbone.run(bgr, dets)
            descriptors = feats["descriptor"]
            if self.cfg.backbone.flip:  # the mean of the face's and its mirror image's descriptors
                descriptors = (descriptors + mirrored["descriptor"]) / 2  # type: ignore[index]
        chips = None
        if isinstance(self.gender, Head):
            assert feats is not None and self.backbone is not None  # load_pipeline guarantees it
            pg = self.gender.probabilities(feats, mirrored if self.gender.flip_tta else None)
        else:
            chips = self.gender.chips(bgr, dets)
            pg = self.gender.probabilities(chips)
        labels = classify.decide(pg[:, 1], self.cfg.gender.threshold, self.cfg.gender.uncertain_margin)
        ages = stds = None
        if self.age is not None:
            if chips is None or not self.age.same_chips(self.gender):  # a head cuts no chips
                chips = self.age.chips(bgr, dets)
            ages, stds = classify.age_statistics(self.age.probabilities(chips))
        t2 = time.perf_counter()
        full = dets.transformed(scale)
        faces = []
        for i in range(len(full)):
            b = tuple(float(v) for v in full.boxes[i])
            faces.append(Face(
                box=b, score=float(full.scores[i]),
                landmarks=tuple((float(x), float(y)) for x, y in full.landmarks[i]),
                width_px=b[2] - b[0], p_male=float(pg[i, 1]), p_female=float(pg[i, 0]), gender=labels[i],
                age=None if ages is None else float(ages[i]), age_std=None if stds is None else float(stds[i]),
                descriptor=None if descriptors is None else descriptors[i].astype("<f2").tobytes(),
            ))
        return faces, {"detect": t1 - t0, "classify": t2 - t1}


def load_pipeline(cfg: PipelineConfig, *, threads: int = 1) -> Pipeline:
    """Load and check every model named by ``cfg``; raises ModelError / ModelLoadError."""
    align.set_threads(threads)
    mdir = Path(cfg.models_dir) if cfg.models_dir else model_store.default_models_dir()
    manifest = model_store.load_manifest(mdir)
    providers = choose_providers(cfg.providers)  # a WARNING for each requested one missing here
    det_path = model_store.model_file(mdir, manifest, "centerface")
    det_sess = Session(det_path, inputs={"input.1": 4}, outputs=["537", "538", "539", "540"], threads=threads, name="centerface", providers=providers)
    det = Detector(det_sess, cfg.detector)
    hashes = {"centerface": manifest.models["centerface"].inference_sha256}

    backbone = None
    if cfg.backbone.enabled:
        bspec = manifest.models.get(cfg.backbone.model)
        if bspec is None or bspec.role != "backbone":
            raise ModelLoadError(f"pipeline.backbone.model must name a backbone in {manifest.path}, got "
                                 f"{cfg.backbone.model!r}; set it to dlib-face-v1 or disable the backbone")
        outs = tuple(o.name for o in bspec.outputs)
        bsess = Session(model_store.model_file(mdir, manifest, bspec.name), inputs={bspec.input.name: 4},
                        outputs=list(outs), threads=threads, name=bspec.name, providers=providers)
        backbone = Backbone(bsess, ChipSpec("aligned", int(bspec.chip_size or bspec.input.shape[-1]),
                                            tuple(bspec.normalization.means), float(bspec.normalization.scale),
                                            "tensors", bspec.input.name, outs[0],
                                            padding=float(bspec.chip_padding if bspec.chip_padding is not None else align.PADDING)),
                            outs)
        hashes["backbone"] = bspec.inference_sha256

    g = cfg.gender
    gender: Classifier | Head
    if g.kind != "seed-efficientnet" and g.model in manifest.models and manifest.models[g.model].backbone:
        hspec = manifest.models[g.model]
        if backbone is None or hspec.backbone != backbone.session.name:
            raise ModelLoadError(f"pipeline.gender.model {g.model} reads {hspec.backbone}'s {hspec.backbone_tensor}: "
                                 f"set pipeline.backbone.enabled: true and pipeline.backbone.model: {hspec.backbone}")
        hsess = Session(model_store.model_file(mdir, manifest, g.model), inputs={hspec.input.name: 4},
                        outputs=[hspec.outputs[0].name], threads=threads, name=g.model, providers=providers)
        gender = Head(hsess, str(hspec.backbone_tensor), hspec.input.name, flip_tta=g.flip_tta)
        hashes["gender"] = hspec.inference_sha256
    elif g.kind == "seed-efficientnet":
        path = Path(g.model)
        sess = Session(path, inputs={"input.1": 4}, outputs=None, threads=threads, name=path.name, providers=providers)
        if len(sess.output_names) != 1:
            raise ModelLoadError(f"{path}: a seed-efficientnet model must have exactly one output (p male), it has {sess.output_names}")
        spec = ChipSpec("loose", SEED_SIZE, None, 1 / 255, "sigmoid1", "input.1", sess.output_names[0])
        hashes["gender"] = _sha256(path)
        gender = Classifier(sess, spec, flip_tta=g.flip_tta)
    else:
        gspec = manifest.models[g.model]
        path = model_store.model_file(mdir, manifest, g.model)
        spec = chip_spec(gspec)
        sess = Session(path, inputs={spec.input_name: 4}, outputs=[spec.output_name], threads=threads, name=g.model, providers=providers)
        hashes["gender"] = gspec.inference_sha256
        gender = Classifier(sess, spec, flip_tta=g.flip_tta)

    age = None
    if cfg.age.enabled:
        aspec = chip_spec(manifest.models[cfg.age.model], age=True)
        apath = model_store.model_file(mdir, manifest, cfg.age.model)
        asess = Session(apath, inputs={aspec.input_name: 4}, outputs=[aspec.output_name], threads=threads, name=cfg.age.model, providers=providers)
        age = Classifier(asess, aspec)
        hashes["age"] = manifest.models[cfg.age.model].inference_sha256

    d = cfg.detector
    bundle = {
        "models": hashes,
        "detector": {"threshold": d.threshold, "nms_iou": d.nms_iou, "max_side": d.max_side, "tile_side": d.tile_side, "min_face_px": d.min_face_px},
        "gender": {"model": Path(g.model).name, "kind": g.kind, "flip_tta": g.flip_tta, "template": align.TEMPLATE.round(4).tolist()},
    }
    if backbone is not None:
        bundle["backbone"] = {"model": cfg.backbone.model, "size": backbone.spec.size, "padding": backbone.spec.padding,
                              "flip": cfg.backbone.flip}
    sessions = [det.session, gender.session] + [m.session for m in (backbone, age) if m is not None]
    used = list(dict.fromkeys(p for sess in sessions for p in sess.providers))
    if used != [PROVIDER]:  # results from a GPU are their own bundle; CPU-only keeps the key it always had
        bundle["providers"] = used
    return Pipeline(cfg, det, gender, age, bundle, backbone)


def chip_spec(spec: model_store.ModelSpec, *, age: bool = False) -> ChipSpec:
    """The chip specification a manifest entry describes (never guessed from tensor shapes)."""
    size = int(spec.input.shape[-1])
    norm = spec.normalization
    means = tuple(norm.means) if any(norm.means) else None
    if age:
        output = "softmax-age"
    else:
        output = "sigmoid1" if spec.labels is not None and len(spec.labels) == 1 else "softmax2"
        if spec.labels is not None and len(spec.labels) == 2 and tuple(spec.labels) != ("female", "male"):
            raise ModelLoadError(f"{spec.name}: gender labels must be [female, male], the manifest says {list(spec.labels)}")
    return ChipSpec(
        kind="aligned", size=size, means_rgb=means, scale=float(norm.scale), output=output,
        input_name=spec.input.name, output_name=spec.outputs[0].name,
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
