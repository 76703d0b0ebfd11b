"""What keeps the review page to its own browser tab: the ``Host`` check (DNS rebinding), loopback
addresses, the cross-site and CSRF checks of posted forms and the reading of those forms within
bounds, and :class:`Guard`, the ASGI wrapper that refuses foreign hosts, over-long addresses and
cross-site media requests and adds the security headers to every response.

No starlette at import time (``register_cli`` must work without the ``web`` extra).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request

    from daemon.web.state import State

log = logging.getLogger(__name__)

MAX_FORM_BYTES = 16 * 1024
MAX_FORM_FIELDS = 16
MAX_QUERY_BYTES = 32 * 1024
MAX_PATH_BYTES = 2048
CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
MEDIA_SITES = ("same-origin", "none")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_allowed(host: str, names: frozenset[str], port: int | None) -> bool:
    """Whether a ``Host`` header names this server (DNS-rebinding defence)."""
    m = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?", host)
    if not m or m.group(1).lower() not in names:
        return False
    return port is None or int(m.group(2) or 80) == port


async def read_form(request: Request, st: State, what: str) -> dict[str, str] | tuple[int, str]:
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


def _cross_site(request: Request, st: State) -> str | None:
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


class Guard:
    """ASGI wrapper: refuse foreign Host headers, over-long requests and cross-site media
    requests, and add security headers to every response."""

    def __init__(self, app: Starlette, st: State) -> None:
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
