"""What the bytes of an image are and whether they are whole: signatures and structure walkers.

Formats
    Recognised by signature, never by file name. JPEG, PNG, GIF, WebP, BMP, TIFF, HEIC/HEIF and
    AVIF (when Pillow is built with it) are decoded; JPEG XL and JPEG 2000 are recognised and
    refused as ``unsupported_format``;
    anything else (PDF, ZIP, text, random bytes) is ``not_an_image`` with a description of
    what the first bytes look like.

Truncation policy (checked on the raw bytes before decoding; libraries fill missing data silently)
    * JPEG: the marker segments are walked from SOI; entropy-coded scan data is skipped to the next
      marker; the data must reach an EOI marker (FFD9). A JPEG whose data ends without EOI is
      ``truncated`` - including one that lacks *only* the final FFD9 (decoders return it as a clean
      image, we do not). Bytes after a valid EOI (camera trailers, padding) are allowed.
    * PNG: every chunk is walked up to IEND with its CRC. Data ending before IEND is ``truncated``;
      with the chunk structure intact, a CRC mismatch, a damaged zlib stream, too little pixel
      data or a bad row filter is ``corrupt`` (the file is whole but its content is damaged).
    * GIF: blocks are walked to the trailer (0x3B); ending before it is ``truncated``.
    * WebP: the RIFF length must fit in the data, else ``truncated``.
    * HEIC, AVIF: every top-level box must fit in the data, else ``truncated``; HEIC items whose
      data lies past the end are ``truncated`` too (libheif says so when decoding).
    * BMP, TIFF: Pillow's own checks ("image file is truncated") with ``LOAD_TRUNCATED_IMAGES``
      kept False.
    * When the header itself cannot be parsed, the walker decides: ``truncated`` if the data stops
      inside a well-formed prefix, else ``corrupt``.
    Not detected: damage inside JPEG entropy-coded data or inside GIF/WebP/TIFF compressed data
    that the decoder does not notice (the file is complete; its pixels are analysed as they are).
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Iterator

import numpy as np
from PIL import features

from daemon.pipeline import heif
from daemon.pipeline.reading import ImageError
from daemon.states import Reason

_AVIF = bool(features.check("avif"))  # Pillow >= 11.3 wheels decode AVIF; older ones do not
SUPPORTED_FORMATS = ("jpeg", "png", "gif", "webp", "bmp", "tiff", "heic") + (("avif",) if _AVIF else ())
UNSUPPORTED_FORMATS = ("jxl", "jp2") + (() if _AVIF else ("avif",))
HEIF_FAMILY = ("heic", "avif")  # ISO base media files: one box walker, one declared-size check


# --------------------------------------------------------------------------------------------
# Signatures

HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
AVIF_BRANDS = {b"avif", b"avis"}
_BMP_DIB_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}


def _ftyp_brands(data: bytes) -> set[bytes]:
    if len(data) < 12 or data[4:8] != b"ftyp":
        return set()
    box = int.from_bytes(data[:4], "big")
    end = min(len(data), box if 16 <= box <= 4096 else 16)
    return {data[8:12]} | {data[i : i + 4] for i in range(16, end - 3, 4)}


def sniff_format(data: bytes) -> str | None:
    """The image format named by the first bytes, or None when they are not an image we know."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if data[:2] == b"BM" and len(data) >= 18 and int.from_bytes(data[14:18], "little") in _BMP_DIB_SIZES:
        return "bmp"
    brands = _ftyp_brands(data)
    if brands & AVIF_BRANDS:
        return "avif"
    if brands & HEIF_BRANDS:
        return "heic"
    if data.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "jxl"
    if data.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "jp2"
    return None


_NON_IMAGES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive (or DOCX/XLSX/ODT/JAR/APK)"),
    (b"PK\x05\x06", "an empty ZIP archive"),
    (b"\x1f\x8b", "gzip-compressed data"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an OLE compound file (old Office document, Thumbs.db)"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"\x7fELF", "an ELF executable"),
    (b"MZ", "a Windows executable"),
    (b"OggS", "an Ogg media file"),
    (b"ID3", "an MP3 audio file"),
    (b"RIFF", "a RIFF container (WAV/AVI), not WebP"),
    (b"8BPS", "a Photoshop document (PSD)"),
)


def _describe(data: bytes) -> str:
    for magic, name in _NON_IMAGES:
        if data.startswith(magic):
            return name
    if data[4:8] == b"ftyp":
        return f"an ISO media file (MP4/MOV/3GP, brand {data[8:12]!r})"
    head = data[:512]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and all(c.isprintable() or c in "\r\n\t" for c in text.rstrip("\x00")[:400]):
        kind = "markup (HTML/XML/SVG)" if text.lstrip().startswith("<") else "text"
        return f"{kind} starting {text[:24]!r}"
    return f"unrecognised bytes starting {data[:8].hex(' ')}"


def require_format(data: bytes) -> str:
    if not data:
        raise ImageError(Reason.EMPTY, "image data must not be empty, got 0 bytes; the file is empty")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError(
            Reason.NOT_AN_IMAGE,
            f"expected an image ({', '.join(SUPPORTED_FORMATS)} by signature, whatever the file"
            f" name says), got {_describe(data)} ({len(data)} bytes); the file is not an image"
            " and nothing will change that on retry",
        )
    if fmt in UNSUPPORTED_FORMATS:
        raise ImageError(
            Reason.UNSUPPORTED_FORMAT,
            f"expected one of {', '.join(SUPPORTED_FORMATS)}, got {fmt.upper()}, which is recognised but not decoded; convert it (e.g. to PNG) to analyse it",
        )
    return fmt


# --------------------------------------------------------------------------------------------
# Structure walkers (truncation), one per format

_JPEG_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # skips stuffing, RSTn and fill


def truncated(fmt: str, detail: str) -> ImageError:
    return ImageError(
        Reason.TRUNCATED,
        f"{fmt.upper()} data must be complete, got {detail}; the file was cut short or is still"
        " being written - re-acquire it or wait until the copy has finished",
    )


def corrupt(fmt: str, detail: str) -> ImageError:
    return ImageError(Reason.CORRUPT, f"{fmt.upper()} data is damaged: {detail}; the file cannot be decoded")


def _check_jpeg(data: bytes) -> None:
    """Walk marker segments from SOI to EOI; scans are skipped to the next real marker."""
    n, pos = len(data), 2
    while True:
        if pos >= n:
            raise truncated("jpeg", f"the data ending at byte {n} before the end marker FFD9")
        if data[pos] != 0xFF:
            raise corrupt("jpeg", f"expected a marker at byte {pos}, found 0x{data[pos]:02x}")
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            raise truncated("jpeg", f"the data ending at byte {n} before the end marker FFD9")
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI; anything after it is a trailer and allowed
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers
            continue
        if not (0xC0 <= marker <= 0xCF or 0xDA <= marker <= 0xEF or marker == 0xFE):
            raise corrupt("jpeg", f"invalid marker FF{marker:02X} at byte {pos - 2}")
        if pos + 2 > n:
            raise truncated("jpeg", f"the data ending inside the FF{marker:02X} segment at byte {n}")
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2:
            raise corrupt("jpeg", f"segment FF{marker:02X} at byte {pos - 2} has length {length}")
        pos += length
        if pos > n:
            raise truncated("jpeg", f"the data ending inside the FF{marker:02X} segment at byte {n}")
        if marker == 0xDA:  # start of scan: entropy-coded data runs to the next marker
            found = _JPEG_NEXT_MARKER.search(data, pos)
            if found is None:
                raise truncated("jpeg", f"scan data running to the end (byte {n}) without FFD9")
            pos = found.start()


def png_chunks(data: bytes, *, verify: bool) -> Iterator[tuple[bytes, memoryview]]:
    """Yield (type, payload) up to and including IEND; raise truncated/corrupt."""
    n, pos, view = len(data), 8, memoryview(data)
    while True:
        if pos + 8 > n:
            raise truncated("png", f"the data ending at byte {n} before the IEND chunk")
        length, ctype = struct.unpack_from(">I4s", data, pos)
        if length > 0x7FFFFFFF or not ctype.isalpha():
            raise corrupt("png", f"invalid chunk header {ctype!r} (length {length}) at byte {pos}")
        end = pos + 12 + length
        if end > n:
            raise truncated("png", f"the data ending at byte {n} inside chunk {ctype.decode()}")
        if verify and zlib.crc32(view[pos + 4 : end - 4]) != int.from_bytes(data[end - 4 : end], "big"):
            raise corrupt("png", f"chunk {ctype.decode()} at byte {pos} fails its CRC")
        yield ctype, view[pos + 8 : end - 4]
        if ctype == b"IEND":
            return
        pos = end


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_raw_size(ihdr: bytes) -> tuple[int, int]:
    """(bytes of filtered pixel data the IHDR promises, row length or 0 when interlaced)."""
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", ihdr)
    if depth not in _PNG_DEPTHS.get(colour, ()) or interlace > 1:
        raise corrupt("png", f"invalid IHDR (bit depth {depth}, colour type {colour}, interlace {interlace})")
    bits = _PNG_CHANNELS[colour] * depth

    def rows(w: int, h: int) -> int:
        return 0 if w <= 0 or h <= 0 else h * (1 + (w * bits + 7) // 8)

    if not interlace:
        return rows(width, height), 1 + (width * bits + 7) // 8
    return sum(rows((width - x + dx - 1) // dx, (height - y + dy - 1) // dy) for x, y, dx, dy in _ADAM7), 0


def _check_png(data: bytes) -> bool:
    """Walk all chunks (CRC) to IEND and inflate IDAT without keeping it (bounded memory).

    This costs one extra inflate but proves the pixel stream sound (zlib, Adler-32, length,
    row filter types) before OpenCV sees it: libpng prints its errors on stderr, and Pillow
    returns images whose stream fails its Adler-32 check. Returns True when the stream carries
    data after the image (decodable; the caller then decodes with Pillow, which ignores it quietly).
    """
    inflater, got, expected, row, extra = zlib.decompressobj(), 0, -1, 0, False
    for ctype, payload in png_chunks(data, verify=True):
        if ctype == b"IHDR" and len(payload) == 13:
            expected, row = _png_raw_size(bytes(payload))
        if ctype != b"IDAT" or extra:
            continue
        if inflater.eof:
            extra = len(payload) > 0
            continue
        for start in range(0, len(payload), 65536):
            pending: bytes | memoryview = payload[start : start + 65536]
            while pending and not inflater.eof and not extra:
                try:
                    out = inflater.decompress(pending, 4 << 20)
                except zlib.error as err:
                    raise corrupt("png", f"the IDAT zlib stream is damaged ({err})") from err
                if row and out:  # every row must start with a filter type 0..4
                    mine = np.frombuffer(out, np.uint8)[: max(expected - got, 0)]
                    if mine[(-got) % row :: row].max(initial=0) > 4:
                        raise corrupt("png", "a row has an invalid filter type")
                got += len(out)
                extra = 0 <= expected < got  # stop inflating what nobody will decode
                pending = inflater.unconsumed_tail
            if inflater.eof and (inflater.unused_data or start + 65536 < len(payload)):
                extra = True
    if expected < 0:
        raise corrupt("png", "the IHDR chunk is missing or malformed")
    if got < expected:
        raise corrupt("png", f"{got} bytes of pixel data where the header needs {expected}")
    return extra


def _gif_skip_subblocks(data: bytes, pos: int) -> int:
    n = len(data)
    while True:
        if pos >= n:
            raise truncated("gif", f"the data ending at byte {n} inside a data block")
        size = data[pos]
        pos += 1 + size
        if size == 0:
            return pos


def count_gif_frames(data: bytes) -> int:
    """Walk GIF blocks to the trailer; return the number of frames."""
    n = len(data)
    if n < 13:
        raise truncated("gif", f"only {n} bytes, less than the 13-byte header")
    pos, frames = 13, 0
    if data[10] & 0x80:
        pos += 3 << ((data[10] & 7) + 1)
    while True:
        if pos >= n:
            raise truncated("gif", f"the data ending at byte {n} before the trailer 0x3B")
        block = data[pos]
        if block == 0x3B:
            return frames
        if block == 0x21:  # extension: label, sub-blocks
            pos = _gif_skip_subblocks(data, pos + 2)
        elif block == 0x2C:  # image descriptor, local colour table, LZW code size, sub-blocks
            if pos + 10 > n:
                raise truncated("gif", f"the data ending at byte {n} inside an image descriptor")
            flags = data[pos + 9]
            pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1
            pos = _gif_skip_subblocks(data, pos)
            frames += 1
        else:
            raise corrupt("gif", f"unexpected block 0x{block:02x} at byte {pos}")


def _check_webp(data: bytes) -> None:
    need = 8 + int.from_bytes(data[4:8], "little")
    if len(data) < need:
        raise truncated("webp", f"{len(data)} bytes where the RIFF header declares {need}")


_CHECKS = {"jpeg": _check_jpeg, "gif": count_gif_frames, "webp": _check_webp}


def heif_error(fmt: str, err: heif.HeifDataError) -> ImageError:
    if err.reason == "truncated":
        return truncated(fmt, err.detail)
    if err.reason == "unsupported":
        return ImageError(Reason.UNSUPPORTED_FORMAT, f"{fmt.upper()}: {err.detail} is not decoded; convert it to analyse it")
    return corrupt(fmt, err.detail)


def check_complete(fmt: str, data: bytes) -> bool:
    """Raise truncated/corrupt from the raw structure; True when a PNG has surplus pixel data."""
    if fmt == "png":
        return _check_png(data)
    if fmt in HEIF_FAMILY:
        try:
            heif.check_boxes(data)
        except heif.HeifDataError as err:
            raise heif_error(fmt, err) from err
    check = _CHECKS.get(fmt)
    if check is not None:
        check(data)
    return False
