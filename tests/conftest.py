"""Shared fixtures: the labelled dev data, the real models, the databases (SQLite and the real
PostgreSQL server), evidence-tree manifests and a thread-leak check."""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEV = Path(os.environ.get("FORENSIC_GENDER_DEV_DATA", REPO.parent / "shared" / "data" / "dev"))
PG_URL = os.environ.get("FORENSIC_GENDER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session")
def dev_data() -> Path:
    """``../shared/data/dev`` (research licence: read there, never copied into the project)."""
    if not (DEV / "lfw" / "labels.csv").is_file():
        pytest.skip(f"labelled dev data not found at {DEV}; set FORENSIC_GENDER_DEV_DATA to its folder")
    return DEV


@pytest.fixture(scope="session")
def models_ready() -> None:
    """Skip unless the real models are fetched and valid."""
    from daemon import models

    mdir = models.default_models_dir()
    try:
        bad = [s for s in models.verify(mdir, models.load_manifest(mdir)) if not s.valid]
    except models.ModelError as err:
        pytest.skip(f"models not usable ({err}); run `forensic-gender models fetch`")
    if bad:
        pytest.skip(f"models missing or invalid: {[s.name for s in bad]}; run `forensic-gender models fetch`")


@pytest.fixture(scope="session")
def pipeline(models_ready):  # noqa: ANN001, ANN201
    """The real pipeline with the default configuration (loaded once per test session)."""
    from daemon.config import PipelineConfig
    from daemon.pipeline.analyze import load_pipeline

    return load_pipeline(PipelineConfig())


def _pg_reachable() -> str | None:
    try:
        from sqlalchemy import create_engine, text

        eng = create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with eng.connect() as c:
            c.execute(text("select 1"))
        eng.dispose()
        return None
    except Exception as err:  # driver missing, server down, auth...
        return f"{type(err).__name__}: {err}"


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """The PostgreSQL test server; must be reachable in CI, skipped elsewhere when it is not."""
    why = _pg_reachable()
    if why:
        if IN_CI:
            pytest.fail(f"PostgreSQL at {PG_URL} is required in CI and not reachable: {why}")
        pytest.skip(f"PostgreSQL not reachable at {PG_URL} ({why}); start it or set FORENSIC_GENDER_TEST_PG to a URL")
    return PG_URL


@pytest.fixture
def pg_url(pg_server_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL schema for one test (dropped afterwards)."""
    from sqlalchemy import create_engine, text

    name = f"t_{uuid.uuid4().hex[:10]}"
    admin = create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE SCHEMA "{name}"'))
    sep = "&" if "?" in pg_server_url else "?"
    yield f"{pg_server_url}{sep}options=-csearch_path%3D{name}"
    with admin.connect() as c:
        c.execute(text(f'DROP SCHEMA "{name}" CASCADE'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path: Path) -> str:  # noqa: ANN001
    """The same store test runs on SQLite and on the real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.db'}"
    return request.getfixturevalue("pg_url")


def tree_manifest(root: Path) -> dict[str, tuple]:
    """Everything observable about a tree: per entry kind, size, mode, mtime, ctime, inode, sha256
    (names as bytes-faithful ``surrogateescape`` text, so that any name can be compared)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            digest = None
            if p.is_file() and not p.is_symlink() and os.access(p, os.R_OK):
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, digest)
    return out


@pytest.fixture(autouse=True)
def no_thread_leak() -> Iterator[None]:
    """Fail a test that leaves non-daemon threads running (observers, writers)."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
    for t in leaked:
        t.join(5)
    leaked = [t.name for t in leaked if t.is_alive()]
    assert not leaked, f"threads leaked: {leaked}"
