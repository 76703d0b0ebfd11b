"""Capture metadata per image (schema version 8): when, on which device, where.

One row in ``image_capture`` per image whose EXIF block said anything
(:class:`daemon.pipeline.exif.Capture`); none for the others, for images that failed to decode
and for those analysed before version 8 (they get one when analysed again). ``taken_at`` is the
camera's local time as ISO 8601 text without a zone (it sorts and compares as text),
``taken_offset`` its zone offset when the file records one.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Column, ColumnElement, Connection, Float, Index, Integer, MetaData, String, Table, func, inspect, or_, select

metadata = MetaData()
TEXT = 200  # the longest text field kept (daemon.pipeline.exif.MAX_TEXT)

image_capture = Table(
    "image_capture",
    metadata,
    Column("image_id", Integer, primary_key=True),  # images.id (no foreign key, as the other added tables)
    Column("taken_at", String(19)),
    Column("taken_offset", String(6)),
    Column("make", String(TEXT)),
    Column("model", String(TEXT)),
    Column("software", String(TEXT)),
    Column("lens", String(TEXT)),
    Column("serial", String(TEXT)),
    Column("gps_lat", Float),
    Column("gps_lon", Float),
    Column("gps_alt", Float),
    Index("ix_image_capture_taken_at", "taken_at"),
    Index("ix_image_capture_model", "model"),
)
FIELDS = tuple(c.name for c in image_capture.columns if c.name != "image_id")


def has_table(conn: Connection) -> bool:
    """Whether this database has the table (read-only commands may meet an older schema)."""
    return inspect(conn).has_table("image_capture")


def create(conn: Connection) -> None:
    """Migration step 8."""
    metadata.create_all(conn, checkfirst=True)


def store(conn: Connection, image_id: int, capture: Any) -> None:
    """Record the capture metadata of an image that has none yet (the first analysis' stays)."""
    values = {k: getattr(capture, k) for k in FIELDS}
    if not any(v is not None for v in values.values()):
        return
    exists = conn.execute(select(image_capture.c.image_id).where(image_capture.c.image_id == image_id)).first()
    if exists is None:
        conn.execute(image_capture.insert().values(image_id=image_id, **values))


def conditions(
    image_id: ColumnElement[Any], *, taken_from: str | None, taken_to: str | None, devices: tuple[str, ...], has_gps: bool
) -> list[ColumnElement[bool]]:
    """Conditions on ``image_id`` (a column holding an image's id) for the capture filters of
    :mod:`daemon.queries.filters`: taken at or after / before a local time, a device whose make
    or model contains one of ``devices`` (case-insensitive), a recorded position."""
    c = image_capture.c
    where: list[ColumnElement[bool]] = []
    if taken_from is not None:
        where.append(c.taken_at >= taken_from)
    if taken_to is not None:
        where.append(c.taken_at < taken_to)
    if devices:
        name = func.lower(func.coalesce(c.make, "") + " " + func.coalesce(c.model, ""))
        where.append(or_(*[name.contains(d.lower(), autoescape=True) for d in devices]))
    if has_gps:
        where.append(c.gps_lat.is_not(None))
    if not where:
        return []
    return [image_id.in_(select(c.image_id).where(*where))]


def of_images(conn: Connection, image_ids: list[int]) -> dict[int, dict[str, Any]]:
    """image id -> its capture fields, for the images that have a row (none on an older schema)."""
    return lookup(conn, image_ids) if image_ids and has_table(conn) else {}


def lookup(conn: Connection, image_ids: list[int]) -> dict[int, dict[str, Any]]:
    """:func:`of_images` where the caller already knows the table exists."""
    if not image_ids:
        return {}
    rows = conn.execute(select(image_capture).where(image_capture.c.image_id.in_(image_ids))).mappings()
    return {r["image_id"]: {k: r[k] for k in FIELDS} for r in rows}
