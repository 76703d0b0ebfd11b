"""Video: the only module that opens video containers and decodes their frames (PyAV: FFmpeg's
libraries inside the wheel, no system FFmpeg).

Recognised by signature (:func:`sniff`), never by name: ISO media (MP4, MOV, M4V, 3GP; HEIC and
AVIF are images and stay :mod:`daemon.pipeline.images`'), QuickTime without ``ftyp``, AVI,
Matroska and WebM. A file named ``.mov`` that holds text is not a video, and is refused by the
image decoder as ``not_an_image`` like any other unknown content.

Sampling (:meth:`Clip.sample`)
    The first video stream is decoded in order; a frame is kept when its timestamp reaches the
    next sampling time (the first frame, then one every ``interval`` seconds), converted to
    upright 8-bit BGR (the stream's display rotation applied, as players do). ``index`` is the
    frame's ordinal among the decoded frames (0 = first), ``time`` its timestamp in seconds from
    the stream's start.

Limits and damage
    A frame larger than ``max_pixels`` refuses the video (``too_large``) before any frame is
    decoded. Sampling stops at ``max_frames`` sampled frames or at the ``deadline`` (a decode
    time budget, so a stream that claims or holds hours of frames costs a bounded time); the
    frames sampled so far are kept and :attr:`Clip.cut` says why it stopped (``frame_limit``,
    ``time_budget``). Data that ends or breaks mid-stream keeps the frames before the damage:
    ``truncated`` when the data ends early (a packet reaching the end of the file, or the last
    frame well before the duration the container declares), ``corrupt`` when it breaks inside.
    No frame at all is an :class:`ImageError`: ``truncated``/``corrupt`` for a container that
    cannot be opened, ``no_frames`` for one without a decodable video frame.

Container metadata
    Duration, frame rate, declared frame count and codec from the container; the capture facts
    the camera wrote (QuickTime/MP4 ``creation_time``, Apple's ``com.apple.quicktime.*`` keys,
    Android's ``com.android.*``, an ISO 6709 ``location``) as a
    :class:`daemon.pipeline.exif.Capture`, each value checked like EXIF's.
"""

from __future__ import annotations

import io
import logging
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import av
import numpy as np

from daemon.pipeline import structure
from daemon.pipeline.exif import MAX_TEXT, Capture
from daemon.pipeline.reading import ImageError
from daemon.states import Reason, VideoCut

log = logging.getLogger(__name__)
av.logging.set_level(None)  # FFmpeg's own messages off stderr; its last error comes with each exception

SNIFF_BYTES = 64
FORMATS = ("mp4", "mov", "3gp", "avi", "mkv", "webm")
_QT_ATOMS = {b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}
_LATE = 2.0  # seconds: data ending this long before the declared duration is truncated


def sniff(head: bytes) -> str | None:
    """The video container named by the first bytes, or None (an image, or not a video)."""
    if head[4:8] == b"ftyp" and len(head) >= 12:
        box = int.from_bytes(head[:4], "big")
        brands = {head[8:12]} | {head[i : i + 4] for i in range(16, min(len(head), max(box, 16)) - 3, 4)}
        if brands & (structure.HEIF_BRANDS | structure.AVIF_BRANDS):  # an image in an ISO media file
            return None
        major = head[8:12]
        if major == b"qt  ":
            return "mov"
        return "3gp" if major.startswith((b"3gp", b"3g2")) else "mp4"
    if head[4:8] in _QT_ATOMS and int.from_bytes(head[:4], "big") >= 8:
        return "mov"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm" if b"webm" in head[:SNIFF_BYTES] else "mkv"
    return None


@dataclass(frozen=True)
class Frame:
    """One sampled frame: upright BGR pixels, its ordinal among decoded frames, its time (s)."""

    index: int
    time: float
    bgr: np.ndarray


@dataclass(frozen=True)
class VideoInfo:
    """What the container says. ``width``/``height`` are upright (rotation applied)."""

    container: str
    codec: str
    width: int
    height: int
    rotation: int  # degrees counter-clockwise applied to make frames upright
    duration: float | None  # seconds, as declared
    fps: float | None
    frames: int | None  # declared frame count, None when the container does not say
    capture: Capture | None
    notes: tuple[str, ...] = field(default=())


def _size(f: io.BufferedIOBase) -> int:
    pos = f.tell()
    end = f.seek(0, io.SEEK_END)
    f.seek(pos)
    return end


def _ends_early(f: io.BufferedIOBase, fmt: str) -> bool:
    """Whether the container's own structure says the data stops early (a box or RIFF chunk
    longer than what is left): a cut file, not a damaged one."""
    size = _size(f)
    f.seek(0)
    try:
        if fmt == "avi":
            head = f.read(8)
            return len(head) == 8 and int.from_bytes(head[4:8], "little") + 8 > size
        if fmt in ("mkv", "webm"):
            return False  # EBML: told by the frames' times against the declared duration instead
        pos = 0
        for _ in range(100_000):  # top-level ISO boxes
            if pos >= size:
                return False
            f.seek(pos)
            head = f.read(16)
            if len(head) < 8:
                return True
            n = int.from_bytes(head[:4], "big")
            if n == 1 and len(head) >= 16:
                n = int.from_bytes(head[8:16], "big")
            elif n == 0:  # to the end of the file
                return False
            if n < 8:
                return False
            if pos + n > size:
                return True
            pos += n
        return False
    finally:
        f.seek(0)


def _damage(f: io.BufferedIOBase, fmt: str, err: Exception, what: str) -> ImageError:
    cut = _ends_early(f, fmt)
    reason = Reason.TRUNCATED if cut else Reason.CORRUPT
    how = "the data ends before the container does (the file was cut)" if cut else "the container is damaged"
    return ImageError(reason, f"{fmt.upper()} video: {what}: {how}; FFmpeg said {_say(err)}")


def _say(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err)[:300]}"


_ISO6709 = re.compile(r"^([+-]\d{1,2}(?:\.\d+)?)([+-]\d{1,3}(?:\.\d+)?)([+-]\d+(?:\.\d+)?)?")
_WHEN = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(?:\.\d+)?(Z|[+-]\d{2}:?\d{2})?$")


def _text(v: str | None) -> str | None:
    return (v.replace("\x00", "").strip()[:MAX_TEXT] or None) if v else None


def _when(value: str, name: str, notes: list[str]) -> tuple[str, str | None] | None:
    m = _WHEN.match(value.strip())
    if not m:
        notes.append(f"video {name} ignored: expected ISO 8601 date and time, got {value[:40]!r}")
        return None
    y, mo, d, h, mi, s = (int(g) for g in m.groups()[:6])
    if not (1 <= mo <= 12 and 1 <= d <= 31 and h <= 23 and mi <= 59 and s <= 60 and y >= 1904):
        if y > 1904 or (mo, d) != (1, 1):  # 1904-01-01 (or 1970) is QuickTime's "never set"
            notes.append(f"video {name} ignored: not a valid date and time, got {value[:40]!r}")
        return None
    if (y, mo, d) in ((1904, 1, 1), (1970, 1, 1)):
        return None
    zone = m.group(7)
    if zone == "Z":
        offset: str | None = "+00:00"
    elif zone:
        z = zone.replace(":", "")
        offset = f"{z[:3]}:{z[3:]}" if int(z[1:3]) <= 14 and int(z[3:]) <= 59 else None
    else:
        offset = None
    return f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{min(s, 59):02d}", offset


def _location(value: str, notes: list[str]) -> tuple[float, float, float | None] | None:
    m = _ISO6709.match(value.strip())
    if not m:
        notes.append(f"video location ignored: expected ISO 6709 (+DD.DDDD+DDD.DDDD/), got {value[:40]!r}")
        return None
    lat, lon = float(m.group(1)), float(m.group(2))
    alt = float(m.group(3)) if m.group(3) else None
    if abs(lat) > 90 or abs(lon) > 180:
        notes.append(f"video location ignored: {lat:.6f}, {lon:.6f} is off the globe")
        return None
    if alt is not None and not -12_000 <= alt <= 100_000:
        alt = None
    return round(lat, 7), round(lon, 7), alt


def container_capture(tags: dict[str, str], notes: list[str]) -> Capture | None:
    """The capture facts in a container's metadata (keys lower-cased), checked; problems go to
    ``notes``."""
    fields: dict[str, Any] = {}
    apple = tags.get("com.apple.quicktime.creationdate")  # local time with its zone
    when = _when(apple, "creationdate", notes) if apple else None
    if when is None and tags.get("creation_time"):
        when = _when(tags["creation_time"], "creation_time", notes)  # UTC by the format's rules
    if when is not None:
        fields["taken_at"], fields["taken_offset"] = when
    for key, names in (
        ("make", ("com.apple.quicktime.make", "com.android.manufacturer", "make")),
        ("model", ("com.apple.quicktime.model", "com.android.model", "model")),
        ("software", ("com.apple.quicktime.software", "com.android.version", "encoder_software", "software")),
    ):
        fields[key] = next((_text(tags[n]) for n in names if tags.get(n)), None)
    where = tags.get("com.apple.quicktime.location.iso6709") or tags.get("location")
    loc = _location(where, notes) if where else None
    if loc is not None:
        fields["gps_lat"], fields["gps_lon"], fields["gps_alt"] = loc
    found = Capture(**fields)
    return found if found else None


def _rotation(frame: av.VideoFrame) -> int:
    r = getattr(frame, "rotation", 0) or 0
    return int(round(r / 90.0)) % 4 * 90


def _upright(frame: av.VideoFrame, rotation: int) -> np.ndarray:
    bgr = frame.to_ndarray(format="bgr24")
    if rotation:
        bgr = np.rot90(bgr, k=rotation // 90)  # counter-clockwise, as the display matrix says
    return np.ascontiguousarray(bgr)


class Clip:
    """An open video (:func:`open_clip`): :attr:`info`, then :meth:`sample` once; afterwards
    :attr:`cut` says why sampling stopped early (None when it reached the end)."""

    def __init__(self, f: io.BufferedIOBase, fmt: str, *, max_pixels: int, threads: int = 1) -> None:
        self._f, self.format, self._max_pixels = f, fmt, max_pixels
        notes: list[str] = []
        try:
            self._c = av.open(f, mode="r")
        except av.FFmpegError as err:
            raise _damage(f, fmt, err, "the container cannot be opened") from err
        try:
            streams = self._c.streams.video
            if not streams:
                raise ImageError(Reason.NO_FRAMES, f"{fmt.upper()} file: expected a video stream, got none (audio or data only); nothing to analyse")
            s = self._stream = streams[0]
            cc = s.codec_context
            cc.thread_count = max(1, threads)
            w, h = int(cc.width or 0), int(cc.height or 0)
            if w * h > max_pixels:
                raise ImageError(
                    Reason.TOO_LARGE,
                    f"{fmt.upper()} video: frames must be at most {max_pixels} pixels, got {w}x{h} = {w * h}"
                    " (from the header, nothing decoded); raise the pixel limit if such videos must be analysed",
                )
            tags = {str(k).lower(): str(v) for k, v in {**dict(s.metadata), **dict(self._c.metadata)}.items()}
            duration = self._c.duration / 1e6 if self._c.duration and self._c.duration > 0 else None
            if duration is None and s.duration and s.time_base:
                duration = float(s.duration * s.time_base)
            fps = float(s.average_rate) if s.average_rate else None
            self.info = VideoInfo(
                container=fmt, codec=str(cc.name), width=w, height=h, rotation=0, duration=duration,
                fps=fps if fps and math.isfinite(fps) else None, frames=int(s.frames) if s.frames else None,
                capture=container_capture(tags, notes), notes=tuple(notes),
            )  # fmt: skip
        except BaseException:
            self._c.close()
            raise
        self.cut: VideoCut | None = None
        self._packet: Any = None  # the packet being decoded (av.Packet)
        self.cut_detail: str | None = None

    def close(self) -> None:
        self._c.close()

    def __enter__(self) -> Clip:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stop(self, why: VideoCut, detail: str) -> None:
        self.cut, self.cut_detail = why, detail
        log.info("%s video sampling stopped (%s): %s", self.format, why, detail)

    def _frames(self) -> Iterator[av.VideoFrame]:
        """The stream's frames as the decoder gives them. At damage (an FFmpeg error while
        demuxing or decoding) the frames the decoder still holds (it keeps a few back to reorder
        them) are drained first, then the error is raised: the frames before the damage are kept."""
        try:
            for packet in self._c.demux(self._stream):
                self._packet = packet
                yield from packet.decode()
        except av.FFmpegError:
            try:
                yield from self._stream.codec_context.decode(None)
            except av.FFmpegError as err:
                log.debug("%s video: draining the decoder after damage failed: %s", self.format, _say(err))
            raise

    def _decoded(self) -> Iterator[tuple[int, float, av.VideoFrame]]:
        """Every frame of the stream as the decoder returns them (presentation order): (ordinal,
        seconds from the start, frame). A frame over the pixel limit (a stream whose header did
        not say its size, or that changes it) refuses the video."""
        start, index = self._stream.start_time or 0, -1
        for frame in self._frames():
            index += 1
            if frame.width * frame.height > self._max_pixels:
                raise ImageError(
                    Reason.TOO_LARGE,
                    f"{self.format.upper()} video: frames must be at most {self._max_pixels} pixels, frame {index} has"
                    f" {frame.width}x{frame.height}; raise the pixel limit if such videos must be analysed",
                )
            if frame.pts is not None and frame.time_base:
                t = float((frame.pts - start) * frame.time_base)
            else:
                t = index / (self.info.fps or 30.0)
            if index == 0:
                rot = _rotation(frame)
                if rot:
                    w, h = (self.info.height, self.info.width) if rot % 180 else (self.info.width, self.info.height)
                    self.info = replace(self.info, rotation=rot, width=w, height=h)
            yield index, t, frame

    def _ended(self) -> bool:
        """Whether the packet being decoded reached the end of the file (a cut file)."""
        pk = self._packet
        return pk is not None and pk.pos is not None and pk.pos >= 0 and pk.pos + pk.size >= _size(self._f)

    def sample(self, interval: float, *, max_frames: int, deadline: float) -> Iterator[Frame]:
        """The sampled frames, in order (see the module docstring); stops early at the limits or
        at damage (:attr:`cut`). Raises :class:`ImageError` when not one frame decodes."""
        taken, next_t, last_t = 0, 0.0, None
        try:
            for index, t, frame in self._decoded():
                last_t = t
                if t + 1e-6 >= next_t:
                    yield Frame(index=index, time=round(t, 3), bgr=_upright(frame, self.info.rotation))
                    taken += 1
                    next_t = (math.floor(t / interval + 1e-9) + 1) * interval
                    if taken >= max_frames:
                        self._stop(VideoCut.FRAME_LIMIT, f"{taken} frames sampled (the most per video), up to {t:.1f} s")
                        return
                if time.monotonic() > deadline:
                    self._stop(VideoCut.TIME_BUDGET, f"the decode time budget ran out at {t:.1f} s ({taken} frames sampled)")
                    return
        except av.FFmpegError as err:
            if taken == 0:
                raise _damage(self._f, self.format, err, "no frame decodes") from err
            why = VideoCut.TRUNCATED if self._ended() or _ends_early(self._f, self.format) else VideoCut.CORRUPT
            self._stop(why, f"decoding stopped after {last_t or 0:.1f} s ({taken} frames sampled): {_say(err)}")
            return
        if taken == 0:
            raise ImageError(Reason.NO_FRAMES, f"{self.format.upper()} video: expected at least one decodable frame, got none")
        d = self.info.duration
        if d is not None and last_t is not None and last_t + _LATE < d < 10 * 24 * 3600:
            self._stop(VideoCut.TRUNCATED, f"the frames end at {last_t:.1f} s of the {d:.1f} s the container declares")


def open_clip(f: io.BufferedIOBase, fmt: str, *, max_pixels: int, threads: int = 1) -> Clip:
    """Open a video from a binary file object (positioned anywhere; read from the start)."""
    f.seek(0)
    return Clip(f, fmt, max_pixels=max_pixels, threads=threads)


def frame_at(f: io.BufferedIOBase, fmt: str, index: int, *, max_pixels: int) -> Frame:
    """Frame ``index`` (an ordinal from :meth:`Clip.sample`), decoded in order from the start:
    what annotate, crops and the review page show for a face found in a video."""
    with open_clip(f, fmt, max_pixels=max_pixels) as clip:
        try:
            for i, t, frame in clip._decoded():
                if i == index:
                    return Frame(index=i, time=round(t, 3), bgr=_upright(frame, clip.info.rotation))
        except av.FFmpegError as err:
            raise _damage(f, fmt, err, f"frame {index} does not decode") from err
    raise ImageError(Reason.NO_FRAMES, f"{fmt.upper()} video: expected a frame {index}, got fewer frames")
