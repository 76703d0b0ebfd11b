"""Builders for hostile and unusual evidence files, generated in the test (no binaries committed).

``make_tree(root, face_jpeg)`` fills a folder with every bad input of the foundation issue and
returns ``{relative path: expected (state, reason)}`` for the scan oracle.
"""

from __future__ import annotations

import io
import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload) & 0xFFFFFFFF)


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A small PNG that declares ``width`` x ``height`` RGB pixels of zeros (zlib-compressed)."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * width)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def noise(w: int = 64, h: int = 48, seed: int = 0, mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def with_orientation(face_jpeg: bytes, orientation: int) -> bytes:
    """Store the upright ``face_jpeg`` so that a viewer applying EXIF ``orientation`` shows it
    upright again (the pixels are transformed by the inverse of the orientation)."""
    im = Image.open(io.BytesIO(face_jpeg)).convert("RGB")
    inverse = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}
    op = inverse[orientation]
    stored = im.transpose(op) if op is not None else im
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def make_tree(root: Path, face_jpeg: bytes) -> dict[str, tuple[str, str | None]]:
    """Write every bad or unusual input under ``root``; returns the expected outcome per path."""
    root.mkdir(parents=True, exist_ok=True)
    face = Image.open(io.BytesIO(face_jpeg)).convert("RGB")
    expect: dict[str, tuple[str, str | None]] = {}

    def put(name: str, data: bytes, state: str, reason: str | None = None) -> None:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        expect[name] = (state, reason)

    put("empty.jpg", b"", "failed", "empty")
    put("random.jpg", np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes(), "failed", "not_an_image")
    put("document.png", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n%%EOF\n", "failed", "not_an_image")
    zbuf = io.BytesIO()
    import zipfile

    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("a.txt", "hello")
    put("archive.png", zbuf.getvalue(), "failed", "not_an_image")
    put("real-png.txt", encode(face, "PNG"), "done")
    put("truncated-half.jpg", face_jpeg[: len(face_jpeg) // 2], "failed", "truncated")
    put("no-eoi.jpg", face_jpeg[:-2], "failed", "truncated")
    put("bomb.png", png_bomb(), "failed", "too_large")
    put("absurd-header.png", png_header_only(100_000, 100_000), "failed", "too_large")
    arr16 = (np.asarray(face, np.uint16) * 257)[..., ::-1].copy()
    import cv2

    put("sixteen-bit.png", cv2.imencode(".png", arr16)[1].tobytes(), "done")
    put("gray.png", encode(face.convert("L"), "PNG"), "done")
    put("palette.png", encode(face.convert("P"), "PNG"), "done")
    put("rgba.png", encode(face.convert("RGBA"), "PNG"), "done")
    put("cmyk.jpg", encode(face.convert("CMYK"), "JPEG", quality=92), "done")
    put("progressive.jpg", encode(face, "JPEG", quality=92, progressive=True), "done")
    put("photo.webp", encode(face, "WEBP", quality=90), "done")
    put("photo.bmp", encode(face, "BMP"), "done")
    for k in range(1, 9):
        put(f"exif/orientation-{k}.jpg", with_orientation(face_jpeg, k), "done")
    frames = [face, noise(face.width, face.height, 2), noise(face.width, face.height, 3)]
    put("animated.gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0), "done")
    put("multipage.tif", encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]), "done")
    # an unreadable file: root reads anything, so a file that vanishes cannot be faked; use a
    # directory entry that is not readable as a file instead (a FIFO) plus a symlink loop.
    os.mkfifo(root / "pipe.jpg")
    expect["pipe.jpg"] = ("failed", "not_regular_file")
    os.symlink("loop-b.jpg", root / "loop-a.jpg")
    os.symlink("loop-a.jpg", root / "loop-b.jpg")
    expect["loop-a.jpg"] = ("failed", "symlink")
    expect["loop-b.jpg"] = ("failed", "symlink")
    os.symlink(".", root / "self-loop-dir")  # a directory symlink loop: never followed
    expect["self-loop-dir"] = ("failed", "symlink")
    return expect


def png(seed: int) -> bytes:
    """A small unique image (noise: no face, analysed in milliseconds)."""
    return encode(noise(32, 24, seed), "PNG")


def hostile_names(n: int, seed: int = 18) -> list[bytes]:
    """File names no tool would expect: the probe's cases, escapes that collide with the
    recorded form of other names, and ``n`` random byte strings (any byte but NUL and ``/``)."""
    fixed = [
        b"bad\xff.jpg", b"bad\\xff.jpg", b"bad\\\\xff.jpg", b"\x1b[2J\x1b[31mred.jpg", b"line\nbreak.jpg",
        "\u202egpj.exe".encode(), b"tab\there.jpg", b"cr\rhere.jpg", b"\x7f\x80\x9f.jpg", b"back\\slash.jpg",
        b"\\", b"\\\\x41", "caf\u00e9.jpg".encode(), "caf\u00e9.jpg".encode("latin-1"), b"\xc3", b"\xed\xa0\x80.jpg",
        b"x" * 255, b"photo.jpg.part", b"photo.tmp", b".hidden", b".photo.jpg.Ab12Cd", b"._photo.jpg", b"Thumbs.db",
        b"-rf", b"=HYPERLINK(1)", b"'quoted'", b'"dq"', b"%s%n", b"$(id)", b"a b  c ",
    ]
    rng = random.Random(seed)
    alphabet = [b for b in range(1, 256) if b != ord("/")]
    out = list(fixed)
    while len(out) < len(fixed) + n:
        name = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        if name not in (b".", b"..") and name not in out:
            out.append(name)
    return out


def make_named_tree(root: Path, names: list[bytes]) -> dict[bytes, bytes]:
    """One distinct image per name (half of them one folder down, under a hostile folder name
    too); returns ``{absolute path bytes: content}``."""
    rb = os.fsencode(root)
    os.makedirs(rb + b"/sub\xfe\x1b[0m", exist_ok=True)
    files = {}
    for i, name in enumerate(names):
        p = rb + (b"/" if i % 2 == 0 else b"/sub\xfe\x1b[0m/") + name
        data = png(i)
        with open(p, "wb") as fh:
            fh.write(data)
        files[p] = data
    return files
