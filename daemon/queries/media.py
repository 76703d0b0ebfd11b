"""Pixels for annotated copies, crops and the review page, and where output may (not) go.

Reading
    An image is only ever read from one of the paths recorded for its content, and only when that
    path - with every symbolic link resolved - lies inside the evidence root recorded with it, and
    that root is a watched root of the configuration or a root recorded in the files table. It is read read-only through
    :func:`daemon.pipeline.images.read_file` and served only if its SHA-256 is still the recorded
    one, so nothing but recorded evidence content can come out, whatever a request asks for.

Writing
    Output (annotated copies, crops, exports) never goes inside an evidence root: see
    :func:`output_refusal`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, case, select

from daemon.config import Config
from daemon.pipeline import images
from daemon.queries.read import recorded_roots
from daemon.store import schema as s

log = logging.getLogger(__name__)


class MediaError(Exception):
    """The image cannot be shown: ``reason`` is ``unknown``, ``outside_roots``, ``changed``,
    ``unreadable`` or ``undecodable``; the message says which paths were tried and why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Loaded:
    """Decoded upright pixels of one content, and where they were read."""

    sha256: str
    path: str
    decoded: images.Decoded
    file: images.FileBytes


def evidence_roots(cfg: Config, conn: Connection | None) -> list[str]:
    """Watched roots plus recorded roots, symbolic links resolved, without duplicates."""
    roots = [r.path for r in cfg.watch.roots]
    if conn is not None:
        roots += recorded_roots(conn)
    return list(dict.fromkeys(os.path.realpath(r) for r in roots if r))


def inside(path: str, roots: Iterable[str]) -> bool:
    """Whether ``path`` (already resolved) is one of ``roots`` or below one (resolved too)."""
    for r in roots:
        if path == r or path.startswith(r.rstrip(os.sep) + os.sep):
            return True
    return False


def output_refusal(out: str | os.PathLike, roots: Sequence[str]) -> str | None:
    """Why ``out`` may not receive output (it is, or is inside, an evidence root), or None.
    The path is resolved first, so a symbolic link into a root is refused too."""
    real = os.path.realpath(os.fspath(out))
    for r in roots:
        if inside(real, [r]):
            return f"{real} is inside the evidence root {r}; write output outside every evidence folder"
    return None


def load(conn: Connection, sha256: str, roots: Sequence[str], *, max_bytes: int, max_pixels: int) -> Loaded:
    """Read and decode the content ``sha256`` from the first of its recorded paths that resolves
    inside the root recorded with it (itself inside one of ``roots``), is still readable and
    still holds that content. Raises :class:`MediaError`."""
    F, I = s.files, s.images  # noqa: N806
    rows = conn.execute(
        select(F.c.path, F.c.root).select_from(F.join(I, I.c.id == F.c.image_id)).where(I.c.sha256 == sha256)
        .order_by(case((F.c.state == "gone", 1), else_=0), F.c.id)
    ).all()
    if not rows:
        raise MediaError("unknown", f"no recorded path holds the image {sha256}")
    why: list[str] = []
    kinds: set[str] = set()
    for path, root in rows:
        real, real_root = os.path.realpath(path), os.path.realpath(root)
        if not (inside(real, [real_root]) and inside(real_root, roots)):
            why.append(f"{path}: resolves to {real}, outside its evidence root {root}; not read")
            kinds.add("outside_roots")
            continue
        try:
            fb = images.read_file(real, max_bytes=max_bytes)
        except images.ImageError as err:
            why.append(f"{path}: {err.message}")
            kinds.add("unreadable")
            continue
        if fb.sha256 != sha256:
            why.append(f"{path}: the content changed since it was analysed (SHA-256 now {fb.sha256[:16]}...)")
            kinds.add("changed")
            continue
        try:
            dec = images.decode(fb.data, max_pixels=max_pixels)
        except images.ImageError as err:
            raise MediaError("undecodable", f"{path}: {err.message}") from err
        return Loaded(sha256, path, dec, fb)
    reason = "outside_roots" if kinds == {"outside_roots"} else "changed" if "changed" in kinds else "unreadable"
    raise MediaError(reason, f"image {sha256[:16]}... cannot be read from any recorded path: " + "; ".join(why))
