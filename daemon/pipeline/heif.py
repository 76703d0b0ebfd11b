"""HEIF/HEIC reading through pillow-heif (libheif with libde265): the only module importing it.

:mod:`daemon.pipeline.images` recognises the format by signature, reads the file, checks the
limits and turns what this module returns into its upright 8-bit BGR frame; this module only
knows the container and libheif.

Container
    An ISO base media file: top-level boxes (``ftyp``, ``meta``, ``mdat``, ...). :func:`check_boxes`
    walks them from the bytes alone: a box running past the end of the data is ``truncated``, a
    malformed box header is ``corrupt``, and a file with an image *track* but no ``meta`` box (a
    pure HEIF/AVIF sequence, which libheif's still-image API cannot read) is ``unsupported``.
    :func:`declared_size` reads the sizes that the image items declare (``ispe`` properties in
    ``meta/iprp/ipco``) without libheif, so that a bomb-sized header is refused before libheif
    parses or allocates anything. Also used for AVIF, which shares the container.

Orientation
    libheif applies the container's transformations (``clap`` crop, ``irot`` rotation, ``imir``
    mirror) when it decodes, and reports the size after them. The HEIF standard makes these
    authoritative and says the EXIF Orientation tag must not be applied on top (Apple writes both,
    consistently). So the pixels returned here are upright; the EXIF tag is handed back only to be
    recorded.

Images in one file
    ``frames`` is the number of top-level images (bursts, collections); the *primary* image, the
    one a viewer shows, is decoded. Thumbnails, depth maps and auxiliary images (alpha, HDR gain
    maps) are not counted and never decoded.

Depth
    10- and 12-bit images are decoded to 16-bit samples (libheif shifts them to the top bits:
    1023 becomes 65472), reduced to 8 bit by the caller with rounding, as 16-bit PNG.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pillow_heif

# This module owns pillow-heif; its process-wide options are ours to set. Nothing we do not
# analyse is read. libheif's own security limits stay on, as a second line behind max_pixels.
pillow_heif.options.THUMBNAILS = False
pillow_heif.options.DEPTH_IMAGES = False
pillow_heif.options.AUX_IMAGES = False
pillow_heif.options.DISABLE_SECURITY_LIMITS = False


class HeifDataError(Exception):
    """The container is not whole (``truncated``), damaged (``corrupt``) or holds no still
    image (``unsupported``); ``detail`` says where, for the caller's message."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class HeifInfo:
    """What libheif reads from the header of the primary image, nothing decoded."""

    width: int  # upright: after clap/irot/imir, as decoded
    height: int
    frames: int  # top-level images in the file
    primary: int  # index of the primary image among them
    bit_depth: int
    mode: str  # pillow-heif's mode of the decoded samples, e.g. "BGR", "BGRA;16"
    exif: bytes | None  # the raw EXIF block, for the caller to read the Orientation tag


_FULL_BOXES = frozenset({b"meta", b"ispe"})  # boxes whose payload starts with version + flags


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """Yield (type, payload start, payload end) for the boxes in data[start:end]."""
    pos = start
    while pos < end:
        if pos + 8 > end:
            raise HeifDataError("truncated", f"the data ending at byte {end} inside a box header")
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:
            if pos + 16 > end:
                raise HeifDataError("truncated", f"the data ending at byte {end} inside a box header")
            size, header = struct.unpack_from(">Q", data, pos + 8)[0], 16
        elif size == 0:  # the box runs to the end of its container
            size = end - pos
        if not all(32 <= c < 127 for c in kind):
            raise HeifDataError("corrupt", f"invalid box type {kind!r} at byte {pos}")
        if size < header:
            raise HeifDataError("corrupt", f"box {kind.decode()} at byte {pos} declares {size} bytes")
        if pos + size > end:
            raise HeifDataError("truncated", f"the data ending at byte {end} inside box {kind.decode()} (declared to end at {pos + size})")
        body = pos + header + (4 if kind in _FULL_BOXES else 0)
        yield kind, min(body, pos + size), pos + size
        pos += size


def check_boxes(data: bytes) -> None:
    """Walk the top-level boxes; raise :class:`HeifDataError` when the file is not whole."""
    kinds = {kind for kind, _, _ in _boxes(data, 0, len(data))}
    if b"meta" not in kinds:
        if b"moov" in kinds:
            raise HeifDataError("unsupported", "an image sequence (a track) with no still image (no meta box)")
        raise HeifDataError("corrupt", "no meta box (the file declares no image)")


def declared_size(data: bytes) -> tuple[int, int]:
    """The largest (width, height) any image item declares (``ispe``); (0, 0) when none is
    found or the boxes cannot be walked (the caller's other checks then decide)."""
    best = (0, 0)
    try:
        for kind, start, end in _boxes(data, 0, len(data)):
            if kind != b"meta":
                continue
            for sub, s1, e1 in _boxes(data, start, end):
                if sub != b"iprp":
                    continue
                for prop, s2, e2 in _boxes(data, s1, e1):
                    if prop != b"ipco":
                        continue
                    for item, s3, e3 in _boxes(data, s2, e2):
                        if item == b"ispe" and e3 - s3 >= 8:
                            w, h = struct.unpack_from(">II", data, s3)
                            best = max(best, (w, h), key=lambda wh: wh[0] * wh[1])
    except HeifDataError:
        return best
    return best


def _open(data: bytes) -> pillow_heif.HeifFile:
    return pillow_heif.open_heif(io.BytesIO(data), convert_hdr_to_8bit=False, bgr_mode=True)


def probe(data: bytes) -> HeifInfo:
    """Read the header of the primary image (libheif parses the boxes; no pixel is decoded).

    Raises what pillow-heif raises (ValueError, RuntimeError, ...) for a file it cannot parse."""
    heif = _open(data)
    if len(heif) == 0:
        raise HeifDataError("corrupt", "the file holds no top-level image")
    primary = heif.primary_index
    image = heif[primary]
    width, height = image.size
    exif, depth = image.info.get("exif"), image.info.get("bit_depth")
    return HeifInfo(
        width=int(width),
        height=int(height),
        frames=len(heif),
        primary=primary,
        bit_depth=depth if isinstance(depth, int) else 8,
        mode=str(image.mode),
        exif=exif if isinstance(exif, bytes) and exif else None,
    )


def decode(data: bytes) -> np.ndarray:
    """The primary image, upright: HxWx3 BGR, HxWx4 BGRA or HxW grey; uint8, or uint16 for
    images deeper than 8 bit. A file whose items point past its end is ``truncated``."""
    heif = _open(data)
    try:
        return np.array(heif[heif.primary_index])
    except ValueError as err:
        text = str(err)
        if "end of file" in text.lower() or "outside of file bounds" in text:
            raise HeifDataError("truncated", f"image data missing ({text.strip()})") from err
        raise
