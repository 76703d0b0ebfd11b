"""``forensic-gender evaluate``: validate the configured pipeline on labelled images.

Labelled data format (the layout of ``../shared/data/dev``; see ``docs/EVALUATION.md``)
-------------------------------------------------------------------------------------------
A labelled folder holds ``images/`` and ``labels.csv`` (UTF-8, comma-separated, header row):

- ``file`` (required): the image's path relative to ``images/`` (no ``..``, not absolute).
- ``gender`` (optional): ``male``, ``female`` or blank (not annotated; perceived gender).
- ``age`` (optional): age in years (a number >= 0) or blank.
- ``age_group`` or ``perceived_age_group`` (optional): a free-text age group used to break gender
  results down where no numeric age exists (WIDER's ``Young Adult``, ``Adult``...).
- ``race`` (optional): a free-text group (FairFace's seven) used to break gender results down.
- ``x1, y1, x2, y2`` (optional, all four or none in the header): a face box in pixels of the
  upright image (EXIF orientation applied), ``x2 = x1 + width``, as in
  :mod:`daemon.pipeline.detect`.

With box columns the folder is a *scene* folder: one row per labelled face, every row has a box,
and detections are matched to boxes at IoU >= 0.5, greedily by detection score
(:func:`daemon.metrics.match_boxes`). Without them it is a *crop* folder: one row per image,
and the labelled face is the detection nearest the image centre among those whose box contains
the centre (:func:`daemon.metrics.match_centre`); none such counts as a miss. Other columns are
ignored. Every problem in a labels file is reported at once, with its row number.

What is measured (per folder): detection recall (overall and by face width, scene folders
only), the precision lower bound, detections per image; gender with male positive over found
faces (and counting misses as errors), ROC-AUC, the confusion matrix, the uncertain share, by
face width and age group; calibration of p(male); age MAE by band and the minor flag (an
estimate under 18 against a label under 18). Definitions live in :mod:`daemon.metrics`.

Each image is analysed once by the same worker pool as ``scan`` (no database). The raw
predictions are kept (``predictions/<folder>.json``) so a later run can re-score them with a
higher detection threshold or another uncertain band (``--reuse``) without re-running models.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from daemon import __version__, metrics
from daemon.config import Config, PipelineConfig

log = logging.getLogger(__name__)

LABELS = "labels.csv"
IMAGES = "images"
BOX_COLUMNS = ("x1", "y1", "x2", "y2")
AGE_GROUP_COLUMNS = ("age_group", "perceived_age_group")
MAX_PROBLEMS = 25
PREDICTIONS_VERSION = 1


class EvaluationError(Exception):
    """Labelled data or a reused run that cannot be evaluated; ``problems`` lists every issue."""

    def __init__(self, problems: list[str], where: str = "evaluate") -> None:
        self.problems = problems
        shown = problems[:MAX_PROBLEMS]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        super().__init__(f"{where}: {len(problems)} problem(s):\n  " + "\n  ".join(shown) + more)


# --- labelled data ---------------------------------------------------------------------------

@dataclass(frozen=True)
class LabelledFace:
    """One labelled face; ``box`` is None in crop folders. ``row`` is the CSV line number."""

    row: int
    box: tuple[float, float, float, float] | None
    gender: str | None
    age: float | None
    age_group: str | None
    race: str | None = None

    @property
    def width(self) -> float | None:
        return None if self.box is None else self.box[2] - self.box[0]


@dataclass(frozen=True)
class LabelledImage:
    file: str
    path: Path
    faces: tuple[LabelledFace, ...]


@dataclass(frozen=True)
class LabelledSet:
    """A labelled folder, read and checked. ``kind`` is ``scene`` (boxes) or ``crops``."""

    name: str
    root: Path
    kind: str
    images: tuple[LabelledImage, ...]
    labels_sha256: str
    data_hash: str
    unlisted: int

    @property
    def faces(self) -> int:
        return sum(len(i.faces) for i in self.images)


def load_labelled(folder: str | os.PathLike, name: str | None = None) -> LabelledSet:
    """Read ``folder/labels.csv`` and check it against ``folder/images``; raises
    :class:`EvaluationError` listing every problem."""
    root = Path(folder)
    where = str(root)
    labels, images_dir = root / LABELS, root / IMAGES
    if not root.is_dir():
        raise EvaluationError([f"{root}: must be a folder holding {IMAGES}/ and {LABELS}, got no such folder; "
                               "check the path"], where)
    if not labels.is_file() or not images_dir.is_dir():
        missing = [p.name + ("/" if p is images_dir else "") for p in (labels, images_dir) if not p.exists()]
        raise EvaluationError([f"{root}: a labelled folder must hold {IMAGES}/ and {LABELS}; missing {', '.join(missing)} "
                               "(see docs/EVALUATION.md for the format)"], where)
    raw = labels.read_bytes()
    problems: list[str] = []
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise EvaluationError([f"{labels}: must be UTF-8 text, got undecodable bytes at offset {err.start}; re-save it as UTF-8"], where) from err
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    if "file" not in header:
        raise EvaluationError([f"{labels}: the header must have a 'file' column, got {header or 'no header'}"], where)
    has_box = [c in header for c in BOX_COLUMNS]
    if any(has_box) and not all(has_box):
        raise EvaluationError([f"{labels}: box columns must be all of {', '.join(BOX_COLUMNS)} or none, got only "
                               f"{', '.join(c for c, h in zip(BOX_COLUMNS, has_box, strict=True) if h)}"], where)
    scene = all(has_box)
    group_col = next((c for c in AGE_GROUP_COLUMNS if c in header), None)
    by_file: dict[str, list[LabelledFace]] = {}
    for line, row in enumerate(reader, start=2):
        face = _parse_row(row, line, scene, group_col, labels.name, problems)
        file = (row.get("file") or "").strip()
        if not file:
            problems.append(f"{labels.name} line {line}: 'file' must name an image under {IMAGES}/, got a blank")
            continue
        if Path(file).is_absolute() or ".." in Path(file).parts:
            problems.append(f"{labels.name} line {line}: 'file' must be relative to {IMAGES}/ without '..', got {file!r}")
            continue
        if face is not None:
            by_file.setdefault(file, []).append(face)
    if not scene:
        for file, faces in by_file.items():
            if len(faces) > 1:
                problems.append(f"{labels.name} lines {', '.join(str(f.row) for f in faces)}: a crop folder has one row per image, "
                                f"{file!r} has {len(faces)}; add x1,y1,x2,y2 columns to label several faces in one image")
    images, sizes = [], []
    for file in by_file:
        path = images_dir / file
        try:
            st = path.stat()
        except OSError:
            problems.append(f"{labels.name} line {by_file[file][0].row}: {IMAGES}/{file} does not exist; fix the name or remove the row")
            continue
        if not path.is_file():
            problems.append(f"{labels.name} line {by_file[file][0].row}: {IMAGES}/{file} must be a regular file")
            continue
        images.append(LabelledImage(file, path, tuple(by_file[file])))
        sizes.append((file, st.st_size))
    if not by_file and not problems:
        problems.append(f"{labels.name}: has no rows; label at least one image")
    if problems:
        raise EvaluationError(problems, where)
    listed = set(by_file)
    unlisted = sum(1 for p in images_dir.rglob("*") if p.is_file() and p.relative_to(images_dir).as_posix() not in listed)
    if unlisted:
        log.warning("%s: %d file(s) under %s/ have no row in %s and are not evaluated", root, unlisted, IMAGES, LABELS)
    return LabelledSet(
        name=name or root.resolve().name, root=root, kind="scene" if scene else "crops", images=tuple(images),
        labels_sha256=hashlib.sha256(raw).hexdigest(), data_hash=data_hash(raw, sizes), unlisted=unlisted,
    )


def _parse_row(row: dict, line: int, scene: bool, group_col: str | None, fname: str, problems: list[str]) -> LabelledFace | None:
    where = f"{fname} line {line}"
    ok = True
    gender = (row.get("gender") or "").strip().lower() or None
    if gender is not None and gender not in metrics.TRUTH:
        problems.append(f"{where}: 'gender' must be male, female or blank, got {row.get('gender')!r}")
        ok = False
    age = None
    if (row.get("age") or "").strip():
        try:
            age = float(row["age"])
            if not (age >= 0 and math.isfinite(age)):
                raise ValueError
        except ValueError:
            problems.append(f"{where}: 'age' must be a number of years >= 0 or blank, got {row['age']!r}")
            ok = False
    box = None
    if scene:
        cells = [(row.get(c) or "").strip() for c in BOX_COLUMNS]
        try:
            x1, y1, x2, y2 = (float(c) for c in cells)
            if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
                raise ValueError
            box = (x1, y1, x2, y2)
        except ValueError:
            problems.append(f"{where}: a scene row needs a box with x2 > x1 and y2 > y1 (pixels), got "
                            f"x1,y1,x2,y2 = {','.join(cells)}")
            ok = False
    group = (row.get(group_col) or "").strip() or None if group_col else None
    race = (row.get("race") or "").strip() or None
    return LabelledFace(line, box, gender, age, group, race) if ok else None


def data_hash(labels: bytes, sizes: Sequence[tuple[str, int]]) -> str:
    """SHA-256 over ``labels.csv`` and the sorted list of (image path, size): cheap, and changes
    when a label, an image name or an image's size changes."""
    h = hashlib.sha256()
    h.update(b"labels.csv\0")
    h.update(labels)
    for file, size in sorted(sizes):
        h.update(f"\0{file}\0{size}".encode())
    return h.hexdigest()


def select(images: Sequence[LabelledImage], limit: int | None) -> list[LabelledImage]:
    """At most ``limit`` images, spread evenly over the labels' order (deterministic)."""
    if limit is None or limit >= len(images):
        return list(images)
    if limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    idx = sorted(set(np.linspace(0, len(images) - 1, limit).round().astype(int).tolist()))
    return [images[i] for i in idx]


# --- predictions -----------------------------------------------------------------------------

@dataclass(frozen=True)
class PredictedFace:
    box: tuple[float, float, float, float]
    score: float
    p_male: float
    age: float | None


@dataclass(frozen=True)
class ImagePrediction:
    """What the pipeline said about one image (``reason`` set when it failed)."""

    file: str
    faces: tuple[PredictedFace, ...]
    width: int | None = None
    height: int | None = None
    reason: str | None = None
    error: str | None = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        # Full precision, so that re-scoring (--reuse) gives exactly the figures of the run itself.
        d["faces"] = [[*(float(v) for v in f.box), float(f.score), float(f.p_male), None if f.age is None else float(f.age)]
                      for f in self.faces]
        d["seconds"] = {k: round(v, 5) for k, v in self.seconds.items()}
        return d

    @staticmethod
    def from_json(d: dict) -> ImagePrediction:
        faces = tuple(PredictedFace(tuple(f[:4]), f[4], f[5], f[6]) for f in d["faces"])  # type: ignore[arg-type]
        return ImagePrediction(d["file"], faces, d.get("width"), d.get("height"), d.get("reason"), d.get("error"), d.get("seconds") or {})


def _prediction(file: str, outcome: Any) -> ImagePrediction:
    from daemon.workers import Analysed

    if isinstance(outcome, Analysed):
        r = outcome.result
        faces = tuple(PredictedFace(f.box, f.score, f.p_male, f.age) for f in r.faces)
        return ImagePrediction(file, faces, r.width, r.height, seconds=dict(r.seconds))
    reason = getattr(outcome, "reason", "unknown")
    error = getattr(outcome, "error", repr(outcome))
    log.warning("%s: not analysed (%s): %s", file, reason, error)
    return ImagePrediction(file, (), reason=reason, error=error)


def predict(pool: Any, images: Sequence[LabelledImage], *, desc: str = "", progress: bool = True) -> list[ImagePrediction]:
    """Analyse each image once on a started :class:`daemon.workers.WorkerPool`, in order."""
    from tqdm import tqdm

    from daemon.workers import Task

    out: dict[int, ImagePrediction] = {}
    nxt = 0
    with tqdm(total=len(images), desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True,
              disable=None if progress else True) as bar:
        while len(out) < len(images):
            while pool.free() and nxt < len(images):
                pool.submit(Task(nxt, str(images[nxt].path)))
                nxt += 1
            for outcome in pool.poll(0.5):
                out[outcome.file_id] = _prediction(images[outcome.file_id].file, outcome)
                bar.update(1)
    return [out[i] for i in range(len(images))]


# --- scoring ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScoreParams:
    """Parameters applied when scoring: a detection threshold (faces scoring below are dropped;
    it can only raise the one the predictions were made with; kept when score > threshold, as in
    :func:`daemon.pipeline.detect.decode`), the gender threshold and band."""

    detection_threshold: float
    gender_threshold: float
    uncertain_margin: float
    iou_min: float = 0.5

    @staticmethod
    def of(cfg: PipelineConfig) -> ScoreParams:
        return ScoreParams(cfg.detector.threshold, cfg.gender.threshold, cfg.gender.uncertain_margin)


@dataclass(frozen=True)
class FaceOutcome:
    """A labelled face and what the pipeline made of it (``p_male`` NaN when missed)."""

    gender: str | None
    age: float | None
    age_group: str | None
    width: float | None  # labelled box width (scene folders)
    found: bool
    p_male: float
    age_estimate: float | None
    image: str = ""
    race: str | None = None


def match_image(img: LabelledImage, pred: ImagePrediction, kind: str, params: ScoreParams) -> tuple[list[FaceOutcome], int]:
    """Outcomes for the labelled faces of one image, and the number of detections kept."""
    faces = [f for f in pred.faces if f.score > params.detection_threshold]  # as detect.decode: heat > threshold
    boxes = np.array([f.box for f in faces], np.float64).reshape(-1, 4)
    scores = np.array([f.score for f in faces], np.float64)
    if kind == "scene":
        truth = np.array([f.box for f in img.faces], np.float64)
        which = metrics.match_boxes(truth, boxes, scores, params.iou_min).tolist()
    else:
        if pred.width is None or pred.height is None:
            which = [-1]
        else:
            which = [metrics.match_centre(boxes, pred.width, pred.height)]
    out = []
    for lf, d in zip(img.faces, which, strict=True):
        hit = faces[d] if d >= 0 else None
        out.append(FaceOutcome(
            lf.gender, lf.age, lf.age_group, lf.width, hit is not None,
            math.nan if hit is None else hit.p_male, None if hit is None else hit.age, img.file, lf.race,
        ))
    return out, len(faces)


def _age_group(f: FaceOutcome) -> str | None:
    if f.age is not None:
        return metrics.age_band(f.age)
    return f.age_group


def score(ls: LabelledSet, images: Sequence[LabelledImage], preds: Sequence[ImagePrediction], params: ScoreParams) -> dict:
    """All metrics for one folder (a JSON-ready dict)."""
    outcomes: list[FaceOutcome] = []
    detections = 0
    for img, pred in zip(images, preds, strict=True):
        o, n = match_image(img, pred, ls.kind, params)
        outcomes.extend(o)
        detections += n
    failed = Counter(p.reason for p in preds if p.reason)
    found = sum(o.found for o in outcomes)
    det = metrics.DetectionCounts(len(outcomes), found, detections, len(images))
    res: dict[str, Any] = {
        "images": len(images), "failed_images": dict(failed), "labelled_faces": len(outcomes),
        "detection": det.to_json(),
    }
    if ls.kind == "scene":
        res["detection"]["by_width"] = _detection_by_width(outcomes)

    g = [o for o in outcomes if o.gender is not None]
    if g:
        truth = [o.gender for o in g]
        p = np.array([o.p_male for o in g], np.float64)
        res["gender"] = metrics.gender_report(truth, p, params.gender_threshold, params.uncertain_margin,
                                              [o.image for o in g] if ls.kind == "scene" else None)
        if ls.kind == "scene":
            res["gender"]["by_width"] = {
                name: metrics.gender_report([o.gender for o in sub], [o.p_male for o in sub], params.gender_threshold, params.uncertain_margin)
                for _, _, name in metrics.WIDTH_BANDS
                if (sub := [o for o in g if metrics.width_band(o.width) == name])  # type: ignore[arg-type]
            }
        groups = _ordered_groups(g)
        if groups:
            res["gender"]["by_age_group"] = {
                name: metrics.gender_report([o.gender for o in sub], [o.p_male for o in sub], params.gender_threshold, params.uncertain_margin)
                for name in groups if (sub := [o for o in g if _age_group(o) == name])
            }
        races = sorted({o.race for o in g if o.race})
        if races:
            res["gender"]["by_race"] = {
                name: metrics.gender_report([o.gender for o in sub], [o.p_male for o in sub], params.gender_threshold, params.uncertain_margin)
                for name in races if (sub := [o for o in g if o.race == name])
            }
        found_g = ~np.isnan(p)
        pos = np.array([t == metrics.MALE for t in truth], bool)[found_g]
        bins, ece = metrics.reliability(pos, p[found_g])
        res["calibration"] = {"ece": ece, "bins": [dataclasses.asdict(b) for b in bins]}
        fpr, tpr, thr = metrics.roc_curve(pos, p[found_g])
        res["roc"] = {"fpr": fpr, "tpr": tpr, "thresholds": [t if math.isfinite(t) else None for t in thr]}
    a = [o for o in outcomes if o.age is not None]
    if a:
        est = [o for o in a if o.found and o.age_estimate is not None]
        am = metrics.age_metrics(np.array([o.age for o in est]), np.array([o.age_estimate for o in est]))
        res["age"] = {"labelled": len(a), "estimated": len(est), **am.to_json()}
    secs = [p.seconds for p in preds if p.seconds]
    if secs:
        res["seconds_per_image"] = {k: float(np.mean([s.get(k, 0.0) for s in secs])) for k in ("read_decode", "detect", "classify")}
    return res


def _detection_by_width(outcomes: Sequence[FaceOutcome]) -> dict[str, dict]:
    groups: dict[str, list[FaceOutcome]] = {}
    for t in metrics.WIDTH_MIN:
        groups[f">={t}"] = [o for o in outcomes if o.width is not None and o.width >= t]
    groups["<20"] = [o for o in outcomes if o.width is not None and o.width < 20]
    for _, _, name in metrics.WIDTH_BANDS:
        groups[name] = [o for o in outcomes if o.width is not None and metrics.width_band(o.width) == name]
    return {k: {"labelled": len(v), "matched": sum(o.found for o in v), "recall": metrics.ratio(sum(o.found for o in v), len(v))}
            for k, v in groups.items()}


def _ordered_groups(faces: Sequence[FaceOutcome]) -> list[str]:
    names = {n for o in faces if (n := _age_group(o)) is not None}
    bands = [name for _, _, name in metrics.AGE_BANDS if name in names]
    return bands + sorted(names - set(bands))


# --- orchestration ---------------------------------------------------------------------------

def run_info(cfg: Config, config_file: str | None) -> dict:
    """Version, host, date and platform for the report."""
    from importlib import metadata

    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    return {
        "tool": "forensic-gender", "version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": cfg.host_id, "platform": platform.platform(), "python": platform.python_version(),
        "onnxruntime": version("onnxruntime"), "numpy": version("numpy"), "opencv": version("opencv-python-headless"),
        "config_file": str(Path(config_file).resolve()) if config_file else None,
        "command": " ".join(["forensic-gender", *sys.argv[1:]]) if sys.argv and "forensic-gender" in sys.argv[0] else None,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }


def trained_on(cfg: PipelineConfig) -> str:
    """What the gender model was trained on, for the table (from the manifest's model card)."""
    from daemon import models as model_store

    known = {"gender-v1": "dlib-models: Cydral's private set (~200k faces)"}
    g = cfg.gender
    if g.model in known:
        return known[g.model]
    if g.kind == "seed-efficientnet" or g.model.endswith(".onnx"):
        return "user-supplied model"
    try:
        mdir = Path(cfg.models_dir) if cfg.models_dir else model_store.default_models_dir()
        spec = model_store.load_manifest(mdir).models.get(g.model)
    except model_store.ModelError:
        spec = None
    if spec is not None and spec.model_card:
        return f"see {spec.model_card}"
    return "unknown"


def _check_reuse(reuse: dict, ls: LabelledSet, cfg: PipelineConfig, images: Sequence[LabelledImage], path: Path) -> list[str]:
    """Why predictions from an earlier run cannot be re-scored under ``cfg`` (empty: they can)."""
    problems = []
    if reuse.get("version") != PREDICTIONS_VERSION:
        problems.append(f"{path}: predictions format must be version {PREDICTIONS_VERSION}, got {reuse.get('version')!r}; run without --reuse")
    if reuse.get("data_hash") != ls.data_hash:
        problems.append(f"{path}: made on different data (hash {str(reuse.get('data_hash'))[:12]}, now {ls.data_hash[:12]}); run without --reuse")
    old = reuse.get("pipeline", {})
    new = dataclasses.asdict(cfg)
    for section, free in (("detector", {"threshold"}), ("gender", {"threshold", "uncertain_margin"}), ("age", set()), ("models_dir", set())):
        a, b = old.get(section), new.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            diff = sorted(k for k in set(a) | set(b) if k not in free and a.get(k) != b.get(k))
            if diff:
                problems.append(f"{path}: pipeline.{section} differs in {', '.join(f'{k} ({a.get(k)!r} then, {b.get(k)!r} now)' for k in diff)}; "
                                "only the detection threshold (upwards) and the gender threshold/band can be re-scored; run without --reuse")
        elif a != b:
            problems.append(f"{path}: pipeline.{section} was {a!r}, now {b!r}; run without --reuse")
    old_t = (old.get("detector") or {}).get("threshold")
    if old_t is not None and cfg.detector.threshold < old_t:
        problems.append(f"{path}: the detection threshold can only be raised when re-scoring: made at {old_t}, asked for "
                        f"{cfg.detector.threshold}; run without --reuse")
    have = {p["file"] for p in reuse.get("images", [])}
    missing = [i.file for i in images if i.file not in have]
    if missing:
        problems.append(f"{path}: has no prediction for {len(missing)} selected image(s) (e.g. {missing[0]!r}); "
                        "use the same --limit or run without --reuse")
    return problems


def unique_names(folders: Sequence[Path]) -> list[str]:
    """Report names from the folders' names, made unique with ``-2``, ``-3``..."""
    seen: Counter = Counter()
    out = []
    for f in folders:
        base = f.resolve().name or "data"
        seen[base] += 1
        out.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return out


def evaluate(folders: Sequence[str | os.PathLike], cfg: Config, out: str | os.PathLike, *, workers: int = 0, limit: int | None = None,
             reuse: str | os.PathLike | None = None, progress: bool = True, config_file: str | None = None) -> dict:
    """Evaluate the pipeline of ``cfg`` on each labelled folder; write the report under ``out``.

    Returns the report (also written as ``out/report.json``). Raises :class:`EvaluationError`
    for bad labelled data or a ``reuse`` run that does not fit.
    """
    from daemon import report as report_mod

    paths = [Path(f) for f in folders]
    names = unique_names(paths)
    sets = [load_labelled(p, n) for p, n in zip(paths, names, strict=True)]  # all checked before any model runs
    chosen = [select(s.images, limit) for s in sets]
    out = Path(out)
    reused: list[dict] = []
    if reuse is not None:
        problems = []
        for s, imgs in zip(sets, chosen, strict=True):
            p = Path(reuse) / "predictions" / f"{s.name}.json"
            try:
                doc = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                problems.append(f"{p}: cannot read the earlier run's predictions ({err}); pass the --out folder of an earlier evaluate")
                continue
            problems += _check_reuse(doc, s, cfg.pipeline, imgs, p)
            reused.append(doc)
        if problems:
            raise EvaluationError(problems, "evaluate --reuse")
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions").mkdir(exist_ok=True)
    params = ScoreParams.of(cfg.pipeline)
    report: dict[str, Any] = {"run": run_info(cfg, config_file), "pipeline": dataclasses.asdict(cfg.pipeline),
                              "params": dataclasses.asdict(params), "limit": limit, "reused_from": str(reuse) if reuse else None,
                              "trained_on": trained_on(cfg.pipeline), "folders": []}
    pool = None
    t_all = time.perf_counter()
    try:
        if reuse is None:
            from daemon.workers import WorkerPool

            n = workers or cfg.service.workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
            pool = WorkerPool(max(1, n), cfg.pipeline, db_url=None, file_timeout=cfg.service.file_timeout)
            log.info("starting %d worker(s)", pool.n)
            pool.start()
            report["bundle"], report["bundle_key"] = pool.bundle, pool.bundle_key
            report["run"]["workers"] = pool.n
        else:
            report["bundle"], report["bundle_key"] = reused[0].get("bundle"), reused[0].get("bundle_key")
        for i, (s, imgs) in enumerate(zip(sets, chosen, strict=True)):
            t0 = time.perf_counter()
            if pool is not None:
                preds = predict(pool, imgs, desc=s.name, progress=progress)
                doc = {"version": PREDICTIONS_VERSION, "folder": str(s.root.resolve()), "data_hash": s.data_hash,
                       "pipeline": report["pipeline"], "bundle": report["bundle"], "bundle_key": report["bundle_key"],
                       "images": [p.to_json() for p in preds]}
                (out / "predictions" / f"{s.name}.json").write_text(json.dumps(doc), encoding="utf-8")
            else:
                by_file = {p["file"]: ImagePrediction.from_json(p) for p in reused[i]["images"]}
                preds = [by_file[img.file] for img in imgs]
            wall = time.perf_counter() - t0
            res = score(s, imgs, preds, params)
            res.update(name=s.name, path=str(s.root.resolve()), kind=s.kind, labels_sha256=s.labels_sha256, data_hash=s.data_hash,
                       images_total=len(s.images), faces_total=s.faces, unlisted_images=s.unlisted,
                       wall_seconds=wall, images_per_second=len(imgs) / wall if wall > 0 and pool is not None else None)
            report["folders"].append(res)
            log.info("%s: %d images scored in %.1f s", s.name, len(imgs), wall)
    finally:
        if pool is not None:
            pool.close()
    report["run"]["seconds"] = time.perf_counter() - t_all
    report["files"] = report_mod.write_all(report, out)
    return report


# --- command line ----------------------------------------------------------------------------

def register_cli(subparsers: Any) -> None:
    """Add ``evaluate`` to the main CLI."""
    from daemon.cliargs import add_config_args

    p = subparsers.add_parser(
        "evaluate", help="validate the pipeline on labelled folders (images/ + labels.csv) and write a report",
        description="Run the configured pipeline on labelled folders and write a validation report "
                    "(JSON, markdown, HTML, PNG). Folder format: see docs/EVALUATION.md.")
    p.add_argument("folders", nargs="+", metavar="DATA_DIR", help="a folder holding images/ and labels.csv")
    p.add_argument("--out", default="reports/eval", metavar="DIR", help="where the report goes (default: reports/eval)")
    add_config_args(p, db=False)
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: service.workers, else one per core)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate at most N images per folder, spread evenly")
    p.add_argument("--reuse", metavar="DIR", default=None,
                   help="re-score the predictions of an earlier run (its --out) instead of running the models; only the "
                        "detection threshold (upwards) and the gender threshold/uncertain band may differ")
    p.add_argument("--skip-missing", action="store_true", help="skip DATA_DIRs that do not exist (exit 0 if none is left)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from daemon import report as report_mod
    from daemon.cliargs import load_config

    folders = list(args.folders)
    missing = [f for f in folders if not Path(f).exists()]
    if missing and args.skip_missing:
        for f in missing:
            print(f"forensic-gender evaluate: {f}: not found, skipped", file=sys.stderr)
        folders = [f for f in folders if f not in missing]
        if not folders:
            print("forensic-gender evaluate: no labelled data found; nothing to evaluate (skipped)")
            return 0
    if args.limit is not None and args.limit < 1:
        print(f"forensic-gender evaluate: --limit must be >= 1, got {args.limit}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    for f in folders:
        d = Path(f).resolve()
        if out == d or d in out.parents:
            print(f"forensic-gender evaluate: --out {args.out} is inside the labelled folder {f}; write the report elsewhere", file=sys.stderr)
            return 2
    cfg = load_config(args, check_paths=False)
    try:
        report = evaluate(folders, cfg, args.out, workers=args.workers, limit=args.limit, reuse=args.reuse,
                          progress=not args.no_progress, config_file=args.config)
    except EvaluationError as err:
        print(f"forensic-gender {err}", file=sys.stderr)
        return 2
    print(report_mod.summary_text(report))
    print(f"report: {', '.join(str(Path(args.out) / f) for f in report['files'])}")
    failed = sum(sum(f["failed_images"].values()) for f in report["folders"])
    if failed:
        print(f"forensic-gender evaluate: {failed} image(s) could not be analysed; they count as missed faces "
              "(see report.json, failed_images)", file=sys.stderr)
        return 1
    return 0
