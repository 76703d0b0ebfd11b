"""Near-copies: the perceptual hash on synthetic pictures, its column (schema version 7) on
SQLite and PostgreSQL, and ``forensic-gender near`` end to end after a real scan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from sqlalchemy import select, text

from daemon.pipeline import phash
from daemon.pipeline.analyze import ImageResult
from daemon.store import nearcopies as nc
from daemon.store.engine import open_engine, open_store_engine
from daemon.store.writer import FileStat, Store

FG = [sys.executable, "-m", "daemon.cli"]


def picture(seed: int, h: int = 480, w: int = 640) -> np.ndarray:
    """A photo-like BGR picture of its own: a smooth random field with a few shapes."""
    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(6):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        if rng.random() < 0.5:
            cv2.circle(img, (x, y), int(rng.integers(20, 120)), colour, -1)
        else:
            cv2.rectangle(img, (x, y), (x + int(rng.integers(30, 200)), y + int(rng.integers(30, 200))), colour, -1)
    return img


def jpeg(img: np.ndarray, quality: int = 92) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def copies(img: np.ndarray) -> dict[str, bytes]:
    """The benchmark's three kinds of copy: half size, JPEG quality 70, 5 % cut off each dimension."""
    h, w = img.shape[:2]
    small = cv2.resize(img, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    cy, cx = round(h * 0.03), round(w * 0.02)
    return {"resized": jpeg(small), "jpeg70": jpeg(img, 70), "cropped": jpeg(img[cy : cy + round(h * 0.95), cx : cx + round(w * 0.95)])}


def decoded_hash(data: bytes) -> np.ndarray:
    from daemon.pipeline import images

    return phash.parse(phash.near_hash(images.decode(data, min_side_hint=1280).bgr))


# -- the hash ------------------------------------------------------------------------------------


def test_hash_is_deterministic_hex_and_gray_equals_bgr() -> None:
    img = picture(1)
    h = phash.near_hash(img)
    assert len(h) == 48 and int(h, 16) >= 0 and h == phash.near_hash(img.copy())
    gray = np.repeat(img[..., 1:2], 3, axis=2)  # a gray picture: BGR with equal channels and its one channel agree
    assert phash.near_hash(gray) == phash.near_hash(np.ascontiguousarray(gray[..., 0]))
    assert phash.parse(h).dtype == np.uint64 and phash.parse(h).shape == (3,)


def test_copies_are_near_and_other_pictures_far() -> None:
    base = decoded_hash(jpeg(picture(7)))
    for kind, data in copies(picture(7)).items():
        d = int(phash.distances(decoded_hash(data)[None, :], base)[0])
        assert d <= nc.DEFAULT_DISTANCE, (kind, d)
    others = np.stack([decoded_hash(jpeg(picture(s))) for s in range(20, 40)])
    far = phash.distances(others, base)
    assert far.min() > nc.DEFAULT_DISTANCE, far


@pytest.mark.parametrize("shape", [(1, 1, 3), (3, 500, 3), (700, 2, 3), (31, 33), (2000, 1500, 3)])
def test_any_size_hashes(shape: tuple[int, ...]) -> None:
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    assert len(phash.near_hash(img)) == 48


@pytest.mark.parametrize("shape", [(0, 5, 3), (5, 5, 4), (5,)])
def test_bad_shapes_are_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="must be"):
        phash.near_hash(np.zeros(shape, np.uint8))


def test_parse_and_distances() -> None:
    a, b = "0" * 48, "f" * 16 + "0" * 31 + "1"
    m = phash.parse_many([a, b, b.upper()])
    assert m.shape == (3, 3)
    assert phash.distances(m, phash.parse(a)).tolist() == [0, 65, 65]
    for bad in ("0" * 47, "g" * 48, "0" * 49):
        with pytest.raises(ValueError, match="48"):
            phash.parse(bad)
        with pytest.raises(ValueError, match="48"):
            phash.parse_many([a, bad])
    assert phash.parse_many([]).shape == (0, 3)


def test_search_orders_nearest_first_and_excludes() -> None:
    q = phash.parse("0" * 48)
    hashes = phash.parse_many(["0" * 47 + "3", "0" * 48, "f" * 48, "0" * 47 + "1"])
    index = nc.NearIndex(np.array([10, 11, 12, 13]), hashes, 0)
    assert index.search(q, 2) == [(11, 0, None), (13, 1, None), (10, 2, None)]
    assert index.search(q, 1, exclude=11) == [(13, 1, None)]


def test_a_video_is_found_once_at_its_nearest_frame() -> None:
    q = phash.parse("0" * 48)
    hashes = phash.parse_many(["0" * 47 + "7", "0" * 47 + "1", "0" * 47 + "3", "f" * 48])
    index = nc.NearIndex(np.array([10, 20, 20, 20]), hashes, 0, np.array([-1, 0, 40, 80]))
    assert index.search(q, 3) == [(20, 1, 0), (10, 3, None)]  # frame 40 (2 bits) is farther than frame 0
    assert index.images == 2


@pytest.mark.parametrize("value", ["-1", "97", "x", "1.5", ""])
def test_distance_out_of_range_is_refused(value: str) -> None:
    with pytest.raises(nc.NearError, match="--distance"):
        nc.check_distance(value)


# -- the store -----------------------------------------------------------------------------------


def test_writer_stores_the_first_hash(db_url: str) -> None:
    eng = open_store_engine(db_url)
    try:
        st = Store(eng, "host-a")
        st.ensure_bundle("b1", {"models": {}})
        st.ensure_bundle("b2", {"models": {}})
        first, second = "0123456789abcdef" * 3, "f" * 48
        for bundle, h in (("b1", first), ("b2", second)):
            st.upsert_files([FileStat(f"/ev/{bundle}.jpg", "/ev", 100, 1, 7)])
            (claim,) = st.claim(1, 60)
            res = ImageResult(path="", size=100, sha256="c" * 64, md5="m" * 32, mtime_ns=1, format="jpeg", width=64, height=48,
                              orientation=1, frames=1, notes=(), faces=(), near_hash=h)  # fmt: skip
            assert st.record_analysis(claim.id, res, bundle)
        with eng.connect() as c:
            assert c.execute(select(nc.images_v7.c.near_hash)).scalar_one() == first
            assert nc.image_by_sha(c, "CCCCCC")[2] == first
            with pytest.raises(nc.NearError, match="no image"):
                nc.image_by_sha(c, "dddddd")
    finally:
        eng.dispose()


# -- the command, after a real scan ----------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*FG, *args], capture_output=True, text=True, timeout=600)


@pytest.fixture
def evidence(tmp_path: Path) -> dict[str, Path]:
    """Two pictures with their three copies each, and four unrelated pictures."""
    ev = tmp_path / "evidence"
    ev.mkdir()
    made = {}
    for seed in (101, 102):
        img = picture(seed)
        made[f"p{seed}"] = ev / f"p{seed}.jpg"
        made[f"p{seed}"].write_bytes(jpeg(img))
        for kind, data in copies(img).items():
            made[f"p{seed}.{kind}"] = ev / "copies" / f"p{seed}.{kind}.jpg"
            made[f"p{seed}.{kind}"].parent.mkdir(exist_ok=True)
            made[f"p{seed}.{kind}"].write_bytes(data)
    for seed in (201, 202, 203, 204):
        made[f"o{seed}"] = ev / "other" / f"o{seed}.jpg"
        made[f"o{seed}"].parent.mkdir(exist_ok=True)
        made[f"o{seed}"].write_bytes(jpeg(picture(seed)))
    return made


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_near_finds_the_copies_after_a_scan(tmp_path: Path, evidence: dict[str, Path], models_ready: None, backend: str,
                                            request: pytest.FixtureRequest) -> None:  # fmt: skip
    url = request.getfixturevalue("pg_url") if backend == "postgresql" else f"sqlite:///{tmp_path / 'r.db'}"
    res = run_cli("scan", str(tmp_path / "evidence"), "--db", url, "--no-progress", "--workers", "1")
    assert res.returncode == 0, res.stderr
    eng = open_engine(url)
    with eng.connect() as c:
        assert c.execute(text("select count(*) from images where near_hash is not null")).scalar_one() == 12
        sha = c.execute(text("select i.sha256 from images i join files f on f.image_id = i.id where f.path like '%/p101.jpg'")).scalar_one()
    eng.dispose()

    res = run_cli("near", str(evidence["p101"]), "--db", url, "--format", "json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    found = {Path(p).name: m["distance"] for m in doc["matches"] for p in m["paths"]}
    assert set(found) == {"p101.jpg", "p101.resized.jpg", "p101.jpeg70.jpg", "p101.cropped.jpg"}, found
    assert found["p101.jpg"] == 0 and doc["matches"][0]["same_content"] is True
    assert [m["distance"] for m in doc["matches"]] == sorted(m["distance"] for m in doc["matches"])
    assert doc["images_searched"] == 12 and doc["distance"] == nc.DEFAULT_DISTANCE

    res = run_cli("near", "--image", sha[:12], "--db", url)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"3 image(s) within {nc.DEFAULT_DISTANCE} of 192 bits of image {sha[:16]}")
    names = [Path(line.split()[-1]).name for line in lines[2:]]
    assert sorted(names) == ["p101.cropped.jpg", "p101.jpeg70.jpg", "p101.resized.jpg"]
    assert not any(n.startswith(("p102", "o2")) for n in names)

    res = run_cli("near", "--image", sha, "--db", url, "--distance", "0", "--format", "json")
    assert res.returncode == 0, res.stderr
    exact = json.loads(res.stdout)["matches"]
    assert {m["distance"] for m in exact} <= {0} and all(Path(p).name.startswith("p101.") for m in exact for p in m["paths"])
    assert len(exact) < 3  # the resized and cropped copies differ in some bits


def test_near_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from daemon.cli import main

    url = f"sqlite:///{tmp_path / 'r.db'}"
    open_store_engine(url).dispose()
    photo = tmp_path / "p.jpg"
    photo.write_bytes(jpeg(picture(5)))
    cases = [
        (["near", str(tmp_path / "missing.jpg")], "missing.jpg"),
        (["near", "--image", "zz12345"], "--image must be a SHA-256"),
        (["near", "--image", "abc"], "--image must be a SHA-256"),
        (["near", "--image", "abcdef0123"], "no image with that SHA-256"),
        (["near", str(photo), "--distance", "97"], "--distance must be from 0 to 96"),
        (["near", str(photo), "--distance", "near"], "--distance must be a whole number"),
        (["near", str(photo), "--limit", "0"], "--limit must be a positive"),
        (["near"], "give a PHOTO or --image"),
        (["near", str(photo), "--image", "abcdef"], "give a PHOTO or --image"),
    ]
    for argv, expected in cases:
        code = main([*argv, "--db", url])
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
    text_file = tmp_path / "notes.jpg"
    text_file.write_text("not a picture")
    assert main(["near", str(text_file), "--db", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("forensic-gender near: ") and len(err.strip().splitlines()) == 1
    # a photo with no recorded near-copies is an answer, not an error
    assert main(["near", str(photo), "--db", url]) == 0
    assert capsys.readouterr().out.startswith(f"0 image(s) within {nc.DEFAULT_DISTANCE} of 192 bits")
