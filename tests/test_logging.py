"""The command's log lines: the product's logger names, and names that cannot forge a line."""

from __future__ import annotations

import logging

import pytest

from daemon.logs import setup_logging


def test_log_lines_name_the_product_and_escape_control_characters(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    setup_logging("INFO")
    try:
        logging.getLogger("daemon.service").info("analysed %s", "evil\nFAKE LINE\x1b[2J.jpg")
        logging.getLogger("daemon").warning("top")
        logging.getLogger("watchdog.observers").warning("third party")
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3
    assert "INFO forensic_gender.service: analysed evil" in err[0] and "\x1b" not in err[0]
    assert "WARNING forensic_gender: top" in err[1]
    assert "WARNING watchdog.observers: third party" in err[2]
