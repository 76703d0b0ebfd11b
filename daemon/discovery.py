"""Finding files under evidence roots: one walk for scans, start-up and rescans.

Nothing here opens a file: entries are ``lstat``-ed only. Directories are never followed through
symbolic links (no loops, nothing outside the root). A symbolic link, FIFO, socket or device
is reported with a reason so that it ends in the database as failed, not silently skipped.
Temporary names of copy tools and OS junk are ignored (they are not evidence, or not yet).
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

JUNK_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", "ehthumbs.db", ".localized"})
JUNK_DIRS = frozenset({"@eaDir", ".Trashes", ".Spotlight-V100", ".fseventsd", "$RECYCLE.BIN", ".TemporaryItems"})


@dataclass(frozen=True)
class Filter:
    """Which names under a root are evidence: ``include``/``exclude`` are glob patterns matched
    against the path relative to the root and against the bare name."""

    include: Sequence[str] = ("*",)
    exclude: Sequence[str] = ()

    def accepts(self, relpath: str) -> bool:
        name = os.path.basename(relpath)
        if is_ignored_name(name):
            return False
        if any(part in JUNK_DIRS for part in relpath.split(os.sep)[:-1]):
            return False
        if not any(fnmatch.fnmatch(relpath, p) or fnmatch.fnmatch(name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatch(relpath, p) or fnmatch.fnmatch(name, p) for p in self.exclude)


def is_ignored_name(name: str) -> bool:
    """Temporary names of copy tools (``.name.XXXXXX`` of rsync, ``*.part``, ``*.crdownload``,
    ``~$*``, ``*.tmp``) and OS junk (``._*``, ``.DS_Store``, ``Thumbs.db``, ``desktop.ini``)."""
    if name in JUNK_NAMES or name in JUNK_DIRS or name.startswith("._") or name.startswith("~$"):
        return True
    if name.endswith((".part", ".partial", ".crdownload", ".tmp", ".swp", "~")):
        return True
    # rsync / mktemp style: ".name.ext.XXXXXX"
    if name.startswith(".") and name.count(".") >= 2:
        suffix = name.rsplit(".", 1)[1]
        if len(suffix) == 6 and suffix.isalnum():
            return True
    return False


def stat_path(path: str, root: str) -> FileStat | None:
    """What discovery records for one path, or None when it vanished or is a directory."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as err:
        return FileStat(path, root, 0, 0, None, "unreadable", f"cannot stat {path!r}: {err.strerror}")
    return from_stat(path, root, st)


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
    """Every accepted entry under ``root`` (which may also be a single file), lstat-ed once."""
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
        except OSError as err:
            log.warning("cannot list %s: %s", d, err.strerror)
            continue
        subdirs = []
        for e in entries:
            rel = os.path.relpath(e.path, root)
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if recursive and e.name not in JUNK_DIRS:
                    subdirs.append(e.path)
                continue
            if not filt.accepts(rel):
                continue
            fs = from_stat(e.path, root, st)
            if fs is not None:
                yield fs
        stack.extend(reversed(subdirs))
