"""What the pages of the review page share: the app's :class:`State` (configuration, engines, the
CSRF token, templates, the cache of decoded images and the decoding slots), rendering of pages and
error pages, read connections stopped after :data:`QUERY_SECONDS`, the parsing of the list pages'
filters and pager, and the answers to a busy server or a database that cannot answer.

No starlette or jinja2 at import time (``register_cli`` must work without the ``web`` extra).
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from sqlalchemy import Connection, Engine, select
from sqlalchemy import text as sql_text

from daemon import __version__
from daemon.config import Config
from daemon.paths import show
from daemon.queries import filters as flt
from daemon.queries import media, read
from daemon.render import COLOURS
from daemon.store import schema as s
from daemon.store.engine import open_engine, open_store_engine

if TYPE_CHECKING:
    import numpy as np
    from jinja2 import Environment
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, Response

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent.parent / "templates"
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
PAGE_SIZE = 50
MAX_PAGE = 500
MAX_ID = 2**31 - 1  # ids are the schema's 32-bit integers
DISPLAY_SIDE = 2048
CACHE_BYTES = 256 * 1024 * 1024
MEDIA_CONCURRENCY = 2  # images decoded at once
MEDIA_PIXELS = 64_000_000  # decoded pixels held by those decodings together (one larger image is decoded alone)
MEDIA_QUEUE = 8  # requests that may wait for a decoding slot
MEDIA_WAIT_S = 30.0
QUERY_SECONDS = 30.0


@dataclass(frozen=True)
class Pixels:
    """Decoded upright pixels of one content at ``scale`` (pixels per full-image pixel; 1.0 or
    less), with where they were read and that file's identity at the time (to re-check)."""

    bgr: np.ndarray
    scale: float
    loaded: media.Loaded


class Images:
    """A small LRU of decoded images (by SHA-256) within a byte budget, thread-safe. Entries are
    only what :mod:`daemon.web.media` checks before use; an item over a quarter of the budget is
    never kept."""

    def __init__(self, budget: int = CACHE_BYTES) -> None:
        self.budget, self.used = budget, 0
        self.items: OrderedDict[str, Pixels] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, sha: str) -> Pixels | None:
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

    def put(self, sha: str, px: Pixels) -> None:
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


class Busy(Exception):
    """No decoding slot within the wait: the client should retry."""


class Slots:
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
        :class:`Busy` when too many wait or none frees within the wait."""
        pixels = min(max(pixels, 0), self.pixels)
        with self.cond:
            if not self._free(pixels):
                if self.waiting >= self.queue:
                    raise Busy(f"{self.waiting} image request(s) already wait for one of {self.n} decoding slots")
                self.waiting += 1
                try:
                    got = self.cond.wait_for(lambda: self._free(pixels), timeout=self.wait_s)
                finally:
                    self.waiting -= 1
                if not got:
                    raise Busy(f"no decoding slot became free within {self.wait_s:g} s")
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


@dataclass
class State:
    """One app's state (``app.state.fg``), handed to every page module."""

    cfg: Config
    cut: flt.Cut
    engine: Engine
    writer: Engine | None  # None: the page takes no reviews
    token: str
    hosts: frozenset[str]
    port: int | None
    env: Environment
    cache: Images
    slots: Slots

    @classmethod
    def open(cls, cfg: Config, *, review: bool, hosts: tuple[str, ...], port: int | None, slots: Slots) -> State:
        """The state of a new app over ``cfg.database``: a read engine, a writing one when ``review``,
        a fresh CSRF token and the templates."""
        from jinja2 import Environment, FileSystemLoader, select_autoescape

        g = cfg.pipeline.gender
        env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(("html",)), trim_blocks=True, lstrip_blocks=True)
        env.filters["show"] = show
        st = cls(cfg=cfg, cut=flt.Cut(g.threshold, g.uncertain_margin), engine=open_engine(cfg.database, readonly=True),
                 writer=open_store_engine(cfg.database) if review else None, token=secrets.token_urlsafe(32),
                 hosts=frozenset(h.lower() for h in hosts), port=port, env=env, cache=Images(), slots=slots)
        env.globals.update(version=__version__, review_enabled=review, colours={k: "#%02x%02x%02x" % v[::-1] for k, v in COLOURS.items()})
        return st

    def render(self, request: Request, name: str, status: int = 200, **ctx: object) -> HTMLResponse:
        from starlette.responses import HTMLResponse

        return HTMLResponse(self.env.get_template(name).render(request=request, **ctx), status_code=status)

    def error(self, request: Request, status: int, message: str) -> HTMLResponse:
        return self.render(request, "error.html", status=status, message=message)

    @contextlib.contextmanager
    def db(self) -> Iterator[Connection]:
        """A read connection whose statements stop after QUERY_SECONDS."""
        with self.engine.connect() as conn, deadline(conn, QUERY_SECONDS):
            yield conn


@contextlib.contextmanager
def deadline(conn: Connection, seconds: float) -> Iterator[None]:
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


# --------------------------------------------------------------------------------------------
# Parsing the request, shared by the pages


def int_param(value: int, what: str) -> int:
    if not 1 <= value <= MAX_ID:
        raise flt.FilterError([f"{what}: must be a whole number from 1 to {MAX_ID}, got {value}"])
    return value


def parse_filters(request: Request) -> flt.Filters:
    f = flt.parse(list(request.query_params.multi_items()))
    return replace(f, limit=min(f.limit or PAGE_SIZE, MAX_PAGE))


def cut_from(request: Request) -> flt.Filters:
    return flt.parse([(k, v) for k, v in request.query_params.multi_items() if k in ("threshold", "margin", "bundle")])


def links(f: flt.Filters, page: read.Page) -> dict[str, str | None]:
    """The pager: next and previous pages by keyset position (``after=`` / ``before=`` the
    sort key of the last / first row shown), and the first page."""
    def url(g: flt.Filters) -> str:
        return "?" + urlencode(g.to_params())

    top = f.page(f.limit)
    return {"next": url(f.seek(after=page.next)) if page.next else None,
            "prev": url(f.seek(before=page.prev)) if page.prev else None,
            "first": url(top) if page.prev else None, "self": url(f)}


def form_values(f: flt.Filters) -> dict[str, str]:
    """Filter values for the form (first value of multi-valued fields, comma-joined)."""
    out: dict[str, str] = {}
    for k, v in f.to_params(paging=False):
        out[k] = out[k] + "," + v if k in out else v
    return out


def bundle_keys(conn: Connection) -> list[str]:
    return [r[0] for r in conn.execute(select(s.bundles.c.key).order_by(s.bundles.c.created))]


# --------------------------------------------------------------------------------------------
# The app's exception handlers


async def busy(request: Request, err: Exception) -> Response:
    from starlette.responses import PlainTextResponse

    return PlainTextResponse(f"busy: {err}; try again in a few seconds", 503, headers={"Retry-After": "5"})


async def database_error(request: Request, err: Exception) -> Response:
    from starlette.responses import PlainTextResponse

    text_ = str(getattr(err, "orig", err)).lower()
    if "interrupt" in text_ or "statement timeout" in text_ or "canceling statement" in text_:
        msg = (f"the query took longer than {QUERY_SECONDS:g} s and was stopped; narrow the filters "
               "(a root, a path prefix, a date range) and try again")
        log.warning("%s %s: query stopped after %g s", request.method, request.url.path, QUERY_SECONDS)
    else:
        msg = "the database cannot answer now; try again, and see the server log if this persists"
        log.error("%s %s: database error: %s", request.method, request.url.path, err)
    return PlainTextResponse(msg, 503, headers={"Retry-After": "5"})
