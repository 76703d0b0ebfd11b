"""Image decoding: the only module that decodes image pixels (OpenCV and Pillow).

The bytes come from :mod:`daemon.pipeline.reading` (read once, hashed, never written); videos are
:mod:`daemon.pipeline.video`'s. What the bytes are and whether they are whole (signatures, truncation)
is :mod:`daemon.pipeline.structure`'s.

Decoder per format
    * JPEG: OpenCV (libjpeg-turbo; fastest, and ``IMREAD_REDUCED_COLOR_2/4/8`` decodes DCT-reduced
      for ``min_side_hint``). Adobe (inverted) CMYK/YCCK is converted by OpenCV. If OpenCV refuses a
      JPEG that passed the structure check, Pillow is tried at full resolution.
    * PNG: OpenCV with ``IMREAD_UNCHANGED`` so that 16-bit samples and alpha arrive intact; we
      scale 16 -> 8 bit with rounding (``v * 255 / 65535``), never by truncation, and drop alpha.
      Before that, the pixel stream is inflated once (bounded memory) and checked, because libpng
      prints its errors on stderr and Pillow accepts a stream failing its Adler-32 check. A PNG
      whose stream carries data beyond the image is decoded by Pillow, which ignores it quietly.
    * GIF, WebP, BMP, TIFF: Pillow (wider mode coverage: palette, 1-bit, CMYK, I;16, I, F; frame
      counting). 16/32-bit integer and float greyscale are rescaled by us, never clipped.
    * AVIF: Pillow (libavif), which hands over 8-bit RGB(A). Its loader reports the container's
      rotation/mirror as the EXIF orientation and leaves the pixels as stored, like a JPEG.
    * HEIC/HEIF: pillow-heif, in :mod:`daemon.pipeline.heif` (the one module importing it). libheif
      applies the container's rotation/mirror itself, as the HEIF standard requires; the EXIF tag
      is recorded as ``orientation`` but not applied again. 10/12-bit: reduced to 8 bit like PNG.
    EXIF orientation is applied by us, identically for every format: OpenCV gets
    ``IMREAD_IGNORE_ORIENTATION``; Pillow leaves it alone except in its TIFF loader, which rotates
    by the tag itself (and reports TIFF sizes rotated) - we detect that and do not rotate twice.

Output frame
    :class:`Decoded` ``bgr`` is HxWx3 uint8, C-contiguous, BGR, *upright* (EXIF orientation 1..8
    applied as a viewer shows it). ``width``/``height`` are the upright dimensions of the full
    image; ``scale`` is bgr pixels per full-image pixel (1.0, or 1/2, 1/4, 1/8 for reduced JPEG).
    A point (x, y) in ``bgr`` is (x / scale, y / scale) in the upright full image.

Multi-frame policy
    Animated GIF/WebP/PNG/AVIF and multi-page TIFF: only the FIRST frame is analysed; ``frames``
    holds the frame count and a note ``"first frame of N"`` is added. HEIC with several images:
    the primary image (the one viewers show) is analysed, ``frames`` counts the top-level images.

Limits
    ``max_pixels`` is checked against the full header dimensions (even when a JPEG is then decoded
    DCT-reduced) before any pixel is decoded: a 20000x20000 PNG bomb of 400 KB is refused with no
    allocation. Pillow's own bomb check is disabled (``Image.MAX_IMAGE_PIXELS = None``) because
    this check replaces it. HEIC/AVIF: the largest size any image item declares (``ispe``) is
    checked too, from the bytes, before libheif or libavif parse the file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageFile

from daemon.pipeline import heif
from daemon.pipeline.exif import Capture, capture
from daemon.pipeline.reading import ImageError as ImageError  # the per-file error of every pipeline module
from daemon.pipeline.structure import (
    HEIF_FAMILY,
    check_complete,
    corrupt,
    count_gif_frames,
    heif_error,
    png_chunks,
    require_format,
    sniff_format,
    truncated,
)
from daemon.states import Reason

log = logging.getLogger(__name__)

# This module owns Pillow and OpenCV image I/O; these process-wide settings are ours to make.
Image.MAX_IMAGE_PIXELS = None  # our max_pixels check (from the header) replaces Pillow's
ImageFile.LOAD_TRUNCATED_IMAGES = False  # must stay False: truncation is an error, not an image
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # no decoder warnings on stderr



@dataclass(frozen=True)
class Header:
    """What the header says. ``width``/``height`` are as stored (before EXIF orientation)."""

    format: str
    width: int
    height: int
    frames: int | None  # None when the frames could not be counted
    orientation: int  # EXIF 1..8, 1 if absent or invalid

    @property
    def upright_size(self) -> tuple[int, int]:
        """(width, height) after the EXIF orientation is applied."""
        if self.orientation >= 5:
            return self.height, self.width
        return self.width, self.height


@dataclass(frozen=True)
class Decoded:
    """Upright 8-bit BGR pixels of the first frame; see the module docstring for the frame."""

    bgr: np.ndarray
    format: str
    width: int
    height: int
    scale: float
    orientation: int
    frames: int
    notes: tuple[str, ...]
    capture: Capture | None = None  # when, on which device, where (daemon.pipeline.exif)


# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# Header


@dataclass(frozen=True)
class _Probe:
    header: Header
    mode: str  # Pillow's mode for the first frame, e.g. "RGB", "CMYK", "I;16"
    notes: tuple[str, ...]
    bits: int = 8  # bits per sample where the reader says (HEIC), else 8
    capture: Capture | None = None  # when, on which device, where (EXIF)


def _orientation_from_exif(exif: Image.Exif | None, notes: list[str]) -> int:
    if exif is None:
        return 1
    value = exif.get(0x0112, 1)
    if isinstance(value, int) and 1 <= value <= 8:
        return value
    notes.append(f"invalid EXIF orientation {value!r} ignored")
    return 1


_WARNINGS = threading.RLock()  # catch_warnings swaps process-wide state: one thread at a time


@contextlib.contextmanager
def _warnings_as_notes(notes: list[str]) -> Iterator[None]:
    """What Pillow warns about inside the block (an EXIF tag pointing past the file, ...) becomes
    a note of the image, never an error or a line on stderr."""
    with _WARNINGS, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    notes.extend(dict.fromkeys(f"EXIF: {str(w.message)[:120]}" for w in caught))


def _exif_facts(exif: Image.Exif | None, notes: list[str]) -> tuple[int, Capture | None]:
    """Orientation and capture metadata from an EXIF block."""
    return _orientation_from_exif(exif, notes), capture(exif, notes)


def _read_exif(fmt: str, data: bytes, im: Image.Image, notes: list[str]) -> Image.Exif | None:
    try:
        if fmt == "png":  # Pillow's PNG getexif() may decode the whole image; find eXIf ourselves
            for ctype, payload in png_chunks(data, verify=False):
                if ctype == b"eXIf":
                    exif = Image.Exif()
                    exif.load(bytes(payload))
                    return exif
            return None
        return im.getexif()
    except ImageError:
        return None  # structure problems are reported by decode(); the header stays usable
    except Exception as err:  # a broken EXIF block must not make the image unreadable
        notes.append(f"unreadable EXIF ignored ({type(err).__name__})")
        log.debug("unreadable EXIF ignored: %r", err)
        return None


def _count_frames(fmt: str, data: bytes, im: Image.Image, notes: list[str]) -> int | None:
    try:
        if fmt == "gif":
            return count_gif_frames(data)
        return int(getattr(im, "n_frames", 1))
    except Exception as err:
        notes.append("frame count unknown")
        log.debug("frame count unknown: %r", err)
        return None


def _png_ihdr(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an intact IHDR chunk, even when the rest of the file is missing."""
    if len(data) < 33 or data[8:16] != b"\x00\x00\x00\x0dIHDR":
        return None
    if zlib.crc32(data[12:29]) != int.from_bytes(data[29:33], "big"):
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _header_error(fmt: str, data: bytes, err: Exception) -> ImageError:
    """A header Pillow cannot read: truncated when the data stops early, corrupt otherwise."""
    try:
        check_complete(fmt, data)
    except ImageError as structural:
        if structural.reason == "truncated":
            return structural
    return corrupt(fmt, f"the header cannot be read ({type(err).__name__}: {err})")


def _probe_heif(data: bytes) -> _Probe:
    """HEIC header through libheif. Its size is upright already; the stored size is derived from
    the EXIF orientation, which libheif's own rotation matches in files Apple and others write."""
    notes: list[str] = []
    try:
        info = heif.probe(data)
    except heif.HeifDataError as err:
        raise heif_error("heic", err) from err
    except Exception as err:  # the boxes say truncated, a bare sequence (unsupported) or corrupt
        try:
            heif.check_boxes(data)
        except heif.HeifDataError as structural:
            raise heif_error("heic", structural) from err
        raise corrupt("heic", f"the header cannot be read ({type(err).__name__}: {err})") from err

    def read() -> Image.Exif | None:
        if not info.exif:
            return None
        try:
            exif = Image.Exif()
            exif.load(info.exif)
            return exif
        except Exception as err:  # a broken EXIF block must not make the image unreadable
            notes.append(f"unreadable EXIF ignored ({type(err).__name__})")
            return None

    with _warnings_as_notes(notes):
        orientation, meta = _exif_facts(read(), notes)
    width, height = (info.height, info.width) if orientation >= 5 else (info.width, info.height)
    if width <= 0 or height <= 0:
        raise corrupt("heic", f"the header declares {width}x{height} pixels")
    if info.primary:
        notes.append(f"primary image (number {info.primary + 1} of {info.frames}) analysed")
    return _Probe(Header("heic", width, height, info.frames, orientation), info.mode, tuple(notes), info.bit_depth, meta)


def _probe(data: bytes) -> _Probe:
    fmt = require_format(data)
    if fmt == "heic":
        return _probe_heif(data)
    notes: list[str] = []
    try:
        # Pillow parses the EXIF block while opening a JPEG (for its resolution): warnings from here on are notes
        with _warnings_as_notes(notes), Image.open(io.BytesIO(data), formats=[fmt.upper()]) as im:
            width, height = im.size
            if fmt == "tiff":  # Pillow reports TIFF sizes already rotated by the Orientation tag
                width, height = im.tag_v2.get(256, width), im.tag_v2.get(257, height)
            mode = im.mode
            orientation, meta = _exif_facts(_read_exif(fmt, data, im, notes), notes)
            frames = _count_frames(fmt, data, im, notes)
    except Exception as err:
        ihdr = _png_ihdr(data) if fmt == "png" else None
        if ihdr is None:
            raise _header_error(fmt, data, err) from err
        log.debug("Pillow cannot open this PNG (%r); using its IHDR", err)
        (width, height), mode, orientation, frames, meta = ihdr, "", 1, None, None
    if width <= 0 or height <= 0:
        raise corrupt(fmt, f"the header declares {width}x{height} pixels")
    return _Probe(Header(fmt, width, height, frames, orientation), mode, tuple(notes), capture=meta)


def read_header(data: bytes) -> Header:
    """Format, stored dimensions, frame count and EXIF orientation, without decoding pixels."""
    return _probe(data).header


# --------------------------------------------------------------------------------------------
# Decoding


def _to_bgr8(arr: np.ndarray, notes: list[str]) -> np.ndarray:
    """OpenCV output (gray/BGR/BGRA, uint8/uint16) -> HxWx3 uint8 BGR."""
    if arr.dtype == np.uint16:
        arr = cv2.convertScaleAbs(arr, alpha=255.0 / 65535.0)  # rounds, saturates
        notes.append("16-bit reduced to 8-bit")
    elif arr.dtype != np.uint8:
        raise corrupt("image", f"unexpected sample type {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] in (2, 4):
        notes.append("alpha dropped")
        arr = arr[:, :, 0] if arr.shape[2] == 2 else arr[:, :, :3]
    if arr.ndim == 2:
        return cv2.cvtColor(arr, cv2.COLOR_GRAY2BGR)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise corrupt("image", f"unexpected decoded shape {arr.shape}")
    return arr


def _wide_gray_to_u8(arr: np.ndarray, mode: str, notes: list[str]) -> np.ndarray:
    """Pillow I;16*, I and F greyscale -> uint8 by rescaling (Pillow's convert would clip)."""
    if mode.startswith("I;16") or (mode == "I" and arr.min(initial=0) >= 0 and arr.max(initial=0) <= 65535):
        notes.append("16-bit reduced to 8-bit")
        return cv2.convertScaleAbs(arr.astype(np.float32), alpha=255.0 / 65535.0)
    f = arr.astype(np.float32)
    lo, hi = float(f.min()), float(f.max())
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        notes.append("float reduced to 8-bit (0..1)")
        return cv2.convertScaleAbs(f, alpha=255.0)
    notes.append(f"{'float' if mode == 'F' else '32-bit'} reduced to 8-bit (min-max {lo:g}..{hi:g})")
    if not math.isfinite(hi - lo) or hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return cv2.convertScaleAbs(f, alpha=255.0 / (hi - lo), beta=-lo * 255.0 / (hi - lo))


def _decode_pillow(data: bytes, probe: _Probe, notes: list[str]) -> tuple[np.ndarray, bool]:
    """First frame as BGR, and whether Pillow already applied the EXIF orientation.

    Pillow's TIFF loader rotates by the Orientation tag itself and then deletes the tag; we
    detect that and do not rotate twice.
    """
    fmt = probe.header.format
    with Image.open(io.BytesIO(data), formats=[fmt.upper()]) as im:
        tags = getattr(im, "tag_v2", None)
        had_tag = tags is not None and 0x0112 in tags
        im.load()  # first frame
        upright = had_tag and 0x0112 not in im.tag_v2
        mode = im.mode
        if mode in ("I", "F") or mode.startswith("I;16"):
            gray = _wide_gray_to_u8(np.asarray(im), mode, notes)
            return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), upright
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
            notes.append("alpha dropped")
        if mode == "CMYK":
            notes.append("cmyk converted")
        rgb = im if mode == "RGB" else im.convert("RGB")
        return cv2.cvtColor(np.asarray(rgb), cv2.COLOR_RGB2BGR), upright


def _jpeg_reduction(size: tuple[int, int], min_side_hint: int | None) -> int:
    if not min_side_hint or min_side_hint <= 0:
        return 1
    longer = max(size)
    for factor in (8, 4, 2):
        if math.ceil(longer / factor) >= min_side_hint:
            return factor
    return 1


_REDUCED = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


def _decode_cv2(data: bytes, probe: _Probe, factor: int, notes: list[str]) -> np.ndarray | None:
    buf = np.frombuffer(data, np.uint8)
    if probe.header.format == "jpeg":
        flags = _REDUCED[factor] | cv2.IMREAD_IGNORE_ORIENTATION
        if probe.mode == "CMYK":
            notes.append("cmyk converted")
    else:
        flags = cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION
    arr = cv2.imdecode(buf, flags)
    return None if arr is None else _to_bgr8(arr, notes)


_ORIENT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Turn an HxWxC image stored with EXIF ``orientation`` into the upright image (a view)."""
    return _ORIENT[orientation](arr)


def _decode_heif(data: bytes, probe: _Probe, notes: list[str]) -> np.ndarray:
    """The primary HEIC image, upright (libheif applied the container's rotation), as BGR."""
    arr = heif.decode(data)
    if arr.dtype == np.uint16:  # 10/12-bit samples arrive in the top bits of 16
        arr = cv2.convertScaleAbs(arr, alpha=255.0 / 65535.0)
        notes.append(f"{probe.bits}-bit reduced to 8-bit")
    return _to_bgr8(arr, notes)


def _classify(fmt: str, err: Exception) -> ImageError:
    if isinstance(err, ImageError):
        return err
    if isinstance(err, heif.HeifDataError):
        return heif_error(fmt, err)
    if isinstance(err, MemoryError):
        return ImageError(Reason.TOO_LARGE, f"{fmt.upper()}: ran out of memory while decoding; lower max_pixels")
    text = str(err)
    if "truncated" in text.lower():
        return truncated(fmt, f"a decoder error ({text})")
    return corrupt(fmt, f"the decoder failed ({type(err).__name__}: {text})")


def _refuse_too_large(fmt: str | None, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageError(
            Reason.TOO_LARGE,
            f"{(fmt or '').upper()} header declares {width}x{height} = {width * height} pixels,"
            f" more than max_pixels={max_pixels}; refused before decoding (a decompression bomb"
            " or a huge scan) - raise max_pixels if such images are expected",
        )


def decode(data: bytes, *, max_pixels: int = 100_000_000, min_side_hint: int | None = None) -> Decoded:
    """Decode the first frame to upright 8-bit BGR; refuse bombs from the header, detect truncation."""
    fmt = sniff_format(data)
    if fmt in HEIF_FAMILY:  # before libheif/libavif parse anything: the largest item declared
        _refuse_too_large(fmt, *heif.declared_size(data), max_pixels)
    probe = _probe(data)
    h = probe.header
    fmt = h.format
    _refuse_too_large(fmt, h.width, h.height, max_pixels)
    notes = list(probe.notes)
    factor = _jpeg_reduction((h.width, h.height), min_side_hint) if fmt == "jpeg" else 1
    try:
        surplus = check_complete(fmt, data)
        if surplus:
            notes.append("extra pixel data after the image ignored")
        bgr, upright = None, False
        if fmt == "heic":
            bgr, upright = _decode_heif(data, probe, notes), True
        elif fmt == "jpeg" or (fmt == "png" and not surplus):
            bgr = _decode_cv2(data, probe, factor, notes)
            if bgr is None and fmt == "png":
                raise corrupt(fmt, "the decoder rejected the pixel data")
        if bgr is None:
            if fmt == "jpeg":
                log.debug("OpenCV refused a structurally complete JPEG; trying Pillow")
                notes.append("decoded by Pillow (OpenCV refused)")
                factor = 1
            bgr, upright = _decode_pillow(data, probe, notes)
        if not upright:
            bgr = apply_orientation(bgr, h.orientation)
    except Exception as err:
        raise _classify(fmt, err) from err
    width, height = h.upright_size
    expected = (math.ceil(height / factor), math.ceil(width / factor))
    if bgr.shape[:2] != expected:
        got = f"{bgr.shape[1]}x{bgr.shape[0]}"
        raise corrupt(fmt, f"decoded {got} pixels where the header says {expected[1]}x{expected[0]} (upright)")
    frames = h.frames if h.frames is not None else 1
    if frames > 1:
        notes.append(f"first frame of {frames}")
    return Decoded(
        bgr=np.ascontiguousarray(bgr),
        format=fmt,
        width=width,
        height=height,
        scale=1.0 / factor,
        orientation=h.orientation,
        frames=frames,
        notes=tuple(dict.fromkeys(notes)),
        capture=probe.capture,
    )
