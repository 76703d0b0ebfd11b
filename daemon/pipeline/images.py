"""Image I/O: the only module that reads evidence files and decodes pixels (OpenCV and Pillow).

Reading (:func:`read_file`)
    Evidence is read-only. Evidence found under a root is opened *beneath* that root, one folder
    at a time with ``O_NOFOLLOW`` (a file or folder swapped for a symbolic link after discovery is
    refused as ``symlink``: nothing outside the root can be read through it), and the open
    descriptor must be the regular file discovery saw (same inode, else ``replaced``). A file
    named by the user (``analyze``) is ``stat``-ed first with symlinks followed. Anything that is
    not a regular file (FIFO, socket, device, directory) is refused as ``not_regular_file``
    without being opened. Regular files are opened ``O_RDONLY | O_NONBLOCK | O_NOATIME``
    (``O_NOATIME`` dropped when the kernel answers EPERM, i.e. we are neither owner nor root),
    re-checked with ``fstat`` (so a path swapped for a FIFO between stat and open is still
    refused, and cannot block), read once and hashed (SHA-256, MD5) in the same pass. Nothing is
    ever written or created anywhere.

Formats
    Recognised by signature, never by file name. JPEG, PNG, GIF, WebP, BMP, TIFF, HEIC/HEIF and
    AVIF (when Pillow is built with it) are decoded; JPEG XL and JPEG 2000 are recognised and
    refused as ``unsupported_format``;
    anything else (PDF, ZIP, video, text, random bytes) is ``not_an_image`` with a description of
    what the first bytes look like.

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

Limits
    ``max_pixels`` is checked against the full header dimensions (even when a JPEG is then decoded
    DCT-reduced) before any pixel is decoded: a 20000x20000 PNG bomb of 400 KB is refused with no
    allocation. Pillow's own bomb check is disabled (``Image.MAX_IMAGE_PIXELS = None``) because
    this check replaces it. HEIC/AVIF: the largest size any image item declares (``ispe``) is
    checked too, from the bytes, before libheif or libavif parse the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import math
import os
import re
import stat
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageFile, features

from daemon.pipeline import heif
from daemon.pipeline.exif import Capture, capture
from daemon.states import IMAGE_REASONS, Reason

log = logging.getLogger(__name__)

# This module owns Pillow and OpenCV image I/O; these process-wide settings are ours to make.
Image.MAX_IMAGE_PIXELS = None  # our max_pixels check (from the header) replaces Pillow's
ImageFile.LOAD_TRUNCATED_IMAGES = False  # must stay False: truncation is an error, not an image
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # no decoder warnings on stderr

REASONS = IMAGE_REASONS  # the reasons an ImageError may carry (daemon.states.Reason)
_AVIF = bool(features.check("avif"))  # Pillow >= 11.3 wheels decode AVIF; older ones do not
SUPPORTED_FORMATS = ("jpeg", "png", "gif", "webp", "bmp", "tiff", "heic") + (("avif",) if _AVIF else ())
UNSUPPORTED_FORMATS = ("jxl", "jp2") + (() if _AVIF else ("avif",))
_HEIF_FAMILY = ("heic", "avif")  # ISO base media files: one box walker, one declared-size check
_READ_CHUNK = 1024 * 1024


class ImageError(Exception):
    """A file that cannot be analysed; ``reason`` is machine-readable (one of :data:`REASONS`)."""

    def __init__(self, reason: Reason, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"ImageError reason must be one of {sorted(REASONS)}, got {reason!r}")
        super().__init__(reason, message)  # both in args, so the error survives pickling
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


@dataclass(frozen=True)
class FileBytes:
    """The whole content of one regular file, with its hashes and identity at read time."""

    data: bytes
    size: int
    sha256: str
    md5: str
    mtime_ns: int
    inode: int
    device: int


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
# Reading files


def _show(path: str | bytes) -> str:
    return repr(os.fsdecode(path))


def _os_error(path: str | bytes, what: str, err: OSError) -> ImageError:
    name = errno.errorcode.get(err.errno or 0, "E?")
    hint = {
        errno.ELOOP: "the path is a symlink loop (or too many links); fix or remove the link",
        errno.ENOENT: "the file (or the target of a symlink) does not exist; it may have been"
        " removed, or the link is dangling",
        errno.EACCES: "the service user may not read it; grant read permission",
        errno.EPERM: "the service user may not read it; grant read permission",
    }.get(err.errno or 0, "check the file and the storage it lives on")
    return ImageError(
        Reason.UNREADABLE, f"{_show(path)}: {what} failed with {name} ({err.strerror}); {hint}"
    )


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return f"a non-regular file (mode {stat.filemode(mode)})"


def _not_regular(path: str | bytes, mode: int) -> ImageError:
    return ImageError(
        Reason.NOT_REGULAR_FILE,
        f"{_show(path)}: must be a regular file, got {_kind(mode)}; it was not opened"
        " (reading it could block or have side effects)",
    )


def _too_big(path: str | bytes, size: int, max_bytes: int) -> ImageError:
    return ImageError(
        Reason.TOO_BIG_FILE,
        f"{_show(path)}: file size must be at most {max_bytes} bytes, got {size};"
        " raise the byte limit if such files must be analysed",
    )


_O_BASE = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIR = getattr(os, "O_DIRECTORY", 0)


def _open_readonly(path: str | bytes, *, dir_fd: int | None = None, follow: bool = True) -> int:
    flags = _O_BASE | os.O_NONBLOCK | (0 if follow else _O_NOFOLLOW)
    noatime = getattr(os, "O_NOATIME", 0)
    try:
        return os.open(path, flags | noatime, dir_fd=dir_fd)
    except PermissionError as err:
        if not noatime or err.errno != errno.EPERM:
            raise
        return os.open(path, flags, dir_fd=dir_fd)  # O_NOATIME needs owner or root; atime may now change


def _swapped(p: bytes, what: str) -> ImageError:
    return ImageError(
        Reason.SYMLINK,
        f"{_show(p)}: {what} must be a regular file or folder inside the root, got a symbolic link"
        " (swapped in after the file was found); it was not followed",
    )


def _is_link(name: bytes, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _open_beneath(root: bytes, p: bytes) -> int:
    """Open ``p`` for reading one component at a time from ``root`` without following any
    symbolic link below the root, so that nothing outside the root can be read through a path
    that was changed after discovery."""
    rel = p[len(root):].lstrip(b"/")
    parts = [c for c in rel.split(b"/") if c]
    if not p.startswith(root.rstrip(b"/") + b"/") or not parts or b".." in parts:
        raise ImageError(Reason.UNREADABLE, f"{_show(p)}: must lie inside its root {_show(root)}; it was not opened")
    try:
        dfd = os.open(root, _O_BASE | _O_DIR)
    except OSError as err:
        raise _os_error(root, "open (root folder)", err) from err
    try:
        for comp in parts[:-1]:
            try:
                nfd = os.open(comp, _O_BASE | _O_DIR | _O_NOFOLLOW, dir_fd=dfd)
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(comp, dfd):
                    raise _swapped(p, f"folder {_show(comp)} on its path") from err
                raise _os_error(p, "open", err) from err
            os.close(dfd)
            dfd = nfd
        try:
            mode = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False).st_mode
        except OSError as err:
            raise _os_error(p, "lstat", err) from err
        if stat.S_ISLNK(mode):
            raise _swapped(p, "it")
        if not stat.S_ISREG(mode):  # never open a FIFO or a device (opening one can have effects)
            raise _not_regular(p, mode)
        try:
            return _open_readonly(parts[-1], dir_fd=dfd, follow=False)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise _swapped(p, "it") from err
            raise _os_error(p, "open", err) from err
    finally:
        os.close(dfd)


def read_file(
    path: str | bytes | os.PathLike[str] | os.PathLike[bytes],
    *,
    max_bytes: int = 512 * 1024 * 1024,
    root: str | bytes | None = None,
    inode: int | None = None,
) -> FileBytes:
    """Read a regular file once (read-only, no atime change where allowed), hashing as it goes.

    Evidence found under a ``root`` is opened beneath it without following symbolic links, and
    the open descriptor must be the regular file that discovery saw (``inode``), else the read
    is refused. Without ``root`` (a file named by the user) a symbolic link is followed."""
    p = os.fspath(path)
    if root is not None:
        fd = _open_beneath(os.fsencode(root), os.fsencode(p))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _not_regular(p, st.st_mode)
            if inode is not None and st.st_ino != inode:
                raise ImageError(
                    Reason.REPLACED,
                    f"{_show(p)}: must be the file found at discovery (inode {inode}), got inode {st.st_ino}: it was"
                    " replaced since; the new file is recorded when the watcher or the next scan sees it",
                )
            if st.st_size > max_bytes:
                raise _too_big(p, st.st_size, max_bytes)
        except BaseException:
            os.close(fd)
            raise
    else:
        try:
            st = os.stat(p)  # follows symlinks: a dangling link is ENOENT, a loop ELOOP
        except OSError as err:
            raise _os_error(p, "stat", err) from err
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(p, st.st_mode)
        if st.st_size > max_bytes:
            raise _too_big(p, st.st_size, max_bytes)
        try:
            fd = _open_readonly(p)
        except OSError as err:
            raise _os_error(p, "open", err) from err
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):  # replaced between stat() and open()
            raise _not_regular(p, before.st_mode)
        sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
        parts: list[bytes] = []
        total = 0
        while True:  # normally one read for the whole file and one that sees EOF
            try:
                chunk = os.read(fd, max(before.st_size - total, _READ_CHUNK))
            except OSError as err:
                raise _os_error(p, "read", err) from err
            if not chunk:
                break
            sha.update(chunk)
            md5.update(chunk)
            parts.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise _too_big(p, total, max_bytes)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or total != after.st_size:
        raise ImageError(
            Reason.UNREADABLE,
            f"{_show(p)}: the file must not change while it is read, but it went from"
            f" {before.st_size} to {after.st_size} bytes ({total} read); it is still being"
            " written - retry once the writer has finished",
        )
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    return FileBytes(
        data=data,
        size=total,
        sha256=sha.hexdigest(),
        md5=md5.hexdigest(),
        mtime_ns=before.st_mtime_ns,
        inode=before.st_ino,
        device=before.st_dev,
    )


# --------------------------------------------------------------------------------------------
# Signatures

_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}
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
    if brands & _AVIF_BRANDS:
        return "avif"
    if brands & _HEIF_BRANDS:
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


def _require_format(data: bytes) -> str:
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
            f"expected one of {', '.join(SUPPORTED_FORMATS)}, got {fmt.upper()}, which is recognised"
            " but not decoded; convert it (e.g. to PNG) to analyse it",
        )
    return fmt


# --------------------------------------------------------------------------------------------
# Structure walkers (truncation), one per format

_JPEG_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # skips stuffing, RSTn and fill


def _truncated(fmt: str, detail: str) -> ImageError:
    return ImageError(
        Reason.TRUNCATED,
        f"{fmt.upper()} data must be complete, got {detail}; the file was cut short or is still"
        " being written - re-acquire it or wait until the copy has finished",
    )


def _corrupt(fmt: str, detail: str) -> ImageError:
    return ImageError(Reason.CORRUPT, f"{fmt.upper()} data is damaged: {detail}; the file cannot be decoded")


def _check_jpeg(data: bytes) -> None:
    """Walk marker segments from SOI to EOI; scans are skipped to the next real marker."""
    n, pos = len(data), 2
    while True:
        if pos >= n:
            raise _truncated("jpeg", f"the data ending at byte {n} before the end marker FFD9")
        if data[pos] != 0xFF:
            raise _corrupt("jpeg", f"expected a marker at byte {pos}, found 0x{data[pos]:02x}")
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            raise _truncated("jpeg", f"the data ending at byte {n} before the end marker FFD9")
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI; anything after it is a trailer and allowed
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers
            continue
        if not (0xC0 <= marker <= 0xCF or 0xDA <= marker <= 0xEF or marker == 0xFE):
            raise _corrupt("jpeg", f"invalid marker FF{marker:02X} at byte {pos - 2}")
        if pos + 2 > n:
            raise _truncated("jpeg", f"the data ending inside the FF{marker:02X} segment at byte {n}")
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2:
            raise _corrupt("jpeg", f"segment FF{marker:02X} at byte {pos - 2} has length {length}")
        pos += length
        if pos > n:
            raise _truncated("jpeg", f"the data ending inside the FF{marker:02X} segment at byte {n}")
        if marker == 0xDA:  # start of scan: entropy-coded data runs to the next marker
            found = _JPEG_NEXT_MARKER.search(data, pos)
            if found is None:
                raise _truncated("jpeg", f"scan data running to the end (byte {n}) without FFD9")
            pos = found.start()


def _png_chunks(data: bytes, *, verify: bool) -> Iterator[tuple[bytes, memoryview]]:
    """Yield (type, payload) up to and including IEND; raise truncated/corrupt."""
    n, pos, view = len(data), 8, memoryview(data)
    while True:
        if pos + 8 > n:
            raise _truncated("png", f"the data ending at byte {n} before the IEND chunk")
        length, ctype = struct.unpack_from(">I4s", data, pos)
        if length > 0x7FFFFFFF or not ctype.isalpha():
            raise _corrupt("png", f"invalid chunk header {ctype!r} (length {length}) at byte {pos}")
        end = pos + 12 + length
        if end > n:
            raise _truncated("png", f"the data ending at byte {n} inside chunk {ctype.decode()}")
        if verify and zlib.crc32(view[pos + 4 : end - 4]) != int.from_bytes(data[end - 4 : end], "big"):
            raise _corrupt("png", f"chunk {ctype.decode()} at byte {pos} fails its CRC")
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
        raise _corrupt("png", f"invalid IHDR (bit depth {depth}, colour type {colour}, interlace {interlace})")
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
    for ctype, payload in _png_chunks(data, verify=True):
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
                    raise _corrupt("png", f"the IDAT zlib stream is damaged ({err})") from err
                if row and out:  # every row must start with a filter type 0..4
                    mine = np.frombuffer(out, np.uint8)[: max(expected - got, 0)]
                    if mine[(-got) % row :: row].max(initial=0) > 4:
                        raise _corrupt("png", "a row has an invalid filter type")
                got += len(out)
                extra = 0 <= expected < got  # stop inflating what nobody will decode
                pending = inflater.unconsumed_tail
            if inflater.eof and (inflater.unused_data or start + 65536 < len(payload)):
                extra = True
    if expected < 0:
        raise _corrupt("png", "the IHDR chunk is missing or malformed")
    if got < expected:
        raise _corrupt("png", f"{got} bytes of pixel data where the header needs {expected}")
    return extra


def _gif_skip_subblocks(data: bytes, pos: int) -> int:
    n = len(data)
    while True:
        if pos >= n:
            raise _truncated("gif", f"the data ending at byte {n} inside a data block")
        size = data[pos]
        pos += 1 + size
        if size == 0:
            return pos


def _check_gif(data: bytes) -> int:
    """Walk GIF blocks to the trailer; return the number of frames."""
    n = len(data)
    if n < 13:
        raise _truncated("gif", f"only {n} bytes, less than the 13-byte header")
    pos, frames = 13, 0
    if data[10] & 0x80:
        pos += 3 << ((data[10] & 7) + 1)
    while True:
        if pos >= n:
            raise _truncated("gif", f"the data ending at byte {n} before the trailer 0x3B")
        block = data[pos]
        if block == 0x3B:
            return frames
        if block == 0x21:  # extension: label, sub-blocks
            pos = _gif_skip_subblocks(data, pos + 2)
        elif block == 0x2C:  # image descriptor, local colour table, LZW code size, sub-blocks
            if pos + 10 > n:
                raise _truncated("gif", f"the data ending at byte {n} inside an image descriptor")
            flags = data[pos + 9]
            pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1
            pos = _gif_skip_subblocks(data, pos)
            frames += 1
        else:
            raise _corrupt("gif", f"unexpected block 0x{block:02x} at byte {pos}")


def _check_webp(data: bytes) -> None:
    need = 8 + int.from_bytes(data[4:8], "little")
    if len(data) < need:
        raise _truncated("webp", f"{len(data)} bytes where the RIFF header declares {need}")


_CHECKS = {"jpeg": _check_jpeg, "gif": _check_gif, "webp": _check_webp}


def _heif_error(fmt: str, err: heif.HeifDataError) -> ImageError:
    if err.reason == "truncated":
        return _truncated(fmt, err.detail)
    if err.reason == "unsupported":
        return ImageError(Reason.UNSUPPORTED_FORMAT, f"{fmt.upper()}: {err.detail} is not decoded; convert it to analyse it")
    return _corrupt(fmt, err.detail)


def _check_complete(fmt: str, data: bytes) -> bool:
    """Raise truncated/corrupt from the raw structure; True when a PNG has surplus pixel data."""
    if fmt == "png":
        return _check_png(data)
    if fmt in _HEIF_FAMILY:
        try:
            heif.check_boxes(data)
        except heif.HeifDataError as err:
            raise _heif_error(fmt, err) from err
    check = _CHECKS.get(fmt)
    if check is not None:
        check(data)
    return False


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
            for ctype, payload in _png_chunks(data, verify=False):
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
            return _check_gif(data)
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
        _check_complete(fmt, data)
    except ImageError as structural:
        if structural.reason == "truncated":
            return structural
    return _corrupt(fmt, f"the header cannot be read ({type(err).__name__}: {err})")


def _probe_heif(data: bytes) -> _Probe:
    """HEIC header through libheif. Its size is upright already; the stored size is derived from
    the EXIF orientation, which libheif's own rotation matches in files Apple and others write."""
    notes: list[str] = []
    try:
        info = heif.probe(data)
    except heif.HeifDataError as err:
        raise _heif_error("heic", err) from err
    except Exception as err:  # the boxes say truncated, a bare sequence (unsupported) or corrupt
        try:
            heif.check_boxes(data)
        except heif.HeifDataError as structural:
            raise _heif_error("heic", structural) from err
        raise _corrupt("heic", f"the header cannot be read ({type(err).__name__}: {err})") from err

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
        raise _corrupt("heic", f"the header declares {width}x{height} pixels")
    if info.primary:
        notes.append(f"primary image (number {info.primary + 1} of {info.frames}) analysed")
    return _Probe(Header("heic", width, height, info.frames, orientation), info.mode, tuple(notes), info.bit_depth, meta)


def _probe(data: bytes) -> _Probe:
    fmt = _require_format(data)
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
        raise _corrupt(fmt, f"the header declares {width}x{height} pixels")
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
        raise _corrupt("image", f"unexpected sample type {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] in (2, 4):
        notes.append("alpha dropped")
        arr = arr[:, :, 0] if arr.shape[2] == 2 else arr[:, :, :3]
    if arr.ndim == 2:
        return cv2.cvtColor(arr, cv2.COLOR_GRAY2BGR)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise _corrupt("image", f"unexpected decoded shape {arr.shape}")
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
        return _heif_error(fmt, err)
    if isinstance(err, MemoryError):
        return ImageError(Reason.TOO_LARGE, f"{fmt.upper()}: ran out of memory while decoding; lower max_pixels")
    text = str(err)
    if "truncated" in text.lower():
        return _truncated(fmt, f"a decoder error ({text})")
    return _corrupt(fmt, f"the decoder failed ({type(err).__name__}: {text})")


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
    if fmt in _HEIF_FAMILY:  # before libheif/libavif parse anything: the largest item declared
        _refuse_too_large(fmt, *heif.declared_size(data), max_pixels)
    probe = _probe(data)
    h = probe.header
    fmt = h.format
    _refuse_too_large(fmt, h.width, h.height, max_pixels)
    notes = list(probe.notes)
    factor = _jpeg_reduction((h.width, h.height), min_side_hint) if fmt == "jpeg" else 1
    try:
        surplus = _check_complete(fmt, data)
        if surplus:
            notes.append("extra pixel data after the image ignored")
        bgr, upright = None, False
        if fmt == "heic":
            bgr, upright = _decode_heif(data, probe, notes), True
        elif fmt == "jpeg" or (fmt == "png" and not surplus):
            bgr = _decode_cv2(data, probe, factor, notes)
            if bgr is None and fmt == "png":
                raise _corrupt(fmt, "the decoder rejected the pixel data")
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
        raise _corrupt(fmt, f"decoded {got} pixels where the header says {expected[1]}x{expected[0]} (upright)")
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
