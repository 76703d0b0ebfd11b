"""The images pages: the list of images (``/images``) with the query commands' filters and one
image with its analyses and faces (``/images/{sha256}``; its picture comes from
:mod:`daemon.web.media`)."""

from __future__ import annotations

from dataclasses import replace
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from daemon.queries import filters as flt
from daemon.queries import read
from daemon.queries.formats import on_frame
from daemon.web.state import SHA_RE, State, bundle_keys, cut_from, form_values, links, parse_filters


def routes(st: State) -> list[Route]:
    """The list of images and an image's page."""

    def page_images(request: Request) -> Response:
        try:
            f = parse_filters(request)
            if f.sort.lstrip("-") not in flt.IMAGE_SORTS:
                f = replace(f, sort="path")
            with st.db() as conn:
                sc = read.scope(conn, f, st.cut)
                page = read.image_page(conn, f, sc)
                roots, bundles = read.recorded_roots(conn), bundle_keys(conn)
        except flt.FilterError as err:
            return st.render(request, "images.html", status=400, problems=err.problems, rows=[], f=flt.Filters(), pager={}, q={}, roots=[],
                             bundles=[])
        return st.render(request, "images.html", rows=page.rows, f=f, pager=links(f, page), q=form_values(f), cut=sc.cut, problems=[],
                         roots=roots, bundles=bundles)

    def page_image(request: Request) -> Response:
        sha = request.path_params["sha256"]
        if not SHA_RE.match(sha):
            return st.error(request, 404, "no such image")
        try:
            f = cut_from(request)
            with st.db() as conn:
                sc = read.scope(conn, f, st.cut)
                image_id, _ = read.find_image(conn, sha)
                if image_id is None:
                    return st.error(request, 404, "no such image")
                d = read.image_detail(conn, image_id, sc)
        except flt.FilterError as err:
            return st.error(request, 400, "; ".join(err.problems))
        shown = next((a for a in d["analyses"] if a["latest"]), None)
        frame, frames = None, []
        if d.get("video") and shown is not None:  # a video: one sampled frame at a time, its faces on it
            frames = sorted({r["frame"] for r in shown["faces_rows"] if r.get("frame") is not None})
            raw = request.query_params.get("frame", "")
            frame, faces_rows = on_frame(shown["faces_rows"], int(raw) if raw.isdigit() and len(raw) < 10 else None)
            frame = 0 if frame is None else frame  # a video without faces: its first frame
            shown = {**shown, "faces_rows": faces_rows}
        return st.render(request, "image.html", d=d, shown=shown, cut=sc.cut, q=urlencode(f.to_params()), frame=frame, frames=frames)

    return [
        Route("/images", page_images, methods=["GET"]),
        Route("/images/{sha256}", page_image, methods=["GET"]),
    ]
