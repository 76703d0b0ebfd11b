"""The filter model and the read queries, on SQLite and PostgreSQL: hand-picked boundary cases on
a synthetic database, every filter against an independent Python implementation on a database
built by scanning real dev images, and the query commands end to end."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import time
from dataclasses import replace

import pytest
from tests.query_fixtures import B1, B2, T0, add_review, build_synth, dev_db, load_world, real_db, reference_faces, synth  # noqa: F401 - fixtures
from sqlalchemy import select

from daemon.cli import main
from daemon.queries import filters as flt
from daemon.queries import read
from daemon.queries.filters import Cut, FilterError, Filters, glob_match, parse, parse_when
from daemon.store import reviews as rv
from daemon.store.engine import SCHEMA_VERSION, open_engine, open_store_engine, schema_version

BAND01 = Cut(0.5, 0.1)  # the synthetic faces below were designed around a 0.1 band

# --------------------------------------------------------------------------------------------
# The filter model (pure)


@pytest.mark.parametrize(("values", "expected"), [
    ({"gender": "female,male"}, {"gender": ("female", "male")}),
    ({"--gender": ["uncertain", "uncertain"]}, {"gender": ("uncertain",)}),
    ({"p-male-min": "0.25", "p_male_max": "0.75"}, {"p_male_min": 0.25, "p_male_max": 0.75}),
    ({"uncertain": "1"}, {"uncertain": True}),
    ({"minors": "true"}, {"minors": "likely"}),
    ({"minors": "possible", "minor_k": "2"}, {"minors": "possible", "minor_k": 2.0}),
    ({"sha256": "ABCDEF12"}, {"sha256": ("abcdef12",)}),
    ({"root": "/ev/"}, {"root": ("/ev",)}),
    ({"bundle": "BBBB"}, {"bundle": "bbbb"}),
    ({"sort": "-p_male", "limit": "10", "offset": "20"}, {"sort": "-p_male", "limit": 10, "offset": 20}),
    ({"sort": "p_male:desc"}, {"sort": "-p_male"}),
    ({"sort": "Age:asc"}, {"sort": "age"}),
    ({"limit": "0"}, {"limit": None}),
    ({"final_gender": "not-face"}, {"final_gender": ("not_face",)}),
    ({"review": "reviewed,ignored"}, {"review": ("reviewed", "ignored")}),
    ({"gender": "", "age_min": ""}, {}),  # empty form fields
])
def test_parse_accepts(values, expected) -> None:  # noqa: ANN001
    f = parse(values)
    for k, v in expected.items():
        assert getattr(f, k) == v
    if not expected:
        assert f == Filters()


@pytest.mark.parametrize(("values", "message"), [
    ({"gender": "woman"}, "--gender: must be one of female, male, uncertain, got 'woman'"),
    ({"p_male_min": "high"}, "--p-male-min: must be a number, got 'high'"),
    ({"p_male_min": "nan"}, "--p-male-min: must be a finite number"),
    ({"p_male_min": "1.5"}, "--p-male-min: must be a probability between 0 and 1, got 1.5"),
    ({"age_min": "30", "age_max": "20"}, "--age-min/--age-max: the range is empty (30.0 > 20.0)"),
    ({"threshold": "1"}, "--threshold: must be between 0 and 1 (exclusive), got 1.0"),
    ({"threshold": "0.5", "margin": "0.5"}, "--margin: must leave both labels reachable"),
    ({"sha256": "xyz"}, "--sha256: must be a SHA-256 in hex or a prefix of at least 6 hex digits, got 'xyz'"),
    ({"sha256": "abc"}, "--sha256: must be a SHA-256 in hex or a prefix of at least 6 hex digits"),
    ({"bundle": "newest"}, "--bundle: must be latest, all or a model bundle key"),
    ({"sort": "colour"}, "--sort: must be one of"),
    ({"limit": "-1"}, "--limit: must be a whole number from 0 to 1000000000, got '-1'"),
    ({"seen_since": "last tuesday"}, "--seen-since: must be a date such as 2024-05-01"),
    ({"status": "lost"}, "--status: must be one of queued, working, done, failed, quarantined, gone, got 'lost'"),
    ({"minors": "maybe"}, "--minors: must be one of likely, possible"),
    ({"colour": "red"}, "colour: unknown filter"),
])
def test_parse_refuses_with_a_message(values, message) -> None:  # noqa: ANN001
    with pytest.raises(FilterError) as err:
        parse(values)
    assert any(message in p for p in err.value.problems), err.value.problems


def test_parse_reports_every_problem_at_once() -> None:
    with pytest.raises(FilterError) as err:
        parse({"gender": "x", "p_male_min": "y", "limit": "z"})
    assert len(err.value.problems) == 3


def test_to_params_round_trips() -> None:
    f = parse({"gender": "female,uncertain", "p_male_max": "0.3", "minors": "possible", "path_glob": "*/a/*", "root": "/ev",
               "seen_since": "7d", "sha256": "abcdef", "bundle": "all", "review": "unreviewed", "sort": "-age", "limit": "5",
               "offset": "10", "threshold": "0.45", "margin": "0", "uncertain": "1"})
    again = parse(f.to_params())
    assert again == replace(f, seen_since=again.seen_since)
    assert abs(again.seen_since - f.seen_since) < 5
    assert ("seen_since", "7d") in f.to_params()  # relative dates stay relative in links
    assert f.to_json()["gender"] == ["female", "uncertain"]
    assert "limit" not in f.to_json()


def test_parse_when_forms() -> None:
    now = 1_700_000_000.0
    assert parse_when("36h", now) == now - 36 * 3600
    assert parse_when("7d", now) == now - 7 * 86400
    assert parse_when("90m", now) == now - 5400
    assert parse_when("1700000000") == 1_700_000_000.0
    assert parse_when("2023-11-14T22:13:20Z") == 1_700_000_000.0
    assert parse_when("2023-11-15T00:13:20+02:00") == 1_700_000_000.0
    local = time.mktime((2024, 5, 1, 0, 0, 0, 0, 0, -1))
    assert parse_when("2024-05-01") == local  # naive dates are local time


@pytest.mark.parametrize(("pattern", "path", "hit"), [
    ("*/lfw/*.jpg", "/ev/lfw/a.jpg", True),
    ("*/lfw/*.jpg", "/ev/lfw/sub/a.jpg", True),  # * crosses /
    ("*/lfw/*.jpg", "/ev/lfw/a.JPG", False),  # case-sensitive
    ("/ev/?.jpg", "/ev/a.jpg", True),
    ("/ev/?.jpg", "/ev/ab.jpg", False),
    ("/ev/[ab].jpg", "/ev/b.jpg", True),
    ("/ev/[!ab].jpg", "/ev/b.jpg", False),
    ("/ev/[!ab].jpg", "/ev/c.jpg", True),
    ("*two%_[[]x].jpg", "/ev/b/two%_[x].jpg", True),
    ("*.jpg", "/ev/a.jpg.txt", False),  # anchored
    ("/ev/a+b(1).jpg", "/ev/a+b(1).jpg", True),  # regex characters are literal
    ("/ev/a.jpg", "/ev/aXjpg", False),
    ("/ev/[a", "/ev/[a", True),  # an unclosed bracket is literal
])
def test_glob_matcher_matches_fnmatch(pattern, path, hit) -> None:  # noqa: ANN001
    import fnmatch

    assert glob_match(pattern, path) is hit
    assert fnmatch.fnmatchcase(path, pattern) is hit  # the reference implementation agrees


def test_cli_options_and_page_fields_are_the_same_names() -> None:
    import argparse

    p = argparse.ArgumentParser()
    flt.add_filter_args(p)
    args = p.parse_args(["--gender", "female", "--p-male-max", "0.2", "--minors", "--path-glob", "*/x/*", "--limit", "7"])
    f = flt.from_args(args)
    assert f == parse({"gender": "female", "p_male_max": "0.2", "minors": "likely", "path_glob": "*/x/*", "limit": "7"})


# --------------------------------------------------------------------------------------------
# Synthetic database: boundaries, on SQLite and PostgreSQL


def _ids(url: str, f: Filters, cut: Cut = Cut()) -> list[int]:
    engine = open_engine(url, readonly=True)
    with engine.connect() as c:
        sc = read.scope(c, f, cut)
        out = [r["face_id"] for r in read.faces(c, f, sc)]
        assert read.count_faces(c, f.page(None, 0), sc) == len(out) or f.limit or f.offset
    engine.dispose()
    return out


def _rows(url: str, f: Filters, cut: Cut = Cut()) -> list[dict]:
    engine = open_engine(url, readonly=True)
    with engine.connect() as c:
        out = list(read.faces(c, f, read.scope(c, f, cut)))
    engine.dispose()
    return out


def test_gender_is_recut_at_query_time(synth) -> None:  # noqa: ANN001
    F = synth.face  # noqa: N806
    # default cut 0.5 +- 0.2 (the configuration's): 0.4, 0.5, 0.55 and 0.6 are all uncertain
    rows = {r["face_id"]: r for r in _rows(synth.url, Filters(bundle="all"))}
    for key in ("img1/b1/1", "img1/b2/1", "img2/b2/0", "img3/b1/0"):
        assert rows[F[key]]["gender"] == "uncertain", key
    assert rows[F["img1/b1/1"]]["model_gender"] == "female"  # the stored label is untouched
    # narrower band 0.5 +- 0.1: the band's edges belong to the labels (p >= 0.6 male, p <= 0.4 female)
    narrow = {r["face_id"]: r for r in _rows(synth.url, Filters(bundle="all", margin=0.1))}
    assert narrow[F["img1/b1/1"]]["gender"] == "female"  # p = 0.4
    assert narrow[F["img1/b2/1"]]["gender"] == "male"  # p = 0.6
    assert narrow[F["img2/b2/0"]]["gender"] == "uncertain"  # p = 0.5
    assert narrow[F["img3/b1/0"]]["gender"] == "uncertain"  # p = 0.55
    # margin 0: every face gets a label, p == threshold counts as male (classify.decide)
    zero = {r["face_id"]: r for r in _rows(synth.url, Filters(bundle="all", margin=0.0))}
    assert zero[F["img2/b2/0"]]["gender"] == "male"
    assert _ids(synth.url, Filters(bundle="all", margin=0.0, uncertain=True)) == []
    # another threshold, taken from the configuration when the filters do not name one
    assert sorted(_ids(synth.url, Filters(bundle="all", gender=("male",)), Cut(0.9, 0.0))) == sorted(
        [F["img1/b1/0"], F["img1/b2/0"], F["img5/b2/0"]])


def test_bundle_selection(synth) -> None:  # noqa: ANN001
    F = synth.face  # noqa: N806
    latest = set(_ids(synth.url, Filters()))
    assert latest == {F["img1/b2/0"], F["img1/b2/1"], F["img2/b2/0"], F["img2/b2/1"], F["img3/b1/0"], F["img5/b2/0"], F["img6/b2/0"]}
    assert set(_ids(synth.url, Filters(bundle="all"))) == latest | {F["img1/b1/0"], F["img1/b1/1"]}
    assert set(_ids(synth.url, parse({"bundle": "aaaa"}))) == {F["img1/b1/0"], F["img1/b1/1"], F["img3/b1/0"]}
    assert set(_ids(synth.url, parse({"bundle": B2}))) == latest - {F["img3/b1/0"]}
    with pytest.raises(FilterError, match="matches no model bundle; bundles in this database: aaaa000000000001, bbbb000000000002"):
        _ids(synth.url, parse({"bundle": "cccc"}))


def test_minor_rules(synth) -> None:  # noqa: ANN001
    F = synth.face  # noqa: N806
    # ages (std): img1/b1/1 15 (2), img1/b2/1 16.5 (2), img3 25 (8), img2/b2/1 40 (10), img6 9 (1), img2/b2/0 none
    six = F["img6/b2/0"]
    assert set(_ids(synth.url, parse({"minors": "likely", "bundle": "all"}))) == {F["img1/b1/1"], six}  # 17 < 18; 18.5 is not
    assert set(_ids(synth.url, parse({"minors": "possible", "bundle": "all"}))) == {F["img1/b1/1"], F["img1/b2/1"], F["img3/b1/0"], six}
    assert set(_ids(synth.url, parse({"minors": "likely", "minor_k": "0", "bundle": "all"}))) == {F["img1/b1/1"], F["img1/b2/1"], six}
    assert set(_ids(synth.url, parse({"minors": "possible", "minor_k": "3", "bundle": "all"}))) == {
        F["img1/b1/1"], F["img1/b2/1"], F["img3/b1/0"], F["img2/b2/1"], six}  # 40 - 30 < 18


def test_path_filters_are_exact(synth) -> None:  # noqa: ANN001
    F = synth.face  # noqa: N806
    # LIKE wildcards in the prefix are literal; matching is case-sensitive on both databases
    assert set(_ids(synth.url, parse({"path_prefix": "/ev/b/two%_["}))) == {F["img2/b2/0"], F["img2/b2/1"]}
    assert _ids(synth.url, parse({"path_prefix": "/ev/b/two__"})) == []
    assert _ids(synth.url, parse({"path_prefix": "/EV/"})) == []
    assert set(_ids(synth.url, parse({"path_glob": "*.JPG"}))) == {F["img3/b1/0"]}
    assert set(_ids(synth.url, parse({"path_glob": "/ev/?/*"}))) == {F["img2/b2/0"], F["img2/b2/1"], F["img3/b1/0"], F["img1/b2/0"], F["img1/b2/1"]}
    # the path shown is the first matching one: img2 has a path in each root
    rows = _rows(synth.url, parse({"root": "/ev2"}))
    assert {r["path"] for r in rows} == {"/ev2/copy/two.jpg"}
    rows = _rows(synth.url, parse({"sha256": synth.sha["img2"]}))
    assert {r["path"] for r in rows} == {"/ev/b/two%_[x].jpg"}
    assert set(_ids(synth.url, parse({"status": "gone"}))) == {F["img5/b2/0"]}
    assert set(_ids(synth.url, parse({"seen_since": str(T0 + 150), "seen_until": str(T0 + 350)}))) == {F["img2/b2/0"], F["img2/b2/1"], F["img3/b1/0"]}


def test_sort_and_pages(synth) -> None:  # noqa: ANN001
    url = synth.url
    for key in flt.FACE_SORTS:
        for desc in ("", "-"):
            f = parse({"sort": desc + key, "bundle": "all"})
            rows = _rows(url, f)
            full = [r["face_id"] for r in rows]
            assert len(full) == 9
            pages = []
            for off in range(0, 9, 2):  # pages straddle the faces with and without a current path
                pages += _ids(url, f.page(2, off))
            assert pages == full, (key, desc)  # stable pagination
            col = {"p_male": "p_male", "age": "age", "width": "width_px", "score": "score", "sha256": "sha256", "id": "face_id",
                   "seen": "seen", "path": "path"}[key]
            vals = [r[col] for r in rows if r[col] is not None]
            assert vals == sorted(vals, reverse=bool(desc)), (key, desc, vals)
            if key == "age":
                assert rows[-1]["age"] is None  # unknown ages last, either way
            if key in ("path", "seen"):
                assert rows[-1]["path"] is None and rows[-1]["face_id"] == synth.face["img6/b2/0"]  # no current path: last


def test_images_rows(synth) -> None:  # noqa: ANN001
    engine = open_engine(synth.url, readonly=True)
    with engine.connect() as c:
        sc = read.scope(c, Filters(), BAND01)
        rows = list(read.images(c, Filters(), sc))
        by_path = {r["path"]: r for r in rows}
        assert len(rows) == 6  # five contents and one file never hashed
        two = by_path["/ev/b/two%_[x].jpg"]
        assert [p["path"] for p in two["paths"]] == ["/ev/b/two%_[x].jpg", "/ev2/copy/two.jpg"]
        assert (two["faces"], two["female"], two["male"], two["uncertain"], two["bundle"]) == (2, 1, 0, 1, B2)
        broken = by_path["/ev/bad/broken.jpg"]
        assert (broken["sha256"], broken["status"], broken["reason"]) == (None, "failed", "truncated")
        assert by_path["/ev/old/gone.jpg"]["status"] == "gone"
        assert (by_path["/ev/c/none.png"]["faces"], by_path["/ev/c/none.png"]["analyses"]) == (0, 1)
        one = by_path["/ev/a/one.jpg"]
        assert (one["faces"], one["male"], one["bundle"]) == (2, 2, B2)  # latest analysis: 0.92 and 0.6
        old = list(read.images(c, parse({"bundle": B1}), read.scope(c, parse({"bundle": B1}), BAND01)))
        assert {r["path"]: (r["faces"], r["female"], r["uncertain"]) for r in old} == {"/ev/a/one.jpg": (2, 1, 0), "/ev/a/THREE.JPG": (1, 0, 1)}
        # face filters keep images with at least one matching face
        f = parse({"gender": "uncertain"})
        assert {r["path"] for r in read.images(c, f, read.scope(c, f, BAND01))} == {"/ev/b/two%_[x].jpg", "/ev/a/THREE.JPG"}
        f = parse({"reason": "truncated"})
        assert [r["path"] for r in read.images(c, f, sc)] == ["/ev/bad/broken.jpg"]
        f = parse({"sort": "-faces", "limit": "2"})
        assert [r["faces"] for r in read.images(c, f, sc)] == [2, 2]
        f = parse({"sort": "size"})
        sizes = [r["size"] for r in read.images(c, f, sc)]
        assert sizes[:-1] == sorted(sizes[:-1]) and sizes[-1] is None
    engine.dispose()


def test_stats(synth) -> None:  # noqa: ANN001
    engine = open_engine(synth.url, readonly=True)
    with engine.connect() as c:
        st = read.stats(c, Filters(), read.scope(c, Filters(), BAND01), now=T0 + 1030)
        assert (st["files"], st["images"], st["faces"], st["images_with_faces"]) == (7, 5, 7, 5)
        assert st["by_state"] == {"done": 5, "failed": 1, "gone": 1}
        assert st["failures"] == {"truncated": 1}
        assert st["gender"] == {"female": 2, "male": 3, "uncertain": 2}
        assert st["minors"] == {"likely (age + std < 18)": 1, "possible (age - std < 18)": 3}
        assert st["age"]["unknown"] == 1 and st["age"]["13-17"] == 1 and st["age"]["0-12"] == 1
        assert st["by_root"]["/ev"]["files"] == 6 and st["by_root"]["/ev2"]["files"] == 1
        assert st["by_root"]["/ev"]["faces"] == 6  # counted at each face's first path
        assert st["by_root"]["(no current path)"] == {"files": 0, "faces": 1}
        assert [b["key"] for b in st["bundles"]] == [B1, B2] and [b["analyses"] for b in st["bundles"]] == [2, 5]
        assert st["last_hour"]["analyses"] == 7
        f = parse({"root": "/ev2"})
        st2 = read.stats(c, f, read.scope(c, f, BAND01))
        assert (st2["files"], st2["faces"]) == (1, 2)
    engine.dispose()


def test_reviews_survive_reanalysis_and_never_touch_model_output(synth) -> None:  # noqa: ANN001
    F = synth.face  # noqa: N806
    # reviewed under the old bundle ...
    add_review(synth.url, F["img1/b1/0"], "corrected", "female", "looks female to me", decision="male")
    add_review(synth.url, F["img3/b1/0"], "ignored")
    rows = {r["face_id"]: r for r in _rows(synth.url, Filters(bundle="all"))}
    # ... and seen on the new bundle's face with a slightly different box (IoU 0.91)
    for key in ("img1/b1/0", "img1/b2/0"):
        r = rows[F[key]]
        assert (r["review"], r["review_label"], r["review_note"], r["final_gender"]) == ("corrected", "female", "looks female to me", "female")
        assert (r["gender"], r["model_gender"]) == ("male", "male")  # model output unchanged
    assert rows[F["img1/b2/1"]]["review"] is None  # the other face of the image is not affected
    assert rows[F["img3/b1/0"]]["final_gender"] == "uncertain"  # ignored keeps the model's decision
    assert set(_ids(synth.url, parse({"review": "reviewed"}))) == {F["img1/b2/0"], F["img3/b1/0"]}
    assert set(_ids(synth.url, parse({"review": "corrected"}))) == {F["img1/b2/0"]}
    assert F["img1/b2/0"] not in _ids(synth.url, parse({"review": "unreviewed"}))
    assert set(_ids(synth.url, parse({"final_gender": "female"}))) == {F["img1/b2/0"], F["img2/b2/1"], F["img6/b2/0"]}
    # the latest review wins; clearing withdraws it; history is kept
    add_review(synth.url, F["img1/b2/0"], "corrected", "not_face", decision="male")
    assert set(_ids(synth.url, parse({"final_gender": "not_face"}))) == {F["img1/b2/0"]}
    add_review(synth.url, F["img1/b2/0"], "cleared")
    assert F["img1/b2/0"] in _ids(synth.url, parse({"review": "unreviewed"}))
    engine = open_engine(synth.url, readonly=True)
    with engine.connect() as c:
        row = read.face(c, F["img1/b2/0"], read.scope(c, Filters(), BAND01))
        assert [h["status"] for h in read.review_history(c, row)] == ["corrected", "corrected", "cleared"]
        faces_rows = c.execute(select(read.s.faces.c.p_male, read.s.faces.c.gender).order_by(read.s.faces.c.id)).all()
        assert [tuple(r) for r in faces_rows][0] == (0.95, "male")
    engine.dispose()


@pytest.mark.parametrize(("review", "problem"), [
    (rv.Review("corrected"), "a correction needs a label"),
    (rv.Review("confirmed", "not_face"), "only a female or male decision can be confirmed"),
    (rv.Review("ignored", "male"), "a review with status ignored takes no label"),
    (rv.Review("approved"), "status must be one of confirmed, corrected, ignored, cleared"),
    (rv.Review("corrected", "dog"), "label must be one of female, male, not_face"),
    (rv.Review("ignored", None, "x" * 2001), "note must be at most 2000 characters"),
])
def test_review_validation(review, problem) -> None:  # noqa: ANN001
    assert any(problem in p for p in review.problems())


def test_confirming_an_uncertain_face_needs_a_label(synth) -> None:  # noqa: ANN001
    with pytest.raises(rv.ReviewError, match="only a female or male decision can be confirmed"):
        add_review(synth.url, synth.face["img2/b2/0"], "confirmed", decision="uncertain")
    with pytest.raises(rv.ReviewError, match="face 999999 does not exist"):
        add_review(synth.url, 999999, "ignored")


def test_iou_rule() -> None:
    a = (0.0, 0.0, 10.0, 10.0)
    assert rv.iou(a, a) == 1.0
    assert rv.iou(a, (5.0, 0.0, 15.0, 10.0)) == pytest.approx(1 / 3)
    assert rv.iou(a, (20.0, 20.0, 30.0, 30.0)) == 0.0


def test_show_detail(synth) -> None:  # noqa: ANN001
    add_review(synth.url, synth.face["img1/b1/0"], "confirmed", decision="male")
    engine = open_engine(synth.url, readonly=True)
    with engine.connect() as c:
        image_id, why = read.find_image(c, "/ev/a/one.jpg")
        assert why == []
        assert read.find_image(c, synth.sha["img1"][:10])[0] == image_id
        assert read.find_image(c, "/nowhere.jpg")[0] is None
        assert "never hashed" in read.find_image(c, "/ev/bad/broken.jpg")[1][0]
        d = read.image_detail(c, image_id, read.scope(c, Filters(), BAND01))
        assert [a["bundle"] for a in d["analyses"]] == [B1, B2] and [a["latest"] for a in d["analyses"]] == [False, True]
        assert [len(a["faces_rows"]) for a in d["analyses"]] == [2, 2]
        assert [r["status"] for r in d["reviews"]] == ["confirmed"] and d["reviews"][0]["label"] == "male"
        assert [e["kind"] for e in d["events"]] == ["file_changed"]
    engine.dispose()


def test_queries_work_on_a_version_1_database(tmp_path) -> None:  # noqa: ANN001
    """A database not yet migrated to the reviews table is still readable (read-only commands
    never migrate); a writable open migrates it and keeps the data."""
    from sqlalchemy import create_engine, inspect

    from daemon.store import schema

    url = f"sqlite:///{tmp_path / 'v1.db'}"
    eng = create_engine(url)
    with eng.begin() as c:
        schema.metadata.create_all(c)
        c.execute(schema.meta.insert().values(key="schema_version", value="1"))
    eng.dispose()
    build_synth(url)  # migrates to the current version on open
    engine = open_engine(url, readonly=True)
    with engine.connect() as c:
        assert schema_version(c) == SCHEMA_VERSION >= 3
        assert rv.has_reviews(c)
        # version 3: the face sort indexes end with the face id (keyset pages), replacing version 1's
        names = {ix["name"]: ix["column_names"] for ix in inspect(c).get_indexes("faces")}
        assert names["ix_faces_p_male_id"] == ["p_male", "id"] and names["ix_faces_age_id"] == ["age", "id"]
        assert "ix_faces_p_male" not in names and "ix_faces_score" not in names
    engine.dispose()
    # a v1 database without the table: reads work, reviews are simply absent
    url1 = f"sqlite:///{tmp_path / 'v1b.db'}"
    eng = create_engine(url1)
    with eng.begin() as c:
        schema.metadata.create_all(c)
        c.execute(schema.meta.insert().values(key="schema_version", value="1"))
    eng.dispose()
    engine = open_engine(url1, readonly=True)
    with engine.connect() as c:
        f = parse({"review": "unreviewed"})
        sc = read.scope(c, f, BAND01)
        assert sc.reviews is False
        assert list(read.faces(c, f, sc)) == []
        assert read.stats(c, Filters(), sc)["reviews"] == {}
    engine.dispose()


def test_migration_adds_reviews_to_existing_data(db_url) -> None:  # noqa: ANN001
    from sqlalchemy import inspect, text

    from daemon.store import engine as eng_mod

    engine = open_engine(db_url)
    with engine.begin() as c:  # version 1 only
        eng_mod.MIGRATIONS[0](c)
        c.execute(read.s.meta.insert().values(key="schema_version", value="1"))
        c.execute(read.s.bundles.insert().values(key=B1, spec="{}", created=T0))
    engine.dispose()
    engine = open_store_engine(db_url)
    with engine.connect() as c:
        assert schema_version(c) == SCHEMA_VERSION >= 3 and rv.has_reviews(c)
        assert c.execute(text("SELECT count(*) FROM bundles")).scalar_one() == 1
        faces_ix = {ix["name"]: ix["column_names"] for ix in inspect(c).get_indexes("faces")}
        assert {k: v for k, v in faces_ix.items() if k.endswith("_id")} == {
            "ix_faces_p_male_id": ["p_male", "id"], "ix_faces_age_id": ["age", "id"], "ix_faces_width_id": ["width_px", "id"],
            "ix_faces_score_id": ["score", "id"]}
        assert not {"ix_faces_p_male", "ix_faces_age", "ix_faces_width", "ix_faces_score"} & set(faces_ix)
    engine.dispose()


# --------------------------------------------------------------------------------------------
# Every filter on real analyses of dev images, against the reference implementation


REAL_CASES = [
    {}, {"gender": "female"}, {"gender": "male"}, {"gender": "male,female"}, {"uncertain": "1", "margin": "0.45"},
    {"gender": "uncertain", "threshold": "0.3", "margin": "0.25"}, {"p_male_min": "0.2", "p_male_max": "0.8"},
    {"p_male_max": "0.01"}, {"age_min": "20", "age_max": "35"}, {"minors": "possible"}, {"minors": "likely", "minor_k": "0"},
    {"minors": "possible", "minor_k": "2"}, {"width_min": "40"}, {"width_max": "30"}, {"score_min": "0.9"},
    {"path_glob": "*/wider/*"}, {"path_glob": "*/lfw/A*_0001.jpg"}, {"path_prefix": "{ev}/copies/"}, {"root": "{ev2}"},
    {"root": "{ev}", "gender": "male"}, {"seen_since": "1h"}, {"seen_until": "1h"}, {"status": "done"}, {"status": "failed"},
    {"bundle": "all"}, {"bundle": "{bundle}"}, {"review": "unreviewed"}, {"review": "reviewed"}, {"final_gender": "female"},
    {"sha256": "{dup}"},
]


def _fill(case: dict, db) -> dict:  # noqa: ANN001
    return {k: v.format(ev=db.ev, ev2=db.ev2, bundle=db.bundle[:8], dup=db.dup_sha[:12]) for k, v in case.items()}


def test_every_filter_on_real_analyses(real_db) -> None:  # noqa: ANN001
    w = load_world(real_db.url)
    faces_total = len(w["faces"])
    assert faces_total > 40
    # a review so that the review filters select something
    some = sorted(w["faces"], key=lambda r: r["id"])[3]
    add_review(real_db.url, some["id"], "corrected", "female", decision="male")
    w = load_world(real_db.url)
    sizes = {}
    for case in REAL_CASES:
        f = parse(_fill(case, real_db))
        expected = reference_faces(w, f)
        got = _rows(real_db.url, f)
        assert sorted(r["face_id"] for r in got) == sorted(r["face_id"] for r in expected), case
        exp = {r["face_id"]: r for r in expected}
        for r in got:
            assert (r["gender"], r["final_gender"], r["path"]) == (exp[r["face_id"]]["gender"], exp[r["face_id"]]["final_gender"],
                                                                   exp[r["face_id"]]["path"]), case
        sizes[json.dumps(case)] = len(got)
    # the cases are meaningful: most select a proper, non-empty subset
    proper = [k for k, n in sizes.items() if 0 < n < faces_total]
    assert len(proper) >= len(REAL_CASES) - 8, sizes
    assert sizes[json.dumps({"status": "failed"})] == 0  # failed files have no faces
    assert sizes[json.dumps({"seen_until": "1h"})] == 0  # everything was seen just now


def test_duplicate_content_is_one_image_with_two_paths(real_db) -> None:  # noqa: ANN001
    engine = open_engine(real_db.url, readonly=True)
    with engine.connect() as c:
        f = parse({"sha256": real_db.dup_sha})
        rows = list(read.images(c, f, read.scope(c, f, BAND01)))
        assert len(rows) == 1 and len(rows[0]["paths"]) == 2
        assert rows[0]["paths"][0]["path"].endswith("/copies/copy of " + rows[0]["paths"][1]["path"].rsplit("/", 1)[1])
        f = parse({"status": "failed"})
        failed = {r["path"].rsplit("/", 1)[1]: r["reason"] for r in read.images(c, f, read.scope(c, f, BAND01))}
        assert failed == {"truncated.jpg": "truncated", "notes.txt": "not_an_image"}
    engine.dispose()


# --------------------------------------------------------------------------------------------
# The commands, end to end


def _cli(capsys, *argv: str) -> tuple[int, str, str]:  # noqa: ANN001
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_faces_command_formats(real_db, capsys) -> None:  # noqa: ANN001
    db = ("--db", real_db.url)
    code, out, _ = _cli(capsys, "faces", *db, "--gender", "female", "--limit", "5")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ID", "GENDER", "P(MALE)", "AGE"] and len(lines) == 7
    assert all(" female " in ln for ln in lines[1:6])
    assert re.match(r"5 of \d+ matching face\(s\) shown \(cut: threshold 0\.5, margin 0\.2\); more with --offset 5", lines[-1])
    code, out, _ = _cli(capsys, "faces", *db, "--gender", "female", "--limit", "0", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    from daemon.queries.formats import FACE_COLUMNS

    assert tuple(rows[0].keys()) == FACE_COLUMNS and {r["gender"] for r in rows} == {"female"}
    code, out, _ = _cli(capsys, "faces", *db, "--gender", "female", "--limit", "0", "--format", "json")
    doc = json.loads(out)
    assert doc["format"] == "forensic-gender/faces" and doc["count"] == len(rows) == len(doc["faces"])
    assert doc["query"] == {"gender": ["female"]} and doc["cut"] == {"threshold": 0.5, "margin": 0.2}
    code, out, _ = _cli(capsys, "faces", *db, "--gender", "female", "--limit", "0", "--format", "jsonl")
    assert [json.loads(x)["face_id"] for x in out.splitlines()] == [int(r["face_id"]) for r in rows]
    code, _, err = _cli(capsys, "faces", *db, "--gender", "woman", "--p-male-min", "x")
    assert code == 2 and "--gender: must be one of" in err and "--p-male-min: must be a number" in err


def test_images_stats_show_commands(real_db, capsys) -> None:  # noqa: ANN001
    db = ("--db", real_db.url)
    code, out, _ = _cli(capsys, "images", *db, "--status", "failed")
    assert code == 0 and "failed (truncated)" in out and "failed (not_an_image)" in out and "2 image(s) shown" in out
    code, out, _ = _cli(capsys, "images", *db, "--format", "json", "--limit", "0")
    doc = json.loads(out)
    assert doc["count"] == 37  # 38 files, one content at two paths (failed files are hashed too)
    code, out, _ = _cli(capsys, "stats", *db, "--format", "json")
    st = json.loads(out)
    assert st["files"] == 38 and st["images"] == 37 and st["by_state"] == {"done": 36, "failed": 2}
    assert set(st["by_root"]) == {str(real_db.ev), str(real_db.ev2)} and st["bundles"][0]["key"] == real_db.bundle
    code, out, _ = _cli(capsys, "stats", *db)
    assert code == 0 and "failures: " in out and f"{real_db.bundle}:" in out
    code, out, _ = _cli(capsys, "show", *db, real_db.dup_sha[:10], "--format", "json")
    doc = json.loads(out)
    assert len(doc["paths"]) == 2 and len(doc["analyses"]) == 1 and doc["analyses"][0]["bundle_spec"]["models"]
    code, out, _ = _cli(capsys, "show", *db, doc["paths"][0]["path"])
    assert code == 0 and real_db.dup_sha in out and "paths (2):" in out
    code, _, err = _cli(capsys, "show", *db, "/no/such/file.jpg")
    assert code == 1 and "no recorded path or image SHA-256 matches" in err


def test_annotate_and_crops(real_db, capsys) -> None:  # noqa: ANN001
    import cv2

    db = ("--db", real_db.url)
    wider = sorted((real_db.ev2 / "wider").iterdir())[0]
    out = real_db.out / f"annot-{os.getpid()}-{real_db.url[:5]}.jpg"
    code, text_out, err = _cli(capsys, "annotate", *db, str(wider), "-o", str(out), "--force")
    assert code == 0, err
    img = cv2.imread(str(out))
    orig = cv2.imread(str(wider))
    assert img.shape == orig.shape and (img != orig).any()  # boxes drawn on a same-size copy
    n = int(re.search(r"(\d+) face\(s\) drawn", text_out).group(1))
    assert n > 0
    # output is refused inside an evidence root, even through a symlink
    code, _, err = _cli(capsys, "annotate", *db, str(wider), "-o", str(real_db.ev2 / "wider" / "x.jpg"))
    assert code == 2 and "inside the evidence root" in err
    link = real_db.out / f"link-{os.getpid()}-{real_db.url[:5]}"
    if not link.exists():
        link.symlink_to(real_db.ev)
    code, _, err = _cli(capsys, "crops", *db, "--out", str(link / "crops"))
    assert code == 2 and "inside the evidence root" in err
    assert not (real_db.ev / "crops").exists()
    crops = real_db.out / f"crops-{real_db.url[:5]}"
    code, text_out, err = _cli(capsys, "crops", *db, "--out", str(crops), "--gender", "female", "--root", str(real_db.ev2))
    assert code == 0, err
    index = list(csv.DictReader(io.StringIO((crops / "crops.csv").read_text())))
    files = sorted(p.name for p in crops.glob("*.jpg"))
    assert files == sorted(r["file"] for r in index) and len(files) > 0
    for r in index:
        assert r["file"] == f"{r['sha256']}_{r['bundle']}_{int(r['idx']):03d}.jpg" and r["gender"] == "female"
        assert cv2.imread(str(crops / r["file"])) is not None


def test_review_command(real_db, capsys) -> None:  # noqa: ANN001
    db = ("--db", real_db.url)
    code, out, _ = _cli(capsys, "faces", *db, "--limit", "1", "--format", "jsonl")
    face = json.loads(out)
    code, out, err = _cli(capsys, "review", *db, str(face["face_id"]), "--status", "corrected", "--label", "not_face", "--note", "a poster")
    assert code == 0, err
    assert "review" in out and "final not_face" in out
    code, out, _ = _cli(capsys, "faces", *db, "--review", "corrected", "--format", "jsonl")
    got = [json.loads(x) for x in out.splitlines()]
    assert [(g["face_id"], g["review_label"], g["review_note"]) for g in got] == [(face["face_id"], "not_face", "a poster")]
    code, _, err = _cli(capsys, "review", *db, str(face["face_id"]), "--status", "corrected")
    assert code == 2 and "a correction needs a label" in err


# --------------------------------------------------------------------------------------------
# Keyset paging: every row exactly once, in order, both ways, among many equal sort keys


def build_ties(url: str) -> None:
    """A database whose sort keys tie a lot: p(male) in {0.2, 0.5, 0.8}, half the ages unknown,
    two widths, one score, several faces per image (one path for all), two bundles, paths seen
    at the same time, contents at two paths, and two contents no recorded path holds."""
    import hashlib

    from sqlalchemy import insert

    from daemon.store import schema as s

    engine = open_store_engine(url)
    with engine.begin() as c:
        c.execute(insert(s.bundles), [{"key": B1, "spec": "{}", "created": T0}, {"key": B2, "spec": "{}", "created": T0 + 10}])
        for i in range(1, 13):
            sha = hashlib.sha256(f"tie{i}".encode()).hexdigest()
            iid = c.execute(insert(s.images).values(sha256=sha, md5="0" * 32, size=1000 + i % 3, format="jpeg", width=640, height=480,
                                                    orientation=1, frames=1, first_seen=T0 + i // 3)).inserted_primary_key[0]
            paths = [] if i > 10 else [f"/ev/t{i % 4}/img{i:02d}.jpg"] + ([f"/ev2/copy/img{i:02d}.jpg"] if i % 3 == 0 else [])
            for path in paths:
                c.execute(insert(s.files).values(path=path, root=path[:path.index("/", 1)], size=1, mtime_ns=1, state="done", image_id=iid,
                                                 attempts=1, first_seen=T0 + 10 * (i // 3), last_seen=T0, updated=T0))
            for bundle in ([B1, B2] if i % 2 == 0 else [B1]):
                aid = c.execute(insert(s.analyses).values(image_id=iid, bundle=bundle, faces=0, seconds=0.1, host="h",
                                                          created=T0 + 100 + i)).inserted_primary_key[0]
                for k in range(i % 4 + 1):
                    w = (40.0, 80.0)[k % 2]
                    p = (0.2, 0.5, 0.8)[(i + k) % 3]
                    c.execute(insert(s.faces).values(
                        analysis_id=aid, idx=k, x1=10.0 + 100 * k, y1=10.0, x2=10.0 + 100 * k + w, y2=10.0 + w, score=0.9, landmarks="[]",
                        width_px=w, p_male=p, p_female=1 - p, gender="female", age=None if (i + k) % 2 else (20.0, 30.0)[k % 2],
                        age_std=None if (i + k) % 2 else 2.0))
        c.execute(insert(s.files).values(path="/ev/bad.jpg", root="/ev", size=0, mtime_ns=0, state="failed", image_id=None, attempts=1,
                                         reason="truncated", first_seen=T0, last_seen=T0, updated=T0))
    engine.dispose()


def _expected_order(rows: list[dict], sort: str) -> list[int]:
    """The documented order, computed in Python: the sort key, then the face id, the whole key
    reversed for a descending sort; faces without the key's value (no age, no current path)
    last either way."""
    key, desc = sort.lstrip("-"), sort.startswith("-")
    primary = {"path": lambda r: (r["path"], r["sha256"], r["analysis_id"], r["idx"]),
               "sha256": lambda r: (r["sha256"], r["analysis_id"], r["idx"]),
               "seen": lambda r: (r["seen"],), "age": lambda r: (r["age"],), "p_male": lambda r: (r["p_male"],),
               "width": lambda r: (r["width_px"],), "score": lambda r: (r["score"],), "id": lambda r: ()}[key]
    known = [r for r in rows if r[{"path": "path", "seen": "seen", "age": "age"}.get(key, "face_id")] is not None]
    unknown = [r for r in rows if r not in known]
    if key == "path":  # no current path: ordered by content, as the rest
        tail = sorted(unknown, key=lambda r: (r["sha256"], r["analysis_id"], r["idx"], r["face_id"]), reverse=desc)
    else:
        tail = sorted(unknown, key=lambda r: r["face_id"], reverse=desc)
    return [r["face_id"] for r in sorted(known, key=lambda r: (*primary(r), r["face_id"]), reverse=desc) + tail]


def _walk(c, f: Filters, sc: read.Scope) -> tuple[list[list[int]], list[list[int]]]:  # noqa: ANN001
    """Pages read by following next positions from the top, then previous ones from the last."""
    forward, back = [], []
    page = read.face_page(c, f, sc)
    assert page.prev is None
    while True:
        forward.append([r["face_id"] for r in page.rows])
        if page.next is None:
            break
        page = read.face_page(c, f.seek(after=page.next), sc)
        assert page.prev is not None
    while True:
        back.append([r["face_id"] for r in page.rows])
        if page.prev is None:
            break
        page = read.face_page(c, f.seek(before=page.prev), sc)
    return forward, back


@pytest.fixture
def ties(db_url: str) -> str:
    build_ties(db_url)
    return db_url


def test_keyset_pages_give_every_face_once_in_order_both_ways(ties) -> None:  # noqa: ANN001
    engine = open_engine(ties, readonly=True)
    with engine.connect() as c:
        for bundle in ("latest", "all"):
            for key in flt.FACE_SORTS:
                for sort in (key, "-" + key):
                    f = parse({"sort": sort, "bundle": bundle, "limit": "4"})
                    sc = read.scope(c, f, BAND01)
                    full = list(read.faces(c, f.page(None), sc))
                    ids = [r["face_id"] for r in full]
                    assert ids == _expected_order(full, sort), (sort, bundle)
                    assert len(ids) == len(set(ids)) == (30 if bundle == "latest" else 42)
                    forward, back = _walk(c, f, sc)
                    assert [i for p in forward for i in p] == ids, (sort, bundle)  # every face once, in order
                    assert all(len(p) == 4 for p in forward[:-1]) and 0 < len(forward[-1]) <= 4
                    assert back == forward[::-1], (sort, bundle)  # previous goes back through the same pages
                    # the same positions through faces() (the query commands' --after / --before)
                    mid = read.face_page(c, f, sc).next
                    assert [r["face_id"] for r in read.faces(c, f.page(None).seek(after=mid), sc)] == ids[4:]
                    second = read.face_page(c, f.seek(after=mid), sc)
                    assert [r["face_id"] for r in read.faces(c, f.page(3).seek(before=second.prev), sc)] == ids[1:4]
                    # with a SHA-256 filter the list is read in one part: the same order
                    shas = sorted({r["sha256"] for r in full})[:2] + [next(r["sha256"] for r in full if r["path"] is None)]
                    h = replace(f, sha256=tuple(x[:8] for x in shas))
                    assert [r["face_id"] for r in read.faces(c, h.page(None), sc)] == [r["face_id"] for r in full if r["sha256"] in shas]
                    # a filter with the position: the rows after it that match
                    g = replace(f, gender=("female",))
                    females = [r["face_id"] for r in read.faces(c, g.page(None), sc)]
                    walked, _ = _walk(c, g, sc)
                    assert [i for p in walked for i in p] == females
    engine.dispose()


def test_keyset_images_pages(ties) -> None:  # noqa: ANN001
    engine = open_engine(ties, readonly=True)
    with engine.connect() as c:
        for key in flt.IMAGE_SORTS:
            for sort in (key, "-" + key):
                f = parse({"sort": sort, "limit": "3"})
                sc = read.scope(c, f, BAND01)
                full = [r["path"] for r in read.images(c, f.page(None), sc)]
                assert len(full) == len(set(full)) == 11  # ten contents with a path and the file never hashed
                pages, page = [], read.image_page(c, f, sc)
                while True:
                    pages.append([r["path"] for r in page.rows])
                    if page.next is None:
                        break
                    page = read.image_page(c, f.seek(after=page.next), sc)
                assert [x for p in pages for x in p] == full, sort
                back = []
                while True:
                    back.append([r["path"] for r in page.rows])
                    if page.prev is None:
                        break
                    page = read.image_page(c, f.seek(before=page.prev), sc)
                assert back == pages[::-1], sort
    engine.dispose()


def test_keyset_positions_are_checked(ties) -> None:  # noqa: ANN001
    engine = open_engine(ties, readonly=True)
    with engine.connect() as c:
        for values, message in [
            ({"sort": "p_male", "after": "0.5"}, "--after: '0.5' has 1 field(s), expected 2; a position in the face list sorted by p_male is "
                                                 "P_MALE,FACE_ID (follow the page's next and previous links"),
            ({"sort": "p_male", "before": "high,3"}, "--before: 'high,3' field must be a number, got 'high'"),
            ({"sort": "id", "after": "3.5"}, "field '3.5' must be a whole number"),
            ({"sort": "sha256", "after": "XYZ,1,0,3"}, "field 'XYZ' must be a SHA-256 in lower-case hex"),
        ]:
            f = parse(values)
            with pytest.raises(FilterError) as err:
                list(read.faces(c, f, read.scope(c, f, BAND01)))
            assert message in err.value.problems[0], err.value.problems
    engine.dispose()
    for values, message in [({"after": "1", "before": "2"}, "--after/--before: give one of them"),
                            ({"after": "1", "offset": "5"}, "--offset: cannot be combined with --after")]:
        with pytest.raises(FilterError) as err:
            parse(values)
        assert any(message in p for p in err.value.problems), err.value.problems


def test_cursor_text_round_trips() -> None:
    kinds = (("text", True), ("hex", False), ("int", False), ("int", False), ("int", False))
    for values in [("/ev/a,b/c d.jpg", "ab12", 3, 0, 17), (None, "ab12", 3, 0, 17), ("/ev/x,", "0f", 1, 2, 3)]:
        assert flt.cursor_values(flt.cursor_text(values), kinds) == values
    assert flt.cursor_values(flt.cursor_text((0.1 + 0.2, 5)), (("float", False), ("int", False))) == (0.1 + 0.2, 5)  # exact
    assert flt.cursor_values(flt.cursor_text(("abc", "/p,q")), (("hex", True), ("text", False))) == ("abc", "/p,q")
    assert flt.cursor_values(flt.cursor_text((None, "/p")), (("hex", True), ("text", False))) == (None, "/p")


def test_cli_pages_by_position(ties, capsys) -> None:  # noqa: ANN001
    import shlex

    db = ("--db", ties)
    code, out, _ = _cli(capsys, "faces", *db, "--sort=-p_male", "--limit", "0", "--format", "jsonl")
    every = [json.loads(x)["face_id"] for x in out.splitlines()]
    code, out, err = _cli(capsys, "faces", *db, "--sort=-p_male", "--limit", "5", "--after", f"0.8,{every[2]}")
    assert code == 0, err
    assert [int(ln.split()[0]) for ln in out.splitlines()[1:6]] == every[3:8]
    nxt = re.search(r"more with (--after=.+)$", out.splitlines()[-1]).group(1)
    code, out, _ = _cli(capsys, "faces", *db, "--sort=-p_male", "--limit", "5", *shlex.split(nxt))
    assert [int(ln.split()[0]) for ln in out.splitlines()[1:6]] == every[8:13]
    code, out, _ = _cli(capsys, "images", *db, "--limit", "4", "--after", "/ev/t1/img05.jpg")
    shown = [ln.split()[-1] if not ln.endswith("more)") else ln.split()[-3] for ln in out.splitlines()[1:5]]
    assert code == 0 and shown == ["/ev/t1/img09.jpg", "/ev/t2/img02.jpg", "/ev/t2/img06.jpg", "/ev/t2/img10.jpg"], out
    assert out.splitlines()[-1] == "4 image(s) shown; more with --after=/ev/t2/img10.jpg"
    code, _, err = _cli(capsys, "faces", *db, "--after", "x", "--before", "y")
    assert code == 2 and "--after/--before: give one of them" in err
