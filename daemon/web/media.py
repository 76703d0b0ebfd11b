"""The pixel routes: ``/media/image/{sha256}.jpg`` (the picture, at most :data:`DISPLAY_SIDE`),
``/media/annotated/{sha256}.jpg`` (the picture with its faces drawn, as a download) and
``/media/face/{id}.jpg`` (a face crop, ``?size=large`` or ``thumb``).

No route takes a file path: pixels are read only for a SHA-256 or face id from the database, from a
recorded path inside an evidence root, and only while the file still has that SHA-256
(:mod:`daemon.queries.media`). Decoded pixels are kept in the app's cache (:class:`daemon.web.state.Images`) and
re-checked against the file before they are served again; decoding happens in one of the app's
:class:`daemon.web.state.Slots`, no larger than the response needs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import cv2
import numpy as np
from sqlalchemy import Connection, select
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from daemon.queries import filters as flt
from daemon.queries import media, read
from daemon.queries.formats import on_frame
from daemon.render import crop, draw_faces, encode
from daemon.store import schema as s
from daemon.web.state import DISPLAY_SIDE, SHA_RE, Pixels, State, cut_from, int_param

log = logging.getLogger(__name__)

FACE_SIDES = {"large": (0.4, 320, 640), "thumb": (0.15, 1, 96)}  # size -> (context margin, min side, max side)
ROOTS_TTL = 10.0
MEDIA_REFUSALS = {
    "changed": (409, "the evidence file changed since it was analysed (its SHA-256 is no longer the recorded one), so "
                     "nothing decoded from it is shown; scan it again to record the new content"),
    "gone": (404, "the evidence file no longer exists at any recorded path"),
    "outside_roots": (404, "no recorded path of this image lies inside an evidence root"),
    "unreadable": (404, "no recorded path of this image can be read now (see the server log)"),
    "undecodable": (404, "the evidence file cannot be decoded"),
    "unknown": (404, "no recorded path holds this image"),
}


def decoded_pixels(size: tuple[int, int, str] | None, want: int | None, budget: int) -> int:
    """About how many pixels decoding an image of ``size`` (width, height, format, as recorded)
    holds when its longer side need only be ``want``: a JPEG is decoded reduced by 2, 4 or 8
    while that stays at least ``want``; other formats at full size. Unknown: ``budget`` (it
    runs alone)."""
    if size is None:
        return budget
    w, h, fmt = size
    factor = 1
    if fmt == "jpeg" and want:
        factor = next((f for f in (8, 4, 2) if math.ceil(max(w, h) / f) >= want), 1)
    return math.ceil(w / factor) * math.ceil(h / factor)


def _resize(bgr: np.ndarray, side: int) -> np.ndarray:
    h, w = bgr.shape[:2]
    if max(h, w) <= side:
        return bgr
    f = side / max(h, w)
    return cv2.resize(bgr, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)


def _img(data: bytes, *, download: str | None = None) -> Response:
    headers = {"Content-Disposition": f'attachment; filename="{download}"'} if download else {}
    return Response(data, media_type="image/jpeg", headers=headers)


def _media_error(err: media.MediaError) -> PlainTextResponse:
    """A changed file is a 409 (the database and the evidence disagree), anything else a 404;
    the body starts with ``image not available (REASON)`` and says what happened. The paths
    tried go to the log, not to the response."""
    status, why = MEDIA_REFUSALS.get(err.reason, (404, err.reason))
    log.info("image not shown (%s): %s", err.reason, err.message)
    return PlainTextResponse(f"image not available ({err.reason}): {why}", status)


def _size(conn: Connection, sha: str) -> tuple[int, int, str] | None:
    """Width, height and format of the full upright image, as recorded (None if not)."""
    row = conn.execute(select(s.images.c.width, s.images.c.height, s.images.c.format).where(s.images.c.sha256 == sha)).first()
    return (row.width, row.height, row.format or "") if row and row.width and row.height else None


@dataclass(frozen=True)
class _Source:
    """What the database says about one content, read before any file is (so that no
    connection is held while waiting for a decoding slot)."""

    sha: str
    rows: list
    size: tuple[int, int, str] | None
    roots: list[bytes]
    frame: int | None = None  # a video's frame

    @property
    def key(self) -> str:
        """The pixel cache's key: the content, and the frame of a video."""
        return self.sha if self.frame is None else f"{self.sha}:{self.frame}"

    @property
    def full(self) -> int | None:
        """The longer side of the full image (None if not recorded)."""
        return max(self.size[:2]) if self.size else None


def _frame(request: Request) -> int | None:
    """The ``?frame=N`` of a video's picture (None when absent)."""
    raw = request.query_params.get("frame")
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 9:
        raise flt.FilterError([f"frame: must be a whole number from 0, got {raw[:40]!r}"])
    return int(raw)


def routes(st: State) -> list[Route]:
    """The picture, the annotated picture and the face crops of one app (with its own cache of
    evidence roots)."""
    roots_cache: dict = {"at": -ROOTS_TTL - 1.0, "roots": []}

    def _roots(conn: Connection) -> list[bytes]:
        """Evidence roots, re-read at most every ROOTS_TTL seconds (a distinct over files)."""
        now = time.monotonic()
        if now - roots_cache["at"] > ROOTS_TTL:
            roots_cache["roots"], roots_cache["at"] = media.evidence_roots(st.cfg, conn), now
        return roots_cache["roots"]

    def _source(conn: Connection, sha: str, frame: int | None = None) -> _Source:
        return _Source(sha, media.candidates(conn, sha), _size(conn, sha), _roots(conn), frame)

    def _pixels(src: _Source, side: Callable[[int], int]) -> Pixels:
        """Pixels of ``src.sha`` at least ``side(full longer side)`` pixels on their longer side
        (or full size): from the cache when the file is unchanged and they are large enough, else
        read, hashed and decoded again, no larger than needed, in a decoding slot."""
        sha, full, key = src.sha, src.full, src.key
        px = st.cache.get(key)
        if px is not None:
            state = media.unchanged(px.loaded)
            if not state:  # changed, replaced or gone: never serve what was decoded from it
                st.cache.drop(key)
                px = None
            elif px.scale >= 1.0 or (full and max(px.bgr.shape[:2]) >= min(side(full), full)):
                return px
        want = min(side(full), full) if full else None
        lim = st.cfg.pipeline.limits
        with st.slots.slot(decoded_pixels(src.size, want, st.slots.pixels)):
            px = st.cache.get(key)  # another request may have decoded it while this one waited
            if px is not None and media.unchanged(px.loaded) and (px.scale >= 1.0 or (want and max(px.bgr.shape[:2]) >= want)):
                return px
            loaded = media.load_from(src.rows, sha, src.roots, max_bytes=lim.max_file_bytes, max_pixels=lim.max_pixels,
                                     min_side_hint=want, frame=src.frame)
            dec = loaded.decoded
            bgr, scale = dec.bgr, dec.scale
            if want and max(bgr.shape[:2]) > want:  # formats decoded at full size: keep only what is needed
                bgr = _resize(bgr, want)
                scale = dec.scale * max(bgr.shape[:2]) / max(dec.bgr.shape[:2])
            # keep the pixels and the file's identity, not the full decode nor the file's bytes
            light = replace(loaded, decoded=replace(dec, bgr=np.empty((0, 0, 3), np.uint8)), file=replace(loaded.file, data=b""))
            px = Pixels(np.ascontiguousarray(bgr), scale, light)
        if loaded.identity[0] or loaded.identity[1]:  # read while unchanged: may be served again after a check
            st.cache.put(key, px)
        return px

    def media_image(request: Request) -> Response:
        sha = request.path_params["sha256"]
        if not SHA_RE.match(sha):
            return PlainTextResponse("no such image", 404)
        try:
            frame = _frame(request)
        except flt.FilterError as err:
            return PlainTextResponse("; ".join(err.problems), 400)
        with st.db() as conn:
            src = _source(conn, sha, frame)
        try:
            px = _pixels(src, lambda full: DISPLAY_SIDE)
        except media.MediaError as err:
            return _media_error(err)
        return _img(encode(_resize(px.bgr, DISPLAY_SIDE), ".jpg", 90))

    def media_annotated(request: Request) -> Response:
        sha = request.path_params["sha256"]
        if not SHA_RE.match(sha):
            return PlainTextResponse("no such image", 404)
        try:
            f = cut_from(request)
            frame = _frame(request)
        except flt.FilterError as err:
            return PlainTextResponse("; ".join(err.problems), 400)
        with st.db() as conn:
            try:
                sc = read.scope(conn, f, st.cut)
            except flt.FilterError as err:
                return PlainTextResponse("; ".join(err.problems), 400)
            rows = list(read.faces(conn, flt.Filters(sha256=(sha,), bundle=f.bundle, sort="sha256"), sc))
            frame, rows = on_frame(rows, frame)  # a video: ?frame=, else the frame of its first face
            src = _source(conn, sha, frame)
        try:
            px = _pixels(src, lambda full: DISPLAY_SIDE)
        except media.MediaError as err:
            return _media_error(err)
        from daemon.queries.formats import _faces_to_draw

        k = px.scale
        faces = [{**d, "box": tuple(v * k for v in d["box"]), "landmarks": [[x * k, y * k] for x, y in d["landmarks"]]}
                 for d in _faces_to_draw(rows)]
        return _img(encode(draw_faces(px.bgr, faces), ".jpg", 92), download=f"{sha[:16]}.annotated.jpg")

    def media_face(request: Request) -> Response:
        try:
            face_id = int_param(request.path_params["face_id"], "face id")
        except flt.FilterError as err:
            return PlainTextResponse("; ".join(err.problems), 400)
        size = request.query_params.get("size", "large")
        if size not in FACE_SIDES:
            return PlainTextResponse(f"size: must be one of {', '.join(FACE_SIDES)}, got {size[:40]!r}", 400)
        margin, min_side, max_side = FACE_SIDES[size]
        with st.db() as conn:
            row = read.face(conn, face_id, read.Scope(st.cut, False, "all", conn.dialect.name))
            if row is None:
                return PlainTextResponse("no such face", 404)
            src = _source(conn, row["sha256"], row.get("frame"))
        box_side = max(row["x2"] - row["x1"], row["y2"] - row["y1"], 1.0) * (1 + 2 * margin)

        def side(full: int) -> int:  # the crop shown at max_side needs this much of the whole image
            return max(DISPLAY_SIDE // 4, math.ceil(full * min(1.0, max_side / box_side)))

        try:
            px = _pixels(src, side)
        except media.MediaError as err:
            return _media_error(err)
        k = px.scale
        box = (row["x1"] * k, row["y1"] * k, row["x2"] * k, row["y2"] * k)
        return _img(encode(_resize(crop(px.bgr, box, margin=margin, min_side=min_side), max_side), ".jpg", 90))

    return [
        Route("/media/image/{sha256}.jpg", media_image, methods=["GET"]),
        Route("/media/annotated/{sha256}.jpg", media_annotated, methods=["GET"]),
        Route("/media/face/{face_id:int}.jpg", media_face, methods=["GET"]),
    ]
