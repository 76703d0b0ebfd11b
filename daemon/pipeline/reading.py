"""Reading evidence: the one module that opens files the pipeline analyses, read-only.

Evidence found under a root is opened *beneath* that root, one folder at a time with
``O_NOFOLLOW`` (a file or folder swapped for a symbolic link after discovery is refused as
``symlink``: nothing outside the root can be read through it), and the open descriptor must be
the regular file discovery saw (same inode, else ``replaced``). A file named by the user
(``analyze``) is ``stat``-ed first with symlinks followed. Anything that is not a regular file
(FIFO, socket, device, directory) is refused as ``not_regular_file`` without being opened.
Regular files are opened ``O_RDONLY | O_NONBLOCK | O_NOATIME`` (``O_NOATIME`` dropped when the
kernel answers EPERM, i.e. we are neither owner nor root), re-checked with ``fstat`` (so a path
swapped for a FIFO between stat and open is still refused, and cannot block). Nothing is ever
written or created anywhere.

An image is read once, whole, and hashed (SHA-256, MD5) in the same pass (:func:`read_file`). A
video is hashed in one streaming pass and then decoded from the same open descriptor
(:func:`opened`, :meth:`Opened.hash_all`, :meth:`Opened.reader`): the same file, never the name
again, and the analysis is refused if the file changed in between (:meth:`Opened.check_unchanged`).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from daemon.states import IMAGE_REASONS, Reason

REASONS = IMAGE_REASONS  # the reasons an ImageError may carry (daemon.states.Reason)
_READ_CHUNK = 1024 * 1024


class ImageError(Exception):
    """A file that cannot be analysed; ``reason`` is machine-readable (one of :data:`REASONS`)."""

    def __init__(self, reason: Reason, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"ImageError reason must be one of {sorted(REASONS)}, got {reason!r}")
        super().__init__(reason, message)  # both in args, so the error survives pickling
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


def _show(path: str | bytes) -> str:
    return repr(os.fsdecode(path))


def _os_error(path: str | bytes, what: str, err: OSError) -> ImageError:
    name = errno.errorcode.get(err.errno or 0, "E?")
    hint = {
        errno.ELOOP: "the path is a symlink loop (or too many links); fix or remove the link",
        errno.ENOENT: "the file (or the target of a symlink) does not exist; it may have been removed, or the link is dangling",
        errno.EACCES: "the service user may not read it; grant read permission",
        errno.EPERM: "the service user may not read it; grant read permission",
    }.get(err.errno or 0, "check the file and the storage it lives on")
    return ImageError(Reason.UNREADABLE, f"{_show(path)}: {what} failed with {name} ({err.strerror}); {hint}")


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return f"a non-regular file (mode {stat.filemode(mode)})"


def _not_regular(path: str | bytes, mode: int) -> ImageError:
    return ImageError(
        Reason.NOT_REGULAR_FILE,
        f"{_show(path)}: must be a regular file, got {_kind(mode)}; it was not opened (reading it could block or have side effects)",
    )


def _too_big(path: str | bytes, size: int, max_bytes: int) -> ImageError:
    return ImageError(
        Reason.TOO_BIG_FILE,
        f"{_show(path)}: file size must be at most {max_bytes} bytes, got {size}; raise the byte limit if such files must be analysed",
    )


_O_BASE = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIR = getattr(os, "O_DIRECTORY", 0)


def _open_readonly(path: str | bytes, *, dir_fd: int | None = None, follow: bool = True) -> int:
    flags = _O_BASE | os.O_NONBLOCK | (0 if follow else _O_NOFOLLOW)
    noatime = getattr(os, "O_NOATIME", 0)
    try:
        return os.open(path, flags | noatime, dir_fd=dir_fd)
    except PermissionError as err:
        if not noatime or err.errno != errno.EPERM:
            raise
        return os.open(path, flags, dir_fd=dir_fd)  # O_NOATIME needs owner or root; atime may now change


def _swapped(p: bytes, what: str) -> ImageError:
    return ImageError(
        Reason.SYMLINK,
        f"{_show(p)}: {what} must be a regular file or folder inside the root, got a symbolic link (swapped in after the file was found); it was not followed",
    )


def _is_link(name: bytes, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _open_beneath(root: bytes, p: bytes) -> int:
    """Open ``p`` for reading one component at a time from ``root`` without following any
    symbolic link below the root, so that nothing outside the root can be read through a path
    that was changed after discovery."""
    rel = p[len(root) :].lstrip(b"/")
    parts = [c for c in rel.split(b"/") if c]
    if not p.startswith(root.rstrip(b"/") + b"/") or not parts or b".." in parts:
        raise ImageError(Reason.UNREADABLE, f"{_show(p)}: must lie inside its root {_show(root)}; it was not opened")
    try:
        dfd = os.open(root, _O_BASE | _O_DIR)
    except OSError as err:
        raise _os_error(root, "open (root folder)", err) from err
    try:
        for comp in parts[:-1]:
            try:
                nfd = os.open(comp, _O_BASE | _O_DIR | _O_NOFOLLOW, dir_fd=dfd)
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(comp, dfd):
                    raise _swapped(p, f"folder {_show(comp)} on its path") from err
                raise _os_error(p, "open", err) from err
            os.close(dfd)
            dfd = nfd
        try:
            mode = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False).st_mode
        except OSError as err:
            raise _os_error(p, "lstat", err) from err
        if stat.S_ISLNK(mode):
            raise _swapped(p, "it")
        if not stat.S_ISREG(mode):  # never open a FIFO or a device (opening one can have effects)
            raise _not_regular(p, mode)
        try:
            return _open_readonly(parts[-1], dir_fd=dfd, follow=False)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise _swapped(p, "it") from err
            raise _os_error(p, "open", err) from err
    finally:
        os.close(dfd)


@dataclass(frozen=True)
class FileHash:
    """A file's size, hashes and identity at read time."""

    size: int
    sha256: str
    md5: str
    mtime_ns: int
    inode: int
    device: int


@dataclass(frozen=True)
class FileBytes(FileHash):
    """The whole content of one regular file, with its hashes and identity at read time."""

    data: bytes = b""


class Opened:
    """One open, checked, read-only descriptor of a regular file (see :func:`opened`)."""

    def __init__(self, fd: int, path: str | bytes, st: os.stat_result) -> None:
        self.fd, self.path, self.stat = fd, path, st

    def head(self, n: int) -> bytes:
        """The first ``n`` bytes (fewer for a shorter file), without moving the file position."""
        try:
            return os.pread(self.fd, n, 0)
        except OSError as err:
            raise _os_error(self.path, "read", err) from err

    def _pass(self, max_bytes: int, keep: bool) -> tuple[FileHash, list[bytes]]:
        before = self.stat
        if before.st_size > max_bytes:
            raise _too_big(self.path, before.st_size, max_bytes)
        sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
        parts: list[bytes] = []
        total = 0
        chunk_size = max(before.st_size, _READ_CHUNK) if keep else 8 * _READ_CHUNK
        while True:  # an image: normally one read for the whole file and one that sees EOF
            try:
                chunk = os.pread(self.fd, max(chunk_size - (total if keep else 0), _READ_CHUNK), total)
            except OSError as err:
                raise _os_error(self.path, "read", err) from err
            if not chunk:
                break
            sha.update(chunk)
            md5.update(chunk)
            if keep:
                parts.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise _too_big(self.path, total, max_bytes)
        self.check_unchanged(total)
        return FileHash(total, sha.hexdigest(), md5.hexdigest(), before.st_mtime_ns, before.st_ino, before.st_dev), parts

    def read_all(self, max_bytes: int) -> FileBytes:
        """Read the whole file once, hashing as it goes."""
        h, parts = self._pass(max_bytes, keep=True)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        return FileBytes(h.size, h.sha256, h.md5, h.mtime_ns, h.inode, h.device, data)

    def hash_all(self, max_bytes: int) -> FileHash:
        """Hash the whole file in one streaming pass (bounded memory), keeping nothing."""
        return self._pass(max_bytes, keep=False)[0]

    def reader(self) -> io.BufferedReader:
        """A binary file object over the same open file (its own descriptor, position 0): what
        a decoder reads after :meth:`hash_all`. Close it after use."""
        fd = os.dup(self.fd)
        os.lseek(fd, 0, os.SEEK_SET)
        return io.BufferedReader(io.FileIO(fd, "rb", closefd=True))

    def check_unchanged(self, size: int | None = None) -> None:
        """Refuse a file that changed since it was opened (still being written)."""
        before, after = self.stat, os.fstat(self.fd)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or size not in (None, after.st_size):
            got = "" if size is None else f" ({size} read)"
            raise ImageError(
                Reason.UNREADABLE,
                f"{_show(self.path)}: the file must not change while it is read, but it went from"
                f" {before.st_size} to {after.st_size} bytes{got}; it is still being"
                " written - retry once the writer has finished",
            )


@contextmanager
def opened(path: str | bytes | os.PathLike[str] | os.PathLike[bytes], *, root: str | bytes | None = None, inode: int | None = None) -> Iterator[Opened]:
    """Open a regular file read-only (no atime change where allowed); see the module docstring.

    Evidence found under a ``root`` is opened beneath it without following symbolic links, and
    the open descriptor must be the regular file that discovery saw (``inode``), else the read
    is refused. Without ``root`` (a file named by the user) a symbolic link is followed."""
    p = os.fspath(path)
    if root is not None:
        fd = _open_beneath(os.fsencode(root), os.fsencode(p))
    else:
        try:
            st = os.stat(p)  # follows symlinks: a dangling link is ENOENT, a loop ELOOP
        except OSError as err:
            raise _os_error(p, "stat", err) from err
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(p, st.st_mode)
        try:
            fd = _open_readonly(p)
        except OSError as err:
            raise _os_error(p, "open", err) from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced between stat() and open()
            raise _not_regular(p, st.st_mode)
        if inode is not None and st.st_ino != inode:
            raise ImageError(
                Reason.REPLACED,
                f"{_show(p)}: must be the file found at discovery (inode {inode}), got inode {st.st_ino}: it was"
                " replaced since; the new file is recorded when the watcher or the next scan sees it",
            )
        yield Opened(fd, p, st)
    finally:
        os.close(fd)


def read_file(
    path: str | bytes | os.PathLike[str] | os.PathLike[bytes],
    *,
    max_bytes: int = 512 * 1024 * 1024,
    root: str | bytes | None = None,
    inode: int | None = None,
) -> FileBytes:
    """Read a regular file once, whole, hashing as it goes (:func:`opened`, :meth:`Opened.read_all`)."""
    with opened(path, root=root, inode=inode) as f:
        return f.read_all(max_bytes)
