"""Search by face: the stored faces nearest a descriptor (brute force over the current faces'
descriptors in numpy; at 10^6 faces see ``benchmarks/similar_bench.py``).

The descriptors of the current faces (each image's latest analysis) are read once into a
:class:`FaceIndex` (512 bytes a face in memory) and refreshed by face id: faces are only ever
added, so a refresh reads the new rows, and re-reads everything only when an image got a newer
analysis (its older faces leave the index). The command keeps the index in a cache file between
runs (memory-mapped, 520 bytes a face); the review page keeps it in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import Connection, exists, func, select

from daemon import identity
from daemon.store import schema as s

DEFAULT_DISTANCE = 0.6  # dlib's verification threshold
log = logging.getLogger("daemon.similar")


class SimilarError(ValueError):
    """A search that cannot run (unknown face, a face without a descriptor)."""


@dataclass(frozen=True)
class Match:
    face_id: int
    distance: float


def default_cache(url: str) -> Path | None:
    """Where the index of the database ``url`` is cached between runs:
    the folder ``$XDG_CACHE_HOME/forensic-gender/faces-<hash of the URL>`` (``~/.cache`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not base or base == "~":
        return None
    return Path(base) / "forensic-gender" / f"faces-{hashlib.sha256(url.encode()).hexdigest()[:16]}"


class FaceIndex:
    """Current faces' ids and descriptors (float32, with their squared norms), refreshed
    incrementally (thread-safe). With ``cache``, the index is kept in that file between runs
    (rows read from the database since are added; the file is checked against the database's
    copy of its last face, so a different database at the same URL is never mixed in)."""

    def __init__(self, cache: Path | None = None, *, save_after: int = 10_000) -> None:
        """``save_after``: new faces read from the database before the cache file is rewritten."""
        self.cache, self.save_after = cache, save_after
        self.ids = np.zeros(0, np.int64)
        self.vectors = np.zeros((0, identity.DIM), np.float32)
        self._sq = np.zeros(0, np.float32)
        self._superseded = -1
        self._lock = threading.Lock()

    def refresh(self, conn: Connection) -> None:
        a, f = s.analyses, s.faces
        later = s.analyses.alias("a_later")
        superseded = select(a.c.id).where(exists(select(later.c.id).where(later.c.image_id == a.c.image_id, later.c.id > a.c.id)))
        n_superseded = conn.execute(select(func.count()).select_from(superseded.subquery())).scalar_one()
        with self._lock:
            if n_superseded != self._superseded:  # an image got a newer analysis: its older faces leave
                self._set(np.zeros(0, np.int64), np.zeros((0, identity.DIM), np.float16))
                self._superseded = n_superseded
                if self.cache is not None:
                    self._load_cache(conn, n_superseded)
            last = int(self.ids[-1]) if len(self.ids) else 0
            q = select(f.c.id, f.c.descriptor).where(f.c.id > last, f.c.descriptor.is_not(None), f.c.analysis_id.not_in(superseded)).order_by(f.c.id)
            rows = conn.execute(q).all()
            if rows:
                ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
                vec = np.frombuffer(b"".join(r[1] for r in rows), "<f2").reshape(-1, identity.DIM)
                self._set(np.concatenate([self.ids, ids]), np.concatenate([self.vectors, vec.astype(np.float32)]))
                if self.cache is not None and len(rows) >= self.save_after:
                    self._save_cache(n_superseded)

    def _set(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.ids = ids
        self.vectors = np.ascontiguousarray(vectors, np.float32)
        self._sq = np.einsum("ij,ij->i", self.vectors, self.vectors)

    def _load_cache(self, conn: Connection, n_superseded: int) -> None:
        """The cached index, memory-mapped (read from the page cache as searches touch it)."""
        assert self.cache is not None
        try:
            meta = json.loads((self.cache / "meta.json").read_text())
            ids = np.load(self.cache / "ids.npy", mmap_mode="r")
            vec = np.load(self.cache / "vectors.npy", mmap_mode="r")
            sq = np.load(self.cache / "sq.npy", mmap_mode="r")
        except (OSError, ValueError):
            return
        n = int(meta.get("faces", -1))
        if meta.get("superseded") != n_superseded or n <= 0 or not len(ids) == len(vec) == len(sq) == n or vec.shape[1:] != (identity.DIM,):
            return
        row = conn.execute(select(s.faces.c.descriptor).where(s.faces.c.id == int(ids[-1]))).first()
        if row is None or row[0] is None or not np.allclose(identity.unpack(row[0]), vec[-1], atol=1e-6):
            log.info("face index cache %s belongs to another database; rebuilding it", self.cache)
            return
        self.ids, self.vectors, self._sq = ids, vec, sq

    def _save_cache(self, n_superseded: int) -> None:
        assert self.cache is not None
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            (self.cache / "meta.json").unlink(missing_ok=True)  # invalid until every array is written
            for name, arr in (("ids", self.ids), ("vectors", self.vectors), ("sq", self._sq)):
                tmp = self.cache / f"{name}.{os.getpid()}.tmp.npy"
                np.save(tmp, np.ascontiguousarray(arr))
                os.replace(tmp, self.cache / f"{name}.npy")
            (self.cache / "meta.json").write_text(json.dumps({"faces": len(self.ids), "superseded": n_superseded}))
        except OSError as err:  # a cache only: searching works without it
            log.info("face index cache %s not written: %s", self.cache, err)

    def search(self, vector: np.ndarray, *, limit: int = 50, max_distance: float | None = DEFAULT_DISTANCE, exclude: int | None = None) -> list[Match]:
        """The faces nearest ``vector``, nearest first (ties by face id)."""
        with self._lock:
            ids, vectors, sq = self.ids, self.vectors, self._sq
        q = np.asarray(vector, np.float32)
        d2 = sq - 2.0 * (vectors @ q) + float(q @ q)
        d = np.sqrt(np.maximum(d2, 0.0, out=d2), out=d2)
        idx = np.flatnonzero(d <= max_distance) if max_distance is not None else np.arange(len(d))
        k = limit + (exclude is not None)
        if len(idx) > k:
            idx = idx[np.argpartition(d[idx], k - 1)[:k]]
        idx = idx[np.lexsort((idx, d[idx]))]
        out = [Match(int(ids[i]), float(d[i])) for i in idx.tolist() if ids[i] != exclude]
        return out[:limit]


def face_descriptor(conn: Connection, face_id: int) -> np.ndarray:
    """The stored descriptor of a face (float32)."""
    row = conn.execute(select(s.faces.c.descriptor).where(s.faces.c.id == face_id)).first()
    if row is None:
        raise SimilarError(f"face {face_id} does not exist; list faces with `forensic-gender faces` to find its id")
    if row[0] is None:
        raise SimilarError(
            f"face {face_id} has no identity descriptor (analysed with the face backbone disabled); re-analyse its image with pipeline.backbone.enabled: true"
        )
    return identity.unpack(row[0])


def similar_to_face(
    conn: Connection, face_id: int, *, limit: int = 50, max_distance: float | None = DEFAULT_DISTANCE, index: FaceIndex | None = None
) -> list[Match]:
    """Stored faces like face ``face_id`` (itself left out), nearest first. Pass a long-lived
    ``index`` (the review page keeps one) to avoid reading every descriptor per search."""
    vec = face_descriptor(conn, face_id)
    index = index or FaceIndex()
    index.refresh(conn)
    return index.search(vec, limit=limit, max_distance=max_distance, exclude=face_id)
