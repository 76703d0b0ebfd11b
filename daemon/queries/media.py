"""Pixels for annotated copies, crops and the review page.

Reading
    An image is only ever read from one of the paths recorded for its content, and only when that
    path - with every symbolic link resolved - lies inside the evidence root recorded with it, and
    that root is a watched root of the configuration or a root recorded in the files table.
    Recorded paths are turned back into the exact bytes of the name (:func:`daemon.paths.to_os`).
    The file is then opened beneath its (resolved) root one component at a time without following
    any symbolic link (:func:`daemon.pipeline.reading.read_file` with ``root``), so a link swapped
    in after the check is refused, read read-only, and used only if its SHA-256 is still the
    recorded one: nothing but recorded evidence content can come out, whatever a request asks for.

    :class:`Loaded` carries the identity of what was read (device, inode, size, mtime, ctime,
    taken before reading), so that a cache of decoded pixels can tell cheaply whether the file is
    still the one it decoded (:func:`unchanged`).

Writing
    Output (annotated copies, crops, exports) never goes inside an evidence root, nor onto an
    evidence file: see :mod:`daemon.queries.output`.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import Connection, case, select

from daemon import paths
from daemon.config import Config
from daemon.pipeline import reading
from daemon.queries.read import recorded_roots
from daemon.states import Reason
from daemon.store import schema as s

if TYPE_CHECKING:  # the decoders (OpenCV, Pillow, PyAV) load only when pixels are needed
    from daemon.pipeline import images

log = logging.getLogger(__name__)


class MediaError(Exception):
    """The image cannot be shown: ``reason`` is ``unknown``, ``outside_roots``, ``changed``,
    ``gone``, ``unreadable`` or ``undecodable``; the message says which paths were tried and why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Loaded:
    """Decoded upright pixels of one content, where they were read (the recorded path and the
    resolved OS path) and the identity of that file when it was read: (device, inode, size,
    mtime_ns, ctime_ns)."""

    sha256: str
    path: str
    decoded: images.Decoded
    file: reading.FileBytes
    real: bytes
    identity: tuple[int, int, int, int, int]


def evidence_roots(cfg: Config, conn: Connection | None) -> list[bytes]:
    """Watched roots plus recorded roots, as OS paths with symbolic links resolved, without
    duplicates."""
    roots = [os.fsencode(r.path) for r in cfg.watch.roots if r.path]
    if conn is not None:
        roots += [paths.to_os(r) for r in recorded_roots(conn) if r]
    return list(dict.fromkeys(os.path.realpath(r) for r in roots))


def inside(path: bytes, roots: Iterable[bytes]) -> bool:
    """Whether ``path`` (already resolved) is one of ``roots`` or below one (resolved too)."""
    for r in roots:
        if path == r or path.startswith(r.rstrip(b"/") + b"/"):
            return True
    return False


def identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def unchanged(loaded: Loaded) -> bool | None:
    """True when the file ``loaded`` was read from is still the same (same device, inode, size,
    mtime and ctime: not rewritten, replaced, touched or renamed over); False when it differs;
    None when it is gone."""
    try:
        st = os.lstat(loaded.real)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        return False
    return identity(st) == loaded.identity


def candidates(conn: Connection, sha256: str) -> list[tuple[str, str]]:
    """The recorded (path, root) pairs that held ``sha256``, the best first (not gone, oldest)."""
    F, I = s.files, s.images  # noqa: N806
    return [tuple(r) for r in conn.execute(
        select(F.c.path, F.c.root).select_from(F.join(I, I.c.id == F.c.image_id)).where(I.c.sha256 == sha256)
        .order_by(case((F.c.state == "gone", 1), else_=0), F.c.id)
    )]


_READ_REASONS = {Reason.UNREADABLE, Reason.NOT_REGULAR_FILE, Reason.TOO_BIG_FILE, Reason.SYMLINK, Reason.REPLACED, Reason.EMPTY}


def _read(real: bytes, real_root: bytes, sha256: str, *, max_bytes: int, max_pixels: int,
          frame: int | None) -> tuple[reading.FileBytes, images.Decoded | None]:
    """An image's bytes (decoded by the caller), or a video's hashes with the pixels of its
    ``frame`` (the file hashed streaming; the frame decoded only when the content is ``sha256``)."""
    from daemon.pipeline import images, video

    with reading.opened(real, root=real_root) as f:
        fmt = video.sniff(f.head(video.SNIFF_BYTES))
        if fmt is None:
            return f.read_all(max_bytes), None
        h = f.hash_all(max(max_bytes, 1 << 40))  # the service's video limit applied when it was analysed
        fb = reading.FileBytes(h.size, h.sha256, h.md5, h.mtime_ns, h.inode, h.device)
        if h.sha256 != sha256:
            return fb, None
        with f.reader() as fo:
            fr = video.frame_at(fo, fmt, frame or 0, max_pixels=max_pixels)
        f.check_unchanged()
    height, width = fr.bgr.shape[:2]
    return fb, images.Decoded(bgr=fr.bgr, format=fmt, width=width, height=height, scale=1.0, orientation=1, frames=1,
                              notes=(f"frame {fr.index} at {fr.time:.3f} s",))


def load(conn: Connection, sha256: str, roots: Sequence[bytes], *, max_bytes: int, max_pixels: int,
         min_side_hint: int | None = None, frame: int | None = None) -> Loaded:
    """Read and decode the content ``sha256`` from the first of its recorded paths that resolves
    inside the root recorded with it (itself inside one of ``roots``), is still readable and
    still holds that content. ``min_side_hint``: a JPEG is decoded DCT-reduced while its longer
    side stays at least this long (see :func:`daemon.pipeline.images.decode`). Raises
    :class:`MediaError`. For a video, ``frame`` (default 0) is the frame decoded."""
    return load_from(candidates(conn, sha256), sha256, roots, max_bytes=max_bytes, max_pixels=max_pixels,
                     min_side_hint=min_side_hint, frame=frame)


def load_from(rows: Sequence[tuple[str, str]], sha256: str, roots: Sequence[bytes], *, max_bytes: int, max_pixels: int,
              min_side_hint: int | None = None, frame: int | None = None) -> Loaded:
    """:func:`load` from :func:`candidates` already read (no database needed here)."""
    from daemon.pipeline import images  # the decoders load when pixels are wanted, not for an export

    if not rows:
        raise MediaError("unknown", f"no recorded path holds the image {sha256}")
    why: list[str] = []
    kinds: set[str] = set()
    for path, root in rows:
        real, real_root = os.path.realpath(paths.to_os(path)), os.path.realpath(paths.to_os(root))
        if not (inside(real, [real_root]) and inside(real_root, roots)):
            why.append(f"{path}: resolves to {paths.to_db(real)}, outside its evidence root {root}; not read")
            kinds.add("outside_roots")
            continue
        try:
            before = identity(os.lstat(real))
        except OSError as err:
            gone = err.errno in (errno.ENOENT, errno.ENOTDIR)
            why.append(f"{path}: {'no longer exists' if gone else err.strerror}")
            kinds.add("gone" if gone else "unreadable")
            continue
        try:
            fb, frame_dec = _read(real, real_root, sha256, max_bytes=max_bytes, max_pixels=max_pixels, frame=frame)
        except reading.ImageError as err:
            why.append(f"{path}: {err.message}")
            kinds.add("undecodable" if err.reason not in _READ_REASONS else "unreadable")
            continue
        if fb.sha256 != sha256:
            why.append(f"{path}: the content changed since it was analysed (SHA-256 now {fb.sha256[:16]}...)")
            kinds.add("changed")
            continue
        if (fb.device, fb.inode, fb.size, fb.mtime_ns) != before[:4]:
            before = (0, 0, 0, 0, 0)  # changed while being read: right content, but never trust a cache of it
        try:
            dec = frame_dec or images.decode(fb.data, max_pixels=max_pixels, min_side_hint=min_side_hint)
        except reading.ImageError as err:
            raise MediaError("undecodable", f"{path}: {err.message}") from err
        return Loaded(sha256, path, dec, fb, real, before)
    if kinds == {"outside_roots"}:
        reason = "outside_roots"
    elif "undecodable" in kinds:
        reason = "undecodable"
    elif "changed" in kinds:
        reason = "changed"
    elif kinds <= {"gone", "outside_roots"}:
        reason = "gone"
    else:
        reason = "unreadable"
    raise MediaError(reason, f"image {sha256[:16]}... cannot be read from any recorded path: " + "; ".join(why))
