"""The query commands ``faces``, ``images``, ``stats``, ``show`` and ``review``, and the plumbing
they share with :mod:`daemon.cli.exports`. All but ``review`` only read the database. Their machine
formats are :mod:`daemon.queries.formats`'s.

Hostile names
    Tables and messages for a terminal pass every path, note, reviewer and host name through
    :func:`daemon.paths.show`, so control characters and bidirectional overrides appear as
    escapes and cannot clear the screen, split a row or reverse the text. JSON and CSV keep
    paths as recorded (:mod:`daemon.queries.formats`).

Output files (``-o``, ``--out``) are opened through :mod:`daemon.queries.output`: never through a
symbolic link, never inside an evidence root, never onto an evidence file (a hard link).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from daemon.cli.errors import CliError, guarded
from daemon.paths import show
from daemon.queries.formats import (
    FACE_COLUMNS,
    FORMAT_VERSION,
    IMAGE_COLUMNS,
    capture_line,
    face_record,
    image_record,
    iso,
    video_line,
    write_csv,
    write_json,
    write_jsonl,
)
from daemon.queries.output import json_text

# --------------------------------------------------------------------------------------------
# Tables for a terminal


def _short(path: str | None, width: int) -> str:
    if path is None:
        return "(no current path)"
    path = show(path)
    return path if len(path) <= width else "…" + path[-(width - 1):]


def _age(r: dict) -> str:
    if r.get("age") is None:
        return "-"
    return f"{r['age']:.0f}±{(r.get('age_std') or 0):.0f}"


def _review(r: dict) -> str:
    if r.get("review") in (None, "cleared"):
        return "-"
    return r["review"] + (f":{r['review_label']}" if r["review"] == "corrected" else "")


def write_face_table(out: TextIO, rows: Iterable[dict]) -> int:
    out.write(f"{'ID':>8}  {'GENDER':9} {'P(MALE)':>7}  {'AGE':>6}  {'WIDTH':>5}  {'SCORE':>5}  {'REVIEW':18} PATH [FACE]\n")
    n = 0
    for r in rows:
        out.write(f"{r['face_id']:>8}  {r['gender']:9} {r['p_male']:>7.3f}  {_age(r):>6}  {r['width_px']:>5.0f}  {r['score']:>5.2f}  "
                  f"{_review(r):18} {_short(r['path'], 80)} [{r['idx']}]\n")
        n += 1
    return n


def write_image_table(out: TextIO, rows: Iterable[dict]) -> int:
    out.write(f"{'SHA256':12}  {'SIZE':>9}  {'W x H':>11}  {'STATUS':18} {'FACES':>5} {'F/M/U':>9}  PATH\n")
    n = 0
    for r in rows:
        dims = f"{r['width']}x{r['height']}" if r.get("width") else "-"
        status = show(r["status"]) + (f" ({show(r['reason'])})" if r.get("reason") else "")
        more = f" (+{len(r['paths']) - 1} more)" if len(r["paths"]) > 1 else ""
        fmu = f"{r['female']}/{r['male']}/{r['uncertain']}"
        out.write(f"{(r['sha256'] or '-')[:12]:12}  {r['size'] if r['size'] is not None else '-':>9}  {dims:>11}  {status:18} "
                  f"{r['faces']:>5} {fmu:>9}  {_short(r['path'], 70)}{more}\n")
        n += 1
    return n

# --------------------------------------------------------------------------------------------
# Plumbing shared by the commands


def _db_label(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for display
        return "(database)"



def _setup(args: argparse.Namespace, *, need_filters: bool = True):  # noqa: ANN202
    from daemon.cliargs import load_config
    from daemon.queries import filters as flt

    cfg = load_config(args, check_paths=False)
    f = flt.from_args(args) if need_filters else flt.Filters()
    g = cfg.pipeline.gender
    return cfg, f, flt.Cut(g.threshold, g.uncertain_margin)


def _open_out(path: str | None, guard) -> TextIO:  # noqa: ANN001
    from daemon.queries import output

    if path in (None, "-"):
        return sys.stdout
    return output.open_text(path, guard, "-o")


def _roots(cfg, conn) -> list[bytes]:  # noqa: ANN001
    from daemon.queries.media import evidence_roots

    return evidence_roots(cfg, conn)


def _guard(roots: list[bytes], conn):  # noqa: ANN001, ANN202
    from daemon.queries.output import Guard

    return Guard(roots, conn)


def shell_word(text: str) -> str:
    """``text`` as one shell word that pastes back exactly and shows no raw control character:
    plain quoting when it is printable, else bash's ``$'...'`` with escapes."""
    if text.isprintable() and show(text) == text:
        return shlex.quote(text)
    out = []
    for c in text:
        if c in ("\\", "'"):
            out.append("\\" + c)
        elif c.isprintable() and show(c) == c:
            out.append(c)
        else:
            o = ord(c)
            out.append(f"\\x{o:02x}" if o < 0x80 else f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}")
    return "$'" + "".join(out) + "'"


def _check_id(value: int, what: str) -> int:
    """``value`` as a row id (1 to 2**31 - 1, the schema's integer ids), else a CliError."""
    if not 1 <= value <= 2**31 - 1:
        raise CliError(f"{what} must be a whole number from 1 to {2**31 - 1}, got {value}; find ids with `forensic-gender faces`")
    return value



def _cut_filters(args: argparse.Namespace, bundle: str | None = None):  # noqa: ANN202
    from daemon.queries.filters import parse

    vals = {"threshold": "" if args.threshold is None else repr(args.threshold), "margin": "" if args.margin is None else repr(args.margin)}
    if bundle:
        vals["bundle"] = bundle
    return parse(vals)


def _head(cfg, f, sc) -> dict:  # noqa: ANN001
    return {"generated": iso(time.time()), "database": _db_label(cfg.database), "query": f.to_json(),
            "cut": {"threshold": sc.cut.threshold, "margin": sc.cut.margin}}


# --------------------------------------------------------------------------------------------
# Commands


def cmd_faces(args: argparse.Namespace) -> int:
    from daemon.queries import read

    with _scoped(args) as (cfg, f, conn, sc):
        if args.format == "table":
            page = read.face_page(conn, f, sc) if _keyset(f) else None
            n = write_face_table(sys.stdout, page.rows if page else read.faces(conn, f, sc, stream=True))
            total = read.count_faces(conn, f.page(None), sc)
            if page:  # say where the next page starts
                more = _next_page(page)
            else:
                more = f"; more with --offset {f.offset + n}" if f.offset + n < total else ""
            print(f"{n} of {total} matching face(s) shown (cut: threshold {sc.cut.threshold:g}, margin {sc.cut.margin:g}){more}")
        else:
            rows = read.faces(conn, f, sc, stream=True)
            _write_rows(sys.stdout, args.format, "faces", _head(cfg, f, sc), FACE_COLUMNS, (face_record(r) for r in rows),
                        csv_raw=args.csv_raw)
    return 0


@contextlib.contextmanager
def _scoped(args: argparse.Namespace) -> Iterator[tuple[Any, Any, Any, Any]]:
    """(configuration, filters, read-only connection, query scope) of a listing command; the
    engine is disposed of when the block ends."""
    from daemon.queries import read
    from daemon.store.engine import open_engine

    cfg, f, cut = _setup(args)
    engine = open_engine(cfg.database, readonly=True)
    try:
        with engine.connect() as conn:
            yield cfg, f, conn, read.scope(conn, f, cut)
    finally:
        engine.dispose()


def _next_page(page: Any) -> str:
    """Where the page after a keyset page starts, as the option that asks for it."""
    return f"; more with --after={shell_word(page.next)}" if page.next else ""


def _keyset(f) -> bool:  # noqa: ANN001
    """A page at a position (``--after``/``--before`` with ``--limit``): its table says where
    the next page starts."""
    return bool(f.limit) and (f.after is not None or f.before is not None)


def _write_rows(out: TextIO, fmt: str, kind: str, head: dict, columns, rows: Iterable[dict], *,  # noqa: ANN001
                csv_raw: bool = False) -> int:
    if fmt == "csv":
        return write_csv(out, columns, rows, raw=csv_raw)
    if fmt == "json":
        return write_json(out, kind, head, rows)
    return write_jsonl(out, rows)


def cmd_images(args: argparse.Namespace) -> int:
    from daemon.queries import read

    with _scoped(args) as (cfg, f, conn, sc):
        rows = read.images(conn, f, sc, stream=True)
        if args.format == "table":
            page = read.image_page(conn, f, sc) if _keyset(f) else None
            n = write_image_table(sys.stdout, page.rows if page else rows)
            if page:
                more = _next_page(page)
            else:
                more = f"; more with --offset {f.offset + n}" if f.limit and n == f.limit else ""
            print(f"{n} image(s) shown{more}")
        elif args.format == "csv":
            write_csv(sys.stdout, IMAGE_COLUMNS, (image_record(r) for r in rows), raw=args.csv_raw)
        else:
            _write_rows(sys.stdout, args.format, "images", _head(cfg, f, sc), IMAGE_COLUMNS, (image_record(r) for r in rows))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from daemon.queries import read

    with _scoped(args) as (cfg, f, conn, sc):
        st = read.stats(conn, f, sc)
    st["generated"] = iso(st["generated"])
    for b in st["bundles"]:
        b["created"], b["last_analysis"] = iso(b["created"]), iso(b["last_analysis"])
    if args.format == "json":
        print(json_text({"format": "forensic-gender/stats", "version": FORMAT_VERSION, "database": _db_label(cfg.database),
                         "query": f.to_json(), **st}, indent=2))
        return 0
    print_stats(sys.stdout, st, _db_label(cfg.database))
    return 0


def print_stats(out: TextIO, st: dict, db: str) -> None:
    w = out.write
    w(f"database {show(db)} at {st['generated']}\n")
    w(f"files {st['files']}, distinct images {st['images']}, faces {st['faces']} in {st['images_with_faces']} image(s)\n")
    w("by state: " + (", ".join(f"{k} {v}" for k, v in st["by_state"].items()) or "-") + "\n")
    w("failures: " + (", ".join(f"{show(k)} {v}" for k, v in st["failures"].items()) or "none") + "\n")
    w(f"backlog: {st['backlog']['queued']} queued, {st['backlog']['working']} in progress\n")
    lh = st["last_hour"]
    w(f"last hour: {lh['files_finished']} file(s) finished ({lh['per_minute']}/min), {lh['analyses']} analyses\n")
    c = st["cut"]
    g = st["gender"]
    w(f"gender (threshold {c['threshold']:g}, margin {c['margin']:g}): female {g['female']}, male {g['male']}, uncertain {g['uncertain']}\n")
    w("age: " + ", ".join(f"{k} {v}" for k, v in st["age"].items()) + "\n")
    w("minors: " + ", ".join(f"{k} {v}" for k, v in st["minors"].items()) + "\n")
    if st.get("hosts"):
        w("by host:\n")
        for host, d in st["hosts"].items():
            w(f"  {show(host)}: {d['analyses']} analyses ({d['last_minute']} last minute, {d['last_hour']} last hour), "
              f"{d['leases']} lease(s) held ({d['expired_leases']} expired)\n")
    w("by root:\n")
    for root, d in st["by_root"].items():
        rest = ", ".join(f"{k} {v}" for k, v in d.items() if k not in ("files", "faces"))
        w(f"  {show(root)}: {d.get('files', 0)} file(s) ({rest or '-'}), {d.get('faces', 0)} face(s)\n")
    w("model bundles:\n")
    for b in st["bundles"]:
        w(f"  {show(b['key'])}: {b['analyses']} analyses, gender model {show(str(b['gender_model']))}, age {'on' if b['age'] else 'off'}, "
          f"detector threshold {b['detector_threshold']}, created {b['created']}, last used {b['last_analysis'] or '-'}\n")
    w("reviewed faces: " + (", ".join(f"{k} {v}" for k, v in st["reviews"].items()) or "none")
      + (f" ({st['review_records']} review record(s) in all)" if st.get("review_records") else "") + "\n")


def cmd_show(args: argparse.Namespace) -> int:
    from daemon.queries import read
    from daemon.store.engine import open_engine

    cfg, _, cut = _setup(args, need_filters=False)
    f = _cut_filters(args)
    target = _target(args.target)
    engine = open_engine(cfg.database, readonly=True)
    try:
        with engine.connect() as conn:
            sc = read.scope(conn, f, cut)
            image_id, why = _find(conn, args.target, target)
            d = read.image_detail(conn, image_id, sc)
    finally:
        engine.dispose()
    doc = show_record(d)
    if args.format == "json":
        print(json_text({"format": "forensic-gender/image", "version": FORMAT_VERSION,
                         "cut": {"threshold": sc.cut.threshold, "margin": sc.cut.margin}, **doc}, indent=2))
    else:
        print_show(sys.stdout, doc, sc.cut)
    return 0


def _target(typed: str) -> str:
    """What a user typed for PATH|SHA256 in recorded form: a file that exists is made absolute;
    bytes that are not UTF-8 become ``\\xHH`` (:func:`daemon.paths.user_path`, ``to_db``)."""
    from daemon import paths
    from daemon.queries.filters import MAX_TEXT_CHARS

    if "\x00" in typed or len(typed) > MAX_TEXT_CHARS:
        raise CliError(f"PATH|SHA256 must be a recorded path or a SHA-256 (no NUL character, at most {MAX_TEXT_CHARS} characters), "
                       f"got {typed[:80]!r}")
    return paths.user_path(typed) if os.path.lexists(typed) else paths.to_db(typed)


def _find(conn, typed: str, target: str) -> tuple[int, list[str]]:  # noqa: ANN001
    """The image id for a typed PATH|SHA256: its recorded form, else the text as typed when it
    is already a recorded form (copied from an earlier output)."""
    from daemon.queries import read

    image_id, why = read.find_image(conn, target)
    if image_id is None and typed != target and not any("\ud800" <= c <= "\udfff" for c in typed):
        image_id, why2 = read.find_image(conn, typed)
        why = why2 if image_id is None else why
    if image_id is None:
        raise CliError("; ".join(why), 1)
    return image_id, why


def show_record(d: dict) -> dict:
    return {
        "sha256": d["sha256"], "md5": d["md5"], "size": d["size"], "format": d["format"], "width": d["width"], "height": d["height"],
        "orientation": d["orientation"], "frames": d["frames"], "notes": d["notes"], "first_seen": iso(d["first_seen"]),
        "capture": d.get("capture"), "video": d.get("video"),
        "paths": [{"path": p["path"], "root": p["root"], "state": p["state"], "reason": p["reason"], "error": p["error"],
                   "size": p["size"], "mtime": iso(p["mtime_ns"] / 1e9), "attempts": p["attempts"],
                   "first_seen": iso(p["first_seen"]), "last_seen": iso(p["last_seen"]), "updated": iso(p["updated"])} for p in d["paths"]],
        "analyses": [{"bundle": a["bundle"], "latest": a["latest"], "created": iso(a["created"]), "host": a["host"],
                      "seconds": round(a["seconds"], 3) if a["seconds"] is not None else None, "bundle_spec": a["spec"],
                      "faces": [{k: v for k, v in face_record(fr).items() if k not in ("sha256", "md5", "path", "root", "seen", "state", "image_width", "image_height")}
                                | {"landmarks": json.loads(fr["landmarks"])} for fr in a["faces_rows"]]}
                     for a in d["analyses"]],
        "reviews": [{"id": r["id"], "at": iso(r["created"]), "status": r["status"], "label": r["label"], "note": r["note"],
                     "reviewer": r["reviewer"], "origin": r["origin"], "bundle": r["bundle"], "face_idx": r["face_idx"],
                     "box": [round(r[k], 1) for k in ("x1", "y1", "x2", "y2")], "model_gender": r["model_gender"],
                     "model_p_male": r["model_p_male"]} for r in d["reviews"]],
        "events": [{"at": iso(e["at"]), "kind": e["kind"], "host": e["host"], "detail": json.loads(e["detail"]) if e["detail"] else None}
                   for e in d["events"]],
    }


def print_show(out: TextIO, d: dict, cut) -> None:  # noqa: ANN001
    w = out.write
    w(f"sha256 {d['sha256']}\nmd5    {d['md5']}\n")
    w(f"{d['format'] or '?'} {d['width']}x{d['height']}, {d['size']} bytes, orientation {d['orientation']}, frames {d['frames']}"
      + (f", notes: {show(d['notes'])}" if d["notes"] else "") + f"; first seen {d['first_seen']}\n")
    if d.get("capture"):
        w(show(capture_line(d["capture"])) + "\n")
    if d.get("video"):
        w(show(video_line(d["video"])) + "\n")
    w(f"paths ({len(d['paths'])}):\n")
    for p in d["paths"]:
        extra = f" ({show(p['reason'])}: {show(p['error'])})" if p["reason"] else ""
        w(f"  {show(p['path'])}  [{p['state']}{extra}] first seen {p['first_seen']}, last seen {p['last_seen']}\n")
    w(f"analyses ({len(d['analyses'])}; decision re-cut at threshold {cut.threshold:g}, margin {cut.margin:g}):\n")
    for a in d["analyses"]:
        w(f"  bundle {show(a['bundle'])}{' (latest)' if a['latest'] else ''} at {a['created']} on {show(a['host'])}, {len(a['faces'])} face(s)\n")
        for fc in a["faces"]:
            rv = ""
            if fc["review"] not in (None, "cleared"):
                rv = f"  review: {fc['review']}" + (f" {fc['review_label']}" if fc["review_label"] else "") + (f" ({show(fc['review_note'])})" if fc["review_note"] else "")
            age = f"age {fc['age']:.0f}±{fc['age_std'] or 0:.0f}" if fc["age"] is not None else "age -"
            at = f" frame {fc['frame']} ({fc['frame_time']:.1f} s)" if fc.get("frame") is not None else ""
            w(f"    face {fc['idx']} (id {fc['face_id']}){at}: {fc['gender']:9} p(male) {fc['p_male']:.3f}  {age}  box ({fc['x1']:.0f},{fc['y1']:.0f})-({fc['x2']:.0f},{fc['y2']:.0f}) "
              f"{fc['width_px']:.0f}px score {fc['score']:.2f}{rv}\n")
    if d["reviews"]:
        w(f"review history ({len(d['reviews'])}):\n")
        for r in d["reviews"]:
            w(f"  {r['at']} {r['status']}{' ' + r['label'] if r['label'] else ''} face {r['face_idx']} of {r['bundle']} by {show(r['reviewer']) or '-'} via {r['origin']}"
              + (f": {show(r['note'])}" if r["note"] else "") + "\n")
    w(f"events ({len(d['events'])}):\n")
    for e in d["events"]:
        w(f"  {e['at']} {show(e['kind'])} {show(json.dumps(e['detail'], ensure_ascii=False)) if e['detail'] else ''}\n")



def cmd_review(args: argparse.Namespace) -> int:
    from daemon.queries import read
    from daemon.store import reviews as rv
    from daemon.store.engine import open_store_engine

    cfg, _, cut = _setup(args, need_filters=False)
    f = _cut_filters(args)
    _check_id(args.face_id, "FACE_ID")
    engine = open_store_engine(cfg.database)
    try:
        with engine.begin() as conn:
            sc = read.scope(conn, f, cut)
            row = read.face(conn, args.face_id, sc)
            if row is None:
                raise CliError(f"face {args.face_id} does not exist; find face ids with `forensic-gender faces`", 1)
            review = rv.Review(args.status, args.label, args.note, args.reviewer or os.environ.get("USER"), "cli")
            rid = rv.record(conn, args.face_id, review, row["gender"])
        with engine.connect() as conn:
            row = read.face(conn, args.face_id, read.scope(conn, f, cut))
    finally:
        engine.dispose()
    print(f"review {rid} recorded: face {row['face_id']} (image {row['sha256'][:16]}..., face {row['idx']}): model {row['gender']} "
          f"p(male) {row['p_male']:.3f}; review {row['review']}" + (f" {row['review_label']}" if row["review_label"] else "")
          + f"; final {row['final_gender']}")
    return 0

# --------------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, formats: tuple[str, ...], default: str) -> None:
    from daemon.cliargs import add_config_args

    add_config_args(p)
    p.add_argument("--format", choices=formats, default=default, help=f"output format (default {default})")
    if "csv" in formats:
        _csv_raw(p)


def _csv_raw(p: argparse.ArgumentParser) -> None:
    p.add_argument("--csv-raw", action="store_true",
                   help="CSV for programs: write text cells starting with = + - @ tab or CR unchanged "
                        "(by default they get a leading ' so that a spreadsheet never runs them as formulas)")


def register_cli(sub: Any) -> None:
    from daemon.cliargs import add_config_args
    from daemon.queries.filters import add_filter_args
    from daemon.store.reviews import LABELS, STATUSES

    p = sub.add_parser("faces", help="list faces matching filters (read-only)")
    _common(p, ("table", "csv", "json", "jsonl"), "table")
    add_filter_args(p, limit=50)
    p.set_defaults(func=guarded(cmd_faces))

    p = sub.add_parser("images", help="list images: paths, hashes, status, face counts (read-only)")
    _common(p, ("table", "csv", "json", "jsonl"), "table")
    add_filter_args(p, limit=50)
    p.set_defaults(func=guarded(cmd_images))

    p = sub.add_parser("stats", help="totals, states, failures, gender and age, backlog, throughput, bundles (read-only)")
    _common(p, ("table", "json"), "table")
    add_filter_args(p, limit=None, only=("path_prefix", "path_glob", "root", "seen_since", "seen_until", "status", "bundle",
                                         "threshold", "margin", "gender", "age_min", "age_max", "width_min", "score_min", "review"))
    p.set_defaults(func=guarded(cmd_stats))

    p = sub.add_parser("show", help="everything known about one image: paths, analyses, faces, reviews, events (read-only)")
    p.add_argument("target", metavar="PATH|SHA256")
    _common(p, ("table", "json"), "table")
    p.add_argument("--threshold", type=float, help="re-cut the gender decision at this p(male) threshold")
    p.add_argument("--margin", type=float, help="half-width of the uncertain band")
    p.set_defaults(func=guarded(cmd_show))

    p = sub.add_parser("review", help="record an analyst's review of a face (stored beside the model output)")
    p.add_argument("face_id", type=int, metavar="FACE_ID", help="the face id shown by `faces`")
    add_config_args(p)
    p.add_argument("--status", required=True, choices=STATUSES, help="confirmed, corrected, ignored, or cleared (withdraws the review)")
    p.add_argument("--label", choices=LABELS, help="for corrected: female, male or not_face")
    p.add_argument("--note", help="free text (at most 2000 characters)")
    p.add_argument("--reviewer", help="who reviewed (default: $USER)")
    p.add_argument("--threshold", type=float)
    p.add_argument("--margin", type=float)
    p.set_defaults(func=guarded(cmd_review))
