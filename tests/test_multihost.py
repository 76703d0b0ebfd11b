"""Several hosts, one PostgreSQL database (issue 8).

Store level (no models): several *processes* — each one a "host" with its own identity — start
on an empty database at the same moment, then claim and record work with leases while one of
them is SIGKILLed. Service level: real ``forensic-gender run`` processes share one folder and one
database, one is killed and another started later, and PostgreSQL is stopped for 30 s mid-run.

Every test needs the real PostgreSQL server (the ``pg_url`` fixture skips with a message when it
is unreachable outside CI, and fails in CI).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.pool import NullPool

from daemon.store import schema as s
from daemon.store.engine import SCHEMA_VERSION, open_store_engine
from daemon.store.writer import FileStat, Store

pytestmark = pytest.mark.postgres

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


# -- helpers (also run inside child processes: keep them importable and cheap) -------------------


def fake_result(path: str) -> SimpleNamespace:
    """A synthetic ``ImageResult``: the content hash derives from the path (distinct contents)."""
    sha = hashlib.sha256(path.encode()).hexdigest()
    return SimpleNamespace(path=path, size=1000, sha256=sha, md5=sha[:32], mtime_ns=1, format="JPEG", width=64,
                           height=48, orientation=1, frames=1, notes=(), faces=(), seconds={"total": 0.001})


def claim_worker(url: str, host: str, lease: float, batch: int, work_s: float, out: str) -> None:
    """A "host": claim batches, 'analyse' each file (sleep ``work_s``), record it; append
    ``recorded <id>`` / ``lost <id>`` lines to ``out``; stop when nothing is queued or working."""
    from daemon.store.engine import open_store_engine as _open
    from daemon.store.writer import Store as _Store

    store = _Store(_open(url), host)
    store.ensure_bundle("b1", {"synthetic": True})
    with open(out, "a", buffering=1) as fh:
        fh.write("started\n")
        while True:
            claims = store.claim(batch, lease)
            if not claims:
                if store.pending() == 0:
                    break
                time.sleep(0.2)  # a dead host's leases have not expired yet
                continue
            for c in claims:
                time.sleep(work_s)
                ok = store.record_analysis(c.id, fake_result(c.path), "b1")
                fh.write(f"{'recorded' if ok else 'lost'} {c.id}\n")
    store.engine.dispose()


def _spawn(code: str, log: Path) -> subprocess.Popen:
    with log.open("w") as out:  # the child holds its own copy of the descriptor
        return subprocess.Popen([PY, "-c", textwrap.dedent(code)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def _stats(n: int, root: str = "/evidence") -> list[FileStat]:
    return [FileStat(path=f"{root}/img{i:05d}.jpg", root=root, size=1000, mtime_ns=1) for i in range(n)]


# -- store level ----------------------------------------------------------------------------------


def test_concurrent_start_on_empty_database_migrates_once(pg_url: str, tmp_path: Path) -> None:
    """Four hosts open the same empty schema at the same instant: one migrates (under the
    advisory lock), the others wait and find the schema current; every table exists once."""
    go = tmp_path / "go"
    procs = []
    for i in range(4):
        code = f"""
            import logging, os, sys, time
            logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s %(message)s")
            while not os.path.exists({str(go)!r}):
                time.sleep(0.005)
            from daemon.store.engine import open_store_engine
            eng = open_store_engine({pg_url!r})
            print("opened", flush=True)
        """
        procs.append((_spawn(code, tmp_path / f"h{i}.log"), tmp_path / f"h{i}.log"))
    time.sleep(1.5)  # let the interpreters import; then release them together
    go.touch()
    for p, _ in procs:
        assert p.wait(60) == 0
    logs = [log.read_text() for _, log in procs]
    assert all("opened" in lg for lg in logs), logs
    # each migration step ran exactly once across all hosts
    for v in range(SCHEMA_VERSION):
        lines = sum(lg.count(f"migrating database schema {v} -> {v + 1}") for lg in logs)
        assert lines == 1, (v, logs)
    eng = create_engine(pg_url)
    with eng.connect() as c:
        rows = c.execute(select(s.meta.c.key, s.meta.c.value).where(s.meta.c.key == "schema_version")).all()
        assert rows == [("schema_version", str(SCHEMA_VERSION))]
        schema_name = c.execute(text("select current_schema()")).scalar_one()
        n_tables = c.execute(text("select count(*) from information_schema.tables where table_schema = :s"),
                             {"s": schema_name}).scalar_one()
        assert n_tables >= len(s.metadata.tables)
    eng.dispose()


def test_three_processes_claim_one_killed_every_file_once(pg_url: str, tmp_path: Path) -> None:
    """Three host processes share a 600-file queue with a 2 s lease; one is SIGKILLed while it
    holds a batch. The others take its files over when the leases expire: every file is done,
    with exactly one analysis, no result is recorded twice, and no lease is left."""
    n = 600
    eng = open_store_engine(pg_url)
    Store(eng, "seeder").upsert_files(_stats(n))
    procs = {}
    for host, work in (("host-a", 0.004), ("host-b", 0.004), ("host-victim", 0.02)):
        out = tmp_path / f"{host}.out"
        code = f"""
            from tests.test_multihost import claim_worker
            claim_worker({pg_url!r}, {host!r}, 2.0, 10, {work!r}, {str(out)!r})
        """
        procs[host] = (_spawn(code, tmp_path / f"{host}.log"), out)
    victim, vout = procs["host-victim"]
    deadline = time.time() + 60
    while time.time() < deadline and (not vout.exists() or vout.read_text().count("recorded") < 15):
        assert victim.poll() is None, (tmp_path / "host-victim.log").read_text()
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)  # mid-batch: it holds up to 10 leases
    victim.wait(10)
    with eng.connect() as c:
        held = c.execute(select(func.count()).select_from(s.files).where(s.files.c.lease_owner == "host-victim")).scalar_one()
    for host in ("host-a", "host-b"):
        p, _ = procs[host]
        assert p.wait(120) == 0, (tmp_path / f"{host}.log").read_text()

    recorded: dict[int, list[str]] = {}
    for host, (_, out) in procs.items():
        for line in out.read_text().splitlines():
            if line.startswith("recorded "):
                recorded.setdefault(int(line.split()[1]), []).append(host)
    doubled = {k: v for k, v in recorded.items() if len(v) > 1}
    assert not doubled, doubled
    assert held > 0, "the victim should have died holding leases (the test did not exercise expiry)"
    with eng.connect() as c:
        f, a = s.files, s.analyses
        states = dict(c.execute(select(f.c.state, func.count()).group_by(f.c.state)).all())
        assert states == {"done": n}
        assert c.execute(select(func.count()).select_from(f).where(f.c.lease_owner.isnot(None) | f.c.lease_expires.isnot(None))).scalar_one() == 0
        assert c.execute(select(func.count()).select_from(a)).scalar_one() == n
        assert c.execute(select(func.count(func.distinct(a.c.image_id))).select_from(a)).scalar_one() == n
        per_host = dict(c.execute(select(a.c.host, func.count()).group_by(a.c.host)).all())
        # the victim's last write may have committed just before its "recorded" line was written
        assert len(recorded) in (n, n - 1), len(recorded)
        assert {"host-a", "host-b"} <= set(per_host)
        assert set(per_host) <= {"host-a", "host-b", "host-victim"}
        # the taken-over files were claimed twice: attempts say so
        assert c.execute(select(func.count()).select_from(f).where(f.c.attempts >= 2)).scalar_one() >= 1
    eng.dispose()


def test_host_that_lost_its_lease_writes_nothing(db_url: str) -> None:
    """Host A claims, stalls past its lease, host B takes the file over; A's late result is
    dropped (the lease check), B's is the one analysis. Same on SQLite and PostgreSQL."""
    eng = open_store_engine(db_url)
    a, b = Store(eng, "host-a"), Store(eng, "host-b")
    a.ensure_bundle("b1", {})
    a.upsert_files(_stats(1))
    (ca,) = a.claim(5, lease_seconds=0.2)
    assert b.claim(5, lease_seconds=60) == []  # still held by A
    time.sleep(0.3)
    (cb,) = b.claim(5, lease_seconds=60)
    assert cb.id == ca.id and cb.attempts == 2
    assert a.record_analysis(ca.id, fake_result(ca.path), "b1") is False
    assert a.record_failure(ca.id, "crash", "late", max_attempts=3) is None
    assert b.record_analysis(cb.id, fake_result(cb.path), "b1") is True
    with eng.connect() as c:
        row = c.execute(select(s.files.c.state, s.files.c.lease_owner)).one()
        assert tuple(row) == ("done", None)
        assert c.execute(select(s.analyses.c.host)).scalars().all() == ["host-b"]
    eng.dispose()


# -- service level: real ``forensic-gender run`` processes ------------------------------------------

N_IMAGES = int(os.environ.get("FG_MULTIHOST_IMAGES", "3000"))
PG_CLUSTER = ("15", "main")


N_OUTAGE = int(os.environ.get("FG_MULTIHOST_OUTAGE_IMAGES", "1000"))


def _noise(d: Path, n: int, seed: int) -> Path:
    """``n`` distinct 64x48 noise JPEGs (no faces: fast to analyse, every content new)."""
    import numpy as np
    from PIL import Image

    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(d / f"img{i:05d}.jpg", quality=70)
    return d


@pytest.fixture(scope="module")
def noise_folder(tmp_path_factory) -> Path:  # noqa: ANN001
    return _noise(tmp_path_factory.mktemp("share") / "case-1", N_IMAGES, 8)


@pytest.fixture(scope="module")
def outage_folder(tmp_path_factory) -> Path:  # noqa: ANN001
    return _noise(tmp_path_factory.mktemp("share") / "case-2", N_OUTAGE, 9)


def _service(tmp: Path, url: str, root: Path, host: str, roles: tuple[str, ...] = ("watch", "analyze")):  # noqa: ANN202
    from tests.test_service import ServiceProc

    wd = tmp / host
    wd.mkdir()
    roots = f"[{{path: '{root}'}}]" if "watch" in roles else "[]"
    (wd / "config.yaml").write_text(textwrap.dedent(f"""\
        database: '{url}'
        watch:
          stability_window: 0
          roots: {roots}
        service:
          host_id: {host}
          roles: [{', '.join(roles)}]
          workers: 1
          lease_seconds: 15
          file_timeout: 60
    """))
    return ServiceProc(wd, ["--config", str(wd / "config.yaml")])


def _progress(eng, n: int) -> dict:  # noqa: ANN001
    with eng.connect() as c:
        states = dict(c.execute(select(s.files.c.state, func.count()).group_by(s.files.c.state)).all())
    states["total"] = sum(states.values())
    states["all_finished"] = states["total"] == n and not states.get("queued") and not states.get("working")
    return states


def _wait(eng, n: int, pred, timeout: float, procs) -> dict:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        try:
            st = _progress(eng, n)
        except Exception as err:  # noqa: BLE001 - the server may be down on purpose
            st = {"error": str(err)}
        if "error" not in st and pred(st):
            return st
        for p in procs:
            if p.proc is not None and p.proc.poll() is not None and p.proc.returncode not in (-9,):
                pytest.fail(f"{p.workdir.name} exited {p.proc.returncode}:\n{p.log()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out: {st}\n" + "\n".join(f"--- {p.workdir.name}\n{p.log()[-2000:]}" for p in procs))
        time.sleep(0.5)


def _assert_exactly_once(eng, n: int) -> dict:  # noqa: ANN001
    """Every file done, one analysis per content, no lease left; analyses per host."""
    f, a = s.files, s.analyses
    with eng.connect() as c:
        states = dict(c.execute(select(f.c.state, func.count()).group_by(f.c.state)).all())
        assert states == {"done": n}, states
        assert c.execute(select(func.count()).select_from(f).where(f.c.image_id.is_(None))).scalar_one() == 0
        assert c.execute(select(func.count()).select_from(f).where(f.c.lease_owner.isnot(None) | f.c.lease_expires.isnot(None))).scalar_one() == 0
        bundles = c.execute(select(func.count(func.distinct(a.c.bundle)))).scalar_one()
        assert bundles == 1
        assert c.execute(select(func.count()).select_from(a)).scalar_one() == n
        assert c.execute(select(func.count(func.distinct(a.c.image_id)))).scalar_one() == n
        assert c.execute(select(func.count()).select_from(s.images)).scalar_one() == n
        assert c.execute(select(func.count()).select_from(a).where(a.c.host.is_(None))).scalar_one() == 0
        assert c.execute(select(func.count()).select_from(s.events).where(s.events.c.host.is_(None))).scalar_one() == 0
        return dict(c.execute(select(a.c.host, func.count()).group_by(a.c.host)).all())


def test_three_services_one_killed_one_late_every_file_once(pg_url, models_ready, noise_folder, tmp_path) -> None:  # noqa: ANN001
    """Three services with their own host ids share one database and one folder; one is
    SIGKILLed mid-run (its workers too) and a fourth starts later: every file is analysed exactly
    once and every lease ends released."""
    n = N_IMAGES
    eng = open_store_engine(pg_url)  # the schema exists before the services race to discover
    procs = [_service(tmp_path, pg_url, noise_folder, h) for h in ("host-a", "host-b", "host-c")]
    late = _service(tmp_path, pg_url, noise_folder, "host-d")
    try:
        t0 = time.monotonic()
        for p in procs:
            p.start()
        _wait(eng, n, lambda st: st.get("done", 0) >= n // 10, 240, procs)
        with eng.connect() as c:
            held_c = c.execute(select(func.count()).select_from(s.files).where(s.files.c.lease_owner == "host-c")).scalar_one()
        procs[2].kill9(group=True)
        _wait(eng, n, lambda st: st.get("done", 0) >= n // 3, 240, procs[:2])
        late.start()
        alive = [procs[0], procs[1], late]
        st = _wait(eng, n, lambda st: st["all_finished"], 300, alive)
        took = time.monotonic() - t0
        for p in alive:
            assert p.stop() == 0, p.log()[-3000:]
            p.assert_clean_log()
        per_host = _assert_exactly_once(eng, n)
        print(f"\n{n} files in {took:.0f} s with 3 -> 2 -> 3 services: {per_host}; host-c held {held_c} leases when killed")
        assert {"host-a", "host-b", "host-c"} <= set(per_host)
        assert set(per_host) <= {"host-a", "host-b", "host-c", "host-d"}
        with eng.connect() as c:  # the same file was discovered by three watchers: one row each
            assert c.execute(select(func.count()).select_from(s.files)).scalar_one() == n
            hosts = set(c.execute(select(s.events.c.host).where(s.events.c.kind == "service_started")).scalars())
            assert hosts == {"host-a", "host-b", "host-c", "host-d"}
        assert st["all_finished"]
    finally:
        for p in [*procs, late]:
            p.close()
        eng.dispose()


def _pg_ctl(action: str) -> None:
    cmd = ["pg_ctlcluster", "--skip-systemctl-redirect", *PG_CLUSTER, action]
    if action == "stop":
        cmd += ["-m", "immediate"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


def _pg_up(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            e = create_engine(url, connect_args={"connect_timeout": 2})
            with e.connect() as c:
                c.execute(text("select 1"))
            e.dispose()
            return
        except Exception:  # noqa: BLE001
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture
def pg_url_survives_restart(pg_server_url: str):  # noqa: ANN201
    """Like ``pg_url``, but dropped with a fresh connection (the server restarts in the test)."""
    import uuid

    name = f"t_{uuid.uuid4().hex[:10]}"

    def admin(sql: str) -> None:
        e = create_engine(pg_server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        with e.connect() as c:
            c.execute(text(sql))
        e.dispose()

    admin(f'CREATE SCHEMA "{name}"')
    sep = "&" if "?" in pg_server_url else "?"
    yield f"{pg_server_url}{sep}options=-csearch_path%3D{name}"
    _pg_up(pg_server_url)
    admin(f'DROP SCHEMA "{name}" CASCADE')


def test_database_outage_30s_mid_run(pg_url_survives_restart, models_ready, outage_folder, tmp_path) -> None:  # noqa: ANN001
    """PostgreSQL is stopped (immediate: connections cut) for 30 s while two services work (a
    watch-only host and an analyse-only host): they report the outage in STATUS= and the log,
    retry with back-off, resume by themselves, and the run completes with nothing lost or
    doubled. The server is always restarted."""
    import shutil as _sh

    pg_url = pg_url_survives_restart
    if os.geteuid() != 0 or not _sh.which("pg_ctlcluster") or "127.0.0.1" not in pg_url:
        pytest.skip("needs root and the local PostgreSQL cluster (pg_ctlcluster) to stop and start it")
    n = N_OUTAGE
    eng = open_store_engine(pg_url)
    # roles: host-a only discovers (no workers), host-b only analyses (no watched roots)
    procs = [_service(tmp_path, pg_url, outage_folder, "host-a", roles=("watch",)),
             _service(tmp_path, pg_url, outage_folder, "host-b", roles=("analyze",))]
    stopped = False
    try:
        for p in procs:
            p.start()
        _wait(eng, n, lambda st: st.get("done", 0) >= n // 10, 240, procs)
        eng.dispose()
        _pg_ctl("stop")
        stopped = True
        t_down = time.monotonic()
        time.sleep(30)
        for p in procs:
            assert p.proc.poll() is None, f"{p.workdir.name} died during the outage:\n{p.log()[-4000:]}"
        _pg_ctl("start")
        stopped = False
        _pg_up(pg_url)
        st = _wait(eng, n, lambda st: st["all_finished"], 300, procs)
        for p in procs:
            outage = [m for t, m in p.messages if t >= t_down and "STATUS=" in m and "database" in m.lower()]
            assert outage, f"{p.workdir.name}: no STATUS= about the outage: {[m for _, m in p.messages][-10:]}"
            assert "database" in p.log().lower()
            assert p.stop() == 0, p.log()[-3000:]
        per_host = _assert_exactly_once(eng, n)
        assert per_host == {"host-b": n}, per_host  # the watcher analysed nothing
        assert "no analysis (roles: watch)" in procs[0].log()
        with eng.connect() as c:
            started = dict(c.execute(select(s.events.c.host, s.events.c.detail).where(s.events.c.kind == "service_started")).all())
            outages = c.execute(select(s.events.c.host).where(s.events.c.kind == "database_outage")).scalars().all()
        assert json.loads(started["host-a"])["workers"] == 0
        assert json.loads(started["host-b"])["roots"] == []
        assert sorted(outages) == ["host-a", "host-b"], outages  # each recorded the outage once, when it was back
        for p in procs:  # never "back" while the server was down (a step that touched no table proves nothing)
            back = [float(x) for x in re.findall(r"database reachable again after (\d+) s", p.log())]
            assert back and min(back) >= 20, (p.workdir.name, back)  # the server was down 30 s
        assert st["all_finished"]
    finally:
        if stopped:
            _pg_ctl("start")
            _pg_up(pg_url)
        for p in procs:
            p.close()
        eng.dispose()
