"""HEIC/HEIF (pillow-heif) and AVIF (Pillow): the files are made here with the encoders, from
numpy drawings or a dev LFW face, then decoded through ``daemon.pipeline.images`` like every
other format: size, orientation, depth, several images, the pixel limit from the header (before
anything is decoded), truncation and impostors; and one ``scan`` end to end."""

from __future__ import annotations

import io
import os
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
from PIL import Image, features

from daemon.pipeline import heif, reading
from daemon.pipeline.images import ImageError, decode, read_header
from daemon.pipeline.structure import sniff_format

ORIENTATION = 0x0112


def drawing(width: int = 96, height: int = 64) -> np.ndarray:
    """RGB with a red block at the top left and a blue one at the bottom right."""
    a = np.full((height, width, 3), 128, np.uint8)
    a[: height // 4, : width // 4] = (255, 0, 0)
    a[-height // 4 :, -width // 4 :] = (0, 0, 255)
    return a


def heic(rgb: np.ndarray, *, orientation: int | None = None, extra: list[np.ndarray] | None = None) -> bytes:
    """Encode with pillow-heif. ``orientation`` goes into EXIF, which pillow-heif also writes as
    the container's rotation (irot/imir): the pixels given are the stored ones."""
    kw: dict[str, object] = {"quality": 90}
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        kw["exif"] = exif.tobytes()
    f = pillow_heif.from_pillow(Image.fromarray(rgb))
    for more in extra or []:
        f.add_from_pillow(Image.fromarray(more))
    buf = io.BytesIO()
    f.save(buf, **kw)
    return buf.getvalue()


def near(bgr: np.ndarray, colour_bgr: tuple[int, int, int], tol: int = 12) -> bool:
    return bool(np.abs(bgr.astype(int) - colour_bgr).max() <= tol)


def reason(data: bytes, **kw: object) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode(data, **kw)  # type: ignore[arg-type]
    return info.value


def test_plain_heic_decodes_with_its_size_and_colours() -> None:
    data = heic(drawing(96, 64))
    assert sniff_format(data) == "heic"
    h = read_header(data)
    assert (h.format, h.width, h.height, h.frames, h.orientation) == ("heic", 96, 64, 1, 1)
    d = decode(data)
    assert (d.format, d.width, d.height, d.frames, d.scale) == ("heic", 96, 64, 1, 1.0)
    assert d.bgr.shape == (64, 96, 3) and d.bgr.dtype == np.uint8 and d.bgr.flags.c_contiguous
    assert near(d.bgr[4, 4], (0, 0, 255)) and near(d.bgr[-4, -4], (255, 0, 0)) and near(d.bgr[32, 48], (128, 128, 128))
    assert d.notes == ()


def test_odd_size_is_cropped_back_by_the_container() -> None:
    """HEVC codes whole blocks; libheif crops them back (clap): the size is the picture's."""
    d = decode(heic(drawing(101, 61)))
    assert (d.width, d.height) == (101, 61) and d.bgr.shape == (61, 101, 3)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_orientation_is_applied_once(orientation: int) -> None:
    """Stored pixels turned the other way + the orientation = the upright drawing, as for JPEG."""
    upright = drawing(96, 64)
    stored = {3: np.rot90(upright, 2), 6: np.rot90(upright, 1), 8: np.rot90(upright, -1)}[orientation]
    data = heic(np.ascontiguousarray(stored), orientation=orientation)
    h = read_header(data)
    assert h.orientation == orientation
    assert (h.width, h.height) == (stored.shape[1], stored.shape[0]) and h.upright_size == (96, 64)
    d = decode(data)
    assert (d.width, d.height, d.orientation) == (96, 64, orientation)
    assert near(d.bgr[4, 4], (0, 0, 255)) and near(d.bgr[-4, -4], (255, 0, 0)), "not upright (or rotated twice)"


def test_ten_bit_heic_is_reduced_to_eight_bit_with_rounding() -> None:
    ramp = np.zeros((48, 64, 3), np.uint16)
    ramp[:, :32] = 65535  # white left half, black right half, a mid-grey row band
    ramp[20:28] = 32768
    buf = io.BytesIO()
    pillow_heif.from_bytes("RGB;16", (64, 48), ramp.tobytes()).save(buf, quality=-1)
    data = buf.getvalue()
    d = decode(data)
    assert "10-bit reduced to 8-bit" in d.notes
    assert d.bgr.dtype == np.uint8 and d.bgr.shape == (48, 64, 3)
    assert near(d.bgr[5, 5], (255, 255, 255), 3) and near(d.bgr[5, -5], (0, 0, 0), 3)
    assert near(d.bgr[24, 5], (128, 128, 128), 4)


def test_several_images_analyse_the_primary_and_count_them() -> None:
    red, green, blue = (np.full((40, 56, 3), c, np.uint8) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255)))
    data = heic(red, extra=[green, blue])
    assert read_header(data).frames == 3
    d = decode(data)
    assert d.frames == 3 and "first frame of 3" in d.notes
    assert near(d.bgr[20, 28], (0, 0, 255)), "the first (primary) image must be analysed"


def _patch_ispe(data: bytes, width: int, height: int) -> bytes:
    out = bytearray(data)
    at = out.find(b"ispe")
    assert at > 0
    out[at + 8 : at + 16] = struct.pack(">II", width, height)
    return bytes(out)


def test_bomb_sized_header_is_refused_before_libheif_decodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 64x64 picture whose header declares 50000x50000: too_large, and libheif never decodes."""
    bomb = _patch_ispe(heic(drawing(64, 64)), 50000, 50000)
    assert heif.declared_size(bomb) == (50000, 50000)

    def never(data: bytes) -> np.ndarray:
        raise AssertionError("decoded a bomb")

    monkeypatch.setattr(heif, "decode", never)
    err = reason(bomb)
    assert err.reason == "too_large" and "50000x50000" in err.message and "max_pixels=100000000" in err.message


def test_real_image_over_a_lowered_limit_is_too_large() -> None:
    data = heic(drawing(256, 192))
    assert decode(data, max_pixels=256 * 192).width == 256
    err = reason(data, max_pixels=256 * 192 - 1)
    assert err.reason == "too_large" and "256x192" in err.message


def test_truncated_heic_has_a_clear_reason() -> None:
    data = heic(drawing())
    for cut in (len(data) - 1, len(data) // 2, 40, 12):
        err = reason(data[:cut])
        assert err.reason == "truncated", (cut, err)
        assert "HEIC data must be complete" in err.message and "cut short" in err.message


def test_truncated_heic_with_an_open_ended_mdat_is_truncated() -> None:
    """``mdat`` of size 0 runs to the end of the file: libheif finds the items' data missing."""
    data = bytearray(heic(drawing()))
    at = data.find(b"mdat") - 4
    data[at : at + 4] = bytes(4)
    assert decode(bytes(data)).width == 96  # whole: still fine
    err = reason(bytes(data[: at + 20]))
    assert err.reason == "truncated", err


def test_damaged_boxes_are_corrupt_and_impostors_are_not_images(tmp_path: Path) -> None:
    data = bytearray(heic(drawing()))
    at = data.find(b"meta")
    data[at : at + 4] = b"\x00\x01\x02\x03"
    assert reason(bytes(data)).reason == "corrupt"
    fake = tmp_path / "holiday.heic"
    fake.write_text("this is not a photo\n")
    err = reason(reading.read_file(fake).data)
    assert err.reason == "not_an_image" and "text starting 'this is not a photo" in err.message
    empty = tmp_path / "empty.heic"
    empty.write_bytes(b"")
    assert reason(reading.read_file(empty).data).reason == "empty"


def test_a_sequence_track_without_a_still_image_is_unsupported() -> None:
    def box(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", 8 + len(payload)) + kind + payload

    data = box(b"ftyp", b"msf1\x00\x00\x00\x00msf1hevc") + box(b"moov", box(b"mvhd", bytes(100))) + box(b"mdat", bytes(64))
    assert sniff_format(data) == "heic"
    err = reason(data)
    assert err.reason == "unsupported_format" and "no still image" in err.message


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow cannot read or write AVIF")
def test_avif_decodes_upright_through_pillow() -> None:
    upright = drawing(96, 64)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(buf, "AVIF", quality=90, exif=exif.tobytes())
    data = buf.getvalue()
    d = decode(data)
    assert (d.format, d.width, d.height, d.orientation) == ("avif", 96, 64, 6)
    assert near(d.bgr[4, 4], (0, 0, 255)) and near(d.bgr[-4, -4], (255, 0, 0))
    assert reason(data[: len(data) // 2]).reason == "truncated"
    assert reason(_patch_ispe(data, 40000, 40000)).reason == "too_large"


# ---------------------------------------------------------------------------------- end to end


def test_scan_records_faces_in_heic_photos(tmp_path: Path, dev_data: Path, models_ready: None) -> None:
    face = np.asarray(Image.open(dev_data / "lfw" / "images" / "Abdullah_0001.jpg").convert("RGB"))
    evidence = tmp_path / "evidence"
    evidence.mkdir()
    (evidence / "IMG_0001.HEIC").write_bytes(heic(face))
    # stored turned left, tagged 6: only found if the orientation is applied
    (evidence / "IMG_0002.HEIC").write_bytes(heic(np.ascontiguousarray(np.rot90(face, 1)), orientation=6))
    (evidence / "IMG_0003.HEIC").write_bytes(heic(face, extra=[np.zeros_like(face)]))
    (evidence / "notes.heic").write_text("not a photo")
    db = tmp_path / "r.db"
    res = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "scan", str(evidence), "--db", f"sqlite:///{db}", "--no-progress", "--workers", "1"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    with sqlite3.connect(db) as c:
        files = {os.path.basename(p): (s, r) for p, s, r in c.execute("select path, state, reason from files")}
        got = c.execute(
            """select f.path, i.format, i.orientation, i.frames, count(fa.id), min(fa.gender)
               from files f join images i on i.id = f.image_id join analyses a on a.image_id = i.id
               left join faces fa on fa.analysis_id = a.id where f.state = 'done' group by f.path"""
        ).fetchall()
    assert files["notes.heic"] == ("failed", "not_an_image")
    found = {os.path.basename(p): rest for p, *rest in got}
    assert found == {
        "IMG_0001.HEIC": ["heic", 1, 1, 1, "male"],
        "IMG_0002.HEIC": ["heic", 6, 1, 1, "male"],
        "IMG_0003.HEIC": ["heic", 1, 2, 1, "male"],
    }
