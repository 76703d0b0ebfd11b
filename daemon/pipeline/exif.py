"""Capture metadata from an image's EXIF block: when, on which device, where.

Pillow parses the block (:class:`PIL.Image.Exif`, also for HEIC through pillow-heif); this module
only picks the tags an examiner sorts by and checks each one, because EXIF is written by
whatever made the file and is evidence, not truth. A value of the wrong type, a date that is not
a date or a position off the globe is left out and named in a note
(``EXIF GPSLatitude ignored: ...``); the image is analysed as usual.

Times are kept as the camera wrote them: ``taken_at`` is the local capture time in ISO 8601
without a zone (``2024-05-01T14:03:07``, DateTimeOriginal, else DateTime), ``taken_offset`` the
zone offset when the file records one (``+02:00``, OffsetTimeOriginal). Text fields are stripped
of NULs and cut to 200 characters.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from typing import Any

from PIL import Image

EXIF_IFD, GPS_IFD = 0x8769, 0x8825
TAGS_IFD0 = {"make": 0x010F, "model": 0x0110, "software": 0x0131}
TAGS_EXIF = {"lens": 0xA434, "serial": 0xA431}
DATETIME, DATETIME_ORIGINAL, OFFSET_ORIGINAL = 0x0132, 0x9003, 0x9011
GPS_LAT_REF, GPS_LAT, GPS_LON_REF, GPS_LON, GPS_ALT_REF, GPS_ALT = 1, 2, 3, 4, 5, 6
MAX_TEXT = 200
_DATE = re.compile(r"^(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_OFFSET = re.compile(r"^([+-])(\d{2}):(\d{2})$")


@dataclass(frozen=True)
class Capture:
    """What the EXIF block says about the capture; every field None when absent or invalid."""

    taken_at: str | None = None
    taken_offset: str | None = None
    make: str | None = None
    model: str | None = None
    software: str | None = None
    lens: str | None = None
    serial: str | None = None
    gps_lat: float | None = None
    gps_lon: float | None = None
    gps_alt: float | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in vars(self).values())


def _text(value: Any, name: str, notes: list[str]) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        notes.append(f"EXIF {name} ignored: expected text, got {type(value).__name__}")
        return None
    value = value.replace("\x00", "").strip()
    return value[:MAX_TEXT] or None


def _date(value: Any, notes: list[str], name: str) -> str | None:
    text = _text(value, name, notes)
    if text is None:
        return None
    m = _DATE.match(text)
    if not m:
        notes.append(f"EXIF {name} ignored: expected 'YYYY:MM:DD HH:MM:SS', got {text[:40]!r}")
        return None
    y, mo, d, h, mi, s = (int(g) for g in m.groups())
    if not (1 <= mo <= 12 and 1 <= d <= 31 and h <= 23 and mi <= 59 and s <= 60 and y >= 1826):
        if (y, mo, d, h, mi, s) != (0, 0, 0, 0, 0, 0):  # all zeros: the camera's "unknown"
            notes.append(f"EXIF {name} ignored: not a valid date and time, got {text[:40]!r}")
        return None
    return f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{min(s, 59):02d}"


def _offset(value: Any, notes: list[str]) -> str | None:
    text = _text(value, "OffsetTimeOriginal", notes)
    if text is None:
        return None
    m = _OFFSET.match(text)
    if not m or int(m.group(2)) > 14 or int(m.group(3)) > 59:
        notes.append(f"EXIF OffsetTimeOriginal ignored: expected '+HH:MM', got {text[:40]!r}")
        return None
    return text


def _number(value: Any) -> float | None:
    """A rational or number as float; None for anything else (or a zero denominator)."""
    try:
        f = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return f if math.isfinite(f) else None


def _coordinate(dms: Any, ref: Any, name: str, limit: float, negative: str, notes: list[str]) -> float | None:
    if dms is None:
        return None
    parts = [_number(v) for v in dms] if isinstance(dms, (tuple, list)) and len(dms) == 3 else []
    if len(parts) != 3 or any(p is None or p < 0 for p in parts):
        notes.append(f"EXIF {name} ignored: expected three non-negative rationals (degrees, minutes, seconds)")
        return None
    deg, minutes, seconds = (float(p) for p in parts if p is not None)
    value = deg + minutes / 60 + seconds / 3600
    if value > limit or minutes >= 60 or seconds >= 60:
        notes.append(f"EXIF {name} ignored: {value:.6f} is off the globe (at most {limit:g})")
        return None
    ref_text = _text(ref, f"{name}Ref", notes) or ""
    return round(-value if ref_text.upper().startswith(negative) else value, 7)


def _altitude(value: Any, ref: Any, notes: list[str]) -> float | None:
    if value is None:
        return None
    alt = _number(value)
    if alt is None or not -12_000 <= alt <= 100_000:
        notes.append("EXIF GPSAltitude ignored: expected metres between -12000 and 100000")
        return None
    below = ref in (1, b"\x01") or (isinstance(ref, bytes) and ref[:1] == b"\x01")
    return round(-alt if below else alt, 2)


def capture(exif: Image.Exif | None, notes: list[str]) -> Capture | None:
    """The capture metadata of ``exif`` (None when there is none); problems go to ``notes``."""
    if exif is None:
        return None
    try:
        sub = exif.get_ifd(EXIF_IFD)
        gps = exif.get_ifd(GPS_IFD)
    except (OSError, ValueError, TypeError, KeyError, IndexError, SyntaxError, EOFError, struct.error) as err:
        # a broken sub-directory must not cost the rest of the block
        notes.append(f"EXIF sub-directories ignored ({type(err).__name__})")
        sub, gps = {}, {}
    fields: dict[str, Any] = {k: _text(exif.get(tag), k, notes) for k, tag in TAGS_IFD0.items()}
    fields.update({k: _text(sub.get(tag), k, notes) for k, tag in TAGS_EXIF.items()})
    original = sub.get(DATETIME_ORIGINAL)
    if original is not None:
        fields["taken_at"] = _date(original, notes, "DateTimeOriginal")
        fields["taken_offset"] = _offset(sub.get(OFFSET_ORIGINAL), notes)
    else:
        fields["taken_at"] = _date(exif.get(DATETIME), notes, "DateTime")
    fields["gps_lat"] = _coordinate(gps.get(GPS_LAT), gps.get(GPS_LAT_REF), "GPSLatitude", 90, "S", notes)
    fields["gps_lon"] = _coordinate(gps.get(GPS_LON), gps.get(GPS_LON_REF), "GPSLongitude", 180, "W", notes)
    if fields["gps_lat"] is None or fields["gps_lon"] is None:  # half a position is no position
        fields["gps_lat"] = fields["gps_lon"] = None
    fields["gps_alt"] = _altitude(gps.get(GPS_ALT), gps.get(GPS_ALT_REF), notes) if fields["gps_lat"] is not None else None
    found = Capture(**fields)
    return found if found else None
