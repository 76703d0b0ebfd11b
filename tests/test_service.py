"""The service end to end: ``forensic-gender run`` as a subprocess with the real models, real
watchdog observers on real temporary folders, and a real SQLite database.

Every wait is a bounded poll (of the database or of the fake systemd notification socket); the
evidence trees are compared (hashes, sizes, mtimes, inodes, nothing created) before and after.
Images are tiny generated JPEGs (noise, no faces: a few milliseconds each), each made unique by a
JPEG comment segment, so that thousands of files stay affordable on two cores.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import resource
import select
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import tree_manifest

FG = str(Path(sys.executable).with_name("forensic-gender"))
QUEUE_SYSCTL = Path("/proc/sys/fs/inotify/max_queued_events")


# ------------------------------------------------------------------------------ images


def noise_jpeg(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "JPEG", quality=75)
    return buf.getvalue()


BASE = noise_jpeg()


def unique_jpeg(tag: str, base: bytes = BASE) -> bytes:
    """A valid JPEG with a comment segment right after SOI: a distinct content per tag."""
    text = f"forensic-gender test {tag}".encode()
    return base[:2] + b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text + base[2:]


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ database


def q(db: Path, sql: str, args: Iterable = ()) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, tuple(args)).fetchall()
    finally:
        con.close()


def q1(db: Path, sql: str, args: Iterable = ()):  # noqa: ANN201
    return q(db, sql, args)[0][0]


def wait_for(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.1, proc: ServiceProc | None = None):  # noqa: ANN201
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
        except sqlite3.OperationalError as err:  # the database is being created
            last = err
        else:
            if last:
                return last
        if proc is not None:
            proc.pump()
            if proc.proc is not None and proc.proc.poll() is not None:
                pytest.fail(f"the service exited ({proc.proc.returncode}) while waiting for {what}:\n{proc.log()[-4000:]}")
        time.sleep(interval)
    tail = proc.log()[-4000:] if proc else ""
    pytest.fail(f"timed out after {timeout} s waiting for {what} (last: {last!r})\n{tail}")


def live_rows(db: Path) -> dict[str, tuple]:
    """path -> (id, state, attempts, reason, size, sha256 or None) for rows not marked gone."""
    rows = q(db, "select f.path, f.id, f.state, f.attempts, f.reason, f.size, i.sha256 from files f "
                 "left join images i on i.id = f.image_id where f.state != 'gone'")
    return {r[0]: r[1:] for r in rows}


def settled(db: Path, expected: dict[Path, str]) -> bool:
    """Every expected path has a live row in its expected final state and nothing is pending."""
    try:
        rows = live_rows(db)
    except sqlite3.OperationalError:
        return False
    if q1(db, "select count(*) from files where state in ('queued', 'working')"):
        return False
    return {Path(p) for p in rows} == set(expected) and all(rows[str(p)][1] == st for p, st in expected.items())


def assert_oracle(db: Path, roots: list[Path]) -> None:
    """RELIABILITY.md's oracle: one live row per regular file with the right size and hash,
    one analysis per content, a reason for every failure, an intact database."""
    rows = live_rows(db)
    on_disk = {}
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                p = Path(dirpath) / name
                on_disk[str(p)] = p
    assert set(rows) == set(on_disk), f"rows and files differ: only rows {set(rows) - set(on_disk)}, only files {set(on_disk) - set(rows)}"
    for path, (_id, state, _att, reason, size, digest) in rows.items():
        assert state in ("done", "failed", "quarantined"), (path, state)
        assert size == on_disk[path].stat().st_size, path
        if state == "done":
            assert digest == sha256(on_disk[path]), f"{path}: recorded content is not the file's"
        else:
            assert reason, f"{path}: {state} without a reason"
    dup = q(db, "select image_id, bundle, count(*) from analyses group by image_id, bundle having count(*) > 1")
    assert not dup, f"content analysed twice: {dup}"
    missing = q(db, "select f.path from files f where f.state = 'done' and not exists "
                    "(select 1 from analyses a where a.image_id = f.image_id)")
    assert not missing, f"done without an analysis: {missing[:5]}"
    assert q(db, "pragma integrity_check") == [("ok",)]
    assert q(db, "pragma foreign_key_check") == []


# ------------------------------------------------------------------------------ the service


def write_config(path: Path, db: Path, roots: list, **sections: dict) -> Path:
    doc = {
        "database": f"sqlite:///{db}",
        "watch": {"roots": [r if isinstance(r, dict) else {"path": str(r)} for r in roots],
                  "stability_window": 0.5, "rescan_interval": 3600},
        "service": {"workers": 1, "file_timeout": 120, "max_attempts": 3},
    }
    for key, value in sections.items():
        doc.setdefault(key, {}).update(value)
    path.write_text(yaml.safe_dump(doc))
    return path


def _no_core() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the abort hook must not leave core files


class ServiceProc:
    """``forensic-gender run`` in a subprocess with a fake NOTIFY_SOCKET bound by the test."""

    def __init__(self, workdir: Path, args: list[str], *, env: dict | None = None, watchdog_usec: int | None = None,
                 prefix: list[str] | None = None) -> None:
        self.workdir, self.args, self.extra_env, self.prefix = workdir, args, env or {}, prefix or []
        self.watchdog_usec = watchdog_usec
        self.sockdir = Path(tempfile.mkdtemp(prefix="fgn", dir="/tmp"))  # AF_UNIX paths are short
        self.sock_path = self.sockdir / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        # A reader thread drains the socket at once, as systemd does: a datagram socket's queue
        # is short, and the service drops notifications rather than block when it is full.
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read, name="notify-reader", daemon=True)
        self._reader.start()
        self.proc: subprocess.Popen | None = None
        self.runs = 0
        self.logfile = workdir / "service.log"

    def start(self) -> ServiceProc:
        env = {**os.environ, "NOTIFY_SOCKET": str(self.sock_path), **self.extra_env}
        env.pop("WATCHDOG_USEC", None)
        env.pop("WATCHDOG_PID", None)
        if self.watchdog_usec:
            env["WATCHDOG_USEC"] = str(self.watchdog_usec)
        self.runs += 1
        with open(self.logfile, "a") as log:
            log.write(f"\n===== run {self.runs} =====\n")
            log.flush()
            self.proc = subprocess.Popen([*self.prefix, FG, "run", *self.args], cwd=self.workdir, env=env,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_no_core,
                                         start_new_session=True)
        return self

    def _read(self) -> None:
        while not self._closing.is_set():
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def pump(self) -> None:
        """Kept for readability at call sites: the reader thread collects messages."""

    def wait_message(self, pred: Callable[[str], bool], timeout: float = 120, what: str = "a notification") -> str:
        seen = len(self.messages)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            new = self.messages[seen:]
            seen += len(new)
            for _, m in new:
                if pred(m):
                    return m
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"the service exited ({self.proc.returncode}) before {what}:\n{self.log()[-4000:]}")
            time.sleep(0.02)
        pytest.fail(f"timed out after {timeout} s waiting for {what}:\n{self.log()[-4000:]}")

    def wait_ready(self, timeout: float = 180) -> None:
        self.wait_message(lambda m: "READY=1" in m.split("\n"), timeout, "READY=1")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM; the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"the service did not stop within {timeout} s after SIGTERM:\n{self.log()[-4000:]}")
        self.drain()
        return rc

    def drain(self, timeout: float = 5.0) -> None:
        """Wait until the reader thread has taken every datagram already queued."""
        deadline = time.monotonic() + timeout
        while select.select([self.sock], [], [], 0)[0] and time.monotonic() < deadline:
            time.sleep(0.01)

    def kill9(self, *, group: bool = True) -> None:
        """SIGKILL the service and (``group``) its workers, as systemd does after a watchdog
        timeout; without ``group`` the orphaned workers notice and exit by themselves."""
        assert self.proc is not None
        if group:
            os.killpg(self.proc.pid, signal.SIGKILL)
        else:
            self.proc.kill()
        self.proc.wait(60)

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(60)
        self._closing.set()
        self._reader.join(5)
        self.sock.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)

    def assert_clean_log(self) -> None:
        text = self.log()
        assert "Traceback" not in text, text[-6000:]


@pytest.fixture
def services():  # noqa: ANN201
    made: list[ServiceProc] = []

    def make(*a, **kw) -> ServiceProc:  # noqa: ANN002, ANN003
        s = ServiceProc(*a, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def descendants_rss_kib(pid: int) -> int:
    """Resident memory of a process and all its descendants (KiB), from /proc."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([FG, *args], capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------ start-up errors (no models needed)


def test_start_up_errors_are_clear_and_exit_2(tmp_path: Path) -> None:
    ev = tmp_path / "evidence"
    ev.mkdir()
    bad = tmp_path / "bad.yaml"
    bad.write_text("watch:\n  roots: [{path: /nonexistent/folder}]\n  stability_window: -1\nservice: {workrs: 2}\n")
    r = run_cli("run", "--config", str(bad))
    assert r.returncode == 2
    for where in ("watch.roots[0].path", "service.workrs"):
        assert where in r.stderr, r.stderr
    r = run_cli("run", "--watch", str(tmp_path / "missing"), "--db", f"sqlite:///{tmp_path / 'x.db'}")
    assert r.returncode == 2 and "--watch" in r.stderr and "existing directory" in r.stderr
    before = tree_manifest(ev)
    r = run_cli("run", "--watch", str(ev), "--db", f"sqlite:///{ev / 'inside.db'}")
    assert r.returncode == 2 and "must not be inside the watched root" in r.stderr, r.stderr
    assert tree_manifest(ev) == before  # nothing created in the evidence folder
    r = run_cli("status", "--db", f"sqlite:///{tmp_path / 'never.db'}")
    assert r.returncode == 2 and "does not exist" in r.stderr


# ------------------------------------------------------------------------------ lifecycle


def test_notify_watchdog_second_instance_and_sigterm(tmp_path: Path, models_ready, services) -> None:  # noqa: ANN001
    ev, db = tmp_path / "evidence", tmp_path / "state" / "fg.db"
    ev.mkdir()
    for i in range(3):
        (ev / f"img{i}.jpg").write_bytes(unique_jpeg(f"life-{i}"))
    before = tree_manifest(ev)
    cfg = write_config(tmp_path / "fg.yaml", db, [ev])
    svc = services(tmp_path, ["--config", str(cfg)], watchdog_usec=400_000).start()

    ready = svc.wait_message(lambda m: "READY=1" in m.split("\n"), 180, "READY=1")
    # READY only once the database is migrated and every worker has loaded its models
    assert q1(db, "select count(*) from bundles") == 1
    assert q1(db, "select count(*) from events where kind = 'service_started'") == 1
    assert "STATUS=" in ready and "backlog" in ready
    assert not any("WATCHDOG=1" in m for _, m in svc.messages[:svc.messages.index(next(x for x in svc.messages if x[1] == ready))])

    wait_for(lambda: settled(db, {ev / f"img{i}.jpg": "done" for i in range(3)}), 60, "3 files analysed", proc=svc)
    svc.wait_message(lambda m: m.startswith("STATUS=") and "backlog 0" in m, 30, "a STATUS= with the backlog")

    # WATCHDOG=1 pings come from the main loop: regular while it runs ...
    t0 = time.monotonic()
    wait_for(lambda: len([t for t, m in svc.messages if m == "WATCHDOG=1" and t > t0]) >= 5, 10, "watchdog pings", 0.02, svc)
    pings = [t for t, m in svc.messages if m == "WATCHDOG=1" and t > t0]
    assert max(b - a for a, b in zip(pings, pings[1:])) < 1.0
    # ... and they stop while the loop is stuck (here: on a database another process holds)
    con = sqlite3.connect(db, timeout=30, isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    t_lock = time.monotonic()
    while time.monotonic() - t_lock < 3.0:  # the stimulus: hold the lock 3 s while listening
        svc.pump()
        time.sleep(0.02)
    con.execute("COMMIT")
    t_unlock = time.monotonic()
    con.close()
    svc.wait_message(lambda m: m == "WATCHDOG=1", 10, "pings to resume")
    pings = [t for t, m in svc.messages if m == "WATCHDOG=1"]
    around = [t_lock - 1] + [t for t in pings if t_lock - 1 < t <= t_unlock + 5]
    assert max(b - a for a, b in zip(around, around[1:])) >= 1.5, "pings went on while the loop was stuck"

    # a second service on the same SQLite database refuses to start, clearly
    r = run_cli("run", "--config", str(cfg), timeout=120)
    assert r.returncode == 2
    assert "already running" in r.stderr and str(db) in r.stderr and f"pid {svc.proc.pid}" in r.stderr, r.stderr

    # status sees the running service
    doc = json.loads(run_cli("status", "--config", str(cfg), "--format", "json").stdout)
    assert doc["service"]["running"] is True and doc["service"]["pid"] == svc.proc.pid

    assert svc.stop() == 0
    assert any("STOPPING=1" in m for _, m in svc.messages)
    assert q1(db, "select count(*) from events where kind = 'service_stopped'") == 1
    assert json.loads(run_cli("status", "--config", str(cfg), "--format", "json").stdout)["service"]["running"] is False
    svc.assert_clean_log()
    assert tree_manifest(ev) == before


def test_before_start_while_stopped_and_while_running(tmp_path: Path, models_ready, services) -> None:  # noqa: ANN001
    ev, db = tmp_path / "evidence", tmp_path / "fg.db"
    (ev / "sub").mkdir(parents=True)
    for name in ("a", "b", "c", "d", "e"):
        (ev / f"{name}.jpg").write_bytes(unique_jpeg(name))
    (ev / "sub" / "f.jpg").write_bytes(unique_jpeg("f"))
    shutil.copy2(ev / "a.jpg", ev / "sub" / "dup_of_a.jpg")
    (ev / "bad.jpg").write_bytes(b"this is not an image at all")
    (ev / "empty.jpg").write_bytes(b"")
    for junk in (".DS_Store", "Thumbs.db", "._a.jpg", ".g.jpg.Xy12Ab", "h.jpg.part"):
        (ev / junk).write_bytes(b"junk")
    cfg = write_config(tmp_path / "fg.yaml", db, [ev])
    svc = services(tmp_path, ["--config", str(cfg)])

    # -- 1. files present before the first start
    before = tree_manifest(ev)
    svc.start().wait_ready()
    expect = {ev / f"{n}.jpg": "done" for n in "abcde"} | {ev / "sub" / "f.jpg": "done", ev / "sub" / "dup_of_a.jpg": "done",
                                                         ev / "bad.jpg": "failed", ev / "empty.jpg": "failed"}
    # no name is ignored: OS side files and complete files under temporary names get their row
    expect |= {ev / junk: "failed" for junk in (".DS_Store", "Thumbs.db", "._a.jpg", ".g.jpg.Xy12Ab", "h.jpg.part")}
    wait_for(lambda: settled(db, expect), 90, "the files present at start-up", proc=svc)
    assert_oracle(db, [ev])
    assert q1(db, "select count(*) from analyses") == 6  # the duplicate is linked, not analysed
    rows = live_rows(db)
    assert rows[str(ev / "sub" / "dup_of_a.jpg")][5] == rows[str(ev / "a.jpg")][5]
    doc = json.loads(run_cli("status", "--config", str(cfg), "--format", "json").stdout)
    assert doc["service"]["running"] is True
    assert doc["files"]["total"] == 14 and doc["files"]["done"] == 7 and doc["files"]["failed"] == 7
    assert doc["files"]["queued"] == 0 and doc["files"]["quarantined"] == 0 and doc["backlog"] == 0
    assert set(doc["failures"]) == {rows[str(ev / "bad.jpg")][3], rows[str(ev / "empty.jpg")][3]}
    assert doc["roots"][0]["root"] == str(ev) and doc["roots"][0]["files"]["done"] == 7
    assert doc["rate"]["last_5_minutes"] >= 9
    table = run_cli("status", "--config", str(cfg))
    assert table.returncode == 0 and "running" in table.stdout and "backlog" in table.stdout and str(ev) in table.stdout
    assert svc.stop() == 0
    assert tree_manifest(ev) == before

    # -- 2. changes while the service is stopped
    b_image = rows[str(ev / "b.jpg")][5]
    d_old = rows[str(ev / "d.jpg")][5]
    (ev / "new1.jpg").write_bytes(unique_jpeg("new1"))
    (ev / "b.jpg").rename(ev / "sub" / "b_renamed.jpg")
    (ev / "c.jpg").unlink()
    (ev / "d.jpg").write_bytes(unique_jpeg("d, second version"))
    os.utime(ev / "d.jpg", ns=(time.time_ns(), time.time_ns() - 10**10))  # as a copy tool keeping an older mtime
    before = tree_manifest(ev)
    svc.start().wait_ready()
    expect = {p: s for p, s in expect.items() if p.name not in ("b.jpg", "c.jpg")}
    expect |= {ev / "new1.jpg": "done", ev / "sub" / "b_renamed.jpg": "done"}
    wait_for(lambda: settled(db, expect) and q1(db, "select count(*) from files where state = 'gone'") == 2, 90,
             "the changes made while stopped", proc=svc)
    assert_oracle(db, [ev])
    rows = live_rows(db)
    assert rows[str(ev / "sub" / "b_renamed.jpg")][5] == b_image  # same content, linked
    assert rows[str(ev / "d.jpg")][5] == sha256(ev / "d.jpg") != d_old  # modified: analysed as new content
    assert q1(db, "select count(*) from analyses") == 8  # + new1 + d's new content; b was not analysed again
    gone = dict(q(db, "select path, image_id from files where state = 'gone'"))
    assert set(gone) == {str(ev / "b.jpg"), str(ev / "c.jpg")} and all(gone.values())  # results kept
    assert q1(db, "select count(*) from analyses a join images i on i.id = a.image_id where i.sha256 = ?", [d_old]) == 1

    # -- 3. changes while it runs
    e_id, _, e_attempts, *_ = rows[str(ev / "e.jpg")]
    (ev / "e.jpg").rename(ev / "sub" / "e_moved.jpg")
    (ev / "sub" / "f.jpg").unlink()
    (ev / "new1.jpg").write_bytes(unique_jpeg("new1, second version"))
    (ev / "new2.jpg").write_bytes(unique_jpeg("new2"))
    expect = {p: s for p, s in expect.items() if p.name not in ("e.jpg", "f.jpg")}
    expect |= {ev / "sub" / "e_moved.jpg": "done", ev / "new2.jpg": "done"}
    wait_for(lambda: settled(db, expect) and live_rows(db)[str(ev / "new1.jpg")][5] == sha256(ev / "new1.jpg")
             and q1(db, "select count(*) from files where state = 'gone'") == 3, 90, "the changes made while running", proc=svc)
    before = tree_manifest(ev)
    rows = live_rows(db)
    moved = rows[str(ev / "sub" / "e_moved.jpg")]
    assert moved[0] == e_id and moved[2] == e_attempts  # the row followed the file: not read again
    assert q1(db, "select count(*) from events where kind = 'file_moved'") == 1
    assert q1(db, "select count(*) from analyses") == 10  # + new1's second version + new2
    assert svc.stop() == 0
    assert_oracle(db, [ev])
    assert tree_manifest(ev) == before
    assert json.loads(run_cli("status", "--config", str(cfg), "--format", "json").stdout)["service"]["running"] is False
    svc.assert_clean_log()


def test_slow_writer_and_temporary_names(tmp_path: Path, models_ready, services) -> None:  # noqa: ANN001
    ev, db = tmp_path / "evidence", tmp_path / "fg.db"
    ev.mkdir()
    cfg = write_config(tmp_path / "fg.yaml", db, [ev], watch={"stability_window": 1.0})
    svc = services(tmp_path, ["--config", str(cfg)]).start()
    svc.wait_ready()

    rng = np.random.default_rng(7)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (2600, 2600, 3), dtype=np.uint8)).save(buf, "PNG", compress_level=1)
    big = buf.getvalue()
    assert len(big) > 20_000_000
    chunk = 512 * 1024
    with open(ev / "big.png", "wb") as fh:  # a slow writer: pauses well below the stability window
        for i in range(0, len(big), chunk):
            fh.write(big[i:i + chunk])
            fh.flush()
            time.sleep(0.15)
            svc.pump()
    # rsync style: a hidden temporary name, written slowly, then renamed
    tmp_name = ev / ".photo.jpg.Ab12Cd"
    data = unique_jpeg("temp then rename")
    with open(tmp_name, "wb") as fh:
        for i in range(0, len(data), 1000):
            fh.write(data[i:i + 1000])
            fh.flush()
            time.sleep(0.1)
    tmp_name.rename(ev / "photo.jpg")
    # download style: NAME.part, then renamed
    (ev / "photo2.jpg.part").write_bytes(unique_jpeg("part then rename"))
    (ev / "photo2.jpg.part").rename(ev / "photo2.jpg")

    expect = {ev / "big.png": "done", ev / "photo.jpg": "done", ev / "photo2.jpg": "done"}
    wait_for(lambda: settled(db, expect), 120, "the slow and the renamed files", proc=svc)
    before = tree_manifest(ev)
    rows = live_rows(db)
    for p in expect:
        assert rows[str(p)][2] == 1, f"{p.name} was taken more than once"  # attempts
        assert rows[str(p)][5] == sha256(p)  # the final content
    assert q1(db, "select count(*) from files") == 3  # a temporary name that never settled has no row
    assert q1(db, "select count(*) from analyses") == 3
    assert q1(db, "select count(*) from events where kind like 'file_%' and kind != 'file_moved'") == 0  # nothing failed or changed
    assert svc.stop() == 0
    assert tree_manifest(ev) == before
    svc.assert_clean_log()


def test_crashing_file_is_quarantined_across_a_restart(tmp_path: Path, models_ready, services) -> None:  # noqa: ANN001
    ev, db = tmp_path / "evidence", tmp_path / "fg.db"
    ev.mkdir()
    (ev / "CRASHME.jpg").write_bytes(unique_jpeg("crash"))
    (ev / "fine.jpg").write_bytes(unique_jpeg("fine"))
    before = tree_manifest(ev)
    cfg = write_config(tmp_path / "fg.yaml", db, [ev], service={"max_attempts": 4})
    svc = services(tmp_path, ["--config", str(cfg)], env={"FORENSIC_GENDER_TEST_ABORT_MARKER": "CRASHME"})

    def crashes() -> int:
        return q1(db, "select count(*) from events e join files f on f.id = e.file_id where f.path = ? "
                      "and e.kind in ('file_queued', 'file_quarantined')", [str(ev / "CRASHME.jpg")])

    svc.start().wait_ready()
    wait_for(lambda: crashes() >= 1, 90, "the first crash", 0.05, svc)
    assert svc.stop() == 0  # the service survived the crash and drains cleanly
    first = crashes()
    assert 1 <= first < 4, f"{first} crashes before the restart: the test needs the limit to be reached across it"
    state, attempts = q(db, "select state, attempts from files where path = ?", [str(ev / "CRASHME.jpg")])[0]
    assert state == "queued" and attempts == first

    svc.start().wait_ready()
    wait_for(lambda: settled(db, {ev / "CRASHME.jpg": "quarantined", ev / "fine.jpg": "done"}), 120, "quarantine", proc=svc)
    state, attempts, reason = q(db, "select state, attempts, reason from files where path = ?", [str(ev / "CRASHME.jpg")])[0]
    assert (state, attempts, reason) == ("quarantined", 4, "worker_crashed")
    assert crashes() == 4  # the limit counts crashes across restarts
    assert svc.stop() == 0

    # no crash loop after another restart: the quarantined file stays put
    n_events = q1(db, "select count(*) from events")
    svc.start().wait_ready()
    wait_for(lambda: q1(db, "select count(*) from events where kind = 'rescan' and id > ?", [n_events]) >= 1, 60,
             "the start-up scan", proc=svc)
    assert svc.stop() == 0
    assert crashes() == 4
    assert q1(db, "select state from files where path = ?", [str(ev / "CRASHME.jpg")]) == "quarantined"
    doc = json.loads(run_cli("status", "--config", str(cfg), "--format", "json").stdout)
    assert doc["files"]["quarantined"] == 1 and doc["quarantined"] == {"worker_crashed": 1}
    assert "died" in q1(db, "select error from files where path = ?", [str(ev / "CRASHME.jpg")])
    assert tree_manifest(ev) == before


def test_sighup_reload_valid_and_invalid(tmp_path: Path, models_ready, services) -> None:  # noqa: ANN001
    ev1, ev2, db = tmp_path / "ev1", tmp_path / "ev2", tmp_path / "fg.db"
    ev1.mkdir()
    ev2.mkdir()
    (ev1 / "one.jpg").write_bytes(unique_jpeg("one"))
    (ev2 / "two.jpg").write_bytes(unique_jpeg("two"))
    before1, before2 = tree_manifest(ev1), tree_manifest(ev2)
    cfg = write_config(tmp_path / "fg.yaml", db, [ev1])
    svc = services(tmp_path, ["--config", str(cfg)]).start()
    svc.wait_ready()
    wait_for(lambda: settled(db, {ev1 / "one.jpg": "done"}), 60, "ev1 analysed", proc=svc)

    write_config(cfg, db, [ev1, ev2])
    svc.signal(signal.SIGHUP)
    wait_for(lambda: settled(db, {ev1 / "one.jpg": "done", ev2 / "two.jpg": "done"}), 60, "the new root after SIGHUP", proc=svc)
    assert q1(db, "select count(*) from events where kind = 'config_loaded'") == 1
    assert any("RELOADING=1" in m for _, m in svc.messages)

    # new analysis settings: new workers and a new model bundle; the files are analysed again
    # under it and the earlier results are kept
    write_config(cfg, db, [ev1, ev2], pipeline={"detector": {"threshold": 0.4}})
    svc.signal(signal.SIGHUP)
    wait_for(lambda: q1(db, "select count(*) from bundles") == 2 and q1(db, "select count(*) from analyses") == 4
             and settled(db, {ev1 / "one.jpg": "done", ev2 / "two.jpg": "done"}), 90, "re-analysis under the new bundle", proc=svc)
    # a model that cannot be loaded: rejected, the running workers and settings are kept
    write_config(cfg, db, [ev1, ev2], pipeline={"detector": {"threshold": 0.4}, "gender": {"model": "no-such-model"}})
    svc.signal(signal.SIGHUP)
    detail = wait_for(lambda: q(db, "select detail from events where kind = 'config_rejected'"), 90, "the model rejection", proc=svc)
    assert "pipeline" in detail[0][0] and "no-such-model" in detail[0][0]
    assert q1(db, "select count(*) from bundles") == 2

    cfg.write_text(yaml.safe_dump({"database": f"sqlite:///{db}", "watch": {"roots": [{"path": str(tmp_path / "nope")}], "bogus": 1}}))
    svc.signal(signal.SIGHUP)
    detail = wait_for(lambda: q(db, "select detail from events where kind = 'config_rejected' order by id")[1:], 30, "the rejection", proc=svc)
    problems = json.loads(detail[0][0])["problems"]
    assert any("watch.bogus" in p for p in problems) and any("watch.roots[0].path" in p for p in problems)
    assert "rejected" in svc.log() and "watch.bogus" in svc.log()
    (ev2 / "three.jpg").write_bytes(unique_jpeg("three"))  # the running configuration still watches ev2
    wait_for(lambda: settled(db, {ev1 / "one.jpg": "done", ev2 / "two.jpg": "done", ev2 / "three.jpg": "done"}), 60,
             "a file in ev2 after the rejected reload", proc=svc)
    before2 = tree_manifest(ev2)
    # Ctrl-C in a terminal: SIGINT to the whole process group. The workers ignore it (they
    # inherit the blocked mask); the service drains and exits 0, with no traceback anywhere.
    os.killpg(svc.proc.pid, signal.SIGINT)
    assert svc.proc.wait(120) == 0
    assert "SIGINT received" in svc.log()
    svc.assert_clean_log()
    assert tree_manifest(ev1) == before1 and tree_manifest(ev2) == before2


def test_service_on_postgresql(tmp_path: Path, models_ready, pg_url: str, services) -> None:  # noqa: ANN001
    """The same service on the real PostgreSQL server: no lock file (several hosts may share the
    queue); ``status`` knows it runs from its heartbeat in the database."""
    ev = tmp_path / "evidence"
    ev.mkdir()
    for i in range(3):
        (ev / f"pg{i}.jpg").write_bytes(unique_jpeg(f"pg {i}"))
    cfg = tmp_path / "fg.yaml"
    cfg.write_text(yaml.safe_dump({"database": pg_url, "watch": {"roots": [{"path": str(ev)}], "stability_window": 0.5},
                                   "service": {"workers": 1, "host_id": "pg-test-host"}}))
    svc = services(tmp_path, ["--config", str(cfg)]).start()
    svc.wait_ready()

    def doc() -> dict:
        r = run_cli("status", "--config", str(cfg), "--format", "json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    wait_for(lambda: doc()["files"]["done"] == 3, 90, "3 files done on PostgreSQL", 0.5, svc)
    (ev / "pg0.jpg").rename(ev / "pg0-renamed.jpg")
    wait_for(lambda: any(r["root"] == str(ev) and r["files"]["done"] == 3 for r in doc()["roots"])
             and doc()["files"]["total"] == 3, 60, "the rename recorded", 0.5, svc)
    before = tree_manifest(ev)
    d = doc()
    assert d["service"]["running"] is True and d["service"]["hosts"][0]["host"] == "pg-test-host"
    assert d["files"]["gone"] == 0 and d["backlog"] == 0
    assert not list(tmp_path.glob("*.lock"))
    assert svc.stop() == 0
    assert doc()["service"]["running"] is False
    svc.assert_clean_log()
    assert tree_manifest(ev) == before


@pytest.mark.parametrize("dbkind", ["sqlite", "postgresql"])
def test_hostile_names_never_hide_a_tree(tmp_path: Path, models_ready, services, dbkind: str, request) -> None:  # noqa: ANN001
    """One name that is not UTF-8 (or carries escapes, bidi overrides, newlines) must not stop
    any other file from being recorded, at start-up or while running; each name is recorded
    under its own bytes."""
    from daemon.paths import to_os
    from tests.hostile import hostile_names, make_named_tree

    ev = tmp_path / "evidence"
    names = hostile_names(24)
    files = make_named_tree(ev, names[: len(names) // 2])
    url = f"sqlite:///{tmp_path / 'fg.db'}" if dbkind == "sqlite" else request.getfixturevalue("pg_url")
    cfg = write_config(tmp_path / "fg.yaml", tmp_path / "fg.db", [ev])
    doc = yaml.safe_load(cfg.read_text())
    doc["database"] = url
    cfg.write_text(yaml.safe_dump(doc))
    svc = services(tmp_path, ["--config", str(cfg)]).start()
    svc.wait_ready()
    late = make_named_tree(ev / "late", names[len(names) // 2:])  # arriving while it runs
    files |= late
    first_late = next(iter(late))
    renamed = first_late + b".renamed\xff\\"
    os.rename(first_late, renamed)
    files[renamed] = files.pop(first_late)

    def rows() -> dict[bytes, str]:
        from sqlalchemy import create_engine, text

        eng = create_engine(url)
        try:
            with eng.connect() as c:
                return {to_os(p): st for p, st in c.execute(text("select path, state from files where state != 'gone'"))}
        finally:
            eng.dispose()

    wait_for(lambda: rows() == {p: "done" for p in files}, 120, "every hostile name recorded", 0.5, svc)
    before = tree_manifest(ev)
    assert svc.stop() == 0
    svc.assert_clean_log()
    assert tree_manifest(ev) == before


# ------------------------------------------------------------------------------ network shares and inotify limits


def test_polling_share_with_an_outage(tmp_path: Path, models_ready, services) -> None:  # noqa: ANN001
    if shutil.which("bindfs") is None:
        pytest.skip("bindfs is not installed (apt-get install bindfs); it stands in for a network share")
    backing, mnt, db = tmp_path / "backing", tmp_path / "share", tmp_path / "fg.db"
    backing.mkdir()
    mnt.mkdir()

    def mount() -> None:
        r = subprocess.run(["bindfs", "-o", "ro", str(backing), str(mnt)], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            pytest.skip(f"bindfs cannot mount here (FUSE unavailable?): {r.stderr.strip()}")

    def unmount() -> None:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount", "-u", str(mnt)], capture_output=True, timeout=30)

    mount()
    try:
        cfg = write_config(tmp_path / "fg.yaml", db, [{"path": str(mnt), "polling": True, "poll_interval": 0.3}])
        svc = services(tmp_path, ["--config", str(cfg)]).start()
        svc.wait_ready()
        (backing / "remote.jpg").write_bytes(unique_jpeg("written by another host"))  # behind the watcher's back
        wait_for(lambda: settled(db, {mnt / "remote.jpg": "done"}), 60, "the polled file", proc=svc)
        assert q1(db, "select count(*) from events where kind like 'watch_%'") == 0
        unmount()  # the share goes away: an empty mount point
        wait_for(lambda: "not reachable or no longer the folder" in svc.log(), 30, "the outage to be noticed", proc=svc)
        assert q1(db, "select state from files where path = ?", [str(mnt / "remote.jpg")]) == "done"  # not marked gone
        (backing / "later.jpg").write_bytes(unique_jpeg("written during the outage"))
        mount()
        wait_for(lambda: settled(db, {mnt / "remote.jpg": "done", mnt / "later.jpg": "done"}), 60, "the share back", proc=svc)
        assert q1(db, "select attempts from files where path = ?", [str(mnt / "remote.jpg")]) == 1
        before = tree_manifest(backing)
        assert svc.stop() == 0
        svc.assert_clean_log()
        assert tree_manifest(backing) == before
    finally:
        unmount()


def test_inotify_watch_exhaustion_falls_back_to_polling(tmp_path: Path, models_ready, services) -> None:  # noqa: ANN001
    """In a user namespace of its own the test may lower the inotify watch limit for the service
    alone (``/proc/sys/user/max_inotify_watches``), leaving the machine's setting alone."""
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c", "echo 4 > /proc/sys/user/max_inotify_watches"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot lower the inotify watch limit in a user namespace here: {probe.stderr.strip()}")
    ev, db = tmp_path / "evidence", tmp_path / "fg.db"
    for i in range(12):
        (ev / f"d{i:02d}").mkdir(parents=True)
    (ev / "top.jpg").write_bytes(unique_jpeg("top"))
    cfg = write_config(tmp_path / "fg.yaml", db, [{"path": str(ev), "poll_interval": 0.3}])
    svc = services(tmp_path, ["--config", str(cfg)], prefix=[
        "unshare", "--user", "--map-root-user", "sh", "-c", 'echo 4 > /proc/sys/user/max_inotify_watches && exec "$@"', "sh"])
    svc.start().wait_ready()
    wait_for(lambda: "fs.inotify.max_user_watches" in svc.log() and "polling" in svc.log(), 30, "the exhaustion message", proc=svc)
    wait_for(lambda: q(db, "select detail from events where kind = 'watch_fallback'"), 30, "the fallback event", proc=svc)
    detail = json.loads(q1(db, "select detail from events where kind = 'watch_fallback'"))
    assert "fs.inotify.max_user_watches" in detail["detail"] and "sysctl" in detail["detail"]
    (ev / "d11" / "deep.jpg").write_bytes(unique_jpeg("deep"))  # in a folder inotify could not watch
    wait_for(lambda: settled(db, {ev / "top.jpg": "done", ev / "d11" / "deep.jpg": "done"}), 60, "the deep file", proc=svc)
    before = tree_manifest(ev)
    doc = json.loads(run_cli("status", "--config", str(cfg), "--format", "json").stdout)
    assert doc["service"]["hosts"][0]["roots"] == {str(ev): "polling"}
    assert svc.stop() == 0
    svc.assert_clean_log()
    assert tree_manifest(ev) == before


# ------------------------------------------------------------------------------ bursts and kills


@pytest.mark.slow
def test_burst_of_20000_files_with_a_tiny_inotify_queue(tmp_path: Path, models_ready, services) -> None:  # noqa: ANN001
    n_dirs, per_dir = 10, 2000
    ev, db = tmp_path / "evidence", tmp_path / "fg.db"
    for d in range(n_dirs):
        (ev / f"batch{d:02d}").mkdir(parents=True)
    cfg = write_config(tmp_path / "fg.yaml", db, [ev], service={"workers": 2})
    svc = services(tmp_path, ["--config", str(cfg)])
    try:
        old = QUEUE_SYSCTL.read_text()
        QUEUE_SYSCTL.write_text("64")
    except OSError as err:
        pytest.skip(f"cannot lower fs.inotify.max_queued_events ({err}); run as root")
    try:
        svc.start().wait_ready()  # the service's inotify instance now has a queue of 64 events
    finally:
        QUEUE_SYSCTL.write_text(old)  # restored at once: other programs on this machine are not affected

    t0 = time.monotonic()
    for d in range(n_dirs):
        base = ev / f"batch{d:02d}"
        for i in range(per_dir):
            (base / f"img{i:05d}.jpg").write_bytes(unique_jpeg(f"burst {d} {i}"))
    written = time.monotonic() - t0
    before = tree_manifest(ev)
    total = n_dirs * per_dir
    peak = {"all": 0, "main": 0}

    def done() -> bool:
        peak["all"] = max(peak["all"], descendants_rss_kib(svc.proc.pid))
        with open(f"/proc/{svc.proc.pid}/status") as fh:
            peak["main"] = max(peak["main"], next(int(x.split()[1]) for x in fh if x.startswith("VmRSS:")))
        return q1(db, "select count(*) from files where state = 'done'") == total

    wait_for(done, 1500, f"{total} files done", 0.5, svc)
    seconds = time.monotonic() - t0
    assert svc.stop() == 0
    print(f"\nburst: {total} files written in {written:.1f} s, all done after {seconds:.1f} s; "
          f"peak RSS: service and workers {peak['all'] / 1024:.0f} MiB, main process {peak['main'] / 1024:.0f} MiB")
    assert q1(db, "select count(*) from files") == total
    assert q1(db, "select count(*) from files where attempts != 1") == 0  # none taken twice
    assert q1(db, "select count(*) from analyses") == total == q1(db, "select count(distinct image_id) from files")
    assert q1(db, "select count(*) from events where kind = 'inotify_overflow'") >= 1  # recorded ...
    assert q1(db, "select count(*) from events where kind = 'rescan' and detail like '%\"overflow\"%'") >= 1  # ... and rescanned
    assert_oracle(db, [ev])
    assert tree_manifest(ev) == before
    svc.assert_clean_log()
    assert peak["main"] < 600 * 1024, "the main process grew with the backlog"
    assert peak["all"] < 2048 * 1024


@pytest.mark.slow
def test_kill_9_at_random_moments(tmp_path: Path, models_ready, services) -> None:  # noqa: ANN001
    """50 kills: 35 at a random moment of the start-up (imports, migration, lease recovery,
    model loading, the start-up scan) and 15 at a random moment of the work after READY=1
    (claims, analyses, writes). Most kill the whole process group (as systemd does), every
    fifth only the main process (the orphaned workers must go away by themselves)."""
    rnd = random.Random(20240605)
    kills, after_ready, initial, per_cycle = 50, 15, 1200, 20
    ev, db = tmp_path / "evidence", tmp_path / "fg.db"
    for d in range(10):
        (ev / f"part{d}").mkdir(parents=True)
    base = noise_jpeg(160, 120, seed=3)  # ~15 ms each: the run spans the kills
    count = 0

    def add(n: int) -> None:
        nonlocal count
        for _ in range(n):
            (ev / f"part{count % 10}" / f"img{count:05d}.jpg").write_bytes(unique_jpeg(f"kill {count}", base))
            count += 1

    add(initial)
    cfg = write_config(tmp_path / "fg.yaml", db, [ev], watch={"stability_window": 0.3})
    svc = services(tmp_path, ["--config", str(cfg)])
    late = set(rnd.sample(range(kills), after_ready))
    mid_work = 0
    t0 = time.monotonic()
    for k in range(kills):
        started = time.time()
        svc.start()
        if k in late:
            svc.wait_ready()
        deadline = time.monotonic() + (rnd.uniform(0.3, 1.2) if k in late else rnd.uniform(0.1, 2.5))
        if k % 4 == 1:  # some files arrive while it runs (events), the others while it is down
            add(per_cycle)
        while time.monotonic() < deadline:  # the stimulus: let it run until a random moment
            time.sleep(0.01)
        svc.kill9(group=k % 5 != 0)
        if db.exists():  # did this run hold files of its own (claimed, in flight) when it died?
            mid_work += q1(db, "select count(*) from files where state = 'working' and updated >= ?", [started]) > 0
        if k % 4 != 1:
            add(per_cycle)
    kill_seconds = time.monotonic() - t0
    before = tree_manifest(ev)
    svc.start().wait_ready()
    wait_for(lambda: q1(db, "select count(*) from files where state = 'done'") == count, 600, f"all {count} files", 0.5, svc)
    assert svc.stop() == 0
    print(f"\nkill -9: {kills} kills in {kill_seconds:.0f} s ({mid_work} with files in flight), {count} files, "
          f"finished {time.monotonic() - t0 - kill_seconds:.0f} s after the last kill")
    assert count >= 2000
    assert mid_work >= after_ready // 2, f"only {mid_work} kills hit files in flight"
    assert q1(db, "select count(*) from files") == count
    assert q1(db, "select count(*) from files where attempts != 1") == 0  # nothing analysed twice
    assert q1(db, "select count(*) from analyses") == count
    assert q1(db, "select count(*) from events where kind = 'leases_recovered'") >= 1
    assert_oracle(db, [ev])  # includes PRAGMA integrity_check
    assert tree_manifest(ev) == before
    final_run = svc.log().rsplit("===== run", 1)[1]
    assert "Traceback" not in final_run, final_run[-4000:]
