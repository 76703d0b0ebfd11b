"""Logging for the command and the service: one stderr handler whose lines cannot be forged by
a file name, loggers shown under the product's name."""

from __future__ import annotations

import logging
import os
import sys


class _SafeFormatter(logging.Formatter):
    """Escapes control and bidi characters in the message (a file name cannot forge a log line
    or clear a terminal); tracebacks keep their lines. Loggers are shown under the product's
    name (``forensic_gender.service``), not the import package's (``daemon.service``)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        from daemon.paths import show

        record.message = show(record.message)
        if record.name == "daemon" or record.name.startswith("daemon."):
            record.name = "forensic_gender" + record.name[len("daemon") :]
        return super().formatMessage(record)


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr; without timestamps under systemd (journald adds them)."""
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_SafeFormatter(fmt))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
