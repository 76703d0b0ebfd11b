"""Capture metadata (EXIF): read from JPEG, PNG and HEIC files the tests write with Pillow and
pillow-heif, malformed values left out with a note, stored per image (schema version 8) on SQLite
and PostgreSQL, and the ``images`` filters ``--taken-from/--taken-to/--device/--has-gps`` after
a real scan."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin
from sqlalchemy import select

from daemon.pipeline import exif, images
from daemon.pipeline.analyze import ImageResult
from daemon.queries import filters as flt
from daemon.store import capture as cap
from daemon.store.engine import open_store_engine
from daemon.store.writer import FileStat, Store

FG = [sys.executable, "-m", "daemon.cli"]


def _r(x: float) -> TiffImagePlugin.IFDRational:
    f = Fraction(x).limit_denominator(10_000)
    return TiffImagePlugin.IFDRational(f.numerator, f.denominator)


def make_exif(*, taken: str | None = "2024:05:01 14:03:07", offset: str | None = "+02:00", make: object = "Apple",
              model: object = "iPhone 13", gps: tuple | None = ((48, 51, 29.6), "N", (2, 17, 40.2), "E", 35.5),
              **extra: object) -> Image.Exif:  # fmt: skip
    """An EXIF block as a phone writes it; ``extra`` sets raw tags of IFD0 (by number)."""
    e = Image.Exif()
    for tag, value in ((0x010F, make), (0x0110, model), (0x0131, "17.4.1")):
        if value is not None:
            e[tag] = value
    sub = e.get_ifd(exif.EXIF_IFD)
    if taken is not None:
        sub[exif.DATETIME_ORIGINAL] = taken
    if offset is not None:
        sub[exif.OFFSET_ORIGINAL] = offset
    sub[exif.TAGS_EXIF["lens"]] = "iPhone 13 back camera 5.1mm f/1.6"
    if gps is not None:
        lat, lat_ref, lon, lon_ref, alt = gps
        g = e.get_ifd(exif.GPS_IFD)
        g[exif.GPS_LAT_REF], g[exif.GPS_LAT] = lat_ref, tuple(_r(v) for v in lat)
        g[exif.GPS_LON_REF], g[exif.GPS_LON] = lon_ref, tuple(_r(v) for v in lon)
        g[exif.GPS_ALT_REF], g[exif.GPS_ALT] = b"\x00", _r(alt)
    for tag, value in extra.items():
        e[int(tag.lstrip("t"), 16)] = value
    return e


def jpeg_with(e: Image.Exif, size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 90, 60)).save(buf, "JPEG", exif=e.tobytes())
    return buf.getvalue()


def roundtrip(e: Image.Exif) -> tuple[exif.Capture | None, list[str]]:
    """What the product reads from a JPEG carrying ``e``."""
    notes: list[str] = []
    with Image.open(io.BytesIO(jpeg_with(e))) as im:
        return exif.capture(im.getexif(), notes), notes


# -- reading -------------------------------------------------------------------------------------


def test_a_phone_photo_gives_time_device_and_position() -> None:
    c, notes = roundtrip(make_exif())
    assert notes == []
    assert c == exif.Capture(taken_at="2024-05-01T14:03:07", taken_offset="+02:00", make="Apple", model="iPhone 13",
                             software="17.4.1", lens="iPhone 13 back camera 5.1mm f/1.6", serial=None,
                             gps_lat=pytest.approx(48.858222, abs=1e-6), gps_lon=pytest.approx(2.294500, abs=1e-6),
                             gps_alt=35.5)  # fmt: skip


def test_south_and_west_are_negative_and_half_a_position_is_none() -> None:
    c, _ = roundtrip(make_exif(gps=((33, 52, 4.0), "S", (151, 12, 36.0), "W", 10.0)))
    assert c is not None and c.gps_lat < 0 and c.gps_lon < 0
    e = make_exif(gps=None)
    e.get_ifd(exif.GPS_IFD)[exif.GPS_LAT] = (_r(10), _r(0), _r(0))  # a latitude without longitude
    c, _ = roundtrip(e)
    assert c is not None and (c.gps_lat, c.gps_lon, c.gps_alt) == (None, None, None)


@pytest.mark.parametrize(("kw", "note", "field"), [
    ({"taken": "yesterday"}, "EXIF DateTimeOriginal ignored: expected 'YYYY:MM:DD HH:MM:SS'", "taken_at"),
    ({"taken": "2024:13:45 25:61:00"}, "EXIF DateTimeOriginal ignored: not a valid date", "taken_at"),
    ({"offset": "+99:00"}, "EXIF OffsetTimeOriginal ignored", "taken_offset"),
    ({"gps": ((91, 0, 0), "N", (2, 0, 0), "E", 1.0)}, "EXIF GPSLatitude ignored: 91.000000 is off the globe", "gps_lat"),
    ({"gps": ((10, 0, 0), "N", (200, 0, 0), "E", 1.0)}, "EXIF GPSLongitude ignored: 200.000000 is off the globe", "gps_lon"),
    ({"gps": ((10, 75, 0), "N", (2, 0, 0), "E", 1.0)}, "is off the globe", "gps_lat"),
    ({"gps": ((10, 0, 0), "N", (2, 0, 0), "E", 1e7)}, "EXIF GPSAltitude ignored", "gps_alt"),
])  # fmt: skip
def test_malformed_values_are_left_out_with_a_note(kw: dict, note: str, field: str) -> None:
    c, notes = roundtrip(make_exif(**kw))
    assert c is not None and getattr(c, field) is None
    assert any(note in n for n in notes), notes
    assert c.model == "iPhone 13"  # the rest of the block is kept


def test_wrong_types_huge_text_and_zero_dates() -> None:
    e = make_exif(taken="0000:00:00 00:00:00", model="X" * 5000)  # the camera's "unknown" date, an endless model name
    c, notes = roundtrip(e)
    assert c is not None and c.taken_at is None and c.model == "X" * exif.MAX_TEXT
    assert not any("DateTimeOriginal" in n for n in notes)  # all zeros means unknown, not malformed
    # types a writer may store where Pillow cannot coerce them when writing: read as they come
    e = make_exif(make=12345)
    e.get_ifd(exif.GPS_IFD)[exif.GPS_LAT] = "north-ish"  # text where rationals belong
    e.get_ifd(exif.GPS_IFD)[exif.GPS_ALT] = (1, 2, 3)
    notes = []
    c = exif.capture(e, notes)
    assert c is not None and (c.make, c.gps_lat, c.gps_lon, c.gps_alt) == (None, None, None, None)
    assert c.model == "iPhone 13"
    assert any("EXIF make ignored: expected text, got int" in n for n in notes)
    assert any("GPSLatitude ignored" in n for n in notes)


def test_no_exif_no_capture_and_datetime_is_the_fallback() -> None:
    assert exif.capture(None, []) is None
    assert exif.capture(Image.Exif(), []) is None
    c, _ = roundtrip(make_exif(taken=None, offset=None, gps=None, t0132="2019:01:02 03:04:05"))
    assert c is not None and (c.taken_at, c.taken_offset) == ("2019-01-02T03:04:05", None)


def test_decode_carries_the_capture_of_jpeg_png_and_heic() -> None:
    pillow_heif = pytest.importorskip("pillow_heif")
    e = make_exif()
    jpeg = images.decode(jpeg_with(e))
    assert jpeg.capture is not None and jpeg.capture.model == "iPhone 13" and jpeg.capture.taken_at == "2024-05-01T14:03:07"
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, "PNG", exif=e.tobytes())
    png = images.decode(buf.getvalue())
    assert png.capture == jpeg.capture
    heif = pillow_heif.from_bytes(mode="RGB", size=(64, 48), data=bytes(np.full((48, 64, 3), 128, np.uint8)))
    buf = io.BytesIO()
    heif.save(buf, quality=90, exif=e.tobytes())
    heic = images.decode(buf.getvalue())
    assert heic.format == "heic" and heic.capture == jpeg.capture


def test_a_broken_exif_block_costs_nothing_else() -> None:
    data = bytearray(jpeg_with(make_exif()))
    at = data.find(b"Exif\x00\x00") + 6
    data[at + 8 : at + 40] = b"\xff" * 32  # entries of IFD0 overwritten: counts and offsets far out of the file
    dec = images.decode(bytes(data))
    assert dec.bgr.shape == (48, 64, 3)  # the image still decodes; what could not be read is noted or absent


def test_warnings_become_notes_and_leave_the_process_state_alone() -> None:
    """Pillow's warnings are caught per image (catch_warnings swaps process-wide state, so the
    service and the review page, which decode on several threads, must take turns)."""
    import threading
    import warnings

    data = bytearray(jpeg_with(make_exif()))
    at = data.find(b"Exif\x00\x00") + 6
    data[at + 8 : at + 40] = b"\xff" * 32
    filters, show = list(warnings.filters), warnings.showwarning
    notes: list[tuple[str, ...]] = []

    def work() -> None:
        for _ in range(10):
            notes.append(images.decode(bytes(data)).notes)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(notes) == 40 and all(any(n.startswith("EXIF: ") for n in ns) for ns in notes)
    assert warnings.filters == filters and warnings.showwarning is show


# -- filters -------------------------------------------------------------------------------------


def test_filters_parse_and_echo_capture_options() -> None:
    f = flt.parse({"taken-from": "2024-05-01", "taken-to": "2024-05-02T13:30", "device": ["iphone", "Canon"], "has-gps": "1"})
    assert (f.taken_from, f.taken_to, f.device, f.has_gps) == ("2024-05-01T00:00:00", "2024-05-02T13:30:00", ("iphone", "Canon"), True)
    assert f.capture_level and not f.face_level and not f.file_level
    assert flt.parse(f.to_params()) == f
    with pytest.raises(flt.FilterError) as info:
        flt.parse({"taken-from": "2024-02-30", "taken_to": "yesterday"})
    assert len(info.value.problems) == 2 and all("camera-local date" in p for p in info.value.problems)
    with pytest.raises(flt.FilterError, match="range is empty"):
        flt.parse({"taken-from": "2024-05-02", "taken-to": "2024-05-01"})


# -- the store and the queries -------------------------------------------------------------------


def test_writer_stores_the_first_capture(db_url: str) -> None:
    eng = open_store_engine(db_url)
    try:
        st = Store(eng, "host-a")
        first = exif.Capture(taken_at="2024-05-01T14:03:07", model="iPhone 13", gps_lat=1.5, gps_lon=-2.5)
        for bundle, c in (("b1", first), ("b2", exif.Capture(model="other"))):
            st.ensure_bundle(bundle, {"models": {}})
            st.upsert_files([FileStat(f"/ev/{bundle}.jpg", "/ev", 100, 1, 7)])
            (claim,) = st.claim(1, 60)
            res = ImageResult(path="", size=100, sha256="c" * 64, md5="m" * 32, mtime_ns=1, format="jpeg", width=64, height=48,
                              orientation=1, frames=1, notes=(), faces=(), capture=c)  # fmt: skip
            assert st.record_analysis(claim.id, res, bundle)
        with eng.connect() as conn:
            row = conn.execute(select(cap.image_capture)).mappings().one()
            assert (row["taken_at"], row["model"], row["gps_lat"], row["gps_lon"]) == ("2024-05-01T14:03:07", "iPhone 13", 1.5, -2.5)
    finally:
        eng.dispose()


def page_shows_capture(url: str, sha256: str) -> None:
    """The review page's image page lists the capture metadata (when the web extra is installed)."""
    pytest.importorskip("starlette", reason="the web extra is not installed: pip install -e '.[web]'")
    pytest.importorskip("httpx", reason="the test client needs httpx: pip install -e '.[web]'")
    from starlette.testclient import TestClient

    from daemon import config
    from daemon.web import create_app

    app = create_app(config.parse({"database": url}, check_paths=False), port=8765)
    try:
        page = TestClient(app, base_url="http://127.0.0.1:8765").get(f"/images/{sha256}")
        assert page.status_code == 200
        text = " ".join(page.text.split())
        assert "2024-05-01T14:03:07+02:00, Apple iPhone 13 (iPhone 13 back camera 5.1mm f/1.6), GPS 48.858222, 2.294500" in text
    finally:
        app.close()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*FG, *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_images_filter_by_capture_after_a_scan(tmp_path: Path, models_ready: None, backend: str, request: pytest.FixtureRequest) -> None:
    ev = tmp_path / "evidence"
    ev.mkdir()
    (ev / "paris.jpg").write_bytes(jpeg_with(make_exif()))
    (ev / "canon.jpg").write_bytes(jpeg_with(make_exif(make="Canon", model="Canon EOS 80D", taken="2023:12:24 19:00:00", offset=None, gps=None)))
    (ev / "bare.jpg").write_bytes(jpeg_with(Image.Exif(), size=(50, 40)))
    (ev / "odd.jpg").write_bytes(jpeg_with(make_exif(taken="soon", gps=((95, 0, 0), "N", (2, 0, 0), "E", 1.0)), size=(40, 30)))
    url = request.getfixturevalue("pg_url") if backend == "postgresql" else f"sqlite:///{tmp_path / 'r.db'}"
    res = run_cli("scan", str(ev), "--db", url, "--no-progress", "--workers", "1")
    assert res.returncode == 0, res.stderr

    def names(*opts: str) -> set[str]:
        out = run_cli("images", "--db", url, "--format", "json", "--limit", "0", *opts)
        assert out.returncode == 0, out.stderr
        return {Path(r["path"]).name for r in json.loads(out.stdout)["images"]}

    assert names() == {"paris.jpg", "canon.jpg", "bare.jpg", "odd.jpg"}
    assert names("--has-gps") == {"paris.jpg"}
    assert names("--device", "EOS") == {"canon.jpg"}
    assert names("--device", "iphone") == {"paris.jpg", "odd.jpg"}
    assert names("--taken-from", "2024-01-01") == {"paris.jpg"}
    assert names("--taken-to", "2024-01-01") == {"canon.jpg"}
    assert names("--taken-from", "2023-12-24T19:00", "--taken-to", "2023-12-24T19:00:01") == {"canon.jpg"}

    out = run_cli("images", "--db", url, "--format", "csv", "--limit", "0", "--sort", "path")
    assert out.returncode == 0, out.stderr
    rows = {Path(r["path"]).name: r for r in csv.DictReader(io.StringIO(out.stdout))}
    paris = rows["paris.jpg"]
    assert (paris["taken_at"], paris["taken_offset"], paris["camera_make"], paris["camera_model"]) == (
        "2024-05-01T14:03:07",
        "'+02:00",
        "Apple",
        "iPhone 13",
    )  # ' : a cell starting with + is never a formula
    assert abs(float(paris["gps_lat"]) - 48.858222) < 1e-5 and float(paris["gps_alt"]) == 35.5
    assert rows["bare.jpg"]["taken_at"] == "" and rows["bare.jpg"]["camera_model"] == ""
    odd = rows["odd.jpg"]  # malformed values left out, the rest kept, the reason in the notes
    assert (odd["taken_at"], odd["gps_lat"], odd["camera_model"]) == ("", "", "iPhone 13")

    shown = run_cli("show", str(ev / "paris.jpg"), "--db", url)
    assert shown.returncode == 0, shown.stderr
    assert (
        "taken 2024-05-01T14:03:07+02:00 by Apple iPhone 13 (lens iPhone 13 back camera 5.1mm f/1.6; software 17.4.1), GPS 48.858222, 2.294500, 35.5 m"
        in shown.stdout
    )
    if backend == "sqlite":
        page_shows_capture(url, json.loads(run_cli("show", str(ev / "paris.jpg"), "--db", url, "--format", "json").stdout)["sha256"])
    doc = json.loads(run_cli("show", str(ev / "odd.jpg"), "--db", url, "--format", "json").stdout)
    assert doc["capture"]["camera_model"] == "iPhone 13" and doc["capture"]["taken_at"] is None
    assert "EXIF DateTimeOriginal ignored" in doc["notes"] and "GPSLatitude ignored" in doc["notes"]

    out = run_cli("export", "--db", url, "--format", "csv", "--csv-raw")  # faces carry their image's capture
    assert out.returncode == 0, out.stderr
    for r in csv.DictReader(io.StringIO(out.stdout)):  # the pictures hold no face; the columns are there
        raise AssertionError(f"no face expected, got {r}")
    assert out.stdout.splitlines()[0].endswith("person_name,taken_at,taken_offset,camera_make,camera_model,gps_lat,gps_lon,frame,frame_time")


def test_face_exports_carry_the_capture(tmp_path: Path, models_ready: None, dev_data: Path) -> None:
    src = sorted((dev_data / "lfw" / "images").iterdir())[0]
    ev = tmp_path / "evidence"
    ev.mkdir()
    buf = io.BytesIO()
    with Image.open(src) as im:
        im.convert("RGB").save(buf, "JPEG", quality=95, exif=make_exif().tobytes())
    (ev / "face.jpg").write_bytes(buf.getvalue())
    url = f"sqlite:///{tmp_path / 'r.db'}"
    res = run_cli("scan", str(ev), "--db", url, "--no-progress", "--workers", "1")
    assert res.returncode == 0, res.stderr
    out = run_cli("export", "--db", url, "--format", "json")
    assert out.returncode == 0, out.stderr
    faces = json.loads(out.stdout)["faces"]
    assert faces and all((f["camera_model"], f["taken_at"], f["taken_offset"]) == ("iPhone 13", "2024-05-01T14:03:07", "+02:00") for f in faces)
    assert all(abs(f["gps_lat"] - 48.858222) < 1e-5 for f in faces)
    out = run_cli("faces", "--db", url, "--device", "iphone", "--taken-from", "2024-05-01", "--format", "json")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["faces"]) == len(faces)
    out = run_cli("faces", "--db", url, "--device", "canon", "--format", "json")
    assert json.loads(out.stdout)["faces"] == []
