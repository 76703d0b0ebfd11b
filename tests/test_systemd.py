"""systemd integration: the unit and its snippets (checked with systemd's own tools, offline),
and the notification protocol (daemon.notify) against a datagram socket the test binds.

The service itself is never started by systemd here (no systemd as PID 1 in CI); the
lifecycle with a fake NOTIFY_SOCKET is tested end to end in test_service.py."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.notify import Notifier

REPO = Path(__file__).resolve().parents[1]
SYSTEMD = REPO / "systemd"
UNIT = SYSTEMD / "forensic-gender.service"
INSTALLED_BIN = "/opt/forensic-gender/.venv/bin/forensic-gender"
FG = str(Path(sys.executable).with_name("forensic-gender"))


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (apt-get install systemd); CI needs it for the unit checks")
    return path


def unit_here(tmp_path: Path, *dropins: str) -> Path:
    """The unit with the drop-ins merged in, its binary pointed at this checkout (``verify``
    checks that ExecStart= is executable)."""
    text = UNIT.read_text()
    for name in dropins:
        text += "\n" + (SYSTEMD / name).read_text()
    out = tmp_path / "forensic-gender.service"
    out.write_text(text.replace(INSTALLED_BIN, FG))
    return out


def directives(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


# ------------------------------------------------------------------------------ the unit


def test_unit_has_what_the_service_needs() -> None:
    d = directives(UNIT)
    one = {k: v[-1] for k, v in d.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["ExecStart"].endswith("forensic-gender run --config /etc/forensic-gender/config.yaml")
    assert "check-config --config /etc/forensic-gender/config.yaml" in one["ExecStartPre"]
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert int(one["WatchdogSec"]) >= 30 and one["Restart"] == "on-failure"
    assert one["KillMode"] == "mixed"  # SIGTERM to the service only: it drains; workers are its business
    assert one["User"] == one["Group"] == "forensic-gender"
    assert one["StateDirectory"] == "forensic-gender"
    assert one["ProtectSystem"] == "strict" and one["NoNewPrivileges"] == "yes" and one["PrivateNetwork"] == "yes"
    assert "MemoryMax" in one and "MemoryHigh" in one
    assert int(one["TimeoutStopSec"]) > 150  # the drain waits up to min(file_timeout + 5, 150) s
    ev = directives(SYSTEMD / "evidence.conf.example")
    assert ev["ReadOnlyPaths"], "the drop-in example must name evidence roots read-only"


def test_unit_verifies(tmp_path: Path) -> None:
    tool = need("systemd-analyze")
    for dropins in ((), ("evidence.conf.example",), ("evidence.conf.example", "postgresql.conf.example")):
        unit = unit_here(tmp_path, *dropins)
        r = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=120)
        problems = [line for line in (r.stdout + r.stderr).splitlines() if unit.name in line or "forensic" in line]
        assert r.returncode == 0 and not problems, f"{dropins}: {r.stdout}{r.stderr}"


@pytest.mark.parametrize(("dropins", "threshold"), [((), 10), (("evidence.conf.example",), 10),
                                                     (("evidence.conf.example", "postgresql.conf.example"), 10)])
def test_unit_exposure_is_at_most_1(tmp_path: Path, dropins: tuple[str, ...], threshold: int) -> None:
    """What CI runs: ``systemd-analyze security --offline=yes --threshold=10`` (tenths)."""
    tool = need("systemd-analyze")
    unit = unit_here(tmp_path, *dropins)
    r = subprocess.run([tool, "security", "--offline=yes", f"--threshold={threshold}", str(unit)],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert r.returncode == 0 and float(m.group(1)) <= threshold / 10, r.stdout[-3000:]


def test_sysusers_and_tmpfiles_snippets(tmp_path: Path) -> None:
    sysusers, tmpfiles = need("systemd-sysusers"), need("systemd-tmpfiles")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    r = subprocess.run([sysusers, f"--root={root}", str(SYSTEMD / "forensic-gender.sysusers")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    passwd = (root / "etc" / "passwd").read_text()
    entry = next(line for line in passwd.splitlines() if line.startswith("forensic-gender:"))
    uid, home, shell = entry.split(":")[2], entry.split(":")[5], entry.split(":")[6]
    assert int(uid) < 1000 and home == "/var/lib/forensic-gender" and "nologin" in shell
    r = subprocess.run([tmpfiles, f"--root={root}", "--create", str(SYSTEMD / "forensic-gender.tmpfiles")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    state = root / "var" / "lib" / "forensic-gender"
    assert state.is_dir() and (state.stat().st_mode & 0o777) == 0o750 and state.stat().st_uid == int(uid)
    assert (root / "etc" / "forensic-gender").is_dir()


def test_sysctl_snippet_names_real_keys() -> None:
    keys = {}
    for line in (SYSTEMD / "60-forensic-gender.sysctl.conf").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, v = (x.strip() for x in line.split("=", 1))
            keys[k] = int(v)
    assert keys["fs.inotify.max_user_watches"] >= 524288
    for k in keys:
        assert Path("/proc/sys", *k.split(".")).exists(), k


# ------------------------------------------------------------------------------ sd_notify


@pytest.fixture
def listener(tmp_path_factory) -> Iterator[tuple[socket.socket, str]]:  # noqa: ANN001
    d = tmp_path_factory.mktemp("n")
    path = str(d / "s")
    if len(path) > 100:  # AF_UNIX path limit
        import tempfile

        path = os.path.join(tempfile.mkdtemp(prefix="fgn"), "s")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    yield s, path
    s.close()


def recv(s: socket.socket) -> str:
    return s.recv(4096).decode()


def test_notify_messages(listener) -> None:  # noqa: ANN001
    s, path = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "OTHER": "kept"}
    clock = [100.0]
    n = Notifier(env, clock=lambda: clock[0])
    assert env == {"OTHER": "kept"}  # not inherited by the worker processes started later
    assert n.enabled and n.watchdog_interval == 2.0
    assert n.ready("backlog 3 file(s);\n 0.0 files/s")
    msg = recv(s).split("\n")
    assert msg[0] == "READY=1" and "STATUS=backlog 3 file(s); 0.0 files/s" in msg and f"MAINPID={os.getpid()}" in msg
    assert n.status("backlog 0") and recv(s) == "STATUS=backlog 0"
    assert n.watchdog() and recv(s) == "WATCHDOG=1"
    clock[0] += 0.9
    assert not n.watchdog()  # at most every half interval
    clock[0] += 0.2
    assert n.watchdog() and recv(s) == "WATCHDOG=1"
    assert n.reloading() and recv(s).startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert n.stopping("draining") and recv(s) == "STOPPING=1\nSTATUS=draining"
    n.close()


def test_notify_abstract_socket_and_foreign_watchdog() -> None:
    name = f"fg-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(5)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
        assert n.watchdog_interval is None and not n.watchdog()  # the watchdog is for another process
        assert n.ready() and recv(s).startswith("READY=1")
        n.close()
    finally:
        s.close()


def test_notify_without_systemd_is_a_no_op(tmp_path: Path) -> None:
    n = Notifier({})
    assert not n.enabled and not n.ready() and not n.watchdog() and not n.stopping()
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert not gone.ready()  # an error is logged at debug level, never raised
    gone.close()
