"""Near-copies: each image's perceptual hash (schema version 7) and the search over them.

``images.near_hash`` holds :func:`daemon.pipeline.phash.near_hash` of the decoded, upright
image (192 bits as 48 hexadecimal digits), null for images that failed to decode and for those
analysed before version 7 (they get one when analysed again). The column is declared on a
private copy of the table (``schema.metadata`` stays version 1).

The search loads every stored hash into a numpy array and counts the differing bits of each
with the query (XOR and popcount): milliseconds for 300,000 images, so no index of distances is
kept; the column's index serves exact matches.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import Column, Connection, Index, Integer, MetaData, String, Table, func, inspect, select, update

from daemon.pipeline.phash import BITS, WORDS, distances, parse, parse_many
from daemon.store import schema as s
from daemon.store import videos

log = logging.getLogger(__name__)

DEFAULT_DISTANCE = 36  # of 192 bits; chosen by benchmarks/near_bench.py
MAX_DISTANCE = 96  # unrelated pictures lie about 96 bits apart: a larger distance finds nothing near

# only the columns this module reads or writes through it; the others through ``schema.images``
# (never both in one statement: they are the same table)
images_v7 = Table("images", MetaData(), Column("id", Integer, primary_key=True), Column("near_hash", String(48)))
HASH_INDEX = Index("ix_images_near_hash", images_v7.c.near_hash)


class NearError(ValueError):
    """A near-copy search that cannot be answered (unknown image, bad hash prefix or distance)."""


def has_hash(conn: Connection) -> bool:
    """Whether this database has the column (read-only commands may meet an older schema)."""
    return any(c["name"] == "near_hash" for c in inspect(conn).get_columns("images"))


def store_hash(conn: Connection, image_id: int, h: str) -> None:
    """Record the hash of an image row that has none yet (the first analysis' hash stays); a
    malformed one is logged and left out (it never costs the analysis)."""
    try:
        parse(h)
    except ValueError as err:
        log.warning("image %d: near-copy hash not stored: %s", image_id, err)
        return
    t = images_v7
    conn.execute(update(t).where(t.c.id == image_id, t.c.near_hash.is_(None)).values(near_hash=h))


@dataclass
class Match:
    image_id: int
    sha256: str
    distance: int
    width: int | None = None
    height: int | None = None
    format: str | None = None
    paths: list[str] = field(default_factory=list)
    frame: int | None = None  # the nearest sampled frame, for a video


@dataclass(frozen=True)
class NearIndex:
    """Every stored hash: ``ids`` (int64 image ids) and ``hashes`` ((N, 3) uint64); ``frames``
    (int64) names a video's sampled frame, -1 for an image's own hash."""

    ids: np.ndarray
    hashes: np.ndarray
    unhashed: int  # images without a hash (failed, or analysed before schema version 7)
    frames: np.ndarray | None = None

    @property
    def images(self) -> int:
        """How many images (videos counted once) the index holds."""
        return len(np.unique(self.ids))

    def search(self, h: np.ndarray, max_distance: int, *, exclude: int | None = None) -> list[tuple[int, int, int | None]]:
        """``(image_id, distance, frame)`` of the images within ``max_distance`` bits of ``h``,
        nearest first (then by id), leaving out the image ``exclude``; a video once, at its
        nearest sampled frame (``frame`` None for a picture)."""
        d = distances(self.hashes, h)
        hit = np.flatnonzero(d <= max_distance)
        if exclude is not None:
            hit = hit[self.ids[hit] != exclude]
        frames = self.frames if self.frames is not None else np.full(len(self.ids), -1, np.int64)
        order = np.lexsort((frames[hit], self.ids[hit], d[hit]))
        out: list[tuple[int, int, int | None]] = []
        seen: set[int] = set()
        for i in hit[order]:
            image_id = int(self.ids[i])
            if image_id not in seen:
                seen.add(image_id)
                out.append((image_id, int(d[i]), None if frames[i] < 0 else int(frames[i])))
        return out


def load_index(conn: Connection) -> NearIndex:
    """Every image's hash, for :meth:`NearIndex.search`."""
    t = images_v7
    if not has_hash(conn):
        n = conn.execute(select(func.count()).select_from(s.images)).scalar_one()
        return NearIndex(np.zeros(0, np.int64), np.zeros((0, WORDS), np.uint64), int(n))
    q = select(t.c.id, t.c.near_hash).where(t.c.near_hash.is_not(None))
    with_videos = videos.has_tables(conn)
    if with_videos:  # a video's image row holds its first frame's hash: its frames below stand for it
        q = q.where(t.c.id.not_in(select(videos.videos.c.image_id)))
    rows = [(r[0], -1, r[1]) for r in conn.execute(q.order_by(t.c.id))]
    if with_videos:  # every sampled frame of every video
        vf = videos.video_frames
        fq = select(vf.c.image_id, vf.c.frame, vf.c.near_hash).where(vf.c.near_hash.is_not(None))
        rows += [tuple(r) for r in conn.execute(fq.order_by(vf.c.image_id, vf.c.frame))]
    ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
    frames = np.fromiter((r[1] for r in rows), np.int64, len(rows))
    hashes = parse_many([r[2] for r in rows])
    unhashed = conn.execute(select(func.count()).select_from(t).where(t.c.near_hash.is_(None))).scalar_one()
    return NearIndex(ids, hashes, int(unhashed), frames)


def check_distance(value: str) -> int:
    """``--distance``: a whole number of bits in [0, MAX_DISTANCE]."""
    try:
        k = int(value)
    except ValueError:
        raise NearError(f"--distance must be a whole number of bits from 0 to {MAX_DISTANCE}, got {value!r}") from None
    if not 0 <= k <= MAX_DISTANCE:
        raise NearError(
            f"--distance must be from 0 to {MAX_DISTANCE} bits (of {BITS}; unrelated pictures lie about 86 apart), got {k}; the default is {DEFAULT_DISTANCE}"
        )
    return k


def image_by_sha(conn: Connection, prefix: str) -> tuple[int, str, str | None]:
    """``(image_id, sha256, hash or None)`` of the one image whose SHA-256 starts with ``prefix``."""
    p = prefix.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{6,64}", p):
        raise NearError(f"--image must be a SHA-256 or a prefix of it (6 to 64 hexadecimal digits), got {prefix!r}")
    i = s.images
    rows = conn.execute(select(i.c.id, i.c.sha256).where(i.c.sha256.startswith(p)).order_by(i.c.sha256).limit(6)).all()
    if not rows:
        raise NearError(f"--image {p}: no image with that SHA-256 in the database; `forensic-gender images` lists them")
    if len(rows) > 1:
        shown = ", ".join(r.sha256[:16] for r in rows[:5])
        raise NearError(f"--image {p}: {'more than 5' if len(rows) > 5 else len(rows)} images start with it ({shown}); give more digits")
    image_id, sha = int(rows[0].id), str(rows[0].sha256)
    h = conn.execute(select(images_v7.c.near_hash).where(images_v7.c.id == image_id)).scalar_one() if has_hash(conn) else None
    return image_id, sha, h


def describe(conn: Connection, found: list[tuple[int, int, int | None]]) -> list[Match]:
    """The images of ``found`` (``(image_id, distance, frame)``) with their live paths (recorded
    form), in the order given."""
    t, f = s.images, s.files
    out = {i: Match(i, "", d, frame=fr) for i, d, fr in found}
    ids = list(out)
    for k in range(0, len(ids), 500):
        chunk = ids[k : k + 500]
        for r in conn.execute(select(t.c.id, t.c.sha256, t.c.width, t.c.height, t.c.format).where(t.c.id.in_(chunk))):
            m = out[r.id]
            m.sha256, m.width, m.height, m.format = r.sha256, r.width, r.height, r.format
        q = select(f.c.image_id, f.c.path).where(f.c.image_id.in_(chunk), f.c.state != "gone").order_by(f.c.path)
        for image_id, path in conn.execute(q):
            out[image_id].paths.append(path)
    return [out[i] for i in ids]
