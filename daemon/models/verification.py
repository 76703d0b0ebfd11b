"""Verification: sha256 checks of the model files, the per-file-version cache behind
:func:`model_file`, and :func:`verify` over the whole manifest."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from daemon.models.manifest import Manifest, ModelError, ModelSpec, _file_path, _spec


@dataclass(frozen=True)
class ModelStatus:
    """State of one model on disk: ``path`` is the inference file."""

    name: str
    role: str
    path: Path
    present: bool
    valid: bool
    detail: str


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
