"""Persons on the review page: the grid of persons, a person's faces and images, the faces like a
face, and the examiner's decisions (merge two persons, move a face to another or a new person,
take a face out of every person, name a person).

Hooked into :func:`daemon.web.create_app` by :func:`routes`; uses the app's
:class:`~daemon.web.state.State` (renderer, read connections bounded by its statement deadline)
and its safety checks: every POST is there only when the app takes reviews, and must pass the
cross-site check of :func:`daemon.web.security.read_form` and carry the page's CSRF token, as the
review form does. Decisions go through :mod:`daemon.store.persons` (each in its own transaction,
audited in ``person_decisions``) and answer with a 303 back to a page of this server (never to an
address taken from the request). Bad values are a 400 page with the reason.

The examiner's name for the audit trail travels as the ``reviewer`` query parameter of the
persons pages (set once with the small form on top) and as a hidden field of every form.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from daemon.queries import persons as pq
from daemon.queries import similar as sim
from daemon.store import persons as ps
from daemon.web.security import read_form as web_read_form
from daemon.web.state import MAX_ID, State

log = logging.getLogger(__name__)

GRID_SIZE = 60  # persons per page of the grid
GRID_MIN_FACES = 2  # the grid hides single-face persons unless asked
FACES_SIZE = 100  # faces per page of a person
IMAGES_SHOWN = 100  # images listed on a person's page
SIMILAR_SIZE = 50
MAX_SIMILAR = 200
MAX_NAME_QUERY = 200
MAX_REVIEWER = 128
BACK_RE = re.compile(r"^/(persons|persons/\d{1,10}|faces/\d{1,10}|faces/\d{1,10}/similar)$")
INT_RE = re.compile(r"^\d{1,10}$")
AFTER_RE = re.compile(r"^(\d{1,10})-(\d{1,10})$")

# A decision on the person or face whose id the path names: (id, form, reviewer) -> (the page to
# go back to, its query parameters); raises PersonError or BadValueError for a 400.
Decision = Callable[[int, dict[str, str], str | None], tuple[str, dict[str, Any]]]


class BadValueError(ValueError):
    """A query or form value the page cannot take (a 400 with this message)."""


def _int(value: str | None, what: str, *, high: int = MAX_ID) -> int | None:
    """A whole number from 1 to ``high``, or None when absent or empty."""
    if value is None or value.strip() == "":
        return None
    value = value.strip()
    if not INT_RE.match(value) or not 1 <= int(value) <= high:
        raise BadValueError(f"{what}: must be a whole number from 1 to {high}, got {value[:40]!r}")
    return int(value)


def _size(value: str | None, what: str, default: int, high: int) -> int:
    """A count from 1 to ``high``; ``default`` when absent or empty."""
    x = _int(value, what, high=high)
    return default if x is None else x


def _float(value: str | None, what: str, *, default: float, low: float, high: float) -> float:
    """A number in (``low``, ``high``] (``default`` when absent or empty)."""
    if value is None or value.strip() == "":
        return default
    try:
        x = float(value)
    except ValueError:
        x = float("nan")
    if not low < x <= high:  # also refuses nan
        raise BadValueError(f"{what}: must be a number above {low:g} and at most {high:g}, got {value[:40]!r}")
    return x


def _text(value: str | None, what: str, limit: int) -> str | None:
    if value is None or not value.strip():
        return None
    if len(value) > limit:
        raise BadValueError(f"{what}: must be at most {limit} characters, got {len(value)}")
    return value.strip()


def _pid(request: Request, key: str, what: str) -> int:
    value = request.path_params[key]
    if not 1 <= value <= MAX_ID:
        raise BadValueError(f"{what}: must be a whole number from 1 to {MAX_ID}, got {value}")
    return int(value)


def _with_reviewer(path: str, reviewer: str | None, **params: str | int) -> str:
    """``path`` with ``params`` and the examiner's name as its query string."""
    q: dict[str, str | int] = {k: v for k, v in params.items() if v is not None}
    if reviewer:
        q["reviewer"] = reviewer
    return path + ("?" + urlencode(q) if q else "")


def routes(st: State, *, review: bool) -> list[Route]:
    """The persons pages (GET) and, when ``review``, their decision forms (POST)."""
    writer = st.writer
    index = sim.FaceIndex()  # one per app: refreshed per search by the faces added since

    def face_identity(face_id: int) -> pq.FaceRow | None:
        """For the face page (a template global): the face's person and whether it can be searched."""
        with st.db() as conn:
            return pq.face(conn, face_id)

    st.env.globals["face_identity"] = face_identity

    def reviewer_of(request: Request) -> str | None:
        return _text(request.query_params.get("reviewer"), "reviewer", MAX_REVIEWER)

    def page_persons(request: Request) -> Response:
        qp = request.query_params
        try:
            name = _text(qp.get("name"), "name", MAX_NAME_QUERY)
            min_faces = _size(qp.get("min_faces"), "min_faces", GRID_MIN_FACES, MAX_ID)
            limit = _size(qp.get("limit"), "limit", GRID_SIZE, pq.MAX_LIMIT)
            after = None
            if qp.get("after"):
                m = AFTER_RE.match(qp["after"])
                if not m:
                    raise BadValueError(f"after: must be FACES-PERSON (two whole numbers, from the next-page link), got {qp['after'][:40]!r}")
                after = (int(m.group(1)), int(m.group(2)))
            reviewer = reviewer_of(request)
        except BadValueError as err:
            return st.error(request, 400, str(err))
        with st.db() as conn:
            has = ps.has_persons(conn)
            page = pq.list_persons(conn, min_faces=min_faces, name=name, limit=limit, after=after)
        base = {"name": name or "", "min_faces": min_faces, "limit": limit, "reviewer": reviewer or ""}
        defaults = {"name": "", "min_faces": GRID_MIN_FACES, "limit": GRID_SIZE, "reviewer": ""}
        keep = {k: v for k, v in base.items() if v != defaults[k]}  # what the links carry
        nxt = "/persons?" + urlencode({**keep, "after": f"{page.next[0]}-{page.next[1]}"}) if page.next else None
        first = "/persons" + ("?" + urlencode(keep) if keep else "") if after else None
        return st.render(request, "persons.html", nav="persons", rows=page.rows, has_persons=has, q=base, next=nxt, first=first, default_min=GRID_MIN_FACES)

    def page_person(request: Request) -> Response:
        qp = request.query_params
        try:
            person_id = _pid(request, "person_id", "person id")
            after = _int(qp.get("after"), "after")
            limit = _size(qp.get("limit"), "limit", FACES_SIZE, pq.MAX_LIMIT)
            reviewer = reviewer_of(request)
            moved_to = _int(qp.get("to"), "to")
            moved_face = _int(qp.get("face"), "face")
        except BadValueError as err:
            return st.error(request, 400, str(err))
        with st.db() as conn:
            d = pq.person(conn, person_id, limit=limit, after=after, image_limit=IMAGES_SHOWN)
        if d is None:
            return st.error(request, 404, f"person {person_id} does not exist (or no persons yet: run `forensic-gender recluster`)")
        if d.merged_into is not None:  # the surviving person holds its faces now
            return RedirectResponse(_with_reviewer(f"/persons/{d.merged_into}", reviewer, merged=person_id), status_code=302)
        sized = {"limit": limit} if limit != FACES_SIZE else {}
        nxt = _with_reviewer(f"/persons/{person_id}", reviewer, after=d.next, **sized) if d.next else None
        first = _with_reviewer(f"/persons/{person_id}", reviewer, **sized) if after else None
        return st.render(
            request,
            "person.html",
            nav="persons",
            d=d,
            token=st.token,
            reviewer=reviewer or "",
            next=nxt,
            first=first,
            saved=qp.get("saved"),
            moved_to=moved_to,
            moved_face=moved_face,
            merged=_int_or_none(qp.get("merged")),
            back=f"/persons/{person_id}",
        )

    def page_similar(request: Request) -> Response:
        qp = request.query_params
        try:
            face_id = _pid(request, "face_id", "face id")
            limit = _size(qp.get("limit"), "limit", SIMILAR_SIZE, MAX_SIMILAR)
            max_distance = _float(qp.get("max_distance"), "max_distance", default=sim.DEFAULT_DISTANCE, low=0.0, high=2.0)
            reviewer = reviewer_of(request)
        except BadValueError as err:
            return st.error(request, 400, str(err))
        with st.db() as conn:
            me = pq.face(conn, face_id)
            if me is None:
                return st.error(request, 404, f"face {face_id} does not exist")
            try:
                matches = sim.similar_to_face(conn, face_id, limit=limit, max_distance=max_distance, index=index)
            except sim.SimilarError as err:
                return st.error(request, 400, str(err))
            rows = pq.faces_by_id(conn, [m.face_id for m in matches])
        found = [(m, rows[m.face_id]) for m in matches if m.face_id in rows]
        return st.render(
            request,
            "similar.html",
            nav="persons",
            me=me,
            found=found,
            token=st.token,
            reviewer=reviewer or "",
            q={"limit": limit, "max_distance": max_distance},
            saved=qp.get("saved"),
            back=f"/faces/{face_id}/similar",
        )

    async def read_form(request: Request) -> dict[str, str] | Response:
        """The posted form, or the refusal as a page (:func:`daemon.web.security.read_form`)."""
        form = await web_read_form(request, st, "person decision")
        return st.error(request, form[0], form[1]) if isinstance(form, tuple) else form

    def back_to(form: dict[str, str], default: str) -> str:
        back = form.get("back", "")
        return back if BACK_RE.match(back) else default

    def engine() -> Engine:
        if writer is None:  # the routes are not there without review
            raise ps.PersonError("this page is read-only")
        return writer

    def decision(key: str, what: str, act: Decision) -> Callable[[Request], Awaitable[Response]]:
        """The POST endpoint of a decision on the person or face whose id is the path's ``key``
        (``what`` in messages): a bad id is a 400 page; then it reads and checks the form, runs
        ``act(id, form, reviewer)`` in a worker thread, and answers with a 303 to the page that
        names, or a 400 page with the reason."""

        async def endpoint(request: Request) -> Response:
            try:
                target = _pid(request, key, what)
            except BadValueError as err:
                return st.error(request, 400, str(err))
            form = await read_form(request)
            if isinstance(form, Response):
                return form
            reviewer = form.get("reviewer") or None

            def run() -> tuple[str, dict[str, Any]] | str:
                try:
                    return act(target, form, reviewer)
                except (ps.PersonError, BadValueError) as err:
                    return str(err)

            done = await run_in_threadpool(run)
            if isinstance(done, str):
                return st.error(request, 400, f"not recorded: {done}")
            where, params = done
            return RedirectResponse(_with_reviewer(where, reviewer if reviewer and len(reviewer) <= MAX_REVIEWER else None, **params), status_code=303)

        return endpoint

    def merge(keep: int, form: dict[str, str], reviewer: str | None) -> tuple[str, dict[str, Any]]:
        other = _int(form.get("other"), "other (the person to merge into this one)")
        if other is None:
            raise BadValueError("other: give the id of the person to merge into this one")
        moved = ps.merge(engine(), keep, other, reviewer=reviewer)
        log.info("persons: %d merged into %d (%d faces) by %s", other, keep, moved, reviewer or "-")
        return back_to(form, f"/persons/{keep}"), {"saved": "merged", "merged": other}

    def face_person(face_id: int, form: dict[str, str], reviewer: str | None) -> tuple[str, dict[str, Any]]:
        back = back_to(form, f"/faces/{face_id}")
        if form.get("release"):
            ps.release(engine(), face_id, reviewer=reviewer)
            log.info("persons: face %d released by %s", face_id, reviewer or "-")
            return back, {"saved": "released", "face": face_id}
        target = _int(form.get("person"), "person (an existing person's id, or empty for a new person)")
        person_id = ps.assign(engine(), face_id, target, reviewer=reviewer)
        log.info("persons: face %d put to person %d by %s", face_id, person_id, reviewer or "-")
        return back, {"saved": "moved", "face": face_id, "to": person_id}

    def rename(person_id: int, form: dict[str, str], reviewer: str | None) -> tuple[str, dict[str, Any]]:
        ps.rename(engine(), person_id, form.get("name"), reviewer=reviewer)
        return back_to(form, f"/persons/{person_id}"), {"saved": "named"}

    routes = [
        Route("/persons", page_persons, methods=["GET"]),
        Route("/persons/{person_id:int}", page_person, methods=["GET"]),
        Route("/faces/{face_id:int}/similar", page_similar, methods=["GET"]),
    ]
    if review:
        routes += [
            Route("/persons/{person_id:int}/merge", decision("person_id", "person id", merge), methods=["POST"], name="post_merge"),
            Route("/persons/{person_id:int}/name", decision("person_id", "person id", rename), methods=["POST"], name="post_name"),
            Route("/faces/{face_id:int}/person", decision("face_id", "face id", face_person), methods=["POST"], name="post_face_person"),
        ]
    return routes


def _int_or_none(value: str | None) -> int | None:
    """A whole number from a query parameter that only decorates the page (None when it is not one)."""
    return int(value) if value and INT_RE.match(value) and 1 <= int(value) <= MAX_ID else None
