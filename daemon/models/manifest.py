"""The manifest: the schema of a model entry (:class:`ModelSpec` and friends), loading and
validating ``models/manifest.json`` field by field, and where the manifest and the models directory are."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
ENV_MODELS_DIR = "FORENSIC_GENDER_MODELS"
ROLES = ("detector", "gender", "age", "backbone")
ORIGINS = ("release", "project")
TRANSFORMS = ("dynamic-shapes", "dlib-to-onnx")
ARCHIVE_FORMATS = ("wheel", "sdist")
_REPO_MODELS_DIR = Path(__file__).resolve().parents[2] / "models"  # a checkout: the manifest, project models, fetched weights
_PACKAGED_MODELS_DIR = Path(__file__).resolve().parents[1] / "_models"  # what a wheel carries of it (a link to ../models here)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RELEASE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9A-Za-z][0-9A-Za-z.+!_-]*)$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_SYMBOL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ModelError(Exception):
    """A model or the manifest is missing, malformed or does not match; the message says how to fix."""


@dataclass(frozen=True)
class Normalization:
    """Input normalization: ``(pixel - means[c]) * scale`` per channel, in ``color_order``."""

    means: tuple[float, float, float]
    scale: float


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output; a shape entry is a fixed size (int) or a symbol (str)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"
    description: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """One validated manifest entry. ``inference_*`` name the file that sessions load."""

    name: str
    role: str
    origin: str
    release: str | None
    member: str | None
    filename: str
    sha256: str
    bytes: int
    licence: str
    attribution: str
    source_url: str
    input: TensorSpec
    color_order: str
    normalization: Normalization
    size_multiple: int | None
    outputs: tuple[TensorSpec, ...]
    stride: int | None = None
    labels: tuple[str, ...] | None = None
    bin_values: tuple[float, ...] | None = None
    model_card: str | None = None
    derived_filename: str | None = None
    derived_sha256: str | None = None
    derived_bytes: int | None = None
    derived_transform: str | None = None
    archive_format: str = "wheel"
    archive_sha256: str | None = None
    archive_bytes: int | None = None
    chip_size: int | None = None
    backbone: str | None = None
    backbone_tensor: str | None = None
    chip_padding: float | None = None

    @property
    def inference_filename(self) -> str:
        return self.derived_filename or self.filename

    @property
    def inference_sha256(self) -> str:
        return self.derived_sha256 or self.sha256

    @property
    def inference_bytes(self) -> int:
        return self.derived_bytes or self.bytes


@dataclass(frozen=True)
class Manifest:
    """The validated manifest; ``path`` is the file it was read from."""

    models: dict[str, ModelSpec]
    path: Path

    @property
    def releases(self) -> tuple[str, ...]:
        """Every release the manifest fetches from, in manifest order, without repeats."""
        return tuple(dict.fromkeys(s.release for s in self.models.values() if s.release))



# --------------------------------------------------------------------------------------- paths


def _in_checkout() -> bool:
    return (_REPO_MODELS_DIR / MANIFEST_NAME).is_file() and (_REPO_MODELS_DIR.parent / "pyproject.toml").is_file()


def packaged_models_dir() -> Path:
    """The folder of the reference manifest and the project's own models: the repository's
    ``models/`` in a checkout, else their copy inside the installed package (read-only)."""
    return _REPO_MODELS_DIR if _in_checkout() else _PACKAGED_MODELS_DIR


def default_models_dir() -> Path:
    """``$FORENSIC_GENDER_MODELS`` if set; else the repository's ``models/`` in a checkout; else
    (an installed package, whose own folder may be read-only and is replaced by an upgrade)
    ``$XDG_DATA_HOME/forensic-gender/models``, by default ``~/.local/share/forensic-gender/models``."""
    env = os.environ.get(ENV_MODELS_DIR)
    if env:
        return Path(env).expanduser()
    if _in_checkout():
        return _REPO_MODELS_DIR
    data = os.environ.get("XDG_DATA_HOME", "")
    base = Path(data) if os.path.isabs(data) else Path.home() / ".local" / "share"
    return base / "forensic-gender" / "models"


def _file_path(models_dir: Path, manifest: Manifest, spec: ModelSpec, filename: str) -> Path:
    """Release files live in ``models_dir``; project files beside the manifest (committed)."""
    base = manifest.path.parent if spec.origin == "project" else Path(models_dir)
    return base / filename


def _spec(manifest: Manifest, name: str) -> ModelSpec:
    try:
        return manifest.models[name]
    except KeyError:
        raise ModelError(
            f"model {name!r} is not in {manifest.path}; known models: {', '.join(manifest.models)}"
        ) from None


# ------------------------------------------------------------------------------------ manifest


class _Errors(list[str]):
    def add(self, where: str, what: str) -> None:
        self.append(f"{where}: {what}")


def _kind(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"[:80]


def _obj(v: Any, where: str, errs: _Errors, required: set[str],
         optional: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(v, dict):
        errs.add(where, f"must be an object, got {_kind(v)}")
        return {}
    for key in sorted(required - v.keys()):
        errs.add(f"{where}.{key}", "is missing")
    for key in sorted(v.keys() - required - optional):
        errs.add(f"{where}.{key}", f"unknown key; allowed: {', '.join(sorted(required | optional))}")
    return v


def _str(v: Any, where: str, errs: _Errors, *, pattern: re.Pattern[str] | None = None,
         choices: Sequence[str] = (), what: str = "a non-empty string") -> str:
    if not isinstance(v, str) or not v or (pattern and not pattern.match(v)) or (
            choices and v not in choices):
        errs.add(where, f"must be {what}, got {_kind(v)}")
        return ""
    return v


def _int(v: Any, where: str, errs: _Errors) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        errs.add(where, f"must be a positive integer, got {_kind(v)}")
        return 0
    return v


def _num(v: Any, where: str, errs: _Errors, *, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (
            positive and v <= 0):
        errs.add(where, f"must be a {'positive ' if positive else ''}finite number, got {_kind(v)}")
        return 0.0
    return float(v)


def _list(v: Any, where: str, errs: _Errors, length: int | None = None) -> list[Any]:
    if not isinstance(v, list) or not v or (length is not None and len(v) != length):
        size = f"{length} entries" if length is not None else "entries"
        errs.add(where, f"must be a list of {size}, got {_kind(v)}")
        return []
    return v


def _filename(v: Any, where: str, errs: _Errors) -> str:
    name = _str(v, where, errs)
    if name and (name in {".", ".."} or "/" in name or "\\" in name or name.startswith(".")):
        errs.add(where, f"must be a plain file name (no directories, not hidden), got {name!r}")
        return ""
    return name


def _relpath(v: Any, where: str, errs: _Errors, inside: str) -> str:
    path = _str(v, where, errs, what=f"a relative path inside {inside}")
    if path and (path.startswith("/") or ".." in path.split("/") or "\\" in path):
        errs.add(where, f"must be a relative path inside {inside}, got {path!r}")
        return ""
    return path


def _tensor(v: Any, where: str, errs: _Errors, required: frozenset[str] = frozenset(),
            optional: frozenset[str] = frozenset()) -> TensorSpec:
    d = _obj(v, where, errs, {"name", "shape", "dtype"} | required, {"description"} | optional)
    shape: list[int | str] = []
    for i, dim in enumerate(_list(d.get("shape"), f"{where}.shape", errs) if d else []):
        if (isinstance(dim, str) and _SYMBOL.match(dim)) or (isinstance(dim, int) and not isinstance(dim, bool) and dim > 0):
            shape.append(dim)
        else:
            errs.add(f"{where}.shape[{i}]", f"must be a positive integer or a symbol name, got {_kind(dim)}")
    return TensorSpec(
        name=_str(d.get("name"), f"{where}.name", errs) if d else "",
        shape=tuple(shape),
        dtype=_str(d.get("dtype"), f"{where}.dtype", errs, choices=("float32",), what="'float32'") if d else "",
        description=_str(d["description"], f"{where}.description", errs) if "description" in d else "",
    )


def _classes(spec_outputs: Sequence[TensorSpec]) -> int | None:
    last = spec_outputs[0].shape[-1] if spec_outputs and spec_outputs[0].shape else None
    return last if isinstance(last, int) else None


def _parse_model(name: str, v: Any, errs: _Errors) -> dict[str, Any]:
    w = f"models.{name}"
    if not _NAME.match(name):
        errs.add(w, "model names must be lower-case letters, digits, '.', '_' or '-'")
    d = _obj(v, w, errs, {"role", "origin", "filename", "sha256", "bytes", "licence", "input", "outputs"},
             {"release", "member", "archive", "chip", "stride", "labels", "bin_values", "model_card",
              "derived", "notes", "backbone"})
    if not d:
        return {}
    role = _str(d.get("role"), f"{w}.role", errs, choices=ROLES, what=f"one of {list(ROLES)}")
    origin = _str(d.get("origin"), f"{w}.origin", errs, choices=ORIGINS, what=f"one of {list(ORIGINS)}")
    f: dict[str, Any] = {"name": name, "role": role, "origin": origin, "release": None,
                         "member": None, "model_card": None}
    if origin == "release":
        f["release"] = _str(d.get("release"), f"{w}.release", errs, pattern=_RELEASE,
                            what="a pinned release 'name==version'")
        f["member"] = _relpath(d.get("member"), f"{w}.member", errs,
                               "the release archive (an sdist's: below its top folder)")
        if "archive" in d:
            ar = _obj(d["archive"], f"{w}.archive", errs, {"format"}, {"sha256", "bytes"})
            f["archive_format"] = _str(ar.get("format"), f"{w}.archive.format", errs,
                                       choices=ARCHIVE_FORMATS, what=f"one of {list(ARCHIVE_FORMATS)}")
            if f["archive_format"] == "sdist" or "sha256" in ar or "bytes" in ar:
                # an sdist's build backend runs when pip reads its metadata: pin the archive
                f["archive_sha256"] = _str(ar.get("sha256"), f"{w}.archive.sha256", errs,
                                           pattern=_SHA256, what="64 lower-case hex digits")
                f["archive_bytes"] = _int(ar.get("bytes"), f"{w}.archive.bytes", errs)
        if "model_card" in d:
            errs.add(f"{w}.model_card", "only project models carry a model card here")
    elif origin == "project":
        for key in ("release", "member", "archive"):
            if d.get(key) is not None:
                errs.add(f"{w}.{key}", "must be absent for a project model (its file is committed)")
        f["model_card"] = _relpath(d.get("model_card"), f"{w}.model_card", errs,
                                   "the manifest's directory")
    f["filename"] = _filename(d.get("filename"), f"{w}.filename", errs)
    f["sha256"] = _str(d.get("sha256"), f"{w}.sha256", errs, pattern=_SHA256, what="64 lower-case hex digits")
    f["bytes"] = _int(d.get("bytes"), f"{w}.bytes", errs)
    lic = _obj(d.get("licence"), f"{w}.licence", errs, {"spdx", "attribution", "source_url"})
    f["licence"] = _str(lic.get("spdx"), f"{w}.licence.spdx", errs) if lic else ""
    f["attribution"] = _str(lic.get("attribution"), f"{w}.licence.attribution", errs) if lic else ""
    f["source_url"] = _str(lic.get("source_url"), f"{w}.licence.source_url", errs,
                           pattern=re.compile(r"^https?://"), what="an http(s) URL") if lic else ""

    if "backbone" in d:  # a head: its input is a tensor of the backbone, not pixels
        bb = _obj(d["backbone"], f"{w}.backbone", errs, {"model", "tensor"})
        f["backbone"] = _str(bb.get("model"), f"{w}.backbone.model", errs)
        f["backbone_tensor"] = _str(bb.get("tensor"), f"{w}.backbone.tensor", errs)
    pixels = frozenset() if "backbone" in d else frozenset({"color_order", "normalization"})
    f["input"] = _tensor(d.get("input"), f"{w}.input", errs, pixels, frozenset({"size_multiple"}))
    inp: dict[str, Any] = d["input"] if isinstance(d.get("input"), dict) else {}
    f["color_order"] = (_str(inp["color_order"], f"{w}.input.color_order", errs,
                             choices=("RGB", "BGR"), what="'RGB' or 'BGR'")
                        if "color_order" in inp else "")
    norm = (_obj(inp["normalization"], f"{w}.input.normalization", errs, {"means", "scale"})
            if "normalization" in inp else {})
    means = _list(norm["means"], f"{w}.input.normalization.means", errs, 3) if "means" in norm else []
    f["normalization"] = Normalization(
        means=tuple(_num(m, f"{w}.input.normalization.means[{i}]", errs)  # type: ignore[arg-type]
                    for i, m in enumerate(means)),
        scale=(_num(norm["scale"], f"{w}.input.normalization.scale", errs, positive=True)
               if "scale" in norm else 0.0),
    )
    f["size_multiple"] = (_int(inp["size_multiple"], f"{w}.input.size_multiple", errs)
                          if "size_multiple" in inp else None)
    outputs = _list(d.get("outputs"), f"{w}.outputs", errs)
    f["outputs"] = tuple(_tensor(o, f"{w}.outputs[{i}]", errs) for i, o in enumerate(outputs))
    if "chip" in d:
        chip = _obj(d["chip"], f"{w}.chip", errs, {"size", "padding"})
        if "size" in chip:
            f["chip_size"] = _int(chip["size"], f"{w}.chip.size", errs)
        if "padding" in chip:
            f["chip_padding"] = _num(chip["padding"], f"{w}.chip.padding", errs)
            if f["chip_padding"] < 0:
                errs.add(f"{w}.chip.padding", f"must be >= 0, got {chip['padding']}")
        side = f["input"].shape[-1] if f["input"].shape else None
        if isinstance(side, int) and f.get("chip_size") and side != f["chip_size"]:
            errs.add(f"{w}.chip.size", f"must match the input's last dim {side}, got {f['chip_size']}")

    classes = _classes(f["outputs"])
    if role == "detector":
        f["stride"] = _int(d.get("stride"), f"{w}.stride", errs)
    elif "stride" in d:
        errs.add(f"{w}.stride", "only a detector has a stride")
    if role == "gender" or "labels" in d:
        labels = _list(d.get("labels"), f"{w}.labels", errs, classes)
        f["labels"] = tuple(_str(x, f"{w}.labels[{i}]", errs) for i, x in enumerate(labels))
    if role == "age" or "bin_values" in d:
        bins = _list(d.get("bin_values"), f"{w}.bin_values", errs, classes)
        f["bin_values"] = tuple(_num(x, f"{w}.bin_values[{i}]", errs) for i, x in enumerate(bins))

    if "derived" in d:
        dv = _obj(d["derived"], f"{w}.derived", errs, {"filename", "transform", "sha256", "bytes"},
                  {"description"})
        if dv:
            f["derived_filename"] = _filename(dv.get("filename"), f"{w}.derived.filename", errs)
            f["derived_transform"] = _str(dv.get("transform"), f"{w}.derived.transform", errs,
                                          choices=TRANSFORMS, what=f"one of {list(TRANSFORMS)}")
            f["derived_sha256"] = _str(dv.get("sha256"), f"{w}.derived.sha256", errs,
                                       pattern=_SHA256, what="64 lower-case hex digits")
            f["derived_bytes"] = _int(dv.get("bytes"), f"{w}.derived.bytes", errs)
            if origin == "project":
                errs.add(f"{w}.derived", "a project model is committed as used; it has no derived file")
    return f


def _parse_manifest(doc: Any, path: Path) -> Manifest:
    errs = _Errors()
    top = _obj(doc, "(top level)", errs, {"schema_version", "models"}, {"notes"})
    if top and top.get("schema_version") != SCHEMA_VERSION:
        errs.add("schema_version", f"must be {SCHEMA_VERSION}, got {_kind(top.get('schema_version'))}")
    models_doc = top.get("models") if top else None
    if top and (not isinstance(models_doc, dict) or not models_doc):
        errs.add("models", f"must be a non-empty object of name -> model, got {_kind(models_doc)}")
        models_doc = {}
    fields = {name: _parse_model(name, v, errs) for name, v in (models_doc or {}).items()}
    archives: dict[str, tuple[str, Any]] = {}
    for name, f in fields.items():
        if f.get("release"):
            kind = (f.get("archive_format", "wheel"), f.get("archive_sha256"))
            first = archives.setdefault(f["release"], (name, kind))
            if first[1] != kind:
                errs.add(f"models.{name}.archive", f"must match models.{first[0]}.archive for the same "
                         f"release {f['release']}, got {kind[0]} {kind[1]}")
    for name, f in fields.items():
        if f.get("backbone"):
            bb = fields.get(f["backbone"]) or {}
            tensors = [o.name for o in bb.get("outputs", ())]
            if bb.get("role") != "backbone":
                errs.add(f"models.{name}.backbone.model", f"must name a model with role backbone, got {f['backbone']!r}")
            elif f.get("backbone_tensor") not in tensors:
                errs.add(f"models.{name}.backbone.tensor", f"must be one of models.{f['backbone']}'s outputs "
                         f"{tensors}, got {f.get('backbone_tensor')!r}")
    members: dict[tuple[str, str], str] = {}
    for name, f in fields.items():
        rm = (f.get("release") or "", f.get("member") or "")
        if f.get("archive_format") == "sdist" and all(rm) and members.setdefault(rm, name) != name:
            errs.add(f"models.{name}.member", f"{rm[1]!r} of the sdist {rm[0]} is already used by "
                     f"models.{members[rm]} (an sdist is read in one pass, one model per member)")
    seen: dict[str, str] = {}
    for name, f in fields.items():
        for key in ("filename", "derived_filename"):
            fn = f.get(key)
            if fn and fn in seen:
                errs.add(f"models.{name}.{key.replace('_filename', '.filename')}",
                         f"{fn!r} is already used by models.{seen[fn]}")
            elif fn:
                seen[fn] = name
    if errs:
        lines = "\n  ".join(errs)
        raise ModelError(f"manifest {path} is invalid:\n  {lines}\nfix these entries "
                         f"(the repository's models/{MANIFEST_NAME} is the reference)")
    return Manifest(models={n: ModelSpec(**f) for n, f in fields.items()}, path=path)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def load_manifest(models_dir: Path | None = None) -> Manifest:
    """Read and validate ``<models_dir>/manifest.json`` (else the packaged one, see
    :func:`packaged_models_dir`); errors name key paths."""
    base = Path(models_dir) if models_dir is not None else default_models_dir()
    path = base / MANIFEST_NAME
    if not path.is_file():
        path = packaged_models_dir() / MANIFEST_NAME
    try:
        doc = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except FileNotFoundError:
        raise ModelError(f"no {MANIFEST_NAME} in {base} nor in {packaged_models_dir()}; "
                         f"copy the repository's models/{MANIFEST_NAME} into {base}") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ModelError(f"manifest {path} could not be read as JSON: {err}; "
                         f"restore it from the repository (models/{MANIFEST_NAME})") from err
    return _parse_manifest(doc, path)
