"""The review page over HTTP (Starlette's test client): pages and filters, pictures, reviews,
and the attacks it must refuse: path traversal, reading outside the evidence roots, cross-site
review posts, foreign Host headers, writes on read-only routes, binding beyond loopback."""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Iterator
from urllib.parse import parse_qs

import cv2
import numpy as np
import pytest
from sqlalchemy import insert, select

pytest.importorskip("starlette", reason="the web extra is not installed: pip install -e '.[web]'")
pytest.importorskip("httpx", reason="the test client needs httpx: pip install -e '.[web]'")

from starlette.testclient import TestClient  # noqa: E402

from daemon import config  # noqa: E402
from daemon.cli import main  # noqa: E402
from daemon.store import reviews as rv  # noqa: E402
from daemon.store import schema as s  # noqa: E402
from daemon.store.engine import open_engine, open_store_engine  # noqa: E402
from daemon.web import create_app  # noqa: E402
from daemon.web.security import host_allowed, is_loopback  # noqa: E402
from tests.query_fixtures import DevDB, copy_db, dev_db, load_world, real_db  # noqa: F401 - fixtures

PORT = 8765
BASE = f"http://127.0.0.1:{PORT}"


def _client(url: str, **kw) -> tuple[TestClient, object]:  # noqa: ANN003
    app = create_app(config.parse({"database": url}, check_paths=False), port=PORT, **kw)
    return TestClient(app, base_url=BASE), app


@pytest.fixture
def web(dev_db: DevDB, tmp_path) -> Iterator[tuple[TestClient, DevDB]]:  # noqa: ANN001
    """A page over a private SQLite copy of the dev database."""
    url = f"sqlite:///{tmp_path / 'web.db'}"
    copy_db(dev_db.url, url)
    client, app = _client(url)
    yield client, DevDB(url, dev_db.ev, dev_db.ev2, dev_db.out, dev_db.bundle, dev_db.dup_sha)
    app.close()


def _token(client: TestClient, face_id: int) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', client.get(f"/faces/{face_id}").text).group(1)


def _decode(resp) -> np.ndarray:  # noqa: ANN001
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/jpeg"
    return cv2.imdecode(np.frombuffer(resp.content, np.uint8), cv2.IMREAD_COLOR)


# --------------------------------------------------------------------------------------------
# Pages, on SQLite and PostgreSQL


def test_pages_filters_pictures_and_a_review(real_db) -> None:  # noqa: ANN001
    client, app = _client(real_db.url)
    try:
        w = load_world(real_db.url)
        page = client.get("/faces")
        assert page.status_code == 200
        ids = [int(x) for x in re.findall(r'data-face-id="(\d+)"', page.text)]
        assert len(ids) == min(50, len(w["faces"]))
        assert f"<b>{len(w['faces'])}</b> face(s) match" in page.text
        page = client.get("/faces", params={"gender": "female", "limit": "10"})
        genders = re.findall(r'<td class="g-(\w+)">(\w+)</td>', page.text)
        assert genders and all(g == ("female", "female") for g in genders)
        nxt = re.search(r'id="next" href="([^"]+)"', page.text).group(1).replace("&amp;", "&")
        page2 = client.get("/faces" + nxt)
        assert set(re.findall(r'data-face-id="(\d+)"', page2.text)).isdisjoint(re.findall(r'data-face-id="(\d+)"', page.text))
        bad = client.get("/faces", params={"p_male_min": "lots", "gender": "dog"})
        assert bad.status_code == 400 and "--p-male-min: must be a number" in bad.text and "--gender: must be one of" in bad.text
        assert client.get("/images").status_code == 200 and client.get("/images", params={"status": "failed"}).text.count('class="image"') == 2
        assert client.get("/stats").status_code == 200
        # one image with its boxes, its picture, the annotated download and a face
        wider = sorted((real_db.ev2 / "wider").iterdir())[0]
        sha = hashlib.sha256(wider.read_bytes()).hexdigest()
        img_page = client.get(f"/images/{sha}")
        boxes = re.findall(r'id="box-(\d+)"', img_page.text)
        assert img_page.status_code == 200 and len(boxes) >= 1
        orig = cv2.imread(str(wider))
        assert _decode(client.get(f"/media/image/{sha}.jpg")).shape == orig.shape
        ann = client.get(f"/media/annotated/{sha}.jpg")
        assert ann.headers["content-disposition"] == f'attachment; filename="{sha[:16]}.annotated.jpg"'
        assert _decode(ann).shape == orig.shape
        face_id = int(boxes[0])
        assert _decode(client.get(f"/media/face/{face_id}.jpg")).shape[0] >= 320
        assert max(_decode(client.get(f"/media/face/{face_id}.jpg?size=thumb")).shape[:2]) <= 96
        # a review, then the face shows it in the list
        tok = _token(client, face_id)
        r = client.post(f"/faces/{face_id}/review", data={"csrf": tok, "status": "corrected", "label": "not_face", "note": "a poster"},
                        headers={"Origin": BASE, "Sec-Fetch-Site": "same-origin"}, follow_redirects=False)
        assert (r.status_code, r.headers["location"]) == (303, f"/faces/{face_id}?saved=1")
        listed = client.get("/faces", params={"review": "reviewed"}).text
        assert re.findall(r'data-face-id="(\d+)"', listed) == [str(face_id)] and "corrected: not_face" in listed
        face_page = client.get(f"/faces/{face_id}").text
        assert "a poster" in face_page and 'id="final">not_face' in face_page
    finally:
        app.close()


# --------------------------------------------------------------------------------------------
# Attacks (SQLite copy of the dev database)


TRAVERSALS = [
    "/media/image/../../../../etc/passwd",
    "/media/image/..%2F..%2F..%2F..%2Fetc%2Fpasswd.jpg",
    "/media/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd.jpg",
    "/media/image/....//....//etc/passwd.jpg",
    "/media/image/%252e%252e%252fetc%252fpasswd.jpg",
    "/media/image/etc%00passwd.jpg",
    "/media/annotated/..%5c..%5cetc%5cpasswd.jpg",
    "/images/..%2F..%2Fetc%2Fpasswd",
    "/images/%2Fetc%2Fpasswd",
    "/media/face/..%2F..%2Fetc%2Fpasswd.jpg",
    "/media/face/1.jpg/../../../../etc/passwd",
    "/media/face/-1.jpg",
    "/static/../../etc/passwd",
    "/faces/1/../../../etc/passwd",
    "/media/image/" + "0" * 63 + "g.jpg",
    "//etc/passwd",
]


@pytest.mark.parametrize("url", TRAVERSALS)
def test_path_traversal_is_refused(web, url) -> None:  # noqa: ANN001
    client, _ = web
    r = client.get(url)
    assert r.status_code in (400, 404), (url, r.status_code)
    assert b"root:" not in r.content and b"daemon:" not in r.content
    assert r.headers.get("content-type", "").split(";")[0] in ("text/plain", "text/html")


def _record(url: str, sha: str, path: str, root: str) -> None:
    engine = open_store_engine(url)
    with engine.begin() as c:
        iid = c.execute(select(s.images.c.id).where(s.images.c.sha256 == sha)).scalar()
        if iid is None:
            iid = c.execute(insert(s.images).values(sha256=sha, md5="0" * 32, size=1, first_seen=1.0)).inserted_primary_key[0]
        c.execute(insert(s.files).values(path=path, root=root, size=1, mtime_ns=1, state="done", image_id=iid, attempts=1,
                                         first_seen=1.0, last_seen=1.0, updated=1.0))
    engine.dispose()


def test_images_are_read_only_inside_their_root_and_only_with_their_hash(web, tmp_path) -> None:  # noqa: ANN001
    client, db = web
    src = sorted((db.ev / "lfw").iterdir())[5]
    data = src.read_bytes()
    # 1. a recorded path outside its root (a crafted row): the file exists and has the right hash
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.jpg"
    secret.write_bytes(data + b"\x00")  # a distinct content
    sha_secret = hashlib.sha256(secret.read_bytes()).hexdigest()
    root = tmp_path / "root"
    root.mkdir()
    _record(db.url, sha_secret, str(secret), str(root))
    r = client.get(f"/media/image/{sha_secret}.jpg")
    assert r.status_code == 404 and r.text.startswith("image not available (outside_roots): ")
    # 2. a symbolic link inside the root to a file outside it
    link = root / "link.jpg"
    link.symlink_to(secret)
    _record(db.url, sha_secret, str(link), str(root))
    assert client.get(f"/media/image/{sha_secret}.jpg").text.startswith("image not available (outside_roots): ")
    # 3. a recorded path whose content changed: never served as the recorded image
    changed = root / "changed.jpg"
    changed.write_bytes(data)
    fake = hashlib.sha256(b"what was analysed").hexdigest()
    _record(db.url, fake, str(changed), str(root))
    r = client.get(f"/media/image/{fake}.jpg")
    assert r.status_code == 409 and r.text.startswith("image not available (changed): the evidence file changed since it was analysed")
    # 4. a genuine one in its root is served
    good = root / "good.jpg"
    shutil.copyfile(src, good)
    _record(db.url, hashlib.sha256(data).hexdigest(), str(good), str(root))
    assert client.get(f"/media/image/{hashlib.sha256(data).hexdigest()}.jpg").status_code == 200


def _post(client: TestClient, face_id: int, data: dict, headers: dict | None = None):  # noqa: ANN202
    return client.post(f"/faces/{face_id}/review", data=data, headers=headers or {}, follow_redirects=False)


def _reviews(url: str) -> int:
    engine = open_engine(url, readonly=True)
    with engine.connect() as c:
        n = len(c.execute(select(rv.reviews.c.id)).all())
    engine.dispose()
    return n


def test_cross_site_review_posts_are_refused(web) -> None:  # noqa: ANN001
    client, db = web
    face_id = load_world(db.url)["faces"][0]["id"]
    tok = _token(client, face_id)
    ok = {"csrf": tok, "status": "ignored"}
    cases = [
        ({"status": "ignored"}, {"Origin": BASE}, 403, "missing or stale form token"),
        ({"csrf": "guess", "status": "ignored"}, {"Origin": BASE}, 403, "missing or stale form token"),
        (ok, {"Origin": "http://evil.example"}, 403, "is not this server"),
        (ok, {"Origin": "null"}, 403, "is not this server"),
        (ok, {"Origin": "http://127.0.0.1:9999"}, 403, "is not this server"),
        (ok, {"Sec-Fetch-Site": "cross-site"}, 403, "Sec-Fetch-Site is 'cross-site'"),
        (ok, {"Sec-Fetch-Site": "same-site"}, 403, "Sec-Fetch-Site is 'same-site'"),
    ]
    for data, headers, status, text in cases:
        r = _post(client, face_id, data, headers)
        assert (r.status_code, text in r.text) == (status, True), (data, headers, r.text)
    # a form posted as JSON or multipart (CORS-simple types other than urlencoded) is refused too
    r = client.post(f"/faces/{face_id}/review", content=b'{"csrf": "x"}', headers={"Content-Type": "text/plain", "Origin": BASE})
    assert r.status_code in (403, 415)
    assert _reviews(db.url) == 0
    # the same-origin form with the token is accepted; bad values are refused with the reason
    assert _post(client, face_id, {**ok, "status": "corrected"}, {"Origin": BASE}).text == "review not recorded: a correction needs a label (female, male or not_face)"
    assert _post(client, face_id, ok, {"Origin": BASE, "Sec-Fetch-Site": "same-origin"}).status_code == 303
    assert _post(client, face_id, ok).status_code == 303  # a non-browser client with the token
    assert _reviews(db.url) == 2


def test_every_other_route_is_read_only(web) -> None:  # noqa: ANN001
    client, db = web
    face_id = load_world(db.url)["faces"][0]["id"]
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        for url in ("/", "/faces", f"/faces/{face_id}", "/images", "/stats", f"/media/face/{face_id}.jpg"):
            assert client.request(method, url).status_code == 405, (method, url)
    assert client.request("PUT", f"/faces/{face_id}/review").status_code == 405


def test_read_only_page_has_no_write_path(dev_db, tmp_path) -> None:  # noqa: ANN001
    url = f"sqlite:///{tmp_path / 'ro.db'}"
    copy_db(dev_db.url, url)
    client, app = _client(url, review=False)
    try:
        face_id = load_world(url)["faces"][0]["id"]
        page = client.get(f"/faces/{face_id}").text
        assert 'name="csrf"' not in page and "read-only" in page
        assert client.post(f"/faces/{face_id}/review", data={"status": "ignored"}, headers={"Origin": BASE}).status_code in (404, 405)
        assert _reviews(url) == 0
    finally:
        app.close()


def test_foreign_host_headers_and_security_headers(web) -> None:  # noqa: ANN001
    client, _ = web
    for host in ("evil.example", "evil.example:8765", "127.0.0.1:9999", "127.0.0.1.evil.example", "localhost:1"):
        r = client.get("/faces", headers={"Host": host})
        assert r.status_code == 421, host
    for host in ("127.0.0.1:8765", "localhost:8765"):
        assert client.get("/stats", headers={"Host": host}).status_code == 200
    r = client.get("/stats")
    assert "script-src" not in r.headers["content-security-policy"] and "default-src 'none'" in r.headers["content-security-policy"]
    assert (r.headers["x-content-type-options"], r.headers["cache-control"], r.headers["x-frame-options"]) == ("nosniff", "no-store", "DENY")


@pytest.mark.parametrize(("host", "loop"), [("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("[::1]", True), ("localhost", True),
                                            ("0.0.0.0", False), ("192.168.1.5", False), ("::", False), ("example.org", False)])
def test_is_loopback(host, loop) -> None:  # noqa: ANN001
    assert is_loopback(host) is loop


def test_host_allowed() -> None:
    names = frozenset({"127.0.0.1", "localhost"})
    assert host_allowed("127.0.0.1:8765", names, 8765) and host_allowed("LOCALHOST:8765", names, 8765)
    assert not host_allowed("127.0.0.1:8766", names, 8765) and not host_allowed("127.0.0.1", names, 8765)
    assert not host_allowed("evil:8765", names, 8765) and not host_allowed("", names, 8765) and not host_allowed("a b", names, None)
    assert host_allowed("[::1]:80", frozenset({"[::1]"}), 80)


def test_serve_refuses_a_non_loopback_address(capsys, dev_db) -> None:  # noqa: ANN001
    for host in ("0.0.0.0", "192.168.1.5", "example.org"):
        assert main(["serve", "--db", dev_db.url, "--host", host, "--port", "1"]) == 2
        err = capsys.readouterr().err
        assert f"--host {host} is not a loopback address" in err and "--allow-remote" in err


# --------------------------------------------------------------------------------------------
# Keyset pages: the links carry the position of the first / last row shown


@pytest.fixture
def ties_web(db_url: str) -> Iterator[tuple[TestClient, str]]:
    """The page over a database whose sort keys tie a lot (SQLite and PostgreSQL)."""
    from tests.test_queries import build_ties

    build_ties(db_url)
    client, app = _client(db_url)
    yield client, db_url
    app.close()


def _face_ids(html: str) -> list[int]:
    return [int(x) for x in re.findall(r'data-face-id="(\d+)"', html)]


def _link(html: str, name: str) -> str | None:
    import html as html_mod

    m = re.search(rf'id="{name}" href="([^"]+)"', html)
    return html_mod.unescape(m.group(1)) if m else None


def _follow(client: TestClient, route: str, page, rel: str, rows, check=lambda link, page: None):  # noqa: ANN001, ANN201
    """From ``page``, follow its ``rel`` link ("next" or "prev") until there is none: the ``rows``
    of every page reached (``page``'s first), and the last page. ``check(link, page)`` runs on
    every link followed and the page it gave."""
    out = []
    while True:
        assert page.status_code == 200
        out.append(rows(page.text))
        link = _link(page.text, rel)
        if link is None:
            return out, page
        page = client.get(route + link)
        check(link, page)


def _all_faces(url: str, sort: str, bundle: str) -> list[int]:
    from daemon.queries import read
    from daemon.queries.filters import Cut, parse

    engine = open_engine(url, readonly=True)
    with engine.connect() as c:
        f = parse({"sort": sort, "bundle": bundle})
        ids = [r["face_id"] for r in read.faces(c, f, read.scope(c, f, Cut()))]
    engine.dispose()
    return ids


def test_faces_pages_follow_next_and_previous_links(ties_web) -> None:  # noqa: ANN001
    client, url = ties_web
    for sort in ("path", "-p_male", "p_male", "age", "-age", "seen", "-seen", "-score", "width", "id"):
        full = _all_faces(url, sort, "all")
        page = client.get("/faces", params={"sort": sort, "limit": "4", "bundle": "all"})
        assert _link(page.text, "prev") is None and _link(page.text, "first") is None

        def forward(nxt: str, page, sort: str = sort) -> None:  # noqa: ANN001
            q = parse_qs(nxt[1:])
            assert set(q) == {"bundle", "limit", "after"} | ({"sort"} if sort != "path" else set()) and q["bundle"] == ["all"]
            assert parse_qs(_link(page.text, "first")[1:]) == {k: v for k, v in q.items() if k != "after"}

        def backward(prev: str, page) -> None:  # noqa: ANN001
            assert "before=" in prev

        pages, page = _follow(client, "/faces", page, "next", _face_ids, forward)
        assert [i for p in pages for i in p] == full, sort  # every face once, in order, ties and all
        assert all(len(p) == 4 for p in pages[:-1])
        back, _ = _follow(client, "/faces", page, "prev", _face_ids, backward)
        assert back == pages[::-1], sort
    # offset still works (old links); its next link is a position
    page = client.get("/faces", params={"sort": "id", "limit": "4", "offset": "4"})
    full = _all_faces(url, "id", "latest")
    assert _face_ids(page.text) == full[4:8] and "showing 5–8" in page.text
    assert _face_ids(client.get("/faces" + _link(page.text, "next")).text) == full[8:12]
    assert _face_ids(client.get("/faces" + _link(page.text, "prev")).text) == full[:4]
    # a position that is not one: a clear 400
    bad = client.get("/faces", params={"sort": "p_male", "after": "lots"})
    assert bad.status_code == 400 and "--after: &#39;lots&#39; has 1 field(s), expected 2" in bad.text


def _image_paths(html: str) -> list[str]:
    return [re.findall(r'<td class="path">([^<]*)', row)[-1].strip() for row in re.findall(r'<tr class="image">(.*?)</tr>', html, re.S)]


def _all_images(url: str, sort: str) -> list[str]:
    from daemon.queries import read
    from daemon.queries.filters import Cut, parse

    engine = open_engine(url, readonly=True)
    with engine.connect() as c:
        f = parse({"sort": sort})
        paths = [r["path"] for r in read.images(c, f, read.scope(c, f, Cut()))]
    engine.dispose()
    return paths


def test_images_pages_follow_next_and_previous_links(ties_web) -> None:  # noqa: ANN001
    client, url = ties_web
    for sort in ("path", "-faces", "size", "-seen", "sha256"):
        page = client.get("/images", params={"sort": sort, "limit": "3"})
        pages, page = _follow(client, "/images", page, "next", _image_paths)
        flat = [p for ps in pages for p in ps]
        assert flat == _all_images(url, sort) and len(set(flat)) == 11, (sort, flat)
        back, _ = _follow(client, "/images", page, "prev", _image_paths)
        assert back == pages[::-1], sort


def test_face_count_stops_at_the_cap(ties_web, monkeypatch) -> None:  # noqa: ANN001
    from daemon.web import faces as faces_pages

    client, _ = ties_web
    page = client.get("/faces", params={"gender": "female"})
    exact = len(_face_ids(page.text))
    assert f"<b>{exact}</b> face(s) match" in page.text and "exact-count" not in page.text
    monkeypatch.setattr(faces_pages, "COUNT_CAP", 5)
    page = client.get("/faces", params={"gender": "female", "limit": "3"})
    assert "<b>more than 5</b> faces match" in page.text
    stats = client.get("/stats" + _link(page.text, "exact-count")[len("/stats"):])
    assert stats.status_code == 200 and f'<tr><td>faces</td><td class="num">{exact}</td></tr>' in stats.text
