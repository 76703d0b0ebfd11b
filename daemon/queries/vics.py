"""Project VIC VICS JSON export (the data model 2.0 "Media" layout), written as a stream.

What the public material shows (hash sets and case exports written by public tools; the data
model itself is distributed to law enforcement and was not available to us): a JSON object with
an OData context and a ``value`` array. In a hash set the array holds ``Media`` records
(``@odata.context`` ending ``$metadata#Media``); in a case export it holds one case object
(``CaseID``, ``SourceApplicationName``/``Version``, ...) whose ``Media`` array holds them
(``$metadata#Cases``). A Media record has ``MediaID``, ``Category`` (an integer), ``MD5``
(upper-case hex, the key), optional ``SHA1``, ``MediaSize``, ``DateUpdated``, flags written as the
strings ``"true"``/``"false"`` (``IsPrecategorized``, ``VictimIdentified``, ...), free-text
``Comments``, ``Tags`` and ``Series``, ``MimeType``, ``RelativeFilePath``, an
``AlternativeHashes`` array of ``{HashName, HashValue}`` and a ``MediaFiles`` array with one
entry per place the file was found (``MD5``, ``FileName``, ``FilePath``, ``Created``/``Written``/
``Accessed``, ...). docs/VICS.md lists exactly what we fill in and what we do not.

Faces have no field in the model: they go into ``Comments`` (one line per face) and ``Tags``.
``Category`` is always 0 (uncategorized): this tool never categorizes content.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

from daemon import __version__
from daemon.queries.formats import capture_line
from daemon.queries.output import json_text

DATA_MODEL = "http://github.com/VICSDATAMODEL/ProjectVic/DataModels/2.0.xml/US/$metadata"
MIME = {"jpeg": "image/jpeg", "png": "image/png", "gif": "image/gif", "webp": "image/webp", "bmp": "image/bmp", "tiff": "image/tiff",
        "heic": "image/heic", "avif": "image/avif", "mp4": "video/mp4", "mov": "video/quicktime", "3gp": "video/3gpp",
        "avi": "video/x-msvideo", "mkv": "video/x-matroska", "webm": "video/webm"}
APP = "forensic-gender"
CAPTURE_KEYS = ("taken_at", "taken_offset", "camera_make", "camera_model", "gps_lat", "gps_lon")  # what a face row carries


def vics_time(ts: float | None) -> str | None:
    """Seconds since the epoch -> ``2024-05-01T12:00:00.000Z`` (UTC, milliseconds)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class MediaGroup:
    """One content with the faces of the query that belong to it."""

    image: dict  # a face row's image fields: sha256, md5, size, format, analysed
    paths: list[dict]  # paths_of() rows
    faces: list[dict]  # face rows (query-time decision, reviews)
    sha1: str | None = None


def _face_line(f: dict) -> str:
    age = f" age {f['age']:.1f}+-{f['age_std'] or 0:.1f}" if f.get("age") is not None else ""
    review = ""
    if f.get("review") in ("confirmed", "corrected", "ignored"):
        review = f"; review {f['review']}" + (f" as {f['review_label']}" if f.get("review_label") else "")
        review += f" by {f['reviewer']}" if f.get("reviewer") else ""
        review += f": {f['review_note']}" if f.get("review_note") else ""
    person = ""
    if f.get("person_id") is not None:
        person = f"; person {f['person_id']}" + (f" ({f['person_name']})" if f.get("person_name") else "")
    at = f" frame {f['frame']} at {f['frame_time']:.1f} s" if f.get("frame") is not None else ""
    return (f"face {f['idx']}{at}: {f['gender']} p(male)={f['p_male']:.4f}{age} box {f['x1']:.0f},{f['y1']:.0f}-{f['x2']:.0f},{f['y2']:.0f}"
            f" ({f['width_px']:.0f} px) score {f['score']:.3f}{person}{review}")


def tags(faces: Sequence[dict], minor_k: float = 1.0) -> str:
    t = [APP, f"faces={len(faces)}"]
    for g in ("female", "male", "uncertain"):
        n = sum(1 for f in faces if f["gender"] == g)
        if n:
            t.append(f"{g}={n}")
    if any(f.get("age") is not None and f["age"] - minor_k * (f.get("age_std") or 0) < 18 for f in faces):
        t.append("possible_minor")
    if any(f.get("age") is not None and f["age"] + minor_k * (f.get("age_std") or 0) < 18 for f in faces):
        t.append("likely_minor")
    if any(f.get("review") in ("confirmed", "corrected", "ignored") for f in faces):
        t.append("reviewed")
    return ",".join(t)


def media_record(media_id: int, g: MediaGroup, cut: dict) -> dict:
    im = g.image
    bundles = sorted({f["bundle"] for f in g.faces})
    head = f"{APP} {__version__}, model bundle {', '.join(bundles)}, cut threshold {cut['threshold']:g} margin {cut['margin']:g}: {len(g.faces)} face(s)"
    rec: dict = {
        "MediaID": media_id,
        "Category": 0,
        "MD5": im["md5"].upper(),
    }
    if g.sha1:
        rec["SHA1"] = g.sha1.upper()
    rec["MediaSize"] = im["size"]
    rec["DateUpdated"] = vics_time(max((f["analysed"] for f in g.faces if f.get("analysed")), default=None))
    rec["IsPrecategorized"] = "false"
    if im.get("format") in MIME:
        rec["MimeType"] = MIME[im["format"]]
    first = g.paths[0] if g.paths else None
    if first and first["path"].startswith(first["root"].rstrip("/") + "/"):
        rec["RelativeFilePath"] = first["path"][len(first["root"].rstrip("/")) + 1:]
    captured = {k: g.faces[0].get(k) for k in CAPTURE_KEYS} if g.faces else {}
    lines = [head] + ([capture_line(captured)] if any(v is not None for v in captured.values()) else [])
    rec["Comments"] = "\n".join(lines + [_face_line(f) for f in g.faces])
    rec["Tags"] = tags(g.faces)
    rec["AlternativeHashes"] = [{"HashName": "SHA256", "HashValue": im["sha256"].upper(), "MD5": im["md5"].upper()}]
    rec["MediaFiles"] = [
        {k: v for k, v in {"MD5": im["md5"].upper(), "FileName": p["path"].rsplit("/", 1)[-1], "FilePath": p["path"],
                           "Written": vics_time(p["mtime_ns"] / 1e9) if p.get("mtime_ns") else None}.items() if v is not None}
        for p in g.paths
    ]
    return {k: v for k, v in rec.items() if v is not None}


def write(out: TextIO, groups: Iterable[MediaGroup], *, cut: dict, case_id: str | None = None, case_number: str | None = None) -> int:
    """Write the VICS document to ``out`` one Media record at a time; returns how many.
    Without ``case_id``/``case_number`` the hash-set layout (``#Media``); with either, the
    case layout (``#Cases``) with one case holding the Media."""
    cases = case_id is not None or case_number is not None
    if cases:
        head = {"@odata.context": DATA_MODEL + "#Cases"}
        case = {"CaseID": case_id or "{" + str(uuid.uuid4()).upper() + "}"}
        if case_number:
            case["CaseNumber"] = case_number
        case |= {"SourceApplicationName": APP, "SourceApplicationVersion": __version__}
        out.write(json.dumps(head)[:-1] + ', "value": [' + json_text(case)[:-1] + ', "Media": [\n')
    else:
        out.write(json.dumps({"@odata.context": DATA_MODEL + "#Media"})[:-1] + ', "value": [\n')
    n = 0
    for g in groups:
        n += 1
        out.write((",\n" if n > 1 else "") + json_text(media_record(n, g, cut)))
    out.write("\n]}]}\n" if cases else "\n]}\n")
    return n
