"""The wheel, installed WITHOUT extras into a fresh virtual environment, as an operator would:
`--help`, `models list` and `models fetch` from the packaged manifest, `check-config`, `analyze`
and `scan` on an image made here all work; `serve` says which extra it needs; with the `web`
extra `serve --help` works.

Slow (a wheel build, a fresh venv, its dependencies from the package index through pip's cache).
`models fetch` is not made to download the release weights again: the models folder is filled
beforehand with the checkout's fetched files, less one derived file, so the installed package
verifies every file by SHA-256 against its packaged manifest and derives the missing one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from daemon import __version__
from daemon import models as model_store

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
REDERIVED = "centerface-dynamic.onnx"  # left out of the prepared folder: `models fetch` must derive it


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    tmp: Path
    models_dir: Path  # where the installed package keeps fetched weights ($XDG_DATA_HOME here)
    env: dict[str, str]

    def run(self, *args: str | Path, code: int = 0, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run the installed ``forensic-gender``; fail with its output unless it exits ``code``."""
        return _run([self.venv / "bin" / "forensic-gender", *args], env=self.env, cwd=self.tmp, code=code, timeout=timeout)


def _run(
    args: list[str | Path], *, env: dict[str, str] | None = None, cwd: Path | None = None, code: int = 0, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([str(a) for a in args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    if p.returncode != code:
        pytest.fail(f"{' '.join(map(str, args))}: exit {p.returncode}, expected {code}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}")
    return p


def _copy_tree(dest: Path) -> None:
    """The working tree's files (tracked and untracked, not ignored) without build leftovers:
    a stale ``build/`` in the checkout must not reach the wheel. Links are copied as links."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"needs a git checkout to build the wheel from ({err})")
    for rel in filter(None, listed.decode().split("\0")):
        src = ROOT / rel
        if not os.path.lexists(src):  # deleted in the working tree, not yet committed
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel, follow_symlinks=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, models_ready: None) -> Installed:
    tmp = tmp_path_factory.mktemp("install")
    src, dist, env_dir = tmp / "src", tmp / "dist", tmp / "venv"
    _copy_tree(src)
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", dist, src], timeout=600)
    (wheel,) = dist.glob("forensic_gender-*.whl")
    venv.create(env_dir, with_pip=True)
    env = {k: v for k, v in os.environ.items() if k not in ("FORENSIC_GENDER_MODELS", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(XDG_DATA_HOME=str(tmp / "data"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    _run([env_dir / "bin" / "python", "-m", "pip", "install", "--quiet", wheel], env=env, timeout=900)
    return Installed(wheel, env_dir, tmp, tmp / "data" / "forensic-gender" / "models", env)


def test_the_wheel_carries_the_manifest_and_project_models_but_no_fetched_weights(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    manifest = model_store.load_manifest(model_store.packaged_models_dir())
    project = {f"daemon/_models/{m.filename}" for m in manifest.models.values() if m.origin == "project"}
    cards = {f"daemon/_models/{m.model_card}" for m in manifest.models.values() if m.model_card}
    assert {"daemon/_models/manifest.json", "daemon/templates/base.html"} | project | cards <= names
    assert not [n for n in names if n.endswith((".onnx", ".dat")) and n not in project]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_base_install_help_and_version(installed: Installed) -> None:
    out = installed.run("--help").stdout
    for command in ("scan", "analyze", "check-config", "models", "run", "faces", "serve"):
        assert f"    {command} " in out, command
    assert installed.run("--version").stdout.strip() == f"forensic-gender {__version__}"


@dataclass(frozen=True)
class Fetched:
    listed: dict[str, Any]  # `models list --json` before the fetch
    fetch: subprocess.CompletedProcess[str]
    manifest: model_store.Manifest


@pytest.fixture(scope="module")
def fetched(installed: Installed) -> Fetched:
    """`models list`, then `models fetch` into a models folder prepared with the checkout's
    fetched weights (standing in for the downloads) less the file to derive."""
    listed = json.loads(installed.run("models", "list", "--json").stdout)
    checkout = model_store.default_models_dir()
    installed.models_dir.mkdir(parents=True)
    manifest = model_store.load_manifest(checkout)
    for m in manifest.models.values():
        if m.origin == "release":
            for name in (m.filename, m.derived_filename):
                if name and name != REDERIVED:
                    shutil.copyfile(checkout / name, installed.models_dir / name)
    return Fetched(listed, installed.run("models", "fetch"), manifest)


def test_models_list_and_fetch_use_the_packaged_manifest(installed: Installed, fetched: Fetched) -> None:
    site = next((installed.venv / "lib").glob("python3*/site-packages"))
    assert Path(fetched.listed["manifest"]) == site / "daemon" / "_models" / "manifest.json"
    assert Path(fetched.listed["dir"]) == installed.models_dir
    rows = {r["name"]: r for r in fetched.listed["models"]}
    assert all(r["valid"] for r in rows.values() if r["origin"] == "project")  # carried by the wheel
    assert not any(r["present"] for r in rows.values() if r["origin"] == "release")
    assert f"derived {REDERIVED} ok" in fetched.fetch.stderr
    manifest = fetched.manifest
    lines = fetched.fetch.stdout.splitlines()
    assert len(lines) == len(manifest.models) and all(line.startswith("ok ") for line in lines), fetched.fetch.stdout
    derived = installed.models_dir / REDERIVED
    want = next(m.derived_sha256 for m in manifest.models.values() if m.derived_filename == REDERIVED)
    assert hashlib.sha256(derived.read_bytes()).hexdigest() == want
    verified = installed.run("models", "verify").stdout.splitlines()
    assert len(verified) == len(manifest.models) and all(line.startswith("ok ") for line in verified)


@pytest.fixture(scope="module")
def evidence(installed: Installed) -> tuple[Path, Path]:
    """A folder with one drawn image (no face: shapes and text), and the image."""
    folder = installed.tmp / "evidence"
    folder.mkdir()
    img = np.full((240, 320, 3), 230, np.uint8)
    cv2.rectangle(img, (40, 30), (150, 200), (40, 90, 200), -1)
    cv2.circle(img, (230, 120), 60, (30, 160, 60), -1)
    cv2.putText(img, "fg", (180, 220), cv2.FONT_HERSHEY_SIMPLEX, 1.5, (0, 0, 0), 3)
    path = folder / "drawn.jpg"
    ok, data = cv2.imencode(".jpg", img)
    assert ok
    path.write_bytes(data.tobytes())
    return folder, path


def test_check_config(installed: Installed, evidence: tuple[Path, Path]) -> None:
    cfg = installed.tmp / "fg.yaml"
    cfg.write_text(f"database: sqlite:///{installed.tmp}/fg.db\nwatch:\n  roots:\n    - path: {evidence[0]}\n")
    assert "ok; database sqlite:///" in installed.run("check-config", "--config", cfg).stdout
    cfg.write_text("databse: sqlite:///x.db\n")
    assert "databse" in installed.run("check-config", "--config", cfg, code=2).stderr


def test_analyze_and_scan(installed: Installed, fetched: Fetched, evidence: tuple[Path, Path]) -> None:
    folder, image = evidence
    doc = json.loads(installed.run("analyze", "--json", image).stdout)
    assert (doc["status"], doc["width"], doc["height"], doc["format"]) == ("ok", 320, 240, "jpeg")
    assert doc["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest() and doc["faces"] == []
    out = installed.run("scan", folder, "--db", f"sqlite:///{installed.tmp}/scan.db", "--workers", "1", "--no-progress").stdout
    assert "files: 1 new, 0 changed, 0 unchanged" in out and "this run: 1 analysed" in out, out


def test_serve_names_its_extra_until_it_is_installed(installed: Installed) -> None:
    for args in (("serve", "--help"), ("serve", "--port", "0")):
        err = installed.run(*args, code=2).stderr
        assert "pip install 'forensic-gender[web]'" in err, err
    assert "serve" in installed.run("--help").stdout
    _run([installed.venv / "bin" / "python", "-m", "pip", "install", "--quiet", f"{installed.wheel}[web]"], env=installed.env, timeout=600)
    out = installed.run("serve", "--help").stdout
    assert "--allow-remote" in out and "forensic-gender[web]" not in out
