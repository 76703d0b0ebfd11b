"""Names are bytes until shown: how a file name is stored, turned back into bytes, and displayed.

A Linux file name is any byte string without ``/`` and NUL; it need not be UTF-8. Both databases
store text, so a path is kept as its *recorded form*, an injective, reversible text encoding:

- valid UTF-8 is kept as it is (almost every path is stored unchanged);
- a byte that is not part of valid UTF-8 becomes ``\\xHH`` (two lowercase hex digits);
- a literal backslash becomes ``\\\\``, so that the two cannot be confused.

:func:`to_db` makes the recorded form from what the OS gave (bytes, or text that Python decoded
with ``surrogateescape``); :func:`to_os` gives the exact bytes back to open the file. Recorded
forms are what every query, export and page carries (lossless: ``to_os`` recovers the name).

:func:`show` is for terminals and the review page only: it makes control characters (C0, DEL,
C1), bidirectional overrides and isolates, zero-width and line/paragraph separators visible as
``\\u202e``-style escapes, so that a name cannot clear a screen, split a table row or reverse the
text around it. It is not reversible and is never stored.
"""

from __future__ import annotations

import os
import re

__all__ = ["from_db", "show", "to_db", "to_os", "user_path"]

_SURROGATE_OR_BACKSLASH = re.compile("[\\\\\udc80-\udcff]")
_RECORDED_ESCAPE = re.compile(r"\\(\\|x[89a-f][0-9a-f])")  # only bytes >= 0x80 are ever escaped

# C0 controls, DEL and C1 controls; the Unicode bidi embeddings, overrides, isolates and marks;
# zero-width characters and the line/paragraph separators; the BOM. Each shown as an escape.
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ufff9-\ufffb]"
)


def _escape(m: re.Match[str]) -> str:
    ch = m.group(0)
    if ch == "\\":
        return "\\\\"
    return f"\\x{ord(ch) - 0xDC00:02x}"


def to_db(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """The recorded form of an OS path (bytes, or ``surrogateescape`` text as ``os`` returns)."""
    p = os.fspath(path)
    text = os.fsdecode(p) if isinstance(p, bytes) else p
    return _SURROGATE_OR_BACKSLASH.sub(_escape, text)


def _unescape(m: re.Match[str]) -> str:
    code = m.group(1)
    return "\\" if code == "\\" else chr(0xDC00 + int(code[1:], 16))


def to_os(recorded: str) -> bytes:
    """The exact bytes of the path whose recorded form is ``recorded`` (the inverse of to_db).

    A backslash that starts no escape is kept as it is (paths recorded before names were
    encoded, or typed by a user)."""
    text = _RECORDED_ESCAPE.sub(_unescape, recorded) if "\\" in recorded else recorded
    return os.fsencode(text)


def from_db(recorded: str) -> str:
    """The OS path (``surrogateescape`` text, as ``os`` functions take and return) of a
    recorded form."""
    return os.fsdecode(to_os(recorded))


def user_path(typed: str) -> str:
    """The recorded form of a path that a user typed (an argument: ``surrogateescape`` text)."""
    return to_db(os.path.abspath(typed))


def _visible(m: re.Match[str]) -> str:
    code = ord(m.group(0))
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def show(text: str | None) -> str:
    """``text`` safe for a terminal or an HTML page: invisible and layout-changing characters
    become visible escapes (``\\x1b``, ``\\u202e``). For display only."""
    if text is None:
        return ""
    return _UNSAFE.sub(_visible, text)
