"""Persons on the review page over HTTP (Starlette's test client), on SQLite and PostgreSQL: the
grid of persons, a person's faces and images, the faces like a face, and the examiner's
decisions (merge, move a face to another or a new person, release a face, name a person) with
their audit rows, their refusals (no CSRF token, cross-site, bad values) and the read-only page.

The persons come from the real descriptors of the dev database (``real_db``) grouped by
:func:`daemon.store.persons.recluster`; every page is checked against the database."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from sqlalchemy import select

pytest.importorskip("starlette", reason="the web extra is not installed: pip install -e '.[web]'")
pytest.importorskip("httpx", reason="the test client needs httpx: pip install -e '.[web]'")

from starlette.testclient import TestClient

from daemon import config, identity
from daemon.config import IdentityConfig
from daemon.store import persons as ps
from daemon.store import schema as s
from daemon.store.engine import open_engine, open_store_engine
from daemon.web import create_app
from tests import query_fixtures
from tests.query_fixtures import DevDB

dev_db, real_db = query_fixtures.dev_db, query_fixtures.real_db  # the fixtures these tests use

PORT = 8765
BASE = f"http://127.0.0.1:{PORT}"
SAME_SITE = {"Origin": BASE, "Sec-Fetch-Site": "same-origin"}


@dataclass
class Site:
    client: TestClient
    url: str
    token: str


def _client(url: str, **kw) -> tuple[TestClient, object]:  # noqa: ANN003
    app = create_app(config.parse({"database": url}, check_paths=False), port=PORT, **kw)
    return TestClient(app, base_url=BASE), app


def _persons_of(url: str) -> dict[int, list[int]]:
    """person id -> its current face ids (sorted), read straight from the database."""
    engine = open_engine(url, readonly=True)
    with engine.connect() as c:
        cur = ps.current_faces().subquery()
        rows = c.execute(
            select(ps.face_persons.c.person_id, ps.face_persons.c.face_id)
            .where(ps.face_persons.c.face_id.in_(select(cur.c.id)))
            .order_by(ps.face_persons.c.face_id)
        ).all()
    engine.dispose()
    out: dict[int, list[int]] = {}
    for p, f in rows:
        out.setdefault(p, []).append(f)
    return out


def _decisions(url: str) -> list[dict]:
    engine = open_engine(url, readonly=True)
    with engine.connect() as c:
        rows = [dict(r._mapping) for r in c.execute(select(ps.decisions).order_by(ps.decisions.c.id))]
    engine.dispose()
    return rows


def _pins(url: str) -> dict[int, tuple[int, bool]]:
    engine = open_engine(url, readonly=True)
    with engine.connect() as c:
        rows = c.execute(select(ps.face_persons.c.face_id, ps.face_persons.c.person_id, ps.face_persons.c.pinned)).all()
    engine.dispose()
    return {f: (p, bool(pin)) for f, p, pin in rows}


@pytest.fixture
def site(real_db: DevDB) -> Iterator[Site]:
    """The review page over the dev database (SQLite or PostgreSQL) with persons from recluster."""
    engine = open_store_engine(real_db.url)
    stats = ps.recluster(engine, IdentityConfig())
    engine.dispose()
    assert stats["persons"] >= 5, stats
    client, app = _client(real_db.url)
    token = re.search(r'name="csrf" value="([^"]+)"', client.get(f"/persons/{min(_persons_of(real_db.url))}").text).group(1)
    yield Site(client, real_db.url, token)
    app.close()


def _post(site: Site, path: str, data: dict, **kw) -> object:  # noqa: ANN003
    return site.client.post(path, data={"csrf": site.token, **data}, headers=SAME_SITE, follow_redirects=False, **kw)


def _grid_ids(html: str) -> list[int]:
    return [int(x) for x in re.findall(r'class="person" data-person-id="(\d+)"', html)]


def _face_ids(html: str) -> list[int]:
    return [int(x) for x in re.findall(r'class="face" data-face-id="(\d+)"', html)]


# --------------------------------------------------------------------------------------------
# Reading: grid, person, similar faces, face page


def test_grid_person_and_similar_pages_match_the_database(site: Site) -> None:
    c, truth = site.client, _persons_of(site.url)
    order = sorted(truth, key=lambda p: (-len(truth[p]), p))
    # the grid: persons with two faces or more by default, most faces first; singletons on request
    grid = c.get("/persons")
    assert grid.status_code == 200 and 'class="on">Persons' in grid.text
    assert _grid_ids(grid.text) == [p for p in order if len(truth[p]) >= 2] and len(_grid_ids(grid.text)) >= 3
    assert _grid_ids(c.get("/persons", params={"min_faces": "1"}).text) == order
    top = order[0]
    assert f"{len(truth[top])} face(s)" in grid.text
    # keyset pages: disjoint, in order, together the whole list
    seen, url = [], "/persons?min_faces=1&limit=4"
    while url:
        page = c.get(url.replace("&amp;", "&"))
        seen += _grid_ids(page.text)
        m = re.search(r'id="next" href="([^"]+)"', page.text)
        url = m.group(1) if m else None
    assert seen == order
    # a person: its faces (each a link to its face and its image) and images
    detail = c.get(f"/persons/{top}")
    assert detail.status_code == 200 and _face_ids(detail.text) == truth[top]
    for fid in truth[top]:
        assert f'href="/faces/{fid}"' in detail.text
    engine = open_engine(site.url, readonly=True)
    with engine.connect() as conn:
        shas = {
            r[0]
            for r in conn.execute(
                select(s.images.c.sha256)
                .select_from(s.faces.join(s.analyses, s.analyses.c.id == s.faces.c.analysis_id).join(s.images, s.images.c.id == s.analyses.c.image_id))
                .where(s.faces.c.id.in_(truth[top]))
            )
        }
        descriptors = {
            r.id: identity.unpack(r.descriptor) for r in conn.execute(select(s.faces.c.id, s.faces.c.descriptor).where(s.faces.c.descriptor.is_not(None)))
        }
    engine.dispose()
    listed = set(re.findall(r'<td class="path"><a href="/images/([0-9a-f]{64})"', detail.text))
    assert listed == shas and f"in <b>{len(shas)}</b> image(s)" in detail.text
    # faces paged by face id
    first = c.get(f"/persons/{top}", params={"limit": "1"})
    assert _face_ids(first.text) == truth[top][:1]
    nxt = re.search(r'id="next" href="([^"]+)"', first.text).group(1).replace("&amp;", "&")
    assert _face_ids(c.get(nxt).text) == truth[top][1:2]
    # the face page names the person and links to the similar faces
    face_id = truth[top][0]
    face_page = c.get(f"/faces/{face_id}").text
    assert f'<a href="/persons/{top}">person {top}</a>' in face_page and f'href="/faces/{face_id}/similar"' in face_page
    # similar faces: the nearest stored faces with their distances (float16 descriptors), nearest first
    page = c.get(f"/faces/{face_id}/similar")
    assert page.status_code == 200
    got = [(int(f), float(d)) for f, d in re.findall(r'class="match" data-face-id="(\d+)".*?class="num distance">([\d.]+)<', page.text, re.S)]
    # every analysis of the dev database is its image's latest: every face is current
    ref = {f: float(np.linalg.norm(v - descriptors[face_id])) for f, v in descriptors.items() if f != face_id}
    assert [d for _, d in got] == sorted(d for _, d in got) and len(got) <= 50
    assert all(abs(ref[f] - d) < 2e-3 for f, d in got)
    assert {f for f, _ in got} >= {f for f, d in ref.items() if d < 0.6 - 2e-3} and all(d <= 0.6 for _, d in got)
    assert set(truth[top]) & {f for f, _ in got}  # a cluster member has a neighbour in its cluster
    assert f'href="/persons/{top}"' in page.text
    narrow = c.get(f"/faces/{face_id}/similar", params={"max_distance": "0.4", "limit": "2"})
    assert len(re.findall(r'class="match"', narrow.text)) == min(2, sum(1 for d in ref.values() if d <= 0.4))


# --------------------------------------------------------------------------------------------
# Decisions: merge, move, split, release, name (audited; kept by recluster)


def test_merge_split_release_and_name_are_recorded_and_survive_recluster(site: Site) -> None:
    c, truth = site.client, _persons_of(site.url)
    order = sorted(truth, key=lambda p: (-len(truth[p]), p))
    keep, other = order[0], order[1]
    # merge other into keep: 303 back to keep's page, every face of both pinned to keep
    r = _post(site, f"/persons/{keep}/merge", {"other": str(other), "reviewer": "analyst-1", "back": f"/persons/{keep}"})
    assert r.status_code == 303
    loc = urlsplit(r.headers["location"])
    assert loc.path == f"/persons/{keep}" and parse_qs(loc.query) == {"saved": ["merged"], "merged": [str(other)], "reviewer": ["analyst-1"]}
    page = c.get(r.headers["location"])
    assert f"Person {other} was merged into this person" in page.text
    merged_faces = sorted(truth[keep] + truth[other])
    assert _face_ids(page.text) == merged_faces
    pins = _pins(site.url)
    assert all(pins[f] == (keep, True) for f in merged_faces)
    # the merged person's page leads to the surviving one
    gone = c.get(f"/persons/{other}", follow_redirects=False)
    assert gone.status_code == 302 and urlsplit(gone.headers["location"]).path == f"/persons/{keep}"
    # split one face off into a new person, move another to an existing person, release a third
    split, moved, released = merged_faces[0], merged_faces[1], merged_faces[2]
    r = _post(site, f"/faces/{split}/person", {"person": "", "reviewer": "analyst-1", "back": f"/persons/{keep}"})
    assert r.status_code == 303
    q = parse_qs(urlsplit(r.headers["location"]).query)
    new_person = int(q["to"][0])
    assert q["saved"] == ["moved"] and new_person not in truth and _pins(site.url)[split] == (new_person, True)
    third = order[2]
    r = _post(site, f"/faces/{moved}/person", {"person": str(third)})
    assert r.status_code == 303 and urlsplit(r.headers["location"]).path == f"/faces/{moved}"
    r = _post(site, f"/faces/{released}/person", {"release": "1", "back": "https://evil.example/"})
    assert r.status_code == 303 and r.headers["location"].startswith(f"/faces/{released}?")  # never an address from the form
    assert released not in _pins(site.url)
    # name the person (escaped when shown)
    name = "Suspect <b>A</b> \u202eevil"
    r = _post(site, f"/persons/{keep}/name", {"name": name, "reviewer": "analyst-1"})
    assert r.status_code == 303
    page = c.get(f"/persons/{keep}").text
    assert "Suspect &lt;b&gt;A&lt;/b&gt; \\u202eevil" in page and "<b>A</b>" not in page and "\u202e" not in page
    assert _face_ids(page) == [f for f in merged_faces if f not in (split, moved, released)]
    assert "Suspect &lt;b&gt;A&lt;/b&gt;" in c.get("/persons", params={"name": "suspect", "min_faces": "1"}).text
    assert _grid_ids(c.get("/persons", params={"name": "nobody-has-this-name"}).text) == []
    assert "Suspect &lt;b&gt;A&lt;/b&gt;" in c.get(f"/faces/{merged_faces[-1]}").text
    # the audit trail
    d = _decisions(site.url)
    assert [(x["action"], x["person_id"], x["other_id"], x["face_id"]) for x in d if x["action"] != "assign" or x["person_id"] != keep] == [
        ("merge", keep, other, None),
        ("assign", new_person, None, split),
        ("assign", third, None, moved),
        ("release", None, None, released),
        ("name", keep, None, None),
    ]
    assert sum(1 for x in d if x["action"] == "assign" and x["person_id"] == keep) == len(merged_faces)
    assert {x["reviewer"] for x in d if x["action"] in ("merge", "name")} == {"analyst-1"} and d[-1]["name"] == name.strip()
    # recluster keeps every decision
    engine = open_store_engine(site.url)
    ps.recluster(engine, IdentityConfig())
    engine.dispose()
    pins = _pins(site.url)
    assert pins[split] == (new_person, True) and pins[moved] == (third, True) and released not in pins
    assert all(pins[f] == (keep, True) for f in merged_faces if f not in (split, moved, released))
    after = c.get(f"/persons/{keep}").text
    assert "Suspect &lt;b&gt;A&lt;/b&gt;" in after and set(_face_ids(after)) >= {f for f in merged_faces if f not in (split, moved, released)}
    # from the similar page: put a match into the query face's person
    probe = next(f for f in merged_faces if f not in (split, moved, released))
    sim = c.get(f"/faces/{probe}/similar").text
    outsider = next(
        (int(f) for f, p in re.findall(r'class="match" data-face-id="(\d+)".*?class="person">(.*?)</td>', sim, re.S) if f'/persons/{keep}"' not in p), None
    )
    if outsider is not None:
        r = _post(site, f"/faces/{outsider}/person", {"person": str(keep), "back": f"/faces/{probe}/similar"})
        assert r.status_code == 303 and urlsplit(r.headers["location"]).path == f"/faces/{probe}/similar"
        assert _pins(site.url)[outsider] == (keep, True)


# --------------------------------------------------------------------------------------------
# Refusals and bad input


def test_bad_values_are_400_pages_and_refusals_are_403(site: Site) -> None:
    c, truth = site.client, _persons_of(site.url)
    p1, p2 = sorted(truth)[:2]
    face_id = truth[p1][0]
    before = _decisions(site.url)
    bad_posts = [
        (f"/persons/{p1}/merge", {"other": str(p1)}, "cannot merge person"),
        (f"/persons/{p1}/merge", {"other": "999999"}, "person 999999 does not exist"),
        (f"/persons/{p1}/merge", {"other": "x1"}, "other (the person to merge into this one): must be a whole number"),
        (f"/persons/{p1}/merge", {}, "other: give the id"),
        ("/persons/999999/merge", {"other": str(p2)}, "person 999999 does not exist"),
        (f"/faces/{face_id}/person", {"person": "-3"}, "must be a whole number"),
        (f"/faces/{face_id}/person", {"person": "999999"}, "person 999999 does not exist"),
        ("/faces/999999/person", {"person": ""}, "face 999999 does not exist"),
        (f"/persons/{p1}/name", {"name": "x" * 201}, "name must be at most 200 characters"),
        (f"/persons/{p1}/name", {"name": "two\nlines"}, "must not contain control characters"),
        (f"/persons/{p1}/name", {"name": "ok", "reviewer": "r" * 129}, "reviewer must be at most 128 characters"),
    ]
    for path, data, message in bad_posts:
        r = _post(site, path, data)
        assert r.status_code == 400 and "not recorded:" in r.text and message in r.text, (path, data, r.text[-400:])
        assert "Traceback" not in r.text and 'id="error"' in r.text
    bad_gets = [
        ("/persons?min_faces=0", "min_faces: must be a whole number from 1"),
        ("/persons?limit=100000", "limit: must be"),
        ("/persons?after=3", "after: must be FACES-PERSON"),
        ("/persons?name=" + "n" * 201, "name: must be at most 200"),
        (f"/persons/{p1}?after=abc", "after: must be a whole number"),
        (f"/persons/{p1}?limit=0", "limit: must be"),
        (f"/faces/{face_id}/similar?max_distance=nan", "max_distance: must be a number"),
        (f"/faces/{face_id}/similar?max_distance=-1", "max_distance"),
        (f"/faces/{face_id}/similar?limit=201", "limit: must be"),
    ]
    for path, message in bad_gets:
        r = c.get(path)
        assert r.status_code == 400 and message in r.text, (path, r.text[-400:])
    assert c.get("/persons/999999").status_code == 404 and c.get("/faces/999999/similar").status_code == 404
    assert c.get("/persons/0").status_code == 400
    # refusals: no token, a stale token, cross-site, not a form
    r = c.post(f"/persons/{p1}/name", data={"name": "x"}, headers=SAME_SITE, follow_redirects=False)
    assert r.status_code == 403 and "form token" in r.text
    r = c.post(f"/persons/{p1}/merge", data={"csrf": "stale", "other": str(p2)}, headers=SAME_SITE, follow_redirects=False)
    assert r.status_code == 403
    r = c.post(
        f"/persons/{p1}/merge",
        data={"csrf": site.token, "other": str(p2)},
        headers={"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
        follow_redirects=False,
    )
    assert r.status_code == 403 and "Sec-Fetch-Site" in r.text
    r = c.post(f"/faces/{face_id}/person", content=b'{"person": ""}', headers={**SAME_SITE, "Content-Type": "application/json"}, follow_redirects=False)
    assert r.status_code == 415
    r = c.post(f"/persons/{p1}/name", data={"csrf": site.token, **{f"f{k}": "x" for k in range(40)}}, headers=SAME_SITE)
    assert r.status_code == 400
    assert _decisions(site.url) == before and _persons_of(site.url) == truth  # nothing was recorded


def test_read_only_page_has_no_decision_routes_nor_forms(real_db: DevDB) -> None:
    engine = open_store_engine(real_db.url)
    ps.recluster(engine, IdentityConfig())
    engine.dispose()
    truth = _persons_of(real_db.url)
    p1 = max(truth, key=lambda p: len(truth[p]))
    client, app = _client(real_db.url, review=False)
    try:
        page = client.get(f"/persons/{p1}")
        assert page.status_code == 200 and _face_ids(page.text) == truth[p1]
        assert "<form" not in page.text.split("<h3>Faces</h3>")[1] and 'id="merge-form"' not in page.text and "csrf" not in page.text
        assert 'class="same"' not in client.get(f"/faces/{truth[p1][0]}/similar").text
        for path, data in [(f"/persons/{p1}/merge", {"other": "1"}), (f"/persons/{p1}/name", {"name": "x"}), (f"/faces/{truth[p1][0]}/person", {"person": ""})]:
            r = client.post(path, data=data, headers=SAME_SITE, follow_redirects=False)
            assert r.status_code in (404, 405), path
        assert _decisions(real_db.url) == [] and _persons_of(real_db.url) == truth
    finally:
        app.close()


def test_empty_database(tmp_path) -> None:  # noqa: ANN001
    """A database with no persons yet: an empty grid, no such person."""
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    open_store_engine(url).dispose()
    client, app = _client(url, review=False)
    try:
        page = client.get("/persons")
        assert page.status_code == 200 and _grid_ids(page.text) == []
        assert client.get("/persons/1").status_code == 404
    finally:
        app.close()
