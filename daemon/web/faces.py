"""The faces pages: the list of faces (``/`` and ``/faces``) with the query commands' filters, one
face enlarged with its scores and review history (``/faces/{id}``), and, when the app takes
reviews, the review form's ``POST /faces/{id}/review`` (cross-site and CSRF checked by
:func:`daemon.web.security.read_form`)."""

from __future__ import annotations

from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from daemon.queries import filters as flt
from daemon.queries import read
from daemon.store import reviews as rv
from daemon.web.security import read_form
from daemon.web.state import State, bundle_keys, cut_from, form_values, int_param, links, parse_filters

COUNT_CAP = 10_000  # the faces page counts matches up to this, then says "more than"


def routes(st: State, *, review: bool) -> list[Route]:
    """The list of faces and a face's page; with ``review``, the review form's POST."""

    def page_faces(request: Request) -> Response:
        try:
            f = parse_filters(request)
        except flt.FilterError as err:
            return st.render(request, "faces.html", status=400, problems=err.problems, rows=[], f=flt.Filters(), total=0, cap=COUNT_CAP,
                             pager={}, q={}, roots=[], bundles=[])
        with st.db() as conn:
            try:
                sc = read.scope(conn, f, st.cut)
                page = read.face_page(conn, f, sc)
                total = read.count_faces(conn, f.page(None), sc, cap=COUNT_CAP)
            except flt.FilterError as err:
                return st.render(request, "faces.html", status=400, problems=err.problems, rows=[], f=f, total=0, cap=COUNT_CAP, pager={},
                                 q=form_values(f), roots=[], bundles=[])
            roots, bundles = read.recorded_roots(conn), bundle_keys(conn)
        return st.render(request, "faces.html", rows=page.rows, f=f, total=total, cap=COUNT_CAP, pager=links(f, page), q=form_values(f),
                         cut=sc.cut, problems=[], roots=roots, bundles=bundles, stats_q=urlencode(f.to_params(paging=False)),
                         top=page.prev is None)

    def page_face(request: Request) -> Response:
        try:
            face_id = int_param(request.path_params["face_id"], "face id")
            f = cut_from(request)
            with st.db() as conn:
                sc = read.scope(conn, f, st.cut)
                row = read.face(conn, face_id, sc)
                if row is None:
                    return st.error(request, 404, "no such face")
                history = read.review_history(conn, row)
        except flt.FilterError as err:
            return st.error(request, 400, "; ".join(err.problems))
        return st.render(request, "face.html", r=row, history=history, token=st.token, cut=sc.cut, statuses=rv.STATUSES, labels=rv.LABELS,
                         saved=request.query_params.get("saved"))

    async def post_review(request: Request) -> Response:
        try:
            face_id = int_param(request.path_params["face_id"], "face id")
        except flt.FilterError as err:
            return PlainTextResponse("; ".join(err.problems), 400)
        form = await read_form(request, st, "review")
        if isinstance(form, tuple):
            return PlainTextResponse(form[1], form[0])
        given = rv.Review(status=form.get("status", ""), label=form.get("label") or None, note=form.get("note") or None,
                          reviewer=form.get("reviewer") or None, origin="web")

        def write() -> str | None:
            with st.writer.begin() as conn:
                sc = read.scope(conn, flt.Filters(), st.cut)
                row = read.face(conn, face_id, sc)
                if row is None:
                    return "no such face"
                try:
                    rv.record(conn, face_id, given, row["gender"])
                except rv.ReviewError as err:
                    return str(err)
            return None

        problem = await run_in_threadpool(write)
        if problem == "no such face":
            return PlainTextResponse(problem, 404)
        if problem:
            return PlainTextResponse(f"review not recorded: {problem}", 400)
        return RedirectResponse(f"/faces/{face_id}?saved=1", status_code=303)

    out = [
        Route("/", page_faces, methods=["GET"]),
        Route("/faces", page_faces, methods=["GET"]),
        Route("/faces/{face_id:int}", page_face, methods=["GET"]),
    ]
    if review:
        out.append(Route("/faces/{face_id:int}/review", post_review, methods=["POST"]))
    return out
