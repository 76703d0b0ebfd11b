"""Tests for daemon.pipeline.images. Every input is generated here (numpy, Pillow, zlib)."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import resource
import signal
import socket
import struct
import subprocess
import sys
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from daemon.pipeline import images, reading, structure
from daemon.pipeline.images import ImageError, decode, read_header
from daemon.pipeline.reading import read_file
from daemon.pipeline.structure import sniff_format

RED_BGR = (0, 0, 255)


# ---------------------------------------------------------------------------------- helpers


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def png_bytes(width: int, height: int, idat: bytes | None, *, colour: int = 2, depth: int = 8,
              interlace: int = 0, iend: bool = True) -> bytes:
    out = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace))
    if idat is not None:
        out += png_chunk(b"IDAT", idat)
    return out + (png_chunk(b"IEND", b"") if iend else b"")


def zlib_of_zeros(total: int) -> bytes:
    """A zlib stream inflating to ``total`` zero bytes, built without materialising them."""
    chunk = 1 << 20
    body = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = body.compress(bytes(chunk)) + body.flush(zlib.Z_FULL_FLUSH)  # self-contained, repeatable
    count, rest = divmod(total, chunk)
    tail = zlib.compressobj(9, zlib.DEFLATED, -15)
    last = tail.compress(bytes(rest)) + tail.flush()
    adler = ((total % 65521) << 16) | 1  # adler32 of `total` zero bytes
    return b"\x78\xda" + block * count + last + adler.to_bytes(4, "big")


def noise(h: int = 48, w: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def solid(mode: str, colour: object, size: tuple[int, int] = (64, 48)) -> Image.Image:
    return Image.new(mode, size, colour)


def reason_of(data: bytes, **kw: object) -> str:
    with pytest.raises(ImageError) as info:
        decode(data, **kw)
    assert info.value.reason in reading.REASONS
    return info.value.reason


def assert_colour(d: images.Decoded, bgr: tuple[int, int, int], tol: int = 6) -> None:
    assert d.bgr.dtype == np.uint8 and d.bgr.ndim == 3 and d.bgr.shape[2] == 3
    assert d.bgr.flags.c_contiguous
    centre = d.bgr[d.bgr.shape[0] // 2, d.bgr.shape[1] // 2].astype(int)
    assert np.abs(centre - np.array(bgr)).max() <= tol, f"got {centre}, expected {bgr}"


class Timeout(Exception):
    pass


@pytest.fixture
def alarm() -> Iterator[Callable[[float], None]]:
    """Arm a SIGALRM guard so a blocking open() fails the test instead of hanging it."""

    def handler(signum: int, frame: object) -> None:
        raise Timeout("call blocked")

    old = signal.signal(signal.SIGALRM, handler)
    yield lambda seconds: signal.setitimer(signal.ITIMER_REAL, seconds)
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------------- read_file


def test_read_file_hashes_and_identity(tmp_path: Path) -> None:
    data = np.random.default_rng(1).bytes(300_000)
    path = tmp_path / "blob.jpg"
    path.write_bytes(data)
    st = os.stat(path)
    got = read_file(path)
    assert got.data == data and got.size == len(data)
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    assert got.md5 == hashlib.md5(data).hexdigest()
    assert (got.mtime_ns, got.inode, got.device) == (st.st_mtime_ns, st.st_ino, st.st_dev)


def test_read_file_empty_file(tmp_path: Path) -> None:
    (tmp_path / "e.jpg").write_bytes(b"")
    got = read_file(tmp_path / "e.jpg")
    assert got.size == 0 and got.sha256 == hashlib.sha256(b"").hexdigest()
    with pytest.raises(ImageError) as info:
        decode(got.data)
    assert info.value.reason == "empty"


def test_reading_and_decoding_leave_the_evidence_untouched(tmp_path: Path) -> None:
    folder = tmp_path / "evidence"
    folder.mkdir()
    path = folder / "photo.jpg"
    path.write_bytes(encode(noise(), "JPEG"))
    old = os.stat(path)
    os.utime(path, ns=(old.st_mtime_ns - 10**12, old.st_mtime_ns))  # atime < mtime: relatime would bump it

    def snapshot() -> tuple[object, ...]:
        st = os.lstat(path)
        return (sorted(os.listdir(folder)), st.st_size, st.st_mtime_ns, st.st_atime_ns, st.st_ino,
                st.st_mode, st.st_ctime_ns, os.stat(folder).st_mtime_ns)

    before = snapshot()
    for _ in range(3):
        decode(read_file(path).data, min_side_hint=16)
    assert snapshot() == before


def test_read_file_falls_back_when_noatime_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(b"payload")
    real_open, seen = os.open, []

    def fake_open(p: object, flags: int, *args: object, **kw: object) -> int:
        if not flags & getattr(os, "O_DIRECTORY", 0):
            seen.append(flags)
        if flags & getattr(os, "O_NOATIME", 0):
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real_open(p, flags, *args, **kw)

    monkeypatch.setattr(reading.os, "open", fake_open)
    assert read_file(path).data == b"payload"
    if hasattr(os, "O_NOATIME"):
        assert len(seen) == 2 and not seen[1] & os.O_NOATIME and seen[1] & os.O_NONBLOCK
    seen.clear()  # the same beneath a root (evidence found by discovery), without following links
    assert read_file(path, root=str(tmp_path), inode=path.stat().st_ino).data == b"payload"
    if hasattr(os, "O_NOATIME"):
        assert len(seen) == 2 and not seen[1] & os.O_NOATIME and seen[1] & os.O_NOFOLLOW


def test_read_file_too_big_file(tmp_path: Path) -> None:
    (tmp_path / "big.jpg").write_bytes(b"x" * 1000)
    with pytest.raises(ImageError) as info:
        read_file(tmp_path / "big.jpg", max_bytes=999)
    assert info.value.reason == "too_big_file" and "999" in info.value.message
    assert read_file(tmp_path / "big.jpg", max_bytes=1000).size == 1000


def test_directory_named_jpg_is_not_regular(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").mkdir()
    with pytest.raises(ImageError) as info:
        read_file(tmp_path / "x.jpg")
    assert info.value.reason == "not_regular_file" and "directory" in info.value.message


def test_fifo_named_jpg_returns_promptly_without_open(
    tmp_path: Path, alarm: Callable[[float], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    link = tmp_path / "link.jpg"
    link.symlink_to(fifo)
    opened: list[object] = []
    real_open = os.open
    monkeypatch.setattr(reading.os, "open", lambda p, *a: opened.append(p) or real_open(p, *a))
    alarm(5)
    for path in (fifo, link):
        with pytest.raises(ImageError) as info:
            read_file(path)
        assert info.value.reason == "not_regular_file" and "FIFO" in info.value.message
    assert opened == []


def test_invalid_utf8_name_is_read(tmp_path: Path) -> None:
    name = os.fsencode(tmp_path) + b"/\xff\xfe photo.png"
    with open(name, "wb") as fh:
        fh.write(encode(solid("RGB", (255, 0, 0)), "PNG"))
    assert_colour(decode(read_file(name).data), RED_BGR, tol=0)
    with pytest.raises(ImageError) as info:
        read_file(name + b".missing")
    assert info.value.reason == "unreadable" and "\\udcff" in info.value.message  # shown losslessly


def test_socket_and_device_are_not_regular(tmp_path: Path, alarm: Callable[[float], None]) -> None:
    sock_path = tmp_path / "s.jpg"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(sock_path))
        dev = tmp_path / "null.jpg"
        dev.symlink_to("/dev/null")
        alarm(5)
        for path, word in ((sock_path, "socket"), (dev, "character device")):
            with pytest.raises(ImageError) as info:
                read_file(path)
            assert info.value.reason == "not_regular_file" and word in info.value.message


def test_fifo_swapped_in_after_stat_is_refused_without_blocking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, alarm: Callable[[float], None]
) -> None:
    """The race: stat() saw a regular file, open() finds a FIFO. O_NONBLOCK + fstat catch it."""
    regular = tmp_path / "r.jpg"
    regular.write_bytes(b"x")
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    real_stat = os.stat
    monkeypatch.setattr(reading.os, "stat", lambda p, *a, **k: real_stat(regular) if os.fspath(p) == str(fifo) else real_stat(p, *a, **k))
    alarm(5)
    with pytest.raises(ImageError) as info:
        read_file(fifo)
    assert info.value.reason == "not_regular_file"


def test_dangling_symlink_and_loop_are_unreadable(tmp_path: Path) -> None:
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "missing.jpg")
    (tmp_path / "a.jpg").symlink_to(tmp_path / "b.jpg")
    (tmp_path / "b.jpg").symlink_to(tmp_path / "a.jpg")
    with pytest.raises(ImageError) as info:
        read_file(tmp_path / "dangling.jpg")
    assert info.value.reason == "unreadable" and "ENOENT" in info.value.message
    with pytest.raises(ImageError) as info:
        read_file(tmp_path / "a.jpg")
    assert info.value.reason == "unreadable" and "ELOOP" in info.value.message


def test_symlink_to_regular_file_is_followed(tmp_path: Path) -> None:
    target = tmp_path / "real.png"
    target.write_bytes(encode(solid("RGB", (255, 0, 0)), "PNG"))
    (tmp_path / "link.jpg").symlink_to(target)
    assert_colour(decode(read_file(tmp_path / "link.jpg").data), RED_BGR, tol=0)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_permission_denied_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "secret.jpg"
    path.write_bytes(b"\xff\xd8\xff")
    path.chmod(0o600)
    tmp_path.chmod(0o755)
    code = (
        "import os, sys\n"
        "from daemon.pipeline.reading import read_file, ImageError\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "try:\n    read_file(sys.argv[1])\nexcept ImageError as e:\n    print(e.reason, e.message)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("unreadable") and "EACCES" in out.stdout, out.stderr


def test_png_named_txt_decodes_by_signature(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(encode(solid("RGB", (255, 0, 0)), "PNG"))
    d = decode(read_file(path).data)
    assert d.format == "png"
    assert_colour(d, RED_BGR, tol=0)


# ---------------------------------------------------------------------------------- signatures


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.txt", "hello")
    return buf.getvalue()


def ftyp(brand: bytes, *compatible: bytes) -> bytes:
    payload = brand + b"\x00\x00\x00\x00" + b"".join(compatible)
    return struct.pack(">I", 8 + len(payload)) + b"ftyp" + payload + bytes(64)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\xff\xd8\xff\xe0", "jpeg"),
        (b"\x89PNG\r\n\x1a\n", "png"),
        (b"GIF89a", "gif"),
        (b"GIF87a", "gif"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp"),
        (b"II*\x00", "tiff"),
        (b"MM\x00*", "tiff"),
        (b"BM" + bytes(12) + (40).to_bytes(4, "little"), "bmp"),
        (b"BMW, a text that starts like a bitmap", None),
        (ftyp(b"heic", b"mif1", b"heic"), "heic"),
        (ftyp(b"mif1", b"avif"), "avif"),
        (ftyp(b"isom", b"mp41"), None),
        (b"%PDF-1.7\n", None),
        (b"", None),
    ],
)
def test_sniff_format(data: bytes, expected: str | None) -> None:
    assert sniff_format(data) == expected


@pytest.mark.parametrize(
    ("data", "reason", "words"),
    [
        (b"", "empty", "0 bytes"),
        (np.random.default_rng(7).bytes(4096), "not_an_image", "unrecognised bytes"),
        (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "not_an_image", "a PDF document"),
        (zip_bytes(), "not_an_image", "a ZIP archive"),
        (ftyp(b"isom", b"mp41"), "not_an_image", "MP4"),
        (b"<html><body>hello</body></html>", "not_an_image", "markup"),
        (ftyp(b"heic", b"mif1", b"heic"), "corrupt", "HEIC"),  # decoded since pillow-heif: boxes checked
        (b"\x00\x00\x00\x0cJXL \r\n\x87\n" + bytes(64), "unsupported_format", "JXL"),
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(64), "unsupported_format", "JP2"),
    ],
)
def test_bad_inputs_have_exact_reasons(data: bytes, reason: str, words: str) -> None:
    for call in (decode, read_header):
        with pytest.raises(ImageError) as info:
            call(data)
        assert info.value.reason == reason
        assert words in info.value.message


def test_real_avif_is_decoded_when_pillow_has_avif() -> None:
    from PIL import features

    data = encode(solid("RGB", (255, 0, 0)), "AVIF") if features.check("avif") else None
    if data is None:
        assert reason_of(ftyp(b"avif", b"mif1", b"avif")) == "unsupported_format"
        pytest.skip("this Pillow cannot read AVIF: refused as unsupported_format")
    d = decode(data)
    assert d.format == "avif"
    assert_colour(d, RED_BGR, tol=4)


def test_garbage_after_jpeg_signature_is_corrupt() -> None:
    garbage = b"\xff\xd8\xff" + np.random.default_rng(3).bytes(5000)
    assert reason_of(garbage) == "corrupt"
    # a plausible APP0 segment followed by garbage where the next marker should be
    app0 = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    assert reason_of(app0 + b"\x12\x34" + np.random.default_rng(4).bytes(3000)) == "corrupt"


# ---------------------------------------------------------------------------------- truncation


@pytest.fixture(scope="module")
def jpegs() -> dict[str, bytes]:
    im = noise(240, 320)
    return {"baseline": encode(im, "JPEG", quality=90), "progressive": encode(im, "JPEG", quality=90, progressive=True)}


@pytest.mark.parametrize("kind", ["baseline", "progressive"])
@pytest.mark.parametrize("cut", [0.01, 0.5, 0.9, "no_eoi"])
def test_truncated_jpeg(jpegs: dict[str, bytes], kind: str, cut: float | str, capfd: pytest.CaptureFixture[str]) -> None:
    data = jpegs[kind]
    assert data.endswith(b"\xff\xd9")
    cut_data = data[:-2] if cut == "no_eoi" else data[: int(len(data) * cut)]
    assert reason_of(cut_data) == "truncated"
    assert capfd.readouterr().err == ""  # no decoder chatter on stderr


@pytest.mark.parametrize("kind", ["baseline", "progressive"])
def test_jpeg_structure_check_alone_flags_truncation(jpegs: dict[str, bytes], kind: str) -> None:
    """The marker walk itself, independent of what a given OpenCV/Pillow build does with cut data."""
    data = jpegs[kind]
    structure._check_jpeg(data)
    structure._check_jpeg(data + b"\x00" * 10 + b"trailer")
    for cut in (data[:-2], data[:-1], data[: len(data) // 2], data[: int(len(data) * 0.9)], data[:200]):
        with pytest.raises(ImageError) as info:
            structure._check_jpeg(cut)
        assert info.value.reason == "truncated"


def test_jpeg_with_trailer_after_eoi_is_fine(jpegs: dict[str, bytes]) -> None:
    clean = decode(jpegs["baseline"])
    trailed = decode(jpegs["baseline"] + b"\x00" * 64 + b"SEFT camera trailer \xff\xd8\xff\xe1" * 4)
    assert np.array_equal(clean.bgr, trailed.bgr)


def test_jpeg_thumbnail_eoi_inside_exif_does_not_hide_truncation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 1
    thumb = encode(noise(16, 16), "JPEG")  # carries its own FFD9, inside APP1
    exif_bytes = exif.tobytes() + thumb
    data = encode(noise(120, 160), "JPEG", exif=exif_bytes)
    assert decode(data).width == 160
    assert reason_of(data[: len(data) // 2]) == "truncated"


@pytest.fixture(scope="module")
def png_data() -> bytes:
    return encode(noise(120, 160), "PNG")


@pytest.mark.parametrize("cut", [0.5, 0.9, "no_iend", 33])
def test_truncated_png(png_data: bytes, cut: float | str | int, capfd: pytest.CaptureFixture[str]) -> None:
    if cut == "no_iend":
        assert png_data.endswith(png_chunk(b"IEND", b""))
        data = png_data[:-12]
    elif isinstance(cut, int):
        data = png_data[:cut]  # signature + IHDR only
    else:
        data = png_data[: int(len(png_data) * cut)]
    assert reason_of(data) == "truncated"
    assert capfd.readouterr().err == ""


def raw_rows(arr: np.ndarray) -> bytes:
    """Unfiltered PNG scanlines (filter byte 0) for an HxWx3 uint8 array."""
    return np.concatenate([np.zeros((arr.shape[0], 1), np.uint8), arr.reshape(arr.shape[0], -1)], axis=1).tobytes()


def test_png_damage_with_intact_structure(capfd: pytest.CaptureFixture[str]) -> None:
    arr = np.asarray(noise(48, 64))
    raw = raw_rows(arr)
    good = png_bytes(64, 48, zlib.compress(raw))
    assert np.array_equal(decode(good).bgr, arr[:, :, ::-1])
    crc_flipped = bytearray(good)
    crc_flipped[60] ^= 0xFF  # inside IDAT, CRC left as it was
    assert reason_of(bytes(crc_flipped)) == "corrupt"
    flipped = bytearray(zlib.compress(raw))
    flipped[40:50] = bytes(b ^ 0x55 for b in flipped[40:50])
    assert reason_of(png_bytes(64, 48, bytes(flipped))) == "corrupt"  # zlib error, CRC recomputed
    assert reason_of(png_bytes(64, 48, zlib.compress(raw[: len(raw) // 2]))) == "corrupt"  # rows missing
    bad_filter = bytearray(raw)
    bad_filter[len(raw) // 2 // (64 * 3 + 1) * (64 * 3 + 1)] = 9
    assert reason_of(png_bytes(64, 48, zlib.compress(bytes(bad_filter)))) == "corrupt"
    assert capfd.readouterr().err == ""  # libpng never saw these: nothing printed


def test_png_with_surplus_pixel_data_decodes(capfd: pytest.CaptureFixture[str]) -> None:
    arr = np.asarray(noise(48, 64))
    d = decode(png_bytes(64, 48, zlib.compress(raw_rows(arr) * 2)))
    assert np.array_equal(d.bgr, arr[:, :, ::-1])
    assert "extra pixel data after the image ignored" in d.notes
    assert capfd.readouterr().err == ""


def adam7_png(arr: np.ndarray) -> bytes:
    parts = []
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)):
        sub = arr[y0::dy, x0::dx]
        if sub.size:
            parts.append(raw_rows(np.ascontiguousarray(sub)))
    return png_bytes(arr.shape[1], arr.shape[0], zlib.compress(b"".join(parts)), interlace=1)


@pytest.mark.parametrize("size", [(48, 64), (5, 3), (1, 1), (13, 17)])
def test_interlaced_png(size: tuple[int, int]) -> None:
    arr = np.asarray(noise(*size, seed=size[0]))
    data = adam7_png(arr)
    assert np.array_equal(decode(data).bgr, arr[:, :, ::-1])
    assert reason_of(data[:-12]) == "truncated"


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "BMP", "TIFF"])
@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_other_formats(fmt: str, cut: float) -> None:
    data = encode(noise(96, 128), fmt)
    decode(data)
    assert reason_of(data[: int(len(data) * cut)]) == "truncated"


def test_gif_without_trailer_is_truncated() -> None:
    data = encode(noise(), "GIF")
    assert data.endswith(b";")
    assert reason_of(data[:-1]) == "truncated"


# ---------------------------------------------------------------------------------- size limits


def test_header_only_png_dimensions() -> None:
    huge = png_bytes(100_000, 100_000, None, iend=False)
    assert (read_header(huge).width, read_header(huge).height) == (100_000, 100_000)
    assert reason_of(huge) == "too_large"
    assert reason_of(png_bytes(0, 0, None, iend=False)) == "corrupt"
    assert reason_of(png_bytes(64, 48, None, iend=False)) == "truncated"
    assert reason_of(png_bytes(64, 48, None)) == "corrupt"  # IEND but no pixel data


def test_decompression_bomb_rejected_with_bounded_memory() -> None:
    side = 20_000
    bomb = png_bytes(side, side, zlib_of_zeros((side + 1) * side), colour=0)
    assert len(bomb) < 1_000_000  # ~400 KB that inflates to 400 MB (1.2 GB as BGR)
    header = read_header(bomb)
    assert (header.format, header.width, header.height) == ("png", side, side)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    try:
        with pytest.raises(ImageError) as info:
            decode(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert info.value.reason == "too_large"
    assert "20000x20000" in info.value.message and "max_pixels=100000000" in info.value.message
    assert peak < 20 * 2**20, f"rejection allocated {peak} bytes"
    assert grown_kib < 50 * 1024, f"peak RSS grew by {grown_kib} KiB"


def test_max_pixels_is_configurable() -> None:
    data = encode(solid("RGB", (255, 0, 0)), "JPEG")
    assert reason_of(data, max_pixels=64 * 48 - 1) == "too_large"
    assert decode(data, max_pixels=64 * 48).width == 64


# ---------------------------------------------------------------------------------- formats and modes


def png16(bgr16: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", bgr16)
    assert ok
    return buf.tobytes()


def png16_rgb(b: int, g: int, r: int, a: int | None = None) -> bytes:
    planes = [b, g, r] + ([] if a is None else [a])
    return png16(np.dstack([np.full((48, 64), v, np.uint16) for v in planes]))


def png_2bit_gray() -> bytes:
    row = b"\x00" + bytes([0b10101010]) * 16  # 64 pixels of value 2 (of 3)
    return png_bytes(64, 48, zlib.compress(row * 48), colour=0, depth=2)


def multi_frame(fmt: str) -> bytes:
    frames = [solid("RGB", c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], **({"duration": 100} if fmt != "TIFF" else {}))


FORMAT_CASES: list[tuple[str, Callable[[], bytes], str, tuple[int, int, int], int, tuple[str, ...]]] = [
    ("jpeg rgb", lambda: encode(solid("RGB", (255, 0, 0)), "JPEG", quality=95), "jpeg", RED_BGR, 6, ()),
    ("jpeg progressive", lambda: encode(solid("RGB", (255, 0, 0)), "JPEG", quality=95, progressive=True), "jpeg", RED_BGR, 6, ()),
    ("jpeg gray", lambda: encode(solid("L", 128), "JPEG", quality=95), "jpeg", (128, 128, 128), 2, ()),
    ("jpeg cmyk (adobe inverted)", lambda: encode(solid("RGB", (255, 0, 0)).convert("CMYK"), "JPEG", quality=95), "jpeg", RED_BGR, 6, ("cmyk converted",)),
    ("png rgb", lambda: encode(solid("RGB", (255, 0, 0)), "PNG"), "png", RED_BGR, 0, ()),
    ("png rgba", lambda: encode(solid("RGBA", (255, 0, 0, 40)), "PNG"), "png", RED_BGR, 0, ("alpha dropped",)),
    ("png gray", lambda: encode(solid("L", 77), "PNG"), "png", (77, 77, 77), 0, ()),
    ("png gray+alpha", lambda: encode(solid("LA", (77, 0)), "PNG"), "png", (77, 77, 77), 0, ("alpha dropped",)),
    ("png palette", lambda: encode(solid("RGB", (255, 0, 0)).convert("P"), "PNG"), "png", RED_BGR, 0, ()),
    ("png palette+tRNS", lambda: encode(solid("RGB", (255, 0, 0)).convert("P"), "PNG", transparency=0), "png", RED_BGR, 0, ("alpha dropped",)),
    ("png 1-bit", lambda: encode(solid("1", 1), "PNG"), "png", (255, 255, 255), 0, ()),
    # 25855/65535*255 = 100.6 -> 101 when rounded; truncation (>>8) would give 100
    ("png 16-bit rgb", lambda: png16_rgb(0, 25855, 65535), "png", (0, 101, 255), 0, ("16-bit reduced to 8-bit",)),
    ("png 16-bit gray", lambda: png16(np.full((48, 64), 40000, np.uint16)), "png", (156, 156, 156), 0, ("16-bit reduced to 8-bit",)),
    ("png 16-bit rgba", lambda: png16_rgb(0, 0, 65535, 1000), "png", RED_BGR, 0, ("16-bit reduced to 8-bit", "alpha dropped")),
    ("png 2-bit gray", png_2bit_gray, "png", (170, 170, 170), 0, ()),
    ("gif", lambda: encode(solid("RGB", (255, 0, 0)), "GIF"), "gif", RED_BGR, 0, ()),
    ("webp lossless", lambda: encode(solid("RGB", (255, 0, 0)), "WEBP", lossless=True), "webp", RED_BGR, 0, ()),
    ("webp lossy rgba", lambda: encode(solid("RGBA", (255, 0, 0, 128)), "WEBP", quality=95), "webp", RED_BGR, 8, ("alpha dropped",)),
    ("bmp 24-bit", lambda: encode(solid("RGB", (255, 0, 0)), "BMP"), "bmp", RED_BGR, 0, ()),
    ("bmp 8-bit palette", lambda: encode(solid("RGB", (255, 0, 0)).convert("P"), "BMP"), "bmp", RED_BGR, 0, ()),
    ("tiff rgb lzw", lambda: encode(solid("RGB", (255, 0, 0)), "TIFF", compression="tiff_lzw"), "tiff", RED_BGR, 0, ()),
    ("tiff cmyk", lambda: encode(solid("RGB", (255, 0, 0)).convert("CMYK"), "TIFF"), "tiff", RED_BGR, 0, ("cmyk converted",)),
    ("tiff 16-bit gray", lambda: encode(Image.fromarray(np.full((48, 64), 40000, np.uint16)), "TIFF"), "tiff", (156, 156, 156), 0, ("16-bit reduced to 8-bit",)),
    ("tiff float 0..1", lambda: encode(Image.fromarray(np.full((48, 64), 0.25, np.float32)), "TIFF"), "tiff", (64, 64, 64), 0, ("float reduced to 8-bit (0..1)",)),
]


@pytest.mark.parametrize(("name", "make", "fmt", "bgr", "tol", "notes"), FORMAT_CASES, ids=[c[0] for c in FORMAT_CASES])
def test_formats_and_modes(name: str, make: Callable[[], bytes], fmt: str, bgr: tuple[int, int, int], tol: int,
                           notes: tuple[str, ...], capfd: pytest.CaptureFixture[str]) -> None:
    data = make()
    d = decode(data)
    assert (d.format, d.width, d.height, d.scale, d.orientation, d.frames) == (fmt, 64, 48, 1.0, 1, 1)
    assert d.bgr.shape == (48, 64, 3)
    assert_colour(d, bgr, tol)
    assert set(notes) <= set(d.notes), d.notes
    header = read_header(data)
    assert (header.format, header.width, header.height, header.frames) == (fmt, 64, 48, 1)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "WEBP", "PNG"])
def test_multi_frame_first_frame_only(fmt: str) -> None:
    data = multi_frame(fmt)
    d = decode(data)
    assert d.frames == 3 and "first frame of 3" in d.notes
    assert read_header(data).frames == 3
    assert_colour(d, RED_BGR, tol=8)


def test_pillow_truncation_flag_stays_off() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---------------------------------------------------------------------------------- orientation

# The upright picture: 64 wide, 48 tall, red 16x16 marker in the top-left corner, gray elsewhere.
UPRIGHT = np.full((48, 64, 3), 128, np.uint8)
UPRIGHT[:16, :16] = (255, 0, 0)
# What a camera stores for each EXIF orientation so that a viewer shows UPRIGHT (inverse transform).
STORE = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
         5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


def oriented(fmt: str, orientation: int, size: tuple[int, int] | None = None) -> bytes:
    im = Image.fromarray(UPRIGHT)
    if size is not None:
        im = im.resize(size, Image.Resampling.NEAREST)
    if STORE[orientation] is not None:
        im = im.transpose(STORE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    kw: dict[str, object] = {"exif": exif.tobytes()}
    if fmt == "JPEG":
        kw["quality"] = 95
    if fmt == "WEBP":
        kw["lossless"] = True
    return encode(im, fmt, **kw)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(fmt: str, orientation: int) -> None:
    data = oriented(fmt, orientation)
    header = read_header(data)
    assert header.orientation == orientation
    assert header.upright_size == (64, 48)
    d = decode(data)
    assert (d.orientation, d.width, d.height, d.bgr.shape) == (orientation, 64, 48, (48, 64, 3))
    marker, rest = d.bgr[2:14, 2:14].astype(int), d.bgr[20:, 20:].astype(int)
    assert np.abs(marker - (0, 0, 255)).max() <= 12, "marker not in the upright top-left corner"
    assert np.abs(rest - 128).max() <= 12
    viewer = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))[:, :, ::-1]
    assert np.abs(d.bgr.astype(int) - viewer).max() <= 2  # same as Pillow's own viewer transform


def test_invalid_orientation_is_ignored_and_noted() -> None:
    exif = Image.Exif()
    exif[0x0112] = 9
    d = decode(encode(Image.fromarray(UPRIGHT), "JPEG", exif=exif.tobytes()))
    assert d.orientation == 1 and any("invalid EXIF orientation" in n for n in d.notes)


# ---------------------------------------------------------------------------------- DCT reduction


@pytest.fixture(scope="module")
def big_rotated_jpeg() -> bytes:
    return oriented("JPEG", 6, size=(4000, 3000))  # stored 3000x4000 (rotated), upright 4000x3000


def test_min_side_hint_reduces_and_keeps_orientation(big_rotated_jpeg: bytes) -> None:
    header = read_header(big_rotated_jpeg)
    assert (header.width, header.height, header.orientation) == (3000, 4000, 6)
    d = decode(big_rotated_jpeg, min_side_hint=1280)
    assert (d.width, d.height, d.scale, d.orientation) == (4000, 3000, 0.5, 6)
    assert d.bgr.shape == (1500, 2000, 3) and d.bgr.flags.c_contiguous
    assert np.abs(d.bgr[100, 100].astype(int) - (0, 0, 255)).max() <= 12  # marker: upright top-left
    assert np.abs(d.bgr[1400, 1900].astype(int) - 128).max() <= 12
    assert decode(big_rotated_jpeg, min_side_hint=2001).scale == 1.0
    assert decode(big_rotated_jpeg, min_side_hint=500).bgr.shape == (375, 500, 3)  # 4000/8 = 500


@pytest.mark.parametrize(
    ("size", "hint", "factor"),
    [((4000, 3000), 1280, 2), ((4000, 3000), 1000, 4), ((4000, 3000), 500, 8), ((4000, 3000), 4000, 1),
     ((4000, 3000), 4001, 1), ((3000, 4000), 1280, 2), ((801, 600), 101, 8), ((801, 600), None, 1)],
)
def test_jpeg_reduction_factor(size: tuple[int, int], hint: int | None, factor: int) -> None:
    assert images._jpeg_reduction(size, hint) == factor


def test_hint_is_ignored_for_non_jpeg() -> None:
    d = decode(encode(Image.fromarray(UPRIGHT), "PNG"), min_side_hint=8)
    assert d.scale == 1.0 and d.bgr.shape == (48, 64, 3)


def test_odd_jpeg_size_reduces_by_ceiling() -> None:
    d = decode(encode(noise(301, 203), "JPEG"), min_side_hint=50)
    assert d.scale == 0.25 and d.bgr.shape == (76, 51, 3) and (d.width, d.height) == (203, 301)


def test_image_error_rejects_unknown_reason() -> None:
    with pytest.raises(ValueError):
        ImageError("bad_reason", "x")
    err = ImageError("corrupt", "detail")
    assert err.reason == "corrupt" and err.message == "detail" and str(err) == "corrupt: detail"
    back = pickle.loads(pickle.dumps(err))  # worker processes send these back to the parent
    assert (type(back), back.reason, back.message) == (ImageError, "corrupt", "detail")
