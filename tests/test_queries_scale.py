"""Every filter, sort and format on a synthetic database of 100,000 faces, on SQLite and
PostgreSQL. ``benchmarks/query_bench.py`` builds the database and times these queries and pages;
this test checks their answers at that size: each filter's count equals the rows its pages
yield when followed by position, every row satisfies the filter, every format carries the same
rows, whole-database exports carry every face, and every page of the review page loads."""

from __future__ import annotations

import csv
import fnmatch
import html
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from benchmarks import query_bench as qb
from daemon.cli import main
from daemon.queries import read
from daemon.queries.filters import Cut, Filters, parse
from daemon.store.engine import open_engine

N_FACES = int(os.environ.get("FG_TEST_SCALE_FACES", 100_000))  # smaller only to debug the test
PAGE = 5_000


@dataclass
class Big:
    url: str
    facts: dict


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def big(request, tmp_path_factory) -> Iterator[Big]:  # noqa: ANN001
    """The benchmark's 100,000-face database (one per dialect, for the whole module)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('big') / 'big.db'}"
        yield Big(url, qb.build(url, N_FACES))
        return
    import uuid

    from sqlalchemy import create_engine, text

    server = request.getfixturevalue("pg_server_url")
    name = f"t_big_{uuid.uuid4().hex[:8]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE SCHEMA "{name}"'))
    url = f"{server}{'&' if '?' in server else '?'}options=-csearch_path%3D{name}"
    try:
        yield Big(url, qb.build(url, N_FACES))
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP SCHEMA "{name}" CASCADE'))
        admin.dispose()


def _filters(vals: dict, facts: dict) -> Filters:
    return parse({k: v for k, v in qb._vals(vals, facts).items() if k not in ("offset", "after")})


def _holds(name: str, row: dict, cut: Cut, sha: str) -> bool:
    """Whether ``row`` satisfies the filter of the benchmark query ``name`` (from its own fields;
    filters without a check here are covered exactly by test_queries.py)."""
    lo, hi = cut.threshold - cut.margin, cut.threshold + cut.margin
    if row["bundle"] != {"every bundle": row["bundle"], "older bundle": qb.OLD}.get(name.split(": ")[1], qb.NEW):
        return False
    checks = {
        "female": row["gender"] == "female" and row["p_male"] <= lo,
        "uncertain": row["gender"] == "uncertain" and lo < row["p_male"] < hi,
        "p(male) 0.2-0.3": 0.2 <= row["p_male"] <= 0.3,
        "possible minors": row["age"] is not None and row["age"] - row["age_std"] < 18,
        "likely minors": row["age"] is not None and row["age"] + row["age_std"] < 18 and row["width_px"] >= 40,
        "score >= 0.9": row["score"] >= 0.9,
        "path glob": fnmatch.fnmatchcase(row["path"] or "", "*/Pictures/2019/*"),
        "path prefix": (row["path"] or "").startswith("/evidence/case-a/phone/DCIM"),
        "root case-b/usb": row["root"] == "/evidence/case-b/usb",
        "reviewed": row["review"] is not None,
        "final gender male": row["final_gender"] == "male",
        "sha256 prefix": row["sha256"].startswith(sha[:8]),
    }
    for key, ok in checks.items():
        if key in name:
            return ok
    return row["gender"] == ("male" if row["p_male"] >= hi else "female" if row["p_male"] <= lo else "uncertain")


def _walk(c, f: Filters, sc) -> Iterator[dict]:  # noqa: ANN001
    """Every row of ``f``'s list, following the "next" positions ``PAGE`` rows at a time."""
    f = f.page(PAGE)
    while True:
        page = read.face_page(c, f, sc)
        yield from page.rows
        if not page.next:
            return
        f = f.seek(after=page.next)


def test_every_filter_counts_pages_and_rows_agree(big: Big) -> None:
    engine = open_engine(big.url, readonly=True)
    seen_names = 0
    try:
        with engine.connect() as c:
            for name, vals in qb.QUERIES:
                if "DEEP" in name:
                    continue
                f = _filters(vals, big.facts)
                sc = read.scope(c, f, Cut())
                total = read.count_faces(c, f.page(None), sc)
                rows = list(_walk(c, f, sc))
                ids = [r["face_id"] for r in rows]
                assert len(ids) == total and len(set(ids)) == total, name
                assert total <= big.facts["faces_total"] and (total > 0 or N_FACES < 100_000), name
                bad = [r["face_id"] for r in rows if not _holds(name, r, sc.cut, big.facts["sha"])]
                assert not bad, (name, bad[:5])
                seen_names += 1
            assert seen_names == 20
            # every sort, by position, deep into the list: the same order as the first page's
            for sort in ("path", "-p_male", "age", "-width", "score", "sha256", "-seen", "id"):
                f = parse({"sort": sort})
                sc = read.scope(c, f, Cut())
                half, tenth = N_FACES // 2, N_FACES // 10
                head = [r["face_id"] for r in read.faces(c, f.page(half + tenth), sc)]
                after = read.face_page(c, f.page(1, half - 1), sc).next  # after row ``half``
                deep = [r["face_id"] for r in read.face_page(c, f.page(tenth).seek(after=after), sc).rows]
                assert deep == head[half:], sort
    finally:
        engine.dispose()


def _cli(capsys, *argv: str) -> str:  # noqa: ANN001
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_every_format_carries_the_same_rows(big: Big, capsys, tmp_path) -> None:  # noqa: ANN001
    db = ("--db", big.url)
    for args in (("--gender", "female", "--sort", "p_male:desc"), ("--minors", "possible", "--width-min", "30"),
                 ("--final-gender", "male", "--root", "/evidence/case-b/usb"), ("--bundle", "all", "--sort", "age")):
        page = ("--limit", "300", *args)
        as_json = [r["face_id"] for r in json.loads(_cli(capsys, "faces", *db, *page, "--format", "json"))["faces"]]
        as_jsonl = [json.loads(line)["face_id"] for line in _cli(capsys, "faces", *db, *page, "--format", "jsonl").splitlines()]
        as_csv = [int(r["face_id"]) for r in csv.DictReader(io.StringIO(_cli(capsys, "faces", *db, *page, "--format", "csv")))]
        table = _cli(capsys, "faces", *db, *page).splitlines()
        as_table = [int(line.split()[0]) for line in table[1:-1]]
        assert len(as_json) == 300 and as_json == as_jsonl == as_csv == as_table, args
        assert re.search(r"300 of [\d,]+ matching face", table[-1]), table[-1]

    # whole-database exports, streamed to files: every face of the current bundle, once
    out = tmp_path / "all.csv"
    _cli(capsys, "export", *db, "--format", "csv", "-o", str(out))
    with out.open(newline="") as fh:
        ids = [int(r["face_id"]) for r in csv.DictReader(fh)]
    assert len(ids) == len(set(ids)) == big.facts["faces_latest"]
    out = tmp_path / "all.jsonl"
    _cli(capsys, "export", *db, "--format", "jsonl", "-o", str(out), "--gender", "uncertain")
    n_uncertain = len(out.read_text().splitlines())
    assert n_uncertain == json.loads(_cli(capsys, "stats", *db, "--format", "json"))["gender"]["uncertain"]
    out = tmp_path / "vics.json"
    _cli(capsys, "export", *db, "--format", "vics", "-o", str(out), "--root", "/evidence/case-b/usb")
    media = json.loads(out.read_text())["value"]
    assert len({m["MD5"] for m in media}) == len(media) > N_FACES // 100  # one record per image
    assert all(any(p["FilePath"].startswith("/evidence/case-b/usb/") for p in m["MediaFiles"]) for m in media)  # and its other paths

    doc = json.loads(_cli(capsys, "images", *db, "--format", "json", "--limit", "100", "--sort", "faces:desc"))["images"]
    counts = [d["faces"] for d in doc]
    assert len(doc) == 100 and counts == sorted(counts, reverse=True)
    stats = json.loads(_cli(capsys, "stats", *db, "--format", "json"))
    assert stats["failures"] == {"truncated": big.facts["failed"]} and stats["files"] == big.facts["files"]


def test_every_page_loads(big: Big) -> None:
    from starlette.testclient import TestClient

    from daemon import config
    from daemon.web import create_app

    app = create_app(config.parse({"database": big.url}, check_paths=False), port=8765)
    try:
        client = TestClient(app, base_url="http://127.0.0.1:8765")
        n = qb.deep(big.facts)
        where = {**big.facts, "deep": n, "before": n - 50, "deep_images": big.facts["images"] // 2,
                 "before_images": big.facts["images"] // 2 - 50, "small_person": big.facts["persons"] // 2}
        for name, path in qb.PAGES:
            path = path.format(**where).removeprefix("NEXT ")
            r = client.get(path)
            assert r.status_code == 200, (name, path, r.text[:300])
            m = re.search(r'id="next" href="([^"]+)"', r.text)
            if m:  # the page's own next link works too
                href = html.unescape(m.group(1))  # a query ("?after=...") or a whole path (the persons grid)
                nxt = client.get(href if href.startswith("/") else path.split("?")[0] + href)
                assert nxt.status_code == 200, (name, nxt.text[:300])
    finally:
        app.close()
