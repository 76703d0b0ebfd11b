"""The local review page: ``forensic-gender serve`` (Starlette + Jinja2, served by uvicorn).

Server-rendered HTML with no JavaScript: browse faces and images with the same filters as the
query commands, open an image with its boxes drawn, open a face enlarged with its scores,
download the annotated image, and record a review.

Safety
    * Bound to 127.0.0.1 by default; any address that is not loopback is refused unless
      ``--allow-remote`` is given. Requests whose ``Host`` header is not the address served are
      refused (DNS-rebinding).
    * Every route is GET/HEAD only, except ``POST /faces/{id}/review``, which must carry the
      page's CSRF token and, when the browser says where it comes from, ``Origin`` equal to this
      server and ``Sec-Fetch-Site: same-origin``. ``--no-review`` removes the write path.
    * No route takes a file path. Pixels are served only for a SHA-256 or face id from the
      database, read from a recorded path that resolves inside an evidence root, and only when the
      file still has that SHA-256 (:mod:`daemon.queries.media`).
    * Content-Security-Policy forbids scripts, frames and foreign images; responses are not cached.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import logging
import re
import secrets
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import parse_qs, urlencode

import cv2
import numpy as np
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from daemon import __version__
from daemon.config import Config
from daemon.queries import filters as flt
from daemon.queries import media, read
from daemon.render import COLOURS, crop, draw_faces, encode
from daemon.store import reviews as rv
from daemon.store.engine import open_engine, open_store_engine

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
PAGE_SIZE = 50
MAX_PAGE = 500
COUNT_CAP = 10_000  # the faces page counts matches up to this, then says "more than"
MAX_FORM_BYTES = 16 * 1024
DISPLAY_SIDE = 2048
CACHE_BYTES = 256 * 1024 * 1024
ROOTS_TTL = 10.0
CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Images:
    """A small LRU of decoded images (by SHA-256) within a byte budget, thread-safe."""

    def __init__(self, budget: int = CACHE_BYTES) -> None:
        self.budget, self.used = budget, 0
        self.items: OrderedDict[str, np.ndarray] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, sha: str, load) -> np.ndarray:  # noqa: ANN001
        with self.lock:
            if sha in self.items:
                self.items.move_to_end(sha)
                return self.items[sha]
        bgr = load()
        with self.lock:
            if bgr.nbytes <= self.budget // 4 and sha not in self.items:
                self.items[sha] = bgr
                self.used += bgr.nbytes
                while self.used > self.budget:
                    _, old = self.items.popitem(last=False)
                    self.used -= old.nbytes
        return bgr


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


def _resize(bgr: np.ndarray, side: int) -> np.ndarray:
    h, w = bgr.shape[:2]
    if max(h, w) <= side:
        return bgr
    f = side / max(h, w)
    return cv2.resize(bgr, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)


def _img(data: bytes, *, download: str | None = None) -> Response:
    headers = {"Content-Disposition": f'attachment; filename="{download}"'} if download else {}
    return Response(data, media_type="image/jpeg", headers=headers)


def create_app(cfg: Config, *, review: bool = True, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), port: int | None = None) -> Starlette:
    """The review application for ``cfg.database``. ``hosts``: the host names a request's
    ``Host`` header may name; ``port``: the port it must name (None: any)."""
    g = cfg.pipeline.gender
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(("html",)), trim_blocks=True, lstrip_blocks=True)
    st = _State(cfg=cfg, cut=flt.Cut(g.threshold, g.uncertain_margin), engine=open_engine(cfg.database, readonly=True),
                writer=open_store_engine(cfg.database) if review else None, token=secrets.token_urlsafe(32),
                hosts=frozenset(h.lower() for h in hosts), port=port, env=env, cache=_Images())
    env.globals.update(version=__version__, review_enabled=review, colours={k: "#%02x%02x%02x" % v[::-1] for k, v in COLOURS.items()})

    def render(request: Request, name: str, status: int = 200, **ctx) -> HTMLResponse:  # noqa: ANN003
        return HTMLResponse(st.env.get_template(name).render(request=request, **ctx), status_code=status)

    def error(request: Request, status: int, message: str) -> HTMLResponse:
        return render(request, "error.html", status=status, message=message)

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
        with st.engine.connect() as conn:
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
            with st.engine.connect() as conn:
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
        except flt.FilterError as err:
            return error(request, 400, "; ".join(err.problems))
        with st.engine.connect() as conn:
            sc = read.scope(conn, f, st.cut)
            image_id, _ = read.find_image(conn, sha)
            if image_id is None:
                return error(request, 404, "no such image")
            d = read.image_detail(conn, image_id, sc)
        shown = next((a for a in d["analyses"] if a["latest"]), None)
        return render(request, "image.html", d=d, shown=shown, cut=sc.cut, q=urlencode(f.to_params()))

    def page_face(request: Request) -> Response:
        face_id = request.path_params["face_id"]
        try:
            f = _cut_from(request)
        except flt.FilterError as err:
            return error(request, 400, "; ".join(err.problems))
        with st.engine.connect() as conn:
            sc = read.scope(conn, f, st.cut)
            row = read.face(conn, face_id, sc)
            if row is None:
                return error(request, 404, "no such face")
            history = read.review_history(conn, row)
        return render(request, "face.html", r=row, history=history, token=st.token, cut=sc.cut, statuses=rv.STATUSES, labels=rv.LABELS,
                      saved=request.query_params.get("saved"))

    def page_stats(request: Request) -> Response:
        try:
            f = parse_filters(request)
            with st.engine.connect() as conn:
                sc = read.scope(conn, f, st.cut)
                stt = read.stats(conn, f, sc)
        except flt.FilterError as err:
            return error(request, 400, "; ".join(err.problems))
        return render(request, "stats.html", s=stt, iso=_iso)

    roots_cache: dict = {"at": 0.0, "roots": []}

    def _roots(conn) -> list[str]:  # noqa: ANN001
        """Evidence roots, re-read at most every ROOTS_TTL seconds (a distinct over files)."""
        now = time.monotonic()
        if now - roots_cache["at"] > ROOTS_TTL:
            roots_cache["roots"], roots_cache["at"] = media.evidence_roots(st.cfg, conn), now
        return roots_cache["roots"]

    def _load(conn, sha: str) -> np.ndarray:  # noqa: ANN001
        roots = _roots(conn)
        lim = st.cfg.pipeline.limits
        return st.cache.get(sha, lambda: media.load(conn, sha, roots, max_bytes=lim.max_file_bytes, max_pixels=lim.max_pixels).decoded.bgr)

    def media_image(request: Request) -> Response:
        sha = request.path_params["sha256"]
        if not SHA_RE.match(sha):
            return PlainTextResponse("no such image", 404)
        with st.engine.connect() as conn:
            try:
                bgr = _load(conn, sha)
            except media.MediaError as err:
                return PlainTextResponse(f"image not available: {err.reason}", 404)
        return _img(encode(_resize(bgr, DISPLAY_SIDE), ".jpg", 90))

    def media_annotated(request: Request) -> Response:
        sha = request.path_params["sha256"]
        if not SHA_RE.match(sha):
            return PlainTextResponse("no such image", 404)
        try:
            f = _cut_from(request)
        except flt.FilterError as err:
            return PlainTextResponse("; ".join(err.problems), 400)
        with st.engine.connect() as conn:
            sc = read.scope(conn, f, st.cut)
            rows = list(read.faces(conn, flt.Filters(sha256=(sha,), bundle=f.bundle, sort="sha256"), sc))
            try:
                bgr = _load(conn, sha)
            except media.MediaError as err:
                return PlainTextResponse(f"image not available: {err.reason}", 404)
        from daemon.queries.cli import _faces_to_draw

        return _img(encode(draw_faces(bgr, _faces_to_draw(rows)), ".jpg", 92), download=f"{sha[:16]}.annotated.jpg")

    def media_face(request: Request) -> Response:
        face_id = request.path_params["face_id"]
        size = request.query_params.get("size", "large")
        with st.engine.connect() as conn:
            row = read.face(conn, face_id, read.Scope(st.cut, False, "all", conn.dialect.name))
            if row is None:
                return PlainTextResponse("no such face", 404)
            try:
                bgr = _load(conn, row["sha256"])
            except media.MediaError as err:
                return PlainTextResponse(f"image not available: {err.reason}", 404)
        box = (row["x1"], row["y1"], row["x2"], row["y2"])
        if size == "thumb":
            out = _resize(crop(bgr, box, margin=0.15, min_side=1), 96)
        else:
            out = _resize(crop(bgr, box, margin=0.4, min_side=320), 640)
        return _img(encode(out, ".jpg", 90))

    async def post_review(request: Request) -> Response:
        face_id = request.path_params["face_id"]
        why = _cross_site(request, st)
        if why:
            log.warning("review refused: %s", why)
            return PlainTextResponse(f"refused: {why}", 403)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            return PlainTextResponse("refused: the review form must be posted as application/x-www-form-urlencoded", 415)
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            return PlainTextResponse("refused: form too large", 413)
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
        if not hmac.compare_digest(form.get("csrf", ""), st.token):
            return PlainTextResponse("refused: missing or stale form token; reload the page and submit again", 403)
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
    app = Starlette(routes=routes)
    app.state.fg = st
    return _Guard(app, st)


def _bundles(conn) -> list[str]:  # noqa: ANN001
    from sqlalchemy import select

    from daemon.store import schema as s

    return [r[0] for r in conn.execute(select(s.bundles.c.key).order_by(s.bundles.c.created))]


def _q(f: flt.Filters) -> dict:
    """Filter values for the form (first value of multi-valued fields, comma-joined)."""
    out: dict[str, str] = {}
    for k, v in f.to_params(paging=False):
        out[k] = out[k] + "," + v if k in out else v
    return out


def _iso(ts: float | None) -> str:
    from daemon.queries.cli import iso

    return iso(ts) or "-"


def host_allowed(host: str, names: frozenset[str], port: int | None) -> bool:
    """Whether a ``Host`` header names this server (DNS-rebinding defence)."""
    m = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?", host)
    if not m or m.group(1).lower() not in names:
        return False
    return port is None or int(m.group(2) or 80) == port


def _cross_site(request: Request, st: _State) -> str | None:
    """Why a state-changing request looks cross-site, or None."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site != "same-origin":
        return f"Sec-Fetch-Site is {site!r}, must be same-origin"
    origin = request.headers.get("origin")
    if origin is not None:
        host = request.headers.get("host", "")
        if origin == "null" or origin not in (f"http://{host}", f"https://{host}"):
            return f"Origin {origin!r} is not this server (http://{host})"
    return None


class _Guard:
    """ASGI wrapper: refuse foreign Host headers and add security headers to every response."""

    def __init__(self, app: Starlette, st: _State) -> None:
        self.app, self.st = app, st
        self.state = app.state

    def close(self) -> None:
        """Release the database connections."""
        self.st.engine.dispose()
        if self.st.writer is not None:
            self.st.writer.dispose()

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if not host_allowed(host, self.st.hosts, self.st.port):
            await PlainTextResponse(f"refused: Host {host!r} is not served here", 421)(scope, receive, send)
            return

        async def send_with_headers(message) -> None:  # noqa: ANN001
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                headers += [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"same-origin"), (b"cache-control", b"no-store"), (b"x-frame-options", b"DENY")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --------------------------------------------------------------------------------------------
# The command


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from daemon.cli import load_config

    if not is_loopback(args.host) and not args.allow_remote:
        print(f"forensic-gender serve: --host {args.host} is not a loopback address; the page shows evidence and takes reviews. "
              "Bind to 127.0.0.1 (and use an SSH tunnel), or pass --allow-remote if you really mean it", file=sys.stderr)
        return 2
    cfg = load_config(args, check_paths=False)
    hosts = ("127.0.0.1", "localhost") if is_loopback(args.host) and args.host in ("127.0.0.1", "localhost") else (args.host,)
    if args.host in ("::1", "[::1]"):
        hosts = ("[::1]", "localhost")
    app = create_app(cfg, review=not args.no_review, hosts=hosts, port=args.port)
    shown = f"[{args.host.strip('[]')}]" if ":" in args.host else args.host
    print(f"forensic-gender {__version__}: review page on http://{shown}:{args.port}/ (database {cfg.database}); Ctrl-C stops it", flush=True)
    uvicorn.run(app, host=args.host.strip("[]"), port=args.port, log_config=None, access_log=True, server_header=False)
    return 0


def register_cli(sub) -> None:  # noqa: ANN001
    from daemon.cli import add_config_args

    p = sub.add_parser("serve", help="serve the local review page (loopback only unless --allow-remote)")
    add_config_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host (the page has no login)")
    p.add_argument("--no-review", action="store_true", help="read-only page: no review form, no write path")
    p.set_defaults(func=cmd_serve)


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0):  # noqa: ANN001, ANN201
    """Start uvicorn in a daemon thread (tests); returns (server, thread, port). Stop with
    ``server.should_exit = True`` and join the thread."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fg-web", daemon=True)
    t.start()
    return server, t, port

