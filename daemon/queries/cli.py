"""Query commands: ``faces``, ``images``, ``stats``, ``show``, ``export``, ``annotate``, ``crops``
and ``review``. All but ``review`` only read the database.

Machine formats are stable (documented in docs/ANALYST.md): CSV has a header row with the
columns below in this order; JSON is one document ``{"format", "version", "generated", "database",
"query", "cut", <rows>, "count"}``; JSONL is one object per line with the same keys as a JSON row.
Times are UTC, ISO 8601 (``2024-05-01T12:00:00Z``). Empty values are empty in CSV, null in JSON.

Hostile names
    Paths are carried in their recorded form (:mod:`daemon.paths`): JSON and CSV keep them as
    recorded (lossless). Tables and messages for a terminal pass every path, note, reviewer and
    host name through :func:`daemon.paths.show`, so control characters and bidirectional
    overrides appear as escapes and cannot clear the screen, split a row or reverse the text.
    CSV text cells that a spreadsheet would run as a formula (starting with ``=``, ``+``, ``-``,
    ``@``, a tab or a carriage return) are prefixed with ``'`` (OWASP's rule); numbers stay
    numbers. ``--csv-raw`` writes them unchanged, for programs that read the CSV.

Output files (``-o``, ``--out``) are opened through :mod:`daemon.queries.output`: never through a
symbolic link, never inside an evidence root, never onto an evidence file (a hard link).
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import operator
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO

from daemon.paths import show
from daemon.queries.output import json_text


FORMAT_VERSION = 1
FACE_COLUMNS = (
    "face_id", "sha256", "md5", "path", "root", "seen", "state", "idx", "x1", "y1", "x2", "y2", "width_px", "score",
    "p_male", "p_female", "gender", "model_gender", "age", "age_std", "bundle", "analysed", "image_width", "image_height",
    "review", "review_label", "review_note", "reviewer", "reviewed", "final_gender", "person_id", "person_name",
)
IMAGE_COLUMNS = (
    "sha256", "md5", "size", "format", "width", "height", "status", "reason", "faces", "female", "male", "uncertain",
    "bundle", "analysed", "first_seen", "path", "n_paths",
)  # JSON/JSONL rows add "paths": [{path, root, state, reason, first_seen, last_seen}]
_ROUND = {"x1": 1, "y1": 1, "x2": 1, "y2": 1, "width_px": 1, "score": 4, "p_male": 6, "p_female": 6, "age": 1, "age_std": 2}
_TIMES = {"seen", "analysed", "reviewed", "first_seen"}


@functools.lru_cache(maxsize=8192)
def iso(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _converter(key: str):  # noqa: ANN202
    if key in _ROUND:
        nd = _ROUND[key]
        return lambda v: None if v is None else round(v, nd)
    if key in _TIMES:
        return iso
    return None


_FACE_CONVERT = tuple((k, _converter(k)) for k in FACE_COLUMNS)


def face_record(row) -> dict:  # noqa: ANN001
    """A face row in the documented machine shape (rounded, ISO times)."""
    return {k: (conv(row[k]) if conv else row[k]) for k, conv in _FACE_CONVERT}


def image_record(row: dict) -> dict:
    out = {k: (iso(row.get(k)) if k in _TIMES else row.get(k)) for k in IMAGE_COLUMNS if k != "n_paths"}
    out["n_paths"] = len(row["paths"])
    out["paths"] = [{"path": p["path"], "root": p["root"], "state": p["state"], "reason": p["reason"],
                     "first_seen": iso(p["first_seen"]), "last_seen": iso(p["last_seen"])} for p in row["paths"]]
    return out


# --------------------------------------------------------------------------------------------
# Writers (streaming)


def _db_label(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for display
        return "(database)"


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(v: object) -> object:
    """A CSV cell a spreadsheet shows as text: a text value starting with ``= + - @``, a tab or a
    carriage return gets a leading ``'`` (OWASP's CSV-injection rule). Numbers (-0.5) and
    empty values are left alone."""
    if isinstance(v, str) and v.startswith(FORMULA_STARTS):
        return "'" + v
    return v


class _LineFeed:
    """A file for :func:`csv.writer` whose rows end in LF although the writer was told CRLF: told
    CRLF, the writer quotes every cell holding a CR as well as an LF (told LF, it leaves a bare CR
    unquoted, and a file name with a CR would split its row for every reader)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def write(self, row: str) -> int:
        return self.out.write(row[:-2] + "\n" if row.endswith("\r\n") else row)


def csv_writer(out: TextIO):  # noqa: ANN201
    """A CSV writer: rows end in LF, every cell with a CR or LF (or comma or quote) is quoted."""
    return csv.writer(_LineFeed(out), lineterminator="\r\n")


def write_csv(out: TextIO, columns: Iterable[str], rows: Iterable[dict], *, raw: bool = False) -> int:
    """CSV with a header row; text cells neutralised (:func:`csv_cell`) unless ``raw``."""
    cols = list(columns)
    w = csv_writer(out)
    w.writerow(cols)
    get = operator.itemgetter(*cols)
    n = 0
    for r in rows:
        vals = get(r) if len(cols) > 1 else (get(r),)
        w.writerow(vals if raw else [csv_cell(v) for v in vals])  # the csv module writes None as an empty field
        n += 1
    return n


def write_json(out: TextIO, kind: str, head: dict, rows: Iterable[dict]) -> int:
    doc = {"format": f"forensic-gender/{kind}", "version": FORMAT_VERSION, **head}
    out.write(json_text(doc)[:-1] + f', "{kind}": [')
    n = 0
    for r in rows:
        out.write((",\n  " if n else "\n  ") + json_text(r))
        n += 1
    out.write(("\n" if n else "") + f'], "count": {n}}}\n')
    return n


def write_jsonl(out: TextIO, rows: Iterable[dict]) -> int:
    n = 0
    for r in rows:
        out.write(json_text(r) + "\n")
        n += 1
    return n


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


class CliError(Exception):
    """A problem to report as one line and exit with ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


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


def _run(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn filter and CLI errors into one message and exit code 2 (the CLI edge)."""
    from daemon.queries.filters import FilterError
    from daemon.queries.media import MediaError
    from daemon.queries.output import OutputError
    from daemon.store.reviews import ReviewError

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return cmd(args)
        except FilterError as err:
            for p in err.problems:
                print(f"forensic-gender {args.command}: {show(p)}", file=sys.stderr)
            return 2
        except (CliError,) as err:
            print(f"forensic-gender {args.command}: {show(str(err))}", file=sys.stderr)
            return err.code
        except OutputError as err:
            print(f"forensic-gender {args.command}: {show(err.message)}", file=sys.stderr)
            return 2
        except MediaError as err:
            print(f"forensic-gender {args.command}: {show(err.message)}", file=sys.stderr)
            return 1
        except ReviewError as err:
            print(f"forensic-gender {args.command}: {show(str(err))}", file=sys.stderr)
            return 2
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0

    return wrapped


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
    from daemon.store.engine import open_engine

    cfg, f, cut = _setup(args)
    engine = open_engine(cfg.database, readonly=True)
    try:
        with engine.connect() as conn:
            sc = read.scope(conn, f, cut)
            if args.format == "table":
                page = read.face_page(conn, f, sc) if _keyset(f) else None
                n = write_face_table(sys.stdout, page.rows if page else read.faces(conn, f, sc, stream=True))
                total = read.count_faces(conn, f.page(None), sc)
                if page:  # say where the next page starts
                    more = f"; more with --after={shell_word(page.next)}" if page.next else ""
                else:
                    more = f"; more with --offset {f.offset + n}" if f.offset + n < total else ""
                print(f"{n} of {total} matching face(s) shown (cut: threshold {sc.cut.threshold:g}, margin {sc.cut.margin:g}){more}")
            else:
                rows = read.faces(conn, f, sc, stream=True)
                _write_rows(sys.stdout, args.format, "faces", _head(cfg, f, sc), FACE_COLUMNS, (face_record(r) for r in rows),
                            csv_raw=args.csv_raw)
    finally:
        engine.dispose()
    return 0


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
    from daemon.store.engine import open_engine

    cfg, f, cut = _setup(args)
    engine = open_engine(cfg.database, readonly=True)
    try:
        with engine.connect() as conn:
            sc = read.scope(conn, f, cut)
            rows = read.images(conn, f, sc, stream=True)
            if args.format == "table":
                page = read.image_page(conn, f, sc) if _keyset(f) else None
                n = write_image_table(sys.stdout, page.rows if page else rows)
                if page:
                    more = f"; more with --after={shell_word(page.next)}" if page.next else ""
                else:
                    more = f"; more with --offset {f.offset + n}" if f.limit and n == f.limit else ""
                print(f"{n} image(s) shown{more}")
            elif args.format == "csv":
                write_csv(sys.stdout, IMAGE_COLUMNS, (image_record(r) for r in rows), raw=args.csv_raw)
            else:
                _write_rows(sys.stdout, args.format, "images", _head(cfg, f, sc), IMAGE_COLUMNS, (image_record(r) for r in rows))
    finally:
        engine.dispose()
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from daemon.queries import read
    from daemon.store.engine import open_engine

    cfg, f, cut = _setup(args)
    engine = open_engine(cfg.database, readonly=True)
    try:
        with engine.connect() as conn:
            sc = read.scope(conn, f, cut)
            st = read.stats(conn, f, sc)
    finally:
        engine.dispose()
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
            w(f"    face {fc['idx']} (id {fc['face_id']}): {fc['gender']:9} p(male) {fc['p_male']:.3f}  {age}  box ({fc['x1']:.0f},{fc['y1']:.0f})-({fc['x2']:.0f},{fc['y2']:.0f}) "
              f"{fc['width_px']:.0f}px score {fc['score']:.2f}{rv}\n")
    if d["reviews"]:
        w(f"review history ({len(d['reviews'])}):\n")
        for r in d["reviews"]:
            w(f"  {r['at']} {r['status']}{' ' + r['label'] if r['label'] else ''} face {r['face_idx']} of {r['bundle']} by {show(r['reviewer']) or '-'} via {r['origin']}"
              + (f": {show(r['note'])}" if r["note"] else "") + "\n")
    w(f"events ({len(d['events'])}):\n")
    for e in d["events"]:
        w(f"  {e['at']} {show(e['kind'])} {show(json.dumps(e['detail'], ensure_ascii=False)) if e['detail'] else ''}\n")


def cmd_export(args: argparse.Namespace) -> int:
    from daemon.queries import read, vics
    from daemon.store.engine import open_engine

    cfg, f, cut = _setup(args)
    if args.format == "vics":
        from dataclasses import replace

        f = replace(f, sort="sha256")
    engine = open_engine(cfg.database, readonly=True)
    try:
        with engine.connect() as conn, engine.connect() as side:
            sc = read.scope(conn, f, cut)
            read.check_position(f)  # every filter checked before the output file is created
            roots = _roots(cfg, side)
            out = _open_out(args.output, _guard(roots, side))
            try:
                rows = read.faces(conn, f, sc, stream=True)
                if args.format == "vics":
                    hasher = _sha1_reader(side, roots, cfg) if args.hash_files else None
                    groups = _media_groups(side, rows, hasher)
                    n = vics.write(out, groups, cut={"threshold": sc.cut.threshold, "margin": sc.cut.margin},
                                   case_id=args.case_id, case_number=args.case_number)
                    what = "media record(s)"
                else:
                    n = _write_rows(out, args.format, "faces", _head(cfg, f, sc), FACE_COLUMNS, (face_record(r) for r in rows),
                                    csv_raw=args.csv_raw)
                    what = "face(s)"
            finally:
                if out is not sys.stdout:
                    out.close()
    finally:
        engine.dispose()
    if args.output not in (None, "-"):
        print(f"{n} {what} written to {show(args.output)}", file=sys.stderr)
    return 0


def _media_groups(side, rows: Iterator[dict], hasher, batch: int = 200):  # noqa: ANN001, ANN202
    """Consecutive face rows of one image -> MediaGroup, paths fetched per batch of images."""
    from daemon.queries import read
    from daemon.queries.vics import MediaGroup

    pending: list = []

    def flush():  # noqa: ANN202
        ps = read.paths_of(side, [g.image["image_id"] for g in pending])
        for g in pending:
            g.paths = ps[g.image["image_id"]]
            if hasher is not None:
                g.sha1 = hasher(g.image["sha256"])
        out = list(pending)
        pending.clear()
        return out

    cur = None
    for r in rows:
        if cur is None or cur.image["image_id"] != r["image_id"]:
            if cur is not None:
                pending.append(cur)
                if len(pending) >= batch:
                    yield from flush()
            cur = MediaGroup(image=r, paths=[], faces=[])
        cur.faces.append(r)
    if cur is not None:
        pending.append(cur)
    if pending:
        yield from flush()


def _sha1_reader(side, roots, cfg):  # noqa: ANN001, ANN202
    from daemon import paths
    from daemon.pipeline import images
    from daemon.queries.media import inside

    def sha1(sha256: str) -> str | None:
        from sqlalchemy import select

        from daemon.store import schema as s

        for path, root in side.execute(select(s.files.c.path, s.files.c.root).join(s.images, s.images.c.id == s.files.c.image_id)
                                       .where(s.images.c.sha256 == sha256).order_by(s.files.c.id)):
            real, real_root = os.path.realpath(paths.to_os(path)), os.path.realpath(paths.to_os(root))
            if not (inside(real, [real_root]) and inside(real_root, roots)):
                continue
            try:
                fb = images.read_file(real, max_bytes=cfg.pipeline.limits.max_file_bytes, root=real_root)
            except images.ImageError:
                continue
            if fb.sha256 == sha256:
                return hashlib.sha1(fb.data, usedforsecurity=False).hexdigest()
        print(f"forensic-gender export: {sha256[:16]}...: no readable copy with that content; SHA1 left out", file=sys.stderr)
        return None

    return sha1


def _faces_to_draw(rows: list[dict]) -> list[dict]:
    return [{"box": (r["x1"], r["y1"], r["x2"], r["y2"]), "gender": r["gender"], "p_male": r["p_male"], "score": r["score"],
             "age": r["age"], "landmarks": json.loads(r["landmarks"]) if r.get("landmarks") else []} for r in sorted(rows, key=lambda r: r["idx"])]


def annotated_jpeg(conn, sha256: str, rows: list[dict], roots: list[str], cfg, ext: str = ".jpg") -> bytes:  # noqa: ANN001
    """The image with the stored boxes drawn (no re-analysis), encoded."""
    from daemon.queries import media
    from daemon.render import draw_faces, encode

    loaded = media.load(conn, sha256, roots, max_bytes=cfg.pipeline.limits.max_file_bytes, max_pixels=cfg.pipeline.limits.max_pixels)
    return encode(draw_faces(loaded.decoded.bgr, _faces_to_draw(rows)), ext)


def cmd_annotate(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from daemon.queries import output, read
    from daemon.queries.filters import Filters
    from daemon.store import schema
    from daemon.store.engine import open_engine

    cfg, _, cut = _setup(args, need_filters=False)
    f = _cut_filters(args, args.bundle)
    target = _target(args.target)
    engine = open_engine(cfg.database, readonly=True)
    try:
        with engine.connect() as conn:
            sc = read.scope(conn, f, cut)
            roots = _roots(cfg, conn)
            image_id, _ = _find(conn, args.target, target)
            sha = conn.execute(select(schema.images.c.sha256).where(schema.images.c.id == image_id)).scalar_one()
            rows = list(read.faces(conn, Filters(sha256=(sha,), bundle=f.bundle, threshold=f.threshold, margin=f.margin, sort="sha256"), sc))
            out = os.fsencode(args.output)
            if out.endswith(b"/") or os.path.isdir(out):
                out = os.path.join(out, f"{sha[:16]}.annotated.jpg".encode())
            ext = os.path.splitext(out)[1].lower().decode("ascii", "replace")
            if ext not in (".jpg", ".jpeg", ".png"):
                raise CliError(f"-o {args.output}: the output must end in .jpg, .jpeg or .png (or be a folder), got {ext or 'no extension'!r}")
            guard = _guard(roots, conn)
            output.refuse_in_root(os.path.abspath(out), guard, "-o")  # before the work; checked again on the opened file
            data = annotated_jpeg(conn, sha, rows, roots, cfg, ext if ext != ".jpeg" else ".jpg")
            output.write_bytes(out, data, guard, "-o", replace=args.force, make_parents=True)
    finally:
        engine.dispose()
    bundle = rows[0]["bundle"] if rows else "-"
    print(f"{show(os.fsdecode(out))}: {len(rows)} face(s) drawn from bundle {bundle} (image {sha[:16]}...)")
    return 0


def crop_name(row: dict) -> str:
    """Crop file names sort by content, then bundle, then face, and trace back to both."""
    return f"{row['sha256']}_{row['bundle']}_{row['idx']:03d}.jpg"


def cmd_crops(args: argparse.Namespace) -> int:
    import math
    from dataclasses import replace

    from daemon.queries import media, output, read
    from daemon.render import crop, encode
    from daemon.store.engine import open_engine

    cfg, f, cut = _setup(args)
    if not (math.isfinite(args.context) and 0 <= args.context <= 5):
        raise CliError(f"--context must be a fraction of the box from 0 to 5, got {args.context}")
    if not 1 <= args.min_side <= 4096:
        raise CliError(f"--min-side must be from 1 to 4096 pixels, got {args.min_side}")
    f = replace(f, sort="sha256")
    engine = open_engine(cfg.database, readonly=True)
    written = skipped = 0
    try:
        with engine.connect() as conn, engine.connect() as side:
            sc = read.scope(conn, f, cut)
            roots = _roots(cfg, side)
            read.check_position(f)  # every filter checked before the output folder is created
            guard = _guard(roots, side)
            dfd = output.open_dir(args.out, guard, "--out")
            try:
                index = output.open_text(b"crops.csv", guard, "--out", dir_fd=dfd)
                w = csv_writer(index)
                w.writerow(["file", *FACE_COLUMNS])
                cell = (lambda v: v) if args.csv_raw else csv_cell
                loaded_sha, loaded, failed_sha = None, None, None
                try:
                    for r in read.faces(conn, f, sc, stream=True):
                        if r["sha256"] == failed_sha:
                            skipped += 1
                            continue
                        if r["sha256"] != loaded_sha:
                            try:
                                loaded = media.load(side, r["sha256"], roots, max_bytes=cfg.pipeline.limits.max_file_bytes,
                                                    max_pixels=cfg.pipeline.limits.max_pixels)
                                loaded_sha = r["sha256"]
                            except media.MediaError as err:
                                print(f"forensic-gender crops: skipped: {show(err.message)}", file=sys.stderr)
                                failed_sha, skipped = r["sha256"], skipped + 1
                                continue
                        name = crop_name(r)
                        box = (r["x1"], r["y1"], r["x2"], r["y2"])
                        data = encode(crop(loaded.decoded.bgr, box, margin=args.context, min_side=args.min_side))
                        output.write_bytes(name.encode(), data, guard, "--out", dir_fd=dfd)
                        rec = face_record(r)
                        w.writerow([name, *["" if rec[c] is None else cell(rec[c]) for c in FACE_COLUMNS]])
                        written += 1
                finally:
                    index.close()
            finally:
                os.close(dfd)
    finally:
        engine.dispose()
    print(f"{written} crop(s) written to {show(args.out)} (index: crops.csv)"
          + (f"; {skipped} face(s) skipped, image not readable" if skipped else ""))
    return 1 if skipped else 0


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


def register_cli(sub) -> None:  # noqa: ANN001
    from daemon.cliargs import add_config_args
    from daemon.queries.filters import add_filter_args
    from daemon.store.reviews import LABELS, STATUSES

    def common(p: argparse.ArgumentParser, formats: tuple[str, ...], default: str) -> None:
        add_config_args(p)
        p.add_argument("--format", choices=formats, default=default, help=f"output format (default {default})")
        if "csv" in formats:
            csv_raw(p)

    def csv_raw(p: argparse.ArgumentParser) -> None:
        p.add_argument("--csv-raw", action="store_true",
                       help="CSV for programs: write text cells starting with = + - @ tab or CR unchanged "
                            "(by default they get a leading ' so that a spreadsheet never runs them as formulas)")

    p = sub.add_parser("faces", help="list faces matching filters (read-only)")
    common(p, ("table", "csv", "json", "jsonl"), "table")
    add_filter_args(p, limit=50)
    p.set_defaults(func=_run(cmd_faces))

    p = sub.add_parser("images", help="list images: paths, hashes, status, face counts (read-only)")
    common(p, ("table", "csv", "json", "jsonl"), "table")
    add_filter_args(p, limit=50)
    p.set_defaults(func=_run(cmd_images))

    p = sub.add_parser("stats", help="totals, states, failures, gender and age, backlog, throughput, bundles (read-only)")
    common(p, ("table", "json"), "table")
    add_filter_args(p, limit=None, only=("path_prefix", "path_glob", "root", "seen_since", "seen_until", "status", "bundle",
                                         "threshold", "margin", "gender", "age_min", "age_max", "width_min", "score_min", "review"))
    p.set_defaults(func=_run(cmd_stats))

    p = sub.add_parser("show", help="everything known about one image: paths, analyses, faces, reviews, events (read-only)")
    p.add_argument("target", metavar="PATH|SHA256")
    common(p, ("table", "json"), "table")
    p.add_argument("--threshold", type=float, help="re-cut the gender decision at this p(male) threshold")
    p.add_argument("--margin", type=float, help="half-width of the uncertain band")
    p.set_defaults(func=_run(cmd_show))

    p = sub.add_parser("export", help="export the faces of a query as CSV, JSON, JSONL or Project VIC VICS JSON (streamed)")
    common(p, ("csv", "json", "jsonl", "vics"), "csv")
    p.add_argument("-o", "--output", metavar="FILE", help="output file (default: standard output); never inside an evidence root")
    p.add_argument("--hash-files", action="store_true", help="vics: read each image again to add its SHA1 (the database keeps MD5 and SHA-256)")
    p.add_argument("--case-id", help="vics: write the case layout with this CaseID (default: the hash-set Media layout)")
    p.add_argument("--case-number", help="vics: write the case layout with this CaseNumber")
    add_filter_args(p, limit=None)
    p.set_defaults(func=_run(cmd_export))

    p = sub.add_parser("annotate", help="draw the stored faces on an image (no re-analysis) into a new file")
    p.add_argument("target", metavar="PATH|SHA256")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output .jpg/.png file or folder; never inside an evidence root")
    add_config_args(p)
    p.add_argument("--bundle", default="latest", help="which analysis: latest (default) or a bundle key")
    p.add_argument("--threshold", type=float)
    p.add_argument("--margin", type=float)
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_run(cmd_annotate))

    p = sub.add_parser("crops", help="write face crops of a query into a folder, named <sha256>_<bundle>_<face>.jpg, with crops.csv")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder; never inside an evidence root")
    add_config_args(p)
    p.add_argument("--context", type=float, default=0.3, help="context around the box on each side, as a fraction of its size (default 0.3)")
    p.add_argument("--min-side", type=int, default=96, help="upscale small crops to at least this many pixels (default 96)")
    csv_raw(p)
    add_filter_args(p, limit=None)
    p.set_defaults(func=_run(cmd_crops))

    p = sub.add_parser("review", help="record an analyst's review of a face (stored beside the model output)")
    p.add_argument("face_id", type=int, metavar="FACE_ID", help="the face id shown by `faces`")
    add_config_args(p)
    p.add_argument("--status", required=True, choices=STATUSES, help="confirmed, corrected, ignored, or cleared (withdraws the review)")
    p.add_argument("--label", choices=LABELS, help="for corrected: female, male or not_face")
    p.add_argument("--note", help="free text (at most 2000 characters)")
    p.add_argument("--reviewer", help="who reviewed (default: $USER)")
    p.add_argument("--threshold", type=float)
    p.add_argument("--margin", type=float)
    p.set_defaults(func=_run(cmd_review))
