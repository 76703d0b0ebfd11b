"""systemd's notification protocol (sd_notify(3)) without a dependency.

One datagram per message to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or an
abstract name written with a leading ``@``). Outside systemd (no variable) every call is a no-op.
The variables are removed from the environment once read, so that worker processes started
later do not inherit them (only the main process talks to systemd: ``NotifyAccess=main``).

``WATCHDOG=1`` is sent by :meth:`Notifier.watchdog` at half the interval systemd asks for
(``$WATCHDOG_USEC``); the service calls it from its main loop only, so the pings stop when the
loop stops making progress and systemd restarts the service.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, MutableMapping

log = logging.getLogger(__name__)

_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    def __init__(self, environ: MutableMapping[str, str] | None = None, *, clock: Callable[[], float] = time.monotonic,
                 unset: bool = True) -> None:
        env = os.environ if environ is None else environ
        self.clock = clock
        addr = env.get("NOTIFY_SOCKET") or None
        if addr and addr.startswith("@"):
            addr = "\0" + addr[1:]
        self.address = addr
        self.watchdog_interval: float | None = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if usec and (not pid or pid == str(os.getpid())):
            try:
                value = int(usec)
            except ValueError:
                value = 0
            if value > 0:
                self.watchdog_interval = value / 1e6
        if unset:
            for k in _VARS:
                env.pop(k, None)
        self._sock: socket.socket | None = None
        self._last_ping = float("-inf")
        self.sent: list[str] = []  # what was sent, newest last (bounded; for diagnostics)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send one message (``KEY=value`` lines); never raises. True when it was sent."""
        if self.address is None:
            return False
        msg = "\n".join(lines)
        try:
            if self._sock is None:
                # Non-blocking: a full receiver queue must never stall the main loop.
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            self._sock.sendto(msg.encode("utf-8", "replace"), self.address)
        except OSError as err:
            log.debug("sd_notify %r failed: %s", msg, err)
            return False
        self.sent.append(msg)
        del self.sent[:-50]
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={_one_line(status)}"] if status else []), f"MAINPID={os.getpid()}")

    def reloading(self) -> bool:
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={_one_line(text)}")

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def watchdog(self) -> bool:
        """``WATCHDOG=1`` when half the watchdog interval passed since the last ping."""
        if self.watchdog_interval is None or self.address is None:
            return False
        now = self.clock()
        if now - self._last_ping < self.watchdog_interval / 2:
            return False
        self._last_ping = now
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())
