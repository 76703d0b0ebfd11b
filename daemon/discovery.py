"""Finding files under evidence roots: one walk for scans, start-up and rescans.

Nothing here opens a file: entries are ``lstat``-ed only. Directories are never followed through
symbolic links (no loops, nothing outside the root). Every entry ends as a row: a symbolic link,
FIFO, socket or device is reported with a reason so that it is recorded as failed, and a folder
that cannot be listed (or an entry that cannot be ``lstat``-ed) is reported as ``unreadable``
(a folder's row is its path with a trailing separator). No name is ignored: temporary names of
copy tools (``*.part``, rsync's ``.name.XXXXXX``) are evidence like any other once their size and
time stay the same (the watcher's stability window); OS side files (``.DS_Store``, ``Thumbs.db``,
``@eaDir`` thumbnails, recycle bins) are recorded too: they are part of the evidence.

Paths here are OS paths (``str`` with ``surrogateescape`` for names that are not UTF-8); the
store records them losslessly (:mod:`daemon.paths`).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from daemon.store.writer import FileStat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Filter:
    """Which names under a root are evidence: ``include``/``exclude`` are glob patterns matched
    against the path relative to the root and against the bare name."""

    include: Sequence[str] = ("*",)
    exclude: Sequence[str] = ()

    def accepts(self, relpath: str) -> bool:
        name = os.path.basename(relpath)
        if not any(fnmatch.fnmatch(relpath, p) or fnmatch.fnmatch(name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatch(relpath, p) or fnmatch.fnmatch(name, p) for p in self.exclude)


def stat_path(path: str, root: str) -> FileStat | None:
    """What discovery records for one path, or None when it vanished or is a directory."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as err:
        return _unreadable(path, root, "its attributes cannot be read (lstat)", err)
    return from_stat(path, root, st)


def _unreadable(path: str, root: str, what: str, err: OSError) -> FileStat:
    return FileStat(path, root, 0, 0, None, "unreadable",
                    f"{what}: {err.strerror}; grant the service user read and search (x) permission on it and its folder")


def from_stat(path: str, root: str, st: os.stat_result) -> FileStat | None:
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return None
    if stat.S_ISREG(mode):
        return FileStat(path, root, st.st_size, st.st_mtime_ns, st.st_ino)
    if stat.S_ISLNK(mode):
        target = _readlink(path)
        return FileStat(path, root, 0, st.st_mtime_ns, st.st_ino, "symlink",
                        f"a symbolic link (to {target!r}) is not followed: evidence must be a regular file inside the root; analyse the target where it lies")
    kind = "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"
    return FileStat(path, root, 0, st.st_mtime_ns, st.st_ino, "not_regular_file",
                    f"a {kind}, not a regular file: it was not opened")


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def walk(root: str, *, recursive: bool = True, filt: Filter | None = None) -> Iterator[FileStat]:
    """Every accepted entry under ``root`` (which may also be a single file), lstat-ed once. A
    folder that cannot be listed is yielded as an ``unreadable`` row named ``folder/``."""
    filt = filt or Filter()
    root = os.path.abspath(root)
    if not os.path.isdir(root) or os.path.islink(root):
        base = os.path.dirname(root)
        if filt.accepts(os.path.basename(root)):
            st = stat_path(root, base)
            if st is not None:
                yield st
        return
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            continue  # removed while we walked
        except OSError as err:
            log.warning("cannot list %s: %s", d, err.strerror)
            yield _unreadable(d.rstrip(os.sep) + os.sep, root, "the folder cannot be listed", err)
            continue
        subdirs = []
        for e in entries:
            rel = os.path.relpath(e.path, root)
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as err:
                if filt.accepts(rel):
                    yield _unreadable(e.path, root, "its attributes cannot be read (lstat)", err)
                continue
            if stat.S_ISDIR(st.st_mode):
                if recursive:
                    subdirs.append(e.path)
                continue
            if not filt.accepts(rel):
                continue
            fs = from_stat(e.path, root, st)
            if fs is not None:
                yield fs
        stack.extend(reversed(subdirs))
