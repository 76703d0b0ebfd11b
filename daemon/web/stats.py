"""The statistics page (``/stats``): what ``forensic-gender stats`` reports (totals, states,
failures, gender and age, backlog, throughput, bundles) for the query commands' filters."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from daemon.queries import filters as flt
from daemon.queries import read
from daemon.web.state import State, parse_filters


def _iso(ts: float | None) -> str:
    from daemon.queries.formats import iso

    return iso(ts) or "-"


def routes(st: State) -> list[Route]:
    """The statistics page."""

    def page_stats(request: Request) -> Response:
        try:
            f = parse_filters(request)
            with st.db() as conn:
                sc = read.scope(conn, f, st.cut)
                stt = read.stats(conn, f, sc)
        except flt.FilterError as err:
            return st.error(request, 400, "; ".join(err.problems))
        return st.render(request, "stats.html", s=stt, iso=_iso)

    return [Route("/stats", page_stats, methods=["GET"])]
