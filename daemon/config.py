"""Configuration: YAML -> frozen dataclasses, validated up front.

Every problem is reported at once with its key path (``watch.roots[1].path: ...``). Unknown keys
are errors (a typo must not silently fall back to a default). This is the only module that
imports yaml. Pass the resulting :class:`Config` explicitly; there is no global settings object.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_DB = "sqlite:///var/forensic-gender.db"


class ConfigError(Exception):
    """One or more configuration problems; ``problems`` lists them as ``path: message``."""

    def __init__(self, problems: list[str], source: str = "configuration") -> None:
        self.problems = problems
        super().__init__(f"{source} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class DetectorConfig:
    """CenterFace settings. ``max_side``: longer side of the detector input (no upscaling);
    ``tile_side``: when set, images longer than twice max_side get a second, tiled pass at twice
    the resolution so small faces in large photos are found (None disables it)."""

    threshold: float = 0.35
    nms_iou: float = 0.3
    max_side: int = 1280
    tile_side: int | None = None
    min_face_px: float = 0.0


@dataclass(frozen=True)
class GenderConfig:
    """Gender model and decision. ``model``: a manifest name (``gender-dlib-v1``, a head on the
    face backbone; ``gender-v1``; ``gender-wild-v1``) or a path to an ONNX file; ``kind``:
    ``dlib-chip`` / ``project-chip`` (manifest models) or ``seed-efficientnet`` (the research
    project's 150x150 sigmoid model). Labels: male when p >= threshold + uncertain_margin,
    female when p <= threshold - uncertain_margin, uncertain in between (0.2: the band that holds
    most of the errors, see models/gender-dlib-v1.md). ``flip_tta``: average with the mirrored
    face (for a head: a second backbone pass)."""

    model: str = "gender-dlib-v1"
    kind: str = "project-chip"
    threshold: float = 0.5
    uncertain_margin: float = 0.2
    flip_tta: bool = False


@dataclass(frozen=True)
class AgeConfig:
    """Age model (``age-v1``) or ``enabled: false``."""

    enabled: bool = True
    model: str = "age-v1"


@dataclass(frozen=True)
class BackboneConfig:
    """The face backbone (``dlib-face-v1``): one pass per face gives the 128-d identity
    descriptor stored with each face, and the tensor a head-type gender model reads. ``flip``:
    the stored descriptor is the mean of the face's and its mirror image's (a second pass per
    face; LFW verification 0.987 -> 0.994 on dev, see README "Persons")."""

    enabled: bool = True
    model: str = "dlib-face-v1"
    flip: bool = True


@dataclass(frozen=True)
class LimitsConfig:
    """Refuse images above ``max_pixels`` (from the header, before decoding) and files above
    ``max_file_bytes``."""

    max_pixels: int = 100_000_000
    max_file_bytes: int = 512 * 1024 * 1024


@dataclass(frozen=True)
class VideoConfig:
    """Videos (:mod:`daemon.pipeline.video`): a frame every ``interval`` seconds (the first frame
    always), at most ``max_frames`` per video, decoding and analysis within ``budget_seconds``
    (a worker reports progress after every sampled frame, so ``service.file_timeout`` bounds the
    time between two frames, not the whole video); files up to ``max_file_bytes`` (hashed
    streaming, never held in memory)."""

    interval: float = 2.0
    max_frames: int = 300
    budget_seconds: float = 600.0
    max_file_bytes: int = 16 * 1024**3


@dataclass(frozen=True)
class PipelineConfig:
    """``providers``: onnxruntime execution providers in order of preference, from
    :data:`PROVIDERS` (README "GPUs"). A listed provider this host's onnxruntime does not offer is
    skipped with a WARNING at start-up; one that is offered but does not start, or none left, is a
    start-up error. Never a silent fall-back."""

    models_dir: str | None = None
    providers: tuple[str, ...] = ("cpu",)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    gender: GenderConfig = field(default_factory=GenderConfig)
    age: AgeConfig = field(default_factory=AgeConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    video: VideoConfig = field(default_factory=VideoConfig)


@dataclass(frozen=True)
class RootConfig:
    path: str = ""
    recursive: bool = True
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    polling: bool = False
    poll_interval: float = 10.0


@dataclass(frozen=True)
class WatchConfig:
    roots: tuple[RootConfig, ...] = ()
    stability_window: float = 2.0
    rescan_interval: float = 3600.0


@dataclass(frozen=True)
class ServiceConfig:
    workers: int = 0  # 0 = one per core
    max_attempts: int = 3
    lease_seconds: float = 300.0
    file_timeout: float = 120.0
    host_id: str = ""
    roles: tuple[str, ...] = ("watch", "analyze")
    log_level: str = "INFO"


@dataclass(frozen=True)
class IdentityConfig:
    """Persons from face descriptors (:mod:`daemon.store.persons`). ``threshold``: every two
    faces of a person are closer than this (Euclidean, 128-d; complete linkage); 0.55 was chosen
    by cross-validation on train LFW (``python -m training.identity``: the highest recall with
    pairwise precision >= 0.98). A face seeds a person of its own only when at least
    ``min_face_px`` wide and detected with ``min_score``."""

    enabled: bool = True
    threshold: float = 0.55
    min_face_px: float = 40.0
    min_score: float = 0.6


@dataclass(frozen=True)
class Config:
    database: str = DEFAULT_DB
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)

    @property
    def host_id(self) -> str:
        return self.service.host_id or socket.gethostname()


_LIST_FIELDS = {"include", "exclude", "roles", "providers"}
PROVIDERS = ("tensorrt", "cuda", "cpu")  # pipeline.providers, in the only order that makes sense


def _build(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from ``data``, appending problems with their key paths."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{path or '<top>'}: must be a mapping, got {type(data).__name__}")
        return cls()
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            problems.append(f"{_join(path, key)}: unknown key; known keys are {', '.join(known)}")
    kwargs: dict[str, Any] = {}
    hints = {f.name: f.type for f in fields(cls)}
    defaults = cls()
    for name, f in known.items():
        if name not in data:
            continue
        value, where = data[name], _join(path, name)
        default = getattr(defaults, name)
        if is_dataclass(default):
            kwargs[name] = _build(type(default), value, where, problems)
        elif name == "roots":
            kwargs[name] = tuple(_build(RootConfig, r, f"{where}[{i}]", problems) for i, r in enumerate(value or []))
            if not isinstance(value, list):
                problems.append(f"{where}: must be a list of roots, got {type(value).__name__}")
        elif name in _LIST_FIELDS:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                problems.append(f"{where}: must be a list of strings, got {value!r}")
            else:
                kwargs[name] = tuple(value)
        else:
            kwargs[name] = _scalar(value, str(hints[name]), where, problems, default)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field (root path) is missing
        problems.append(f"{path}: {err}")
        return None


def _scalar(value: Any, hint: str, where: str, problems: list[str], default: Any) -> Any:
    optional = "None" in hint
    if value is None and optional:
        return None
    if hint.startswith("bool"):
        ok = isinstance(value, bool)
    elif hint.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        problems.append(f"{where}: must be {hint.replace(' | None', ' or null')}, got {value!r}")
        return default
    return value


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _check(cfg: Config, problems: list[str], check_paths: bool) -> None:
    d, g, lim, svc, w = cfg.pipeline.detector, cfg.pipeline.gender, cfg.pipeline.limits, cfg.service, cfg.watch

    def need(ok: bool, where: str, msg: str) -> None:
        if not ok:
            problems.append(f"{where}: {msg}")

    need(0 < d.threshold < 1, "pipeline.detector.threshold", f"must be between 0 and 1, got {d.threshold}")
    need(0 < d.nms_iou <= 1, "pipeline.detector.nms_iou", f"must be in (0, 1], got {d.nms_iou}")
    need(d.max_side >= 64 and d.max_side % 32 == 0, "pipeline.detector.max_side", f"must be a multiple of 32 and >= 64, got {d.max_side}")
    need(d.tile_side is None or (d.tile_side >= 64 and d.tile_side % 32 == 0), "pipeline.detector.tile_side", f"must be null or a multiple of 32 >= 64, got {d.tile_side}")
    need(g.kind in ("dlib-chip", "seed-efficientnet", "project-chip"), "pipeline.gender.kind", f"must be dlib-chip, project-chip or seed-efficientnet, got {g.kind!r}")
    need(0 < g.threshold < 1, "pipeline.gender.threshold", f"must be between 0 and 1, got {g.threshold}")
    need(0 <= g.uncertain_margin < min(g.threshold, 1 - g.threshold), "pipeline.gender.uncertain_margin", f"must be >= 0 and leave both labels reachable, got {g.uncertain_margin}")
    _check_providers(cfg.pipeline.providers, need)
    need(lim.max_pixels > 0, "pipeline.limits.max_pixels", f"must be positive, got {lim.max_pixels}")
    need(lim.max_file_bytes > 0, "pipeline.limits.max_file_bytes", f"must be positive, got {lim.max_file_bytes}")
    v = cfg.pipeline.video
    need(v.interval > 0, "pipeline.video.interval", f"must be positive seconds, got {v.interval}")
    need(v.max_frames >= 1, "pipeline.video.max_frames", f"must be >= 1, got {v.max_frames}")
    need(v.max_file_bytes > 0, "pipeline.video.max_file_bytes", f"must be positive, got {v.max_file_bytes}")
    need(v.budget_seconds > 0, "pipeline.video.budget_seconds", f"must be positive seconds, got {v.budget_seconds}")
    need(svc.workers >= 0, "service.workers", f"must be >= 0 (0 = one per core), got {svc.workers}")
    need(svc.max_attempts >= 1, "service.max_attempts", f"must be >= 1, got {svc.max_attempts}")
    need(svc.lease_seconds > 0, "service.lease_seconds", f"must be positive, got {svc.lease_seconds}")
    need(svc.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "service.log_level", f"must be DEBUG, INFO, WARNING or ERROR, got {svc.log_level!r}")
    need(set(svc.roles) <= {"watch", "analyze"} and bool(svc.roles), "service.roles", f"must be a non-empty subset of [watch, analyze], got {list(svc.roles)}")
    idn = cfg.identity
    need(0 < idn.threshold <= 2, "identity.threshold", f"must be in (0, 2] (Euclidean distance of unit-scale descriptors), got {idn.threshold}")
    need(idn.min_face_px >= 0, "identity.min_face_px", f"must be >= 0 pixels, got {idn.min_face_px}")
    need(0 <= idn.min_score <= 1, "identity.min_score", f"must be between 0 and 1, got {idn.min_score}")
    need(w.stability_window >= 0, "watch.stability_window", f"must be >= 0 seconds, got {w.stability_window}")
    need(w.rescan_interval > 0, "watch.rescan_interval", f"must be positive seconds, got {w.rescan_interval}")
    need("://" in cfg.database, "database", f"must be a SQLAlchemy URL such as sqlite:///var/fg.db or postgresql+psycopg://host/db, got {cfg.database!r}")
    for i, r in enumerate(w.roots):
        if r is None:
            continue
        where = f"watch.roots[{i}]"
        need(r.poll_interval > 0, f"{where}.poll_interval", f"must be positive seconds, got {r.poll_interval}")
        need(bool(r.path), f"{where}.path", "is required: the folder to watch")
        if check_paths and r.path:
            need(Path(r.path).is_dir(), f"{where}.path", f"must be an existing directory, got {r.path!r}")


def _check_providers(providers: tuple[str, ...], need: Callable[[bool, str, str], None]) -> None:
    where, got = "pipeline.providers", list(providers)
    unknown = [p for p in providers if p not in PROVIDERS]
    need(bool(providers), where, "must list at least one of tensorrt, cuda, cpu (e.g. [cuda, cpu]), got []")
    need(not unknown, where, f"must name providers from tensorrt, cuda, cpu, got {unknown} in {got}")
    need(len(set(providers)) == len(providers), where, f"must name each provider once, got {got}")
    known = [p for p in providers if p in PROVIDERS]
    need(known == sorted(known, key=PROVIDERS.index), where,
         f"must keep the order tensorrt, cuda, cpu (the first takes every node it can), got {got}")


def parse(data: Any, *, source: str = "configuration", check_paths: bool = True, base: Path | None = None) -> Config:
    """Validate a parsed YAML document; raises :class:`ConfigError` listing every problem.
    Relative paths (roots, models dir, sqlite files) are resolved against ``base``."""
    problems: list[str] = []
    cfg = _build(Config, data, "", problems)
    if cfg is not None:
        cfg = _resolve(cfg, base or Path.cwd())
        _check(cfg, problems, check_paths)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def _resolve(cfg: Config, base: Path) -> Config:
    from dataclasses import replace

    def absolute(p: str) -> str:
        return str((base / os.path.expanduser(p)).resolve()) if p else p

    roots = tuple(replace(r, path=absolute(r.path)) for r in cfg.watch.roots)
    pipeline = cfg.pipeline
    if pipeline.models_dir:
        pipeline = replace(pipeline, models_dir=absolute(pipeline.models_dir))
    g = pipeline.gender
    if g.model.endswith(".onnx"):
        pipeline = replace(pipeline, gender=replace(g, model=absolute(g.model)))
    db = cfg.database
    if db.startswith("sqlite:///") and not db.startswith("sqlite:////") and db != "sqlite:///:memory:":
        db = "sqlite:///" + absolute(db[len("sqlite:///"):])
    return replace(cfg, database=db, pipeline=pipeline, watch=replace(cfg.watch, roots=roots))


def load(path: str | os.PathLike | None, *, check_paths: bool = True) -> Config:
    """Load and validate a YAML file (``None`` -> all defaults)."""
    if path is None:
        return parse({}, check_paths=check_paths)
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError([f"{p}: cannot read the configuration file ({err.strerror})"], str(p)) from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError([f"{p}: not valid YAML: {err}"], str(p)) from err
    return parse(data, source=str(p), check_paths=check_paths, base=p.parent.resolve())
