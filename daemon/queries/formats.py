"""The machine formats of the query commands (:mod:`daemon.cli.queries`, :mod:`daemon.cli.exports`),
shared with the review page and the benchmarks: rows as documented records, CSV, JSON and JSONL
writers, the stored faces as drawn. The commands themselves live in :mod:`daemon.cli`.

Machine formats are stable (documented in docs/ANALYST.md): CSV has a header row with the
columns below in this order; JSON is one document ``{"format", "version", "generated", "database",
"query", "cut", <rows>, "count"}``; JSONL is one object per line with the same keys as a JSON row.
Times are UTC, ISO 8601 (``2024-05-01T12:00:00Z``). Empty values are empty in CSV, null in JSON.

Paths are carried in their recorded form (:mod:`daemon.paths`): JSON and CSV keep them as recorded
(lossless). CSV text cells that a spreadsheet would run as a formula (starting with ``=``, ``+``,
``-``, ``@``, a tab or a carriage return) are prefixed with ``'`` (OWASP's rule); numbers stay
numbers. ``--csv-raw`` writes them unchanged, for programs that read the CSV.
"""

from __future__ import annotations

import csv
import functools
import json
import operator
import time
from collections.abc import Iterable, Iterator
from typing import TextIO

from daemon.queries.output import json_text

FORMAT_VERSION = 1
FACE_COLUMNS = (
    "face_id", "sha256", "md5", "path", "root", "seen", "state", "idx", "x1", "y1", "x2", "y2", "width_px", "score",
    "p_male", "p_female", "gender", "model_gender", "age", "age_std", "bundle", "analysed", "image_width", "image_height",
    "review", "review_label", "review_note", "reviewer", "reviewed", "final_gender", "person_id", "person_name",
    # the image's capture metadata (EXIF), as in IMAGE_COLUMNS; empty where the row has none
    "taken_at", "taken_offset", "camera_make", "camera_model", "gps_lat", "gps_lon",
    # a video's face: the frame's ordinal among the decoded frames and its time in seconds (empty for photos)
    "frame", "frame_time",
)
CAPTURE_COLUMNS = frozenset(("taken_at", "taken_offset", "camera_make", "camera_model", "software", "lens", "serial", "gps_lat", "gps_lon", "gps_alt"))
IMAGE_COLUMNS = (
    "sha256", "md5", "size", "format", "width", "height", "status", "reason", "faces", "female", "male", "uncertain",
    "bundle", "analysed", "first_seen", "path", "n_paths",
    # capture metadata from EXIF (daemon.pipeline.exif): camera-local time, device, position
    "taken_at", "taken_offset", "camera_make", "camera_model", "software", "lens", "serial", "gps_lat", "gps_lon", "gps_alt",
    # a video: declared duration (s), codec, frames sampled, why sampling stopped early (docs/VIDEO.md)
    "duration", "codec", "sampled", "cut",
)  # JSON/JSONL rows add "paths": [{path, root, state, reason, first_seen, last_seen}]
_OPTIONAL = CAPTURE_COLUMNS | {"frame", "frame_time"}  # rows from older schemas or other queries may lack them
_ROUND = {"frame_time": 3, "x1": 1, "y1": 1, "x2": 1, "y2": 1, "width_px": 1, "score": 4, "p_male": 6, "p_female": 6, "age": 1, "age_std": 2}
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
    out = {}
    for k, conv in _FACE_CONVERT:
        v = row.get(k) if k in _OPTIONAL else row[k]
        out[k] = conv(v) if conv else v
    return out


def image_record(row: dict) -> dict:
    out = {k: (iso(row.get(k)) if k in _TIMES else row.get(k)) for k in IMAGE_COLUMNS if k != "n_paths"}
    out["n_paths"] = len(row["paths"])
    out["paths"] = [{"path": p["path"], "root": p["root"], "state": p["state"], "reason": p["reason"],
                     "first_seen": iso(p["first_seen"]), "last_seen": iso(p["last_seen"])} for p in row["paths"]]
    return out



# --------------------------------------------------------------------------------------------
# Writers (streaming)


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


def _faces_to_draw(rows: list[dict]) -> list[dict]:
    return [{"box": (r["x1"], r["y1"], r["x2"], r["y2"]), "gender": r["gender"], "p_male": r["p_male"], "score": r["score"],
             "age": r["age"], "landmarks": json.loads(r["landmarks"]) if r.get("landmarks") else []} for r in sorted(rows, key=lambda r: r["idx"])]


def on_frame(rows: list[dict], frame: int | None) -> tuple[int | None, list[dict]]:
    """The face rows one picture shows: for a video, those of ``frame`` (None: the earliest frame
    holding a face); for a photo (no row has a frame), every row and frame None."""
    if frame is None:
        frame = min((r["frame"] for r in rows if r.get("frame") is not None), default=None)
    return (None, rows) if frame is None else (frame, [r for r in rows if r.get("frame") == frame])


def video_line(v: dict) -> str:
    """A video's facts in one line (``show``): codec, duration, frames sampled, where it was cut."""
    dur = f"{v['duration']:.1f} s" if v.get("duration") is not None else "duration unknown"
    fps = f" at {v['fps']:.3g} fps" if v.get("fps") else ""
    cut = f"; cut ({v['cut']}): {v['cut_detail']}" if v.get("cut") else ""
    return f"video: {v.get('codec') or '?'}, {dur}{fps}, {v.get('sampled')} frames sampled every {v.get('interval') or 0:g} s{cut}"


def capture_line(c: dict) -> str:
    """The capture metadata of an image in one line (``show``): time, device, lens, position."""
    when = (c.get("taken_at") or "time unknown") + (c.get("taken_offset") or "")
    device = " ".join(v for v in (c.get("camera_make"), c.get("camera_model")) if v) or "device unknown"
    extra = "; ".join(f"{k} {c[k]}" for k in ("lens", "software", "serial") if c.get(k))
    where = ""
    if c.get("gps_lat") is not None:
        where = f", GPS {c['gps_lat']:.6f}, {c['gps_lon']:.6f}" + (f", {c['gps_alt']:g} m" if c.get("gps_alt") is not None else "")
    return f"taken {when} by {device}" + (f" ({extra})" if extra else "") + where

