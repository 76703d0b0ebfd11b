"""The local review page: ``forensic-gender serve`` (Starlette + Jinja2, served by uvicorn).

Server-rendered HTML with no JavaScript: browse faces and images with the same filters as the
query commands, open an image with its boxes drawn, open a face enlarged with its scores,
download the annotated image, and record a review.

Safety
    * Bound to 127.0.0.1 by default; any address that is not loopback is refused unless
      ``--allow-remote`` is given. Requests whose ``Host`` header is not the address served are
      refused (DNS-rebinding). With ``--port 0`` the port the system chose is printed and served.
    * Every route is GET/HEAD only, except ``POST /faces/{id}/review``, which must carry the
      page's CSRF token and, when the browser says where it comes from, ``Origin`` equal to this
      server and ``Sec-Fetch-Site: same-origin``. ``--no-review`` removes the write path.
    * No route takes a file path. Pixels are served only for a SHA-256 or face id from the
      database, read from a recorded path that resolves inside an evidence root, and only when the
      file still has that SHA-256 (:mod:`daemon.queries.media`). Decoded pixels are cached, but
      before cached pixels are served the file is checked again (device, inode, size, mtime,
      ctime); a file that changed is read and hashed again (a 409 when its content differs),
      one that is gone is a 404.
    * Media are for this page only: ``Cross-Origin-Resource-Policy: same-origin``, and a request
      whose ``Sec-Fetch-Site`` is present and not ``same-origin`` or ``none`` (an ``<img>`` on
      another site) is refused with 403 before anything is read.
    * Content-Security-Policy forbids scripts, frames and foreign images; responses are not cached.

Bounds (every request has one)
    * Query strings of at most :data:`MAX_QUERY_BYTES`; filters bounded as
      :func:`daemon.queries.filters.parse` says (values per filter, text sizes, number ranges); ids
      from 1 to 2**31 - 1. A bad value is a 400 with the reason, never a 500.
    * Path globs are matched without backtracking (:func:`daemon.queries.filters.compile_glob`),
      and every page's queries are stopped after :data:`QUERY_SECONDS` (PostgreSQL
      ``statement_timeout``; a SQLite progress handler): a 503 that says to narrow the filters.
    * At most :data:`MEDIA_CONCURRENCY` images are decoded at once, holding at most
      :data:`MEDIA_PIXELS` decoded pixels together (a larger image is decoded alone), and at most
      :data:`MEDIA_QUEUE` more wait (then 503 with Retry-After); a request that waited is served
      from the cache when another one decoded the same image meanwhile. Images are decoded only as large as the response
      needs (a JPEG DCT-reduced while decoding, others resized right after), and the cache of
      decoded pixels holds at most :data:`CACHE_BYTES`.
    * Names are shown through :func:`daemon.paths.show` (the ``show`` filter of the templates):
      control characters and bidirectional overrides appear as visible escapes.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import ipaddress
import logging
import math
import re
import secrets
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlencode

import cv2
import numpy as np
from sqlalchemy import Connection, select
from sqlalchemy import exc as sa_exc
from sqlalchemy import text as sql_text

from daemon import __version__
from daemon.config import Config
from daemon.paths import show
from daemon.queries import filters as flt
from daemon.queries import media, read
from daemon.render import COLOURS, crop, draw_faces, encode
from daemon.store import reviews as rv
from daemon.store import schema as s
from daemon.store.engine import open_engine, open_store_engine

# starlette and jinja2 (the `web` extra) are imported where the app is built or answers, so that
# `register_cli` works without them and `serve` can say which extra to install.
if TYPE_CHECKING:
    from jinja2 import Environment
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, PlainTextResponse, Response

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
PAGE_SIZE = 50
MAX_PAGE = 500
COUNT_CAP = 10_000  # the faces page counts matches up to this, then says "more than"
MAX_FORM_BYTES = 16 * 1024
MAX_FORM_FIELDS = 16
MAX_QUERY_BYTES = 32 * 1024
MAX_PATH_BYTES = 2048
MAX_ID = 2**31 - 1  # ids are the schema's 32-bit integers
DISPLAY_SIDE = 2048
FACE_SIDES = {"large": (0.4, 320, 640), "thumb": (0.15, 1, 96)}  # size -> (context margin, min side, max side)
CACHE_BYTES = 256 * 1024 * 1024
MEDIA_CONCURRENCY = 2  # images decoded at once
MEDIA_PIXELS = 64_000_000  # decoded pixels held by those decodings together (one larger image is decoded alone)
MEDIA_QUEUE = 8  # requests that may wait for a decoding slot
MEDIA_WAIT_S = 30.0
QUERY_SECONDS = 30.0
ROOTS_TTL = 10.0
CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
MEDIA_SITES = ("same-origin", "none")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class _Pixels:
    """Decoded upright pixels of one content at ``scale`` (pixels per full-image pixel; 1.0 or
    less), with where they were read and that file's identity at the time (to re-check)."""

    bgr: np.ndarray
    scale: float
    loaded: media.Loaded


class _Images:
    """A small LRU of decoded images (by SHA-256) within a byte budget, thread-safe. Entries are
    only what :func:`create_app` checks before use; an item over a quarter of the budget is
    never kept."""

    def __init__(self, budget: int = CACHE_BYTES) -> None:
        self.budget, self.used = budget, 0
        self.items: OrderedDict[str, _Pixels] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, sha: str) -> _Pixels | None:
        with self.lock:
            px = self.items.get(sha)
            if px is not None:
                self.items.move_to_end(sha)
            return px

    def drop(self, sha: str) -> None:
        with self.lock:
            px = self.items.pop(sha, None)
            if px is not None:
                self.used -= px.bgr.nbytes

    def put(self, sha: str, px: _Pixels) -> None:
        with self.lock:
            old = self.items.pop(sha, None)
            if old is not None:
                self.used -= old.bgr.nbytes
            if px.bgr.nbytes > self.budget // 4:
                return
            self.items[sha] = px
            self.used += px.bgr.nbytes
            while self.used > self.budget:
                _, gone = self.items.popitem(last=False)
                self.used -= gone.bgr.nbytes


class _Busy(Exception):
    """No decoding slot within the wait: the client should retry."""


class _Slots:
    """At most ``n`` decodings at once, holding at most ``pixels`` decoded pixels together (an
    image larger than that is decoded alone), and at most ``queue`` requests waiting (threads of
    the server's pool: waiting is bounded, so pages always have threads left)."""

    def __init__(self, n: int, queue: int, wait_s: float, pixels: int = MEDIA_PIXELS) -> None:
        self.n, self.queue, self.wait_s, self.pixels = n, queue, wait_s, pixels
        self.cond = threading.Condition()
        self.waiting = self.active = self.in_use = 0
        self.peak = self.peak_pixels = 0  # most decodings and decoded pixels seen at once (tests read them)

    def _free(self, pixels: int) -> bool:
        return self.active < self.n and self.in_use + pixels <= self.pixels

    @contextlib.contextmanager
    def slot(self, pixels: int = 0) -> Iterator[None]:
        """A decoding slot for an image that decodes to about ``pixels`` pixels, or
        :class:`_Busy` when too many wait or none frees within the wait."""
        pixels = min(max(pixels, 0), self.pixels)
        with self.cond:
            if not self._free(pixels):
                if self.waiting >= self.queue:
                    raise _Busy(f"{self.waiting} image request(s) already wait for one of {self.n} decoding slots")
                self.waiting += 1
                try:
                    got = self.cond.wait_for(lambda: self._free(pixels), timeout=self.wait_s)
                finally:
                    self.waiting -= 1
                if not got:
                    raise _Busy(f"no decoding slot became free within {self.wait_s:g} s")
            self.active += 1
            self.in_use += pixels
            self.peak, self.peak_pixels = max(self.peak, self.active), max(self.peak_pixels, self.in_use)
        try:
            yield
        finally:
            with self.cond:
                self.active -= 1
                self.in_use -= pixels
                self.cond.notify_all()


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


@dataclass
class _State:
    cfg: Config
    cut: flt.Cut
    engine: object
    writer: object | None
    token: str
    hosts: frozenset[str]
    port: int | None
    env: Environment
    cache: _Images
    slots: _Slots


def _resize(bgr: np.ndarray, side: int) -> np.ndarray:
    h, w = bgr.shape[:2]
    if max(h, w) <= side:
        return bgr
    f = side / max(h, w)
    return cv2.resize(bgr, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)


def _img(data: bytes, *, download: str | None = None) -> Response:
    from starlette.responses import Response

    headers = {"Content-Disposition": f'attachment; filename="{download}"'} if download else {}
    return Response(data, media_type="image/jpeg", headers=headers)


MEDIA_REFUSALS = {
    "changed": (409, "the evidence file changed since it was analysed (its SHA-256 is no longer the recorded one), so "
                     "nothing decoded from it is shown; scan it again to record the new content"),
    "gone": (404, "the evidence file no longer exists at any recorded path"),
    "outside_roots": (404, "no recorded path of this image lies inside an evidence root"),
    "unreadable": (404, "no recorded path of this image can be read now (see the server log)"),
    "undecodable": (404, "the evidence file cannot be decoded"),
    "unknown": (404, "no recorded path holds this image"),
}


def _media_error(err: media.MediaError) -> PlainTextResponse:
    """A changed file is a 409 (the database and the evidence disagree), anything else a 404;
    the body starts with ``image not available (REASON)`` and says what happened. The paths
    tried go to the log, not to the response."""
    from starlette.responses import PlainTextResponse

    status, why = MEDIA_REFUSALS.get(err.reason, (404, err.reason))
    log.info("image not shown (%s): %s", err.reason, err.message)
    return PlainTextResponse(f"image not available ({err.reason}): {why}", status)


@contextlib.contextmanager
def _deadline(conn: Connection, seconds: float) -> Iterator[None]:
    """Stop every statement on ``conn`` that runs past ``seconds`` (PostgreSQL: a
    ``statement_timeout`` for the transaction; SQLite: a progress handler that interrupts it)."""
    raw = None
    if conn.dialect.name == "postgresql":
        conn.execute(sql_text(f"SET LOCAL statement_timeout = {int(seconds * 1000)}"))
    elif conn.dialect.name == "sqlite":
        raw = conn.connection.driver_connection
        until = time.monotonic() + seconds
        raw.set_progress_handler(lambda: time.monotonic() > until, 20_000)
    try:
        yield
    finally:
        if raw is not None:
            raw.set_progress_handler(None, 0)


def _int_param(value: int, what: str) -> int:
    if not 1 <= value <= MAX_ID:
        raise flt.FilterError([f"{what}: must be a whole number from 1 to {MAX_ID}, got {value}"])
    return value


def create_app(cfg: Config, *, review: bool = True, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), port: int | None = None) -> Starlette:
    """The review application for ``cfg.database``. ``hosts``: the host names a request's
    ``Host`` header may name; ``port``: the port it must name (None: any)."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse
    from starlette.routing import Route

    g = cfg.pipeline.gender
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(("html",)), trim_blocks=True, lstrip_blocks=True)
    env.filters["show"] = show
    st = _State(cfg=cfg, cut=flt.Cut(g.threshold, g.uncertain_margin), engine=open_engine(cfg.database, readonly=True),
                writer=open_store_engine(cfg.database) if review else None, token=secrets.token_urlsafe(32),
                hosts=frozenset(h.lower() for h in hosts), port=port, env=env, cache=_Images(),
                slots=_Slots(MEDIA_CONCURRENCY, MEDIA_QUEUE, MEDIA_WAIT_S, MEDIA_PIXELS))
    env.globals.update(version=__version__, review_enabled=review, colours={k: "#%02x%02x%02x" % v[::-1] for k, v in COLOURS.items()})

    def render(request: Request, name: str, status: int = 200, **ctx) -> HTMLResponse:  # noqa: ANN003
        return HTMLResponse(st.env.get_template(name).render(request=request, **ctx), status_code=status)

    def error(request: Request, status: int, message: str) -> HTMLResponse:
        return render(request, "error.html", status=status, message=message)

    @contextlib.contextmanager
    def db() -> Iterator[Connection]:
        """A read connection whose statements stop after QUERY_SECONDS."""
        with st.engine.connect() as conn, _deadline(conn, QUERY_SECONDS):
            yield conn

    def parse_filters(request: Request) -> flt.Filters:
        f = flt.parse(list(request.query_params.multi_items()))
        return replace(f, limit=min(f.limit or PAGE_SIZE, MAX_PAGE))

    def links(f: flt.Filters, page: read.Page) -> dict:
        """The pager: next and previous pages by keyset position (``after=`` / ``before=`` the
        sort key of the last / first row shown), and the first page."""
        def url(g: flt.Filters) -> str:
            return "?" + urlencode(g.to_params())

        top = f.page(f.limit)
        return {"next": url(f.seek(after=page.next)) if page.next else None,
                "prev": url(f.seek(before=page.prev)) if page.prev else None,
                "first": url(top) if page.prev else None, "self": url(f)}

    def page_faces(request: Request) -> Response:
        try:
            f = parse_filters(request)
        except flt.FilterError as err:
            return render(request, "faces.html", status=400, problems=err.problems, rows=[], f=flt.Filters(), total=0, cap=COUNT_CAP,
                          pager={}, q={}, roots=[], bundles=[])
        with db() as conn:
            try:
                sc = read.scope(conn, f, st.cut)
                page = read.face_page(conn, f, sc)
                total = read.count_faces(conn, f.page(None), sc, cap=COUNT_CAP)
            except flt.FilterError as err:
                return render(request, "faces.html", status=400, problems=err.problems, rows=[], f=f, total=0, cap=COUNT_CAP, pager={},
                              q=_q(f), roots=[], bundles=[])
            roots, bundles = read.recorded_roots(conn), _bundles(conn)
        return render(request, "faces.html", rows=page.rows, f=f, total=total, cap=COUNT_CAP, pager=links(f, page), q=_q(f), cut=sc.cut,
                      problems=[], roots=roots, bundles=bundles, stats_q=urlencode(f.to_params(paging=False)), top=page.prev is None)

    def page_images(request: Request) -> Response:
        try:
            f = parse_filters(request)
            if f.sort.lstrip("-") not in flt.IMAGE_SORTS:
                f = replace(f, sort="path")
            with db() as conn:
                sc = read.scope(conn, f, st.cut)
                page = read.image_page(conn, f, sc)
                roots, bundles = read.recorded_roots(conn), _bundles(conn)
        except flt.FilterError as err:
            return render(request, "images.html", status=400, problems=err.problems, rows=[], f=flt.Filters(), pager={}, q={}, roots=[], bundles=[])
        return render(request, "images.html", rows=page.rows, f=f, pager=links(f, page), q=_q(f), cut=sc.cut, problems=[],
                      roots=roots, bundles=bundles)

    def _cut_from(request: Request) -> flt.Filters:
        return flt.parse([(k, v) for k, v in request.query_params.multi_items() if k in ("threshold", "margin", "bundle")])

    def page_image(request: Request) -> Response:
        sha = request.path_params["sha256"]
        if not SHA_RE.match(sha):
            return error(request, 404, "no such image")
        try:
            f = _cut_from(request)
            with db() as conn:
                sc = read.scope(conn, f, st.cut)
                image_id, _ = read.find_image(conn, sha)
                if image_id is None:
                    return error(request, 404, "no such image")
                d = read.image_detail(conn, image_id, sc)
        except flt.FilterError as err:
            return error(request, 400, "; ".join(err.problems))
        shown = next((a for a in d["analyses"] if a["latest"]), None)
        return render(request, "image.html", d=d, shown=shown, cut=sc.cut, q=urlencode(f.to_params()))

    def page_face(request: Request) -> Response:
        try:
            face_id = _int_param(request.path_params["face_id"], "face id")
            f = _cut_from(request)
            with db() as conn:
                sc = read.scope(conn, f, st.cut)
                row = read.face(conn, face_id, sc)
                if row is None:
                    return error(request, 404, "no such face")
                history = read.review_history(conn, row)
        except flt.FilterError as err:
            return error(request, 400, "; ".join(err.problems))
        return render(request, "face.html", r=row, history=history, token=st.token, cut=sc.cut, statuses=rv.STATUSES, labels=rv.LABELS,
                      saved=request.query_params.get("saved"))

    def page_stats(request: Request) -> Response:
        try:
            f = parse_filters(request)
            with db() as conn:
                sc = read.scope(conn, f, st.cut)
                stt = read.stats(conn, f, sc)
        except flt.FilterError as err:
            return error(request, 400, "; ".join(err.problems))
        return render(request, "stats.html", s=stt, iso=_iso)

    roots_cache: dict = {"at": -ROOTS_TTL - 1.0, "roots": []}

    def _roots(conn: Connection) -> list[bytes]:
        """Evidence roots, re-read at most every ROOTS_TTL seconds (a distinct over files)."""
        now = time.monotonic()
        if now - roots_cache["at"] > ROOTS_TTL:
            roots_cache["roots"], roots_cache["at"] = media.evidence_roots(st.cfg, conn), now
        return roots_cache["roots"]

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

        @property
        def full(self) -> int | None:
            """The longer side of the full image (None if not recorded)."""
            return max(self.size[:2]) if self.size else None

    def _source(conn: Connection, sha: str) -> _Source:
        return _Source(sha, media.candidates(conn, sha), _size(conn, sha), _roots(conn))

    def _pixels(src: _Source, side: Callable[[int], int]) -> _Pixels:
        """Pixels of ``src.sha`` at least ``side(full longer side)`` pixels on their longer side
        (or full size): from the cache when the file is unchanged and they are large enough, else
        read, hashed and decoded again, no larger than needed, in a decoding slot."""
        sha, full = src.sha, src.full
        px = st.cache.get(sha)
        if px is not None:
            state = media.unchanged(px.loaded)
            if not state:  # changed, replaced or gone: never serve what was decoded from it
                st.cache.drop(sha)
                px = None
            elif px.scale >= 1.0 or (full and max(px.bgr.shape[:2]) >= min(side(full), full)):
                return px
        want = min(side(full), full) if full else None
        lim = st.cfg.pipeline.limits
        with st.slots.slot(decoded_pixels(src.size, want, st.slots.pixels)):
            px = st.cache.get(sha)  # another request may have decoded it while this one waited
            if px is not None and media.unchanged(px.loaded) and (px.scale >= 1.0 or (want and max(px.bgr.shape[:2]) >= want)):
                return px
            loaded = media.load_from(src.rows, sha, src.roots, max_bytes=lim.max_file_bytes, max_pixels=lim.max_pixels,
                                     min_side_hint=want)
            dec = loaded.decoded
            bgr, scale = dec.bgr, dec.scale
            if want and max(bgr.shape[:2]) > want:  # formats decoded at full size: keep only what is needed
                bgr = _resize(bgr, want)
                scale = dec.scale * max(bgr.shape[:2]) / max(dec.bgr.shape[:2])
            # keep the pixels and the file's identity, not the full decode nor the file's bytes
            light = replace(loaded, decoded=replace(dec, bgr=np.empty((0, 0, 3), np.uint8)), file=replace(loaded.file, data=b""))
            px = _Pixels(np.ascontiguousarray(bgr), scale, light)
        if loaded.identity[0] or loaded.identity[1]:  # read while unchanged: may be served again after a check
            st.cache.put(sha, px)
        return px

    def media_image(request: Request) -> Response:
        sha = request.path_params["sha256"]
        if not SHA_RE.match(sha):
            return PlainTextResponse("no such image", 404)
        with db() as conn:
            src = _source(conn, sha)
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
            f = _cut_from(request)
        except flt.FilterError as err:
            return PlainTextResponse("; ".join(err.problems), 400)
        with db() as conn:
            try:
                sc = read.scope(conn, f, st.cut)
            except flt.FilterError as err:
                return PlainTextResponse("; ".join(err.problems), 400)
            rows = list(read.faces(conn, flt.Filters(sha256=(sha,), bundle=f.bundle, sort="sha256"), sc))
            src = _source(conn, sha)
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
            face_id = _int_param(request.path_params["face_id"], "face id")
        except flt.FilterError as err:
            return PlainTextResponse("; ".join(err.problems), 400)
        size = request.query_params.get("size", "large")
        if size not in FACE_SIDES:
            return PlainTextResponse(f"size: must be one of {', '.join(FACE_SIDES)}, got {size[:40]!r}", 400)
        margin, min_side, max_side = FACE_SIDES[size]
        with db() as conn:
            row = read.face(conn, face_id, read.Scope(st.cut, False, "all", conn.dialect.name))
            if row is None:
                return PlainTextResponse("no such face", 404)
            src = _source(conn, row["sha256"])
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

    async def post_review(request: Request) -> Response:
        try:
            face_id = _int_param(request.path_params["face_id"], "face id")
        except flt.FilterError as err:
            return PlainTextResponse("; ".join(err.problems), 400)
        form = await read_form(request, st, "review")
        if isinstance(form, tuple):
            return PlainTextResponse(form[1], form[0])
        review = rv.Review(status=form.get("status", ""), label=form.get("label") or None, note=form.get("note") or None,
                           reviewer=form.get("reviewer") or None, origin="web")

        def write() -> str | None:
            with st.writer.begin() as conn:
                sc = read.scope(conn, flt.Filters(), st.cut)
                row = read.face(conn, face_id, sc)
                if row is None:
                    return "no such face"
                try:
                    rv.record(conn, face_id, review, row["gender"])
                except rv.ReviewError as err:
                    return str(err)
            return None

        problem = await run_in_threadpool(write)
        if problem == "no such face":
            return PlainTextResponse(problem, 404)
        if problem:
            return PlainTextResponse(f"review not recorded: {problem}", 400)
        return RedirectResponse(f"/faces/{face_id}?saved=1", status_code=303)

    async def busy(request: Request, err: Exception) -> Response:
        return PlainTextResponse(f"busy: {err}; try again in a few seconds", 503, headers={"Retry-After": "5"})

    async def database_error(request: Request, err: Exception) -> Response:
        text_ = str(getattr(err, "orig", err)).lower()
        if "interrupt" in text_ or "statement timeout" in text_ or "canceling statement" in text_:
            msg = (f"the query took longer than {QUERY_SECONDS:g} s and was stopped; narrow the filters "
                   "(a root, a path prefix, a date range) and try again")
            log.warning("%s %s: query stopped after %g s", request.method, request.url.path, QUERY_SECONDS)
        else:
            msg = "the database cannot answer now; try again, and see the server log if this persists"
            log.error("%s %s: database error: %s", request.method, request.url.path, err)
        return PlainTextResponse(msg, 503, headers={"Retry-After": "5"})

    routes = [
        Route("/", page_faces, methods=["GET"]),
        Route("/faces", page_faces, methods=["GET"]),
        Route("/faces/{face_id:int}", page_face, methods=["GET"]),
        Route("/images", page_images, methods=["GET"]),
        Route("/images/{sha256}", page_image, methods=["GET"]),
        Route("/stats", page_stats, methods=["GET"]),
        Route("/media/image/{sha256}.jpg", media_image, methods=["GET"]),
        Route("/media/annotated/{sha256}.jpg", media_annotated, methods=["GET"]),
        Route("/media/face/{face_id:int}.jpg", media_face, methods=["GET"]),
    ]
    if review:
        routes.append(Route("/faces/{face_id:int}/review", post_review, methods=["POST"]))
    from daemon.web_persons import persons_routes

    routes += persons_routes(st, render=render, error=error, db=db, review=review)
    app = Starlette(routes=routes, exception_handlers={_Busy: busy, sa_exc.OperationalError: database_error,
                                                       sa_exc.DBAPIError: database_error})
    app.state.fg = st
    return _Guard(app, st)


def _bundles(conn: Connection) -> list[str]:
    return [r[0] for r in conn.execute(select(s.bundles.c.key).order_by(s.bundles.c.created))]


def _q(f: flt.Filters) -> dict:
    """Filter values for the form (first value of multi-valued fields, comma-joined)."""
    out: dict[str, str] = {}
    for k, v in f.to_params(paging=False):
        out[k] = out[k] + "," + v if k in out else v
    return out


def _iso(ts: float | None) -> str:
    from daemon.queries.formats import iso

    return iso(ts) or "-"


def host_allowed(host: str, names: frozenset[str], port: int | None) -> bool:
    """Whether a ``Host`` header names this server (DNS-rebinding defence)."""
    m = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?", host)
    if not m or m.group(1).lower() not in names:
        return False
    return port is None or int(m.group(2) or 80) == port


async def read_form(request: Request, st: _State, what: str) -> dict[str, str] | tuple[int, str]:
    """A posted form (first value per field), or ``(status, refusal)``: cross-site (403), not a
    urlencoded form (415), too large (413), too many fields (400), missing or stale CSRF token (403)."""
    why = _cross_site(request, st)
    if why:
        log.warning("%s refused: %s", what, why)
        return 403, f"refused: {why}"
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        return 415, f"refused: the {what} form must be posted as application/x-www-form-urlencoded"
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return 413, f"refused: the form must be at most {MAX_FORM_BYTES} bytes"
    try:
        fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
    except ValueError:
        return 400, f"refused: the form must have at most {MAX_FORM_FIELDS} fields"
    form = {k: v[0] for k, v in fields.items()}
    if not hmac.compare_digest(form.get("csrf", "").encode("utf-8", "replace"), st.token.encode("ascii")):
        return 403, "refused: missing or stale form token; reload the page and submit again"
    return form


def _cross_site(request: Request, st: _State) -> str | None:
    """Why a state-changing request looks cross-site, or None."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site != "same-origin":
        return f"Sec-Fetch-Site is {site[:40]!r}, must be same-origin"
    origin = request.headers.get("origin")
    if origin is not None:
        host = request.headers.get("host", "")
        if origin == "null" or origin not in (f"http://{host}", f"https://{host}"):
            return f"Origin {origin[:100]!r} is not this server (http://{host[:100]})"
    return None


class _Guard:
    """ASGI wrapper: refuse foreign Host headers, over-long requests and cross-site media
    requests, and add security headers to every response."""

    def __init__(self, app: Starlette, st: _State) -> None:
        self.app, self.st = app, st
        self.state = app.state

    def close(self) -> None:
        """Release the database connections."""
        self.st.engine.dispose()
        if self.st.writer is not None:
            self.st.writer.dispose()

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        from starlette.responses import PlainTextResponse

        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:  # noqa: ANN001
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                headers += [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"same-origin"), (b"cache-control", b"no-store"), (b"x-frame-options", b"DENY"),
                            (b"cross-origin-resource-policy", b"same-origin")]
                message = {**message, "headers": headers}
            await send(message)

        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        if not host_allowed(host, self.st.hosts, self.st.port):
            await PlainTextResponse(f"refused: Host {host[:100]!r} is not served here", 421)(scope, receive, send_with_headers)
            return
        path = scope.get("path", "")
        if len(scope.get("query_string", b"")) > MAX_QUERY_BYTES or len(path.encode("utf-8", "replace")) > MAX_PATH_BYTES:
            await PlainTextResponse(f"refused: the address must be at most {MAX_PATH_BYTES} bytes of path and {MAX_QUERY_BYTES} bytes "
                                    "of query; narrow the filters", 414)(scope, receive, send_with_headers)
            return
        site = headers.get(b"sec-fetch-site")
        if path.startswith("/media/") and site is not None and site.decode("latin-1").lower() not in MEDIA_SITES:
            log.warning("media request refused: Sec-Fetch-Site %r for %s", site, path)
            await PlainTextResponse(f"refused: images are served to this page only (Sec-Fetch-Site {site.decode('latin-1')[:40]!r}, "
                                    "must be same-origin or none)", 403)(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


# --------------------------------------------------------------------------------------------
# The command


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (0: a free port the system picks). Raises
    OSError from bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from daemon.cliargs import load_config

    if not is_loopback(args.host) and not args.allow_remote:
        print(f"forensic-gender serve: --host {show(args.host)} is not a loopback address; the page shows evidence and takes reviews. "
              "Bind to 127.0.0.1 (and use an SSH tunnel), or pass --allow-remote if you really mean it", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        print(f"forensic-gender serve: --port must be from 0 to 65535 (0: any free port), got {args.port}", file=sys.stderr)
        return 2
    cfg = load_config(args, check_paths=False)
    hosts = ("127.0.0.1", "localhost") if is_loopback(args.host) and args.host in ("127.0.0.1", "localhost") else (args.host,)
    if args.host in ("::1", "[::1]"):
        hosts = ("[::1]", "localhost")
    bind = args.host.strip("[]")
    try:
        sock = listen(bind, args.port)
    except (OSError, OverflowError) as err:
        why = getattr(err, "strerror", None) or str(err)
        print(f"forensic-gender serve: cannot listen on {show(args.host)} port {args.port} ({why}); choose another --port "
              "(0 picks a free one) or stop what uses it", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    try:
        app = create_app(cfg, review=not args.no_review, hosts=hosts, port=port)
    except BaseException:
        sock.close()
        raise
    shown = f"[{bind}]" if ":" in bind else bind
    print(f"forensic-gender {__version__}: review page on http://{shown}:{port}/ (database {show(cfg.database)}); Ctrl-C stops it", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=True, server_header=False, lifespan="off"))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        app.close()
    return 0


def register_cli(sub) -> None:  # noqa: ANN001
    from daemon.cliargs import add_config_args

    p = sub.add_parser("serve", help="serve the local review page (loopback only unless --allow-remote)")
    add_config_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: a free port, printed at start)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host (the page has no login)")
    p.add_argument("--no-review", action="store_true", help="read-only page: no review form, no write path")
    p.set_defaults(func=cmd_serve)


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0):  # noqa: ANN001, ANN201
    """Start uvicorn in a daemon thread (tests); returns (server, thread, port). Stop with
    ``server.should_exit = True`` and join the thread."""
    import uvicorn

    sock = listen(host, port)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fg-web", daemon=True)
    t.start()
    return server, t, port
