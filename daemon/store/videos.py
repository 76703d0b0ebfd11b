"""Videos (schema version 9): what the container said, the frames sampled, where sampling stopped.

One row in ``videos`` per analysed video content (its ``images`` row holds the hashes, the
format, the upright frame size and the declared frame count); one row in ``video_frames`` per
sampled frame, with its perceptual hash (:mod:`daemon.pipeline.phash`, indexed like
``images.near_hash``) and how many faces it held. The faces of a video carry their frame
(``faces.frame``, the ordinal among the decoded frames) and time (``faces.frame_time``, seconds);
they are null for images. ``cut`` says why sampling stopped before the end
(:class:`daemon.states.VideoCut`): the faces kept all come from frames before it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Column, Connection, Float, Index, Integer, MetaData, String, Table, Text, inspect, select

metadata = MetaData()

videos = Table(
    "videos",
    metadata,
    Column("image_id", Integer, primary_key=True),  # images.id (no foreign key, as the other added tables)
    Column("codec", String(32)),
    Column("duration", Float),  # seconds, as the container declares
    Column("fps", Float),
    Column("rotation", Integer),
    Column("interval", Float),  # seconds between sampled frames when it was analysed
    Column("sampled", Integer, nullable=False),
    Column("cut", String(16)),
    Column("cut_detail", Text),
)

video_frames = Table(
    "video_frames",
    metadata,
    Column("image_id", Integer, primary_key=True),
    Column("frame", Integer, primary_key=True),
    Column("time", Float, nullable=False),
    Column("faces", Integer, nullable=False),
    Column("near_hash", String(48)),
    Index("ix_video_frames_near_hash", "near_hash"),
)

FIELDS = ("codec", "duration", "fps", "rotation", "interval", "sampled", "cut", "cut_detail")


def has_tables(conn: Connection) -> bool:
    """Whether this database has the video tables (read-only commands may meet an older schema)."""
    return inspect(conn).has_table("videos")


def create(conn: Connection) -> None:
    """Migration step 9 (with the faces' frame columns, :func:`daemon.store.migrations.video`)."""
    metadata.create_all(conn, checkfirst=True)


def store(conn: Connection, image_id: int, video: Any) -> None:
    """Record a video's facts and sampled frames (``ImageResult.video``) unless it has them (the
    first analysis' stay)."""
    if conn.execute(select(videos.c.image_id).where(videos.c.image_id == image_id)).first() is not None:
        return
    conn.execute(videos.insert().values(
        image_id=image_id, codec=video.codec, duration=video.duration, fps=video.fps, rotation=video.rotation,
        interval=video.interval, sampled=len(video.sampled), cut=video.cut, cut_detail=video.cut_detail,
    ))  # fmt: skip
    rows = [{"image_id": image_id, "frame": f.frame, "time": f.time, "faces": f.faces, "near_hash": f.near_hash} for f in video.sampled]
    if rows:
        conn.execute(video_frames.insert(), rows)


def lookup(conn: Connection, image_ids: list[int]) -> dict[int, dict[str, Any]]:
    """The ``videos`` row of each of ``image_ids`` that is a video, by image id."""
    if not image_ids:
        return {}
    got = conn.execute(select(videos).where(videos.c.image_id.in_(image_ids))).mappings().all()
    return {r["image_id"]: {k: r[k] for k in FIELDS} for r in got}


def frames(conn: Connection, image_id: int) -> list[dict[str, Any]]:
    """A video's sampled frames in order: frame, time, faces, near_hash."""
    q = select(video_frames.c.frame, video_frames.c.time, video_frames.c.faces, video_frames.c.near_hash)
    return [dict(r) for r in conn.execute(q.where(video_frames.c.image_id == image_id).order_by(video_frames.c.frame)).mappings()]
