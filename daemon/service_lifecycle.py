"""The service's life: the signals it takes (stop, fast stop, reload) and the instance lock that
allows one service per SQLite database. The main loop that uses them is
:class:`daemon.service.Service`.

Signals are blocked in the main thread and in the worker processes (which inherit its mask), and
taken by the loop (``sigtimedwait``, plus a handler that only records them for threads that
libraries started before the mask was set): SIGTERM/SIGINT drain, a second one stops without
waiting; SIGHUP reloads the configuration.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import time
from types import FrameType

log = logging.getLogger(__name__)

SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


class ServiceError(Exception):
    """The service cannot start (another instance holds the database, ...)."""


# --------------------------------------------------------------------------------------------
# Signals


class Signals:
    """What the signals asked for: ``stop_requested`` (drain, then exit 0), ``fast_stop`` (a
    second stop signal: release the files in flight without waiting) and ``reload_requested``."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.stop_requested = False
        self.fast_stop = False
        self.reload_requested = False

    def on_signal(self, signo: int, _frame: FrameType | None) -> None:
        """The handler for threads that do not block the signals: only records it."""
        self.pending.append(signo)

    def take(self, timeout: float) -> None:
        """Collect pending signals, waiting up to ``timeout`` s for the first one (our sleep)."""
        while True:
            if self.pending:
                signo = self.pending.pop(0)
            else:
                info = signal.sigtimedwait(SIGNALS, timeout) if timeout > 0 else signal.sigtimedwait(SIGNALS, 0)
                if info is None:
                    if self.pending:  # recorded by the handler meanwhile
                        continue
                    break
                signo = info.si_signo
            timeout = 0
            if signo in (signal.SIGTERM, signal.SIGINT):
                if self.stop_requested:
                    self.fast_stop = True
                    log.warning("second stop signal: releasing the files in flight without waiting")
                else:
                    log.info("%s received: finishing the files in flight, then stopping", signal.Signals(signo).name)
                self.stop_requested = True
            elif signo == signal.SIGHUP:
                log.info("SIGHUP received: reloading the configuration")
                self.reload_requested = True

    def sleep(self, seconds: float) -> None:
        """Wait, in short slices so that a signal caught by the handler ends the wait soon."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.stop_requested or self.reload_requested:
                return
            self.take(min(left, 0.25))


# --------------------------------------------------------------------------------------------
# Single instance (SQLite)


def sqlite_path(url: str) -> str | None:
    """The database file of a ``sqlite:///`` URL (None for other databases and ``:memory:``)."""
    if not url.startswith("sqlite:///"):
        return None
    p = url[len("sqlite:///") :].split("?", 1)[0]
    return None if p in ("", ":memory:") else os.path.abspath(p)


class InstanceLock:
    """``flock`` on ``<database>.lock``: one service per SQLite database. The file stays (removing
    lock files races with the next start); the kernel drops the lock when the process dies."""

    def __init__(self, db_path: str) -> None:
        self.path = db_path + ".lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ServiceError(f"cannot lock {self.path}: {err.strerror}") from err
            holder = lock_holder(self.path)
            who = f"pid {holder}" if holder else "another process"
            raise ServiceError(
                f"another forensic-gender service is already running on the database {self.path[:-5]} "
                f"({who} holds {self.path}); stop it first (systemctl stop forensic-gender), or give this one "
                "another --db"
            ) from err
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None


def lock_holder(lock_path: str) -> int | None:
    """The pid holding the service lock on ``lock_path`` (from /proc/locks, which tests the lock
    without taking it), or None when no service runs."""
    try:
        st = os.stat(lock_path)
    except OSError:
        return None
    try:
        with open("/proc/locks", encoding="ascii") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return _probe_lock(lock_path)
    for line in lines:
        parts = line.split()
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        try:
            major, minor, ino = parts[5].split(":")
            if int(ino) == st.st_ino and os.makedev(int(major, 16), int(minor, 16)) == st.st_dev:
                return int(parts[4])
        except ValueError:
            continue
    return None


def _probe_lock(lock_path: str) -> int | None:
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except OSError:
        try:
            return int(os.pread(fd, 32, 0).decode().strip() or 0) or -1
        except ValueError:
            return -1
    finally:
        os.close(fd)
