"""Opening output files (exports, annotated copies, crops) so that evidence is never written.

A path names nothing reliably: between a check and a write, a name can become a symbolic link
to an evidence file, and a hard link *is* the evidence file under another name. So every output
file is opened first and checked on the open descriptor, and only then truncated and written:

1. The folder that will hold it is opened, and its real location (read back from the open
   descriptor) must not be, or lie inside, an evidence root. Nothing is created before that.
2. The file is opened beneath that folder descriptor with ``O_NOFOLLOW`` (a symbolic link is
   refused, never followed) and without ``O_TRUNC``: a new file is created with ``O_EXCL``; an
   existing one is opened as it is, so a refused file keeps its content, mtime and ctime.
3. ``fstat`` on the descriptor: it must be a regular file; its real location must not lie in a
   root; it must not be a recorded evidence file - its ``(st_dev, st_ino)`` is compared with
   every recorded file of that inode (the device from an ``lstat`` of the recorded path); and an
   existing file with other hard links is refused too (one of its names may be evidence).
4. Only then is it truncated and handed out.

Folders for many files (``crops --out``) are created the same way: never under a root, then
opened once, and each file created beneath that descriptor.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING

from daemon import paths

if TYPE_CHECKING:
    from sqlalchemy import Connection

log = logging.getLogger(__name__)

# Characters that change how a terminal or editor shows the text around them (DEL, C1 controls,
# bidi marks, embeddings, overrides and isolates, zero-width characters, line and paragraph
# separators, the BOM). JSON already escapes C0 controls.
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ufff9-\ufffb]")

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_O_OLD = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class OutputError(Exception):
    """Output refused: ``message`` says where, why and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class Guard:
    """What output must never touch: the evidence roots (resolved OS paths), the recorded
    evidence files (looked up by inode in the files table through ``conn``) and any other
    evidence files known by identity: ``files`` maps ``(st_dev, st_ino)`` to a name to show
    (e.g. the inputs of ``analyze``)."""

    roots: Sequence[bytes]
    conn: Connection | None = None
    files: Mapping[tuple[int, int], str] = field(default_factory=dict)

    def root_of(self, real: bytes) -> bytes | None:
        """The evidence root ``real`` (a resolved path) is, or lies inside; None if none."""
        for r in self.roots:
            if real == r or real.startswith(r.rstrip(b"/") + b"/"):
                return r
        return None

    def evidence_file(self, st: os.stat_result) -> str | None:
        """The recorded path of the evidence file that is the object ``st`` describes, if any."""
        known = self.files.get((st.st_dev, st.st_ino))
        if known is not None:
            return known
        if self.conn is None:
            return None
        from sqlalchemy import select

        from daemon.store import schema as s

        rows = self.conn.execute(select(s.files.c.path).where(s.files.c.inode == st.st_ino)).all()
        for (recorded,) in rows:
            try:
                ev = os.lstat(paths.to_os(recorded))
            except OSError:
                continue
            if (ev.st_dev, ev.st_ino) == (st.st_dev, st.st_ino):
                return recorded
        return None


def json_text(obj: object, **kw: object) -> str:
    """``json.dumps`` that keeps other non-ASCII text readable (``ensure_ascii=False``) but writes
    the characters of :data:`_JSON_UNSAFE` as ``\\uXXXX`` escapes: the same JSON values
    (lossless: a parser gets the recorded text back), and nothing that can reorder or hide text
    when the output is shown. They can only occur inside strings, where the escape is valid."""
    text = json.dumps(obj, ensure_ascii=False, **kw)  # type: ignore[arg-type]
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group(0)):04x}", text)


def _show(p: bytes | str) -> str:
    return paths.show(paths.to_db(p))


def fd_path(fd: int, fallback: bytes) -> bytes:
    """Where an open descriptor really is (Linux: its /proc link), else ``fallback`` resolved."""
    try:
        real = os.readlink(f"/proc/self/fd/{fd}".encode())
        if real.startswith(b"/") and not real.endswith(b" (deleted)"):
            return real
    except OSError:
        pass
    return os.path.realpath(fallback)


def _refuse_in_root(guard: Guard, real: bytes, what: str, shown: bytes) -> None:
    root = guard.root_of(real)
    if root is not None:
        raise OutputError(f"{what} {_show(shown)}: must lie outside every folder that holds evidence, but {_show(real)} is inside "
                          f"the evidence root {_show(root)}; write output elsewhere (nothing was written)")


def refuse_in_root(path: str | bytes, guard: Guard, what: str) -> None:
    """Raise :class:`OutputError` when ``path`` (existing or not) would lie in an evidence root,
    judged by the real location of its nearest existing folder. A check before work is done;
    the opened file is checked again."""
    p = os.path.abspath(os.fsencode(path))
    probe, rest = p, []
    while not os.path.lexists(probe) and probe != os.path.dirname(probe):
        probe, tail = os.path.split(probe)
        rest.append(tail)
    _refuse_in_root(guard, os.path.join(os.path.realpath(probe), *reversed(rest)), what, p)


def open_dir(path: str | bytes, guard: Guard, what: str, *, create: bool = True) -> int:
    """An open descriptor of the output folder ``path`` (created with its parents when
    ``create``), which is not and does not lie in an evidence root. Raises :class:`OutputError`."""
    p = os.path.abspath(os.fsencode(path))
    refuse_in_root(p, guard, what)  # before creating anything
    if create and not os.path.lexists(p):
        try:
            os.makedirs(p, exist_ok=True)
        except OSError as err:
            raise OutputError(f"{what} {_show(p)}: cannot create the folder ({err.strerror}); create it or choose another") from err
    try:
        dfd = os.open(p, _O_DIR)
    except OSError as err:
        hint = "it is not a folder" if err.errno == errno.ENOTDIR else err.strerror
        raise OutputError(f"{what} {_show(p)}: must be a folder this user may write ({hint})") from err
    try:
        _refuse_in_root(guard, fd_path(dfd, p), what, p)
    except BaseException:
        os.close(dfd)
        raise
    return dfd


def open_file(path: str | bytes, guard: Guard, what: str, *, replace: bool = True, dir_fd: int | None = None,
              make_parents: bool = False) -> int:
    """A descriptor open for writing on ``path`` (relative to ``dir_fd`` when given), checked as
    the module docstring says and truncated only after the checks. ``replace=False`` refuses an
    existing file; ``make_parents`` creates missing folders (never under a root). Raises
    :class:`OutputError`; a refused existing file is left untouched."""
    p = os.fsencode(path)
    if dir_fd is None:
        full = os.path.abspath(p)
        parent, name = os.path.split(full)
        if not name or p.endswith(b"/"):
            raise OutputError(f"{what} {_show(p)}: must name a file, got a folder")
        dfd = open_dir(parent, guard, what, create=make_parents)
    else:
        full, name, dfd = p, p, dir_fd
        if b"/" in name or name in (b"", b".", b".."):
            raise OutputError(f"{what} {_show(p)}: must be a file name")
    try:
        return _open_in(dfd, name, full, guard, what, replace)
    finally:
        if dir_fd is None:
            os.close(dfd)


def _open_in(dfd: int, name: bytes, full: bytes, guard: Guard, what: str, replace: bool) -> int:
    created = False
    try:
        fd = os.open(name, _O_NEW, 0o644, dir_fd=dfd)
        created = True
    except FileExistsError:
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError as err:
            raise OutputError(f"{what} {_show(full)}: cannot be checked ({err.strerror})") from err
        if stat.S_ISLNK(st.st_mode):
            raise OutputError(f"{what} {_show(full)}: is a symbolic link; output is never written through a link (it could "
                              "lead to evidence); remove the link or choose another name")
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{what} {_show(full)}: must be a regular file, got {stat.filemode(st.st_mode)}; choose another name")
        if not replace:
            raise OutputError(f"{what} {_show(full)}: exists; pass --force to replace it")
        try:
            fd = os.open(name, _O_OLD, dir_fd=dfd)
        except OSError as err:
            raise OutputError(f"{what} {_show(full)}: cannot be opened for writing ({err.strerror})") from err
    except OSError as err:
        raise OutputError(f"{what} {_show(full)}: cannot be created ({err.strerror}); choose a writable place") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{what} {_show(full)}: must be a regular file, got {stat.filemode(st.st_mode)}")
        _refuse_in_root(guard, fd_path(fd, full), what, full)
        if not created:
            ev = guard.evidence_file(st)
            if ev is not None:
                raise OutputError(f"{what} {_show(full)}: is the evidence file {paths.show(ev)} (the same file under another name: a "
                                  "hard link); it was not written; choose another output name")
            if st.st_nlink > 1:
                raise OutputError(f"{what} {_show(full)}: has {st.st_nlink} names (hard links), and one of them may be evidence; "
                                  "it was not written; remove it or choose another output name")
            os.ftruncate(fd, 0)
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        if created:
            try:
                os.unlink(name, dir_fd=dfd)
            except OSError:
                pass
        raise


def open_text(path: str | bytes, guard: Guard, what: str, *, replace: bool = True, dir_fd: int | None = None) -> IO[str]:
    """:func:`open_file` as a UTF-8 text stream (newlines as written, for CSV)."""
    return os.fdopen(open_file(path, guard, what, replace=replace, dir_fd=dir_fd), "w", encoding="utf-8", newline="")


def write_bytes(path: str | bytes, data: bytes, guard: Guard, what: str, *, replace: bool = True, dir_fd: int | None = None,
                make_parents: bool = False) -> None:
    """Write ``data`` to ``path`` through :func:`open_file`."""
    with os.fdopen(open_file(path, guard, what, replace=replace, dir_fd=dir_fd, make_parents=make_parents), "wb") as fh:
        fh.write(data)
