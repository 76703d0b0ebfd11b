"""The local review page: ``forensic-gender serve`` (Starlette + Jinja2, served by uvicorn).

Server-rendered HTML with no JavaScript: browse faces and images with the same filters as the
query commands, open an image with its boxes drawn, open a face enlarged with its scores,
download the annotated image, and record a review.

The package's rooms: this module (:func:`create_app`, which assembles the pages),
:mod:`.security` (Host, CSRF and cross-site checks, form reading, security headers),
:mod:`.state` (what the pages share: state, rendering, bounded read connections, the cache of
decoded images and the decoding slots), one module per page group (:mod:`.faces`,
:mod:`.images`, :mod:`.stats`, :mod:`.media`, :mod:`.persons`) and :mod:`.serve` (the command).
starlette, jinja2 and uvicorn (the ``web`` extra) are imported by the page modules, which are
imported only where an app is built, or inside functions, so that :func:`register_cli` works
without them and ``serve`` can say which extra to install.

Safety
    * Bound to 127.0.0.1 by default; any address that is not loopback is refused unless
      ``--allow-remote`` is given. Requests whose ``Host`` header is not the address served are
      refused (DNS-rebinding). With ``--port 0`` the port the system chose is printed and served.
    * Every route is GET/HEAD only, except ``POST /faces/{id}/review`` (and the persons
      decisions of :mod:`.persons`), which must carry the page's CSRF token and, when the browser
      says where it comes from, ``Origin`` equal to this server and ``Sec-Fetch-Site:
      same-origin``. ``--no-review`` removes the write paths.
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
    * Query strings of at most :data:`daemon.web.security.MAX_QUERY_BYTES`; filters bounded as
      :func:`daemon.queries.filters.parse` says (values per filter, text sizes, number ranges); ids
      from 1 to 2**31 - 1. A bad value is a 400 with the reason, never a 500.
    * Path globs are matched without backtracking (:func:`daemon.queries.filters.compile_glob`),
      and every page's queries are stopped after :data:`daemon.web.state.QUERY_SECONDS`
      (PostgreSQL ``statement_timeout``; a SQLite progress handler): a 503 that says to narrow
      the filters.
    * At most :data:`MEDIA_CONCURRENCY` images are decoded at once, holding at most
      :data:`MEDIA_PIXELS` decoded pixels together (a larger image is decoded alone), and at most
      :data:`MEDIA_QUEUE` more wait (then 503 with Retry-After); a request that waited is served
      from the cache when another one decoded the same image meanwhile. Images are decoded only
      as large as the response needs (a JPEG DCT-reduced while decoding, others resized right
      after), and the cache of decoded pixels holds at most :data:`daemon.web.state.CACHE_BYTES`.
    * Names are shown through :func:`daemon.paths.show` (the ``show`` filter of the templates):
      control characters and bidirectional overrides appear as visible escapes.
"""

from __future__ import annotations

from sqlalchemy import exc as sa_exc

from daemon.config import Config
from daemon.web.security import Guard
from daemon.web.serve import register_cli
from daemon.web.state import DISPLAY_SIDE, MEDIA_CONCURRENCY, MEDIA_PIXELS, MEDIA_QUEUE, MEDIA_WAIT_S, Busy, Slots, State, busy, database_error
from daemon.web.state import Images as _Images

# What other code takes from here: create_app (the tests, benchmarks), register_cli (the command
# table of daemon.cli names this package, as find_spec of a submodule would import it for --help),
# and the decoding bounds and the cache class that tests/test_hostile_page.py reads or lowers:
# create_app reads the bounds by their names here, so that lowering daemon.web.MEDIA_QUEUE counts.
__all__ = ["DISPLAY_SIDE", "MEDIA_CONCURRENCY", "MEDIA_PIXELS", "MEDIA_QUEUE", "_Images", "create_app", "register_cli"]


def create_app(cfg: Config, *, review: bool = True, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), port: int | None = None) -> Guard:
    """The review application for ``cfg.database``. ``hosts``: the host names a request's
    ``Host`` header may name; ``port``: the port it must name (None: any). Close it with
    ``close()`` (the database connections)."""
    from starlette.applications import Starlette

    from daemon.web import faces, images, media, persons, stats

    slots = Slots(MEDIA_CONCURRENCY, MEDIA_QUEUE, MEDIA_WAIT_S, MEDIA_PIXELS)
    st = State.open(cfg, review=review, hosts=hosts, port=port, slots=slots)
    routes = [*faces.routes(st, review=review), *images.routes(st), *stats.routes(st), *media.routes(st), *persons.routes(st, review=review)]
    app = Starlette(routes=routes, exception_handlers={Busy: busy, sa_exc.OperationalError: database_error, sa_exc.DBAPIError: database_error})
    app.state.fg = st
    return Guard(app, st)
