"""Videos (:mod:`daemon.pipeline.video`): container sniffing, sampling, damage, container metadata,
rotation and, with the real models, faces found in sampled frames. Every video is made here with
PyAV in ``tmp_path``; LFW faces come from the dev data (never copied into the project)."""

from __future__ import annotations

import csv
import io
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest

from daemon.config import LimitsConfig, PipelineConfig, VideoConfig
from daemon.pipeline import detect, video
from daemon.pipeline.analyze import ImageResult, Pipeline
from daemon.pipeline.exif import Capture
from daemon.pipeline.reading import ImageError
from daemon.states import Reason, VideoCut

W, H = 64, 48
BIG = 10**8


def noise_frames(n: int, w: int = W, h: int = H, seed: int = 0) -> list[np.ndarray]:
    """Frames of noise, so that every packet is big and damage lands inside frame data."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 64, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def write_video(
    path: Path,
    frames: list[np.ndarray],
    *,
    fps: int = 10,
    codec: str = "libx264",
    fmt: str | None = None,
    faststart: bool = True,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Encode BGR frames into ``path`` (its suffix names the container unless ``fmt`` does)."""
    iso = path.suffix in (".mp4", ".mov", ".3gp")
    opts = {"movflags": ("faststart+" if faststart else "") + "use_metadata_tags"} if iso else {}
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w", format=fmt, options=opts) as c:
        if metadata:
            c.metadata.update(metadata)
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for img in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@dataclass
class Sampled:
    frames: list[video.Frame]
    info: video.VideoInfo
    cut: VideoCut | None
    detail: str | None

    @property
    def at(self) -> list[tuple[int, float]]:
        return [(f.index, f.time) for f in self.frames]


def sample(
    data: bytes | Path,
    fmt: str = "mp4",
    *,
    interval: float = 2.0,
    max_frames: int = 100,
    deadline: float | None = None,
    max_pixels: int = BIG,
) -> Sampled:
    raw = data.read_bytes() if isinstance(data, Path) else data
    with video.open_clip(io.BytesIO(raw), fmt, max_pixels=max_pixels) as clip:
        dl = time.monotonic() + 20 if deadline is None else deadline
        frames = list(clip.sample(interval, max_frames=max_frames, deadline=dl))
        return Sampled(frames, clip.info, clip.cut, clip.cut_detail)


class NoFaces:
    """A detector that finds nothing: the pipeline's video path without the models."""

    def detect(self, bgr: np.ndarray) -> detect.Detections:
        return detect.Detections.empty()


def stub_pipeline(**limits: int) -> Pipeline:
    cfg = PipelineConfig(limits=LimitsConfig(**limits), video=VideoConfig(interval=2.0, max_frames=10, budget_seconds=20))
    return Pipeline(cfg, NoFaces(), None, None, {})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def clip6(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 fps, 6 s, 60 frames of noise, faststart H.264 MP4."""
    return write_video(tmp_path_factory.mktemp("v") / "six.mp4", noise_frames(60))


def patch_u32(data: bytes, box: bytes, offset: int, value: int) -> bytes:
    """Overwrite the big-endian 32-bit field ``offset`` bytes after the first ``box`` type."""
    i = data.find(box)
    assert i > 0, f"no {box!r} box"
    out = bytearray(data)
    out[i + offset : i + offset + 4] = value.to_bytes(4, "big")
    return bytes(out)


# --- 1. sniff ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def containers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small real file per container PyAV's FFmpeg can write."""
    d = tmp_path_factory.mktemp("containers")
    fr = noise_frames(4, 32, 32)
    return {
        "mp4": write_video(d / "a.mp4", fr),
        "mov": write_video(d / "a.mov", fr),
        "3gp": write_video(d / "a.3gp", [np.zeros((144, 176, 3), np.uint8)] * 2, codec="mpeg4"),
        "avi": write_video(d / "a.avi", fr, codec="mpeg4"),
        "mkv": write_video(d / "a.mkv", fr),
        "webm": write_video(d / "a.webm", fr, codec="libvpx-vp9"),
    }


@pytest.mark.parametrize("name", ["mp4", "mov", "3gp", "avi", "mkv", "webm"])
def test_sniff_names_real_containers_and_they_decode(containers: dict[str, Path], name: str) -> None:
    path = containers[name]
    assert video.sniff(path.read_bytes()[: video.SNIFF_BYTES]) == name
    got = sample(path, name, interval=0.1)
    assert got.frames[0].index == 0 and got.frames[0].time == 0.0
    assert got.cut is None


def ftyp(major: bytes, *compatible: bytes) -> bytes:
    body = b"ftyp" + major + b"\x00\x00\x02\x00" + b"".join(compatible)
    return (len(body) + 4).to_bytes(4, "big") + body + b"\x00\x00\x00\x08free"


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (ftyp(b"isom", b"isom", b"iso2", b"avc1", b"mp41"), "mp4"),
        (ftyp(b"M4V ", b"M4V ", b"mp42"), "mp4"),
        (ftyp(b"qt  ", b"qt  "), "mov"),
        (b"\x00\x00\x00\x08wide\x00\x12\x34\x56mdat" + b"\x00" * 40, "mov"),
        (b"\x00\x00\x10\x00moov\x00\x00\x00\x6cmvhd" + b"\x00" * 40, "mov"),
        (b"\x00\x00\x10\x00mdat" + b"\x00" * 40, "mov"),
        (ftyp(b"3gp4", b"isom", b"3gp4"), "3gp"),
        (ftyp(b"3g2a", b"3g2a"), "3gp"),
        (b"RIFF\x00\x10\x00\x00AVI LIST" + b"\x00" * 40, "avi"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x88matroska" + b"\x00" * 20, "mkv"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm" + b"\x00" * 20, "webm"),
        (ftyp(b"heic", b"mif1", b"heic"), None),
        (ftyp(b"mif1", b"mif1", b"heic"), None),
        (ftyp(b"avif", b"avif", b"mif1"), None),
        (ftyp(b"isom", b"isom", b"avif"), None),  # an image brand anywhere makes it an image
        (b"RIFF\x00\x10\x00\x00WAVEfmt " + b"\x00" * 40, None),
        (b"\x00\x00\x00\x04moov", None),  # an atom shorter than its own header
        (b"this is a text file, not a video at all\n" * 2, None),
        (b"", None),
    ],
)
def test_sniff_table(head: bytes, expected: str | None) -> None:
    assert video.sniff(head[: video.SNIFF_BYTES]) == expected


# --- 2. sampling ------------------------------------------------------------------------------


def test_sampling_every_interval(clip6: Path) -> None:
    got = sample(clip6, interval=2.0)
    assert got.at == [(0, 0.0), (20, 2.0), (40, 4.0)]
    assert got.cut is None and got.detail is None
    assert (got.info.container, got.info.codec, got.info.width, got.info.height) == ("mp4", "h264", W, H)
    assert (got.info.duration, got.info.fps, got.info.frames, got.info.rotation) == (6.0, 10.0, 60, 0)
    assert all(f.bgr.shape == (H, W, 3) and f.bgr.dtype == np.uint8 for f in got.frames)


def test_sampling_stops_at_max_frames(clip6: Path) -> None:
    got = sample(clip6, interval=2.0, max_frames=2)
    assert got.at == [(0, 0.0), (20, 2.0)]
    assert got.cut == VideoCut.FRAME_LIMIT
    assert got.detail is not None and "2 frames sampled" in got.detail


def test_sampling_stops_at_a_past_deadline(clip6: Path) -> None:
    got = sample(clip6, interval=2.0, deadline=time.monotonic() - 1.0)
    assert [f.index for f in got.frames] in ([], [0])
    assert got.cut == VideoCut.TIME_BUDGET
    assert got.detail is not None and "time budget" in got.detail


def test_frame_at_gives_the_sampled_pixels(clip6: Path) -> None:
    got = sample(clip6, interval=2.0)
    for f in got.frames:
        with clip6.open("rb") as fo:
            again = video.frame_at(fo, "mp4", f.index, max_pixels=BIG)
        assert (again.index, again.time) == (f.index, f.time)
        assert np.array_equal(again.bgr, f.bgr)
    with clip6.open("rb") as fo, pytest.raises(ImageError) as err:
        video.frame_at(fo, "mp4", 60, max_pixels=BIG)
    assert err.value.reason == Reason.NO_FRAMES and "expected a frame 60" in err.value.message


# --- 3. damage --------------------------------------------------------------------------------


def test_faststart_cut_in_half_keeps_frames_before_the_cut(clip6: Path) -> None:
    data = clip6.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")  # faststart: the index first
    got = sample(data[: len(data) // 2])
    assert 1 <= len(got.frames) < 3 and got.at == [(0, 0.0), (20, 2.0), (40, 4.0)][: len(got.frames)]
    assert got.cut == VideoCut.TRUNCATED
    assert got.detail is not None and "decoding stopped" in got.detail


@pytest.mark.parametrize("k", [2, 12])
def test_a_cut_keeps_every_frame_whose_packet_is_whole(clip6: Path, k: int) -> None:
    """The decoder holds frames back; at the damage they are drained, not lost (even when the
    cut comes before the decoder gave out its first frame)."""
    data = clip6.read_bytes()
    with av.open(io.BytesIO(data)) as c:
        packets = [(p.pos, p.size, p.pts) for p in c.demux(video=0) if p.size]
    assert [p[2] for p in packets] == sorted(p[2] for p in packets)  # no reordering: decode order = time order
    pos, size, _ = packets[k]
    got = sample(data[: pos + size // 2], interval=0.001)
    assert got.at == [(i, round(i / 10, 3)) for i in range(k)]
    assert got.cut == VideoCut.TRUNCATED


def test_moov_at_end_cut_in_half_is_truncated(tmp_path: Path) -> None:
    data = write_video(tmp_path / "late.mp4", noise_frames(60), faststart=False).read_bytes()
    assert data.find(b"mdat") < data.find(b"moov")
    with pytest.raises(ImageError) as err:
        sample(data[: len(data) // 2])
    assert err.value.reason == Reason.TRUNCATED
    assert "cannot be opened" in err.value.message and "the file was cut" in err.value.message


def test_garbage_in_the_middle_keeps_frames_before_it(clip6: Path, tmp_path: Path) -> None:
    data = bytearray(clip6.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4000] = np.random.default_rng(7).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    got = sample(bytes(data))
    assert 1 <= len(got.frames) < 3 and got.at == [(0, 0.0), (20, 2.0), (40, 4.0)][: len(got.frames)]
    assert got.cut in (VideoCut.TRUNCATED, VideoCut.CORRUPT)
    # the service's entry point: a result with the frames before the damage, and why it stopped
    path = tmp_path / "damaged.mp4"
    path.write_bytes(bytes(data))
    res = stub_pipeline().analyze_file(path)
    assert isinstance(res, ImageResult) and res.video is not None
    assert [(s.frame, s.time) for s in res.video.sampled] == got.at
    assert res.video.cut == got.cut
    assert any(n.startswith(f"video cut ({got.cut})") for n in res.notes)


def audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=8000)
        for k in range(4):
            af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            af.sample_rate, af.pts = 8000, k * 1024
            for p in s.encode(af):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.mark.parametrize("fmt", ["mp4", "mkv"])
def test_no_video_stream_is_no_frames(tmp_path: Path, fmt: str) -> None:
    path = audio_only(tmp_path / f"sound.{fmt}")
    assert video.sniff(path.read_bytes()[:64]) == fmt
    with pytest.raises(ImageError) as err:
        sample(path, fmt)
    assert err.value.reason == Reason.NO_FRAMES
    assert err.value.message == f"{fmt.upper()} file: expected a video stream, got none (audio or data only); nothing to analyse"
    with pytest.raises(ImageError) as err:
        stub_pipeline().analyze_file(path)
    assert err.value.reason == Reason.NO_FRAMES


def empty_video_track(path: Path) -> bytes:
    """A container with a video track and not one frame in it."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        c.start_encoding()
    return path.read_bytes()


def test_mp4_with_an_empty_video_track_is_no_frames(tmp_path: Path) -> None:
    # FFmpeg drops a track without samples, so it reads as a file without a video stream
    with pytest.raises(ImageError) as err:
        sample(empty_video_track(tmp_path / "empty.mp4"))
    assert err.value.reason == Reason.NO_FRAMES
    assert err.value.message.startswith("MP4 file: expected a video stream, got none")


def test_mkv_with_an_empty_video_track_is_refused_with_ffmpegs_reason(tmp_path: Path) -> None:
    # FFmpeg will not open a Matroska video track whose codec it never saw a frame of
    with pytest.raises(ImageError) as err:
        sample(empty_video_track(tmp_path / "empty.mkv"), "mkv")
    assert err.value.reason == Reason.CORRUPT
    assert err.value.message.startswith("MKV video: the container cannot be opened: the container is damaged;")
    assert "FFmpeg said EOFError" in err.value.message


def test_text_named_mov_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "x.mov"
    path.write_text("not a movie, just some notes\n" * 10)
    with pytest.raises(ImageError) as err:
        stub_pipeline().analyze_file(path)
    assert err.value.reason == Reason.NOT_AN_IMAGE


def test_frames_over_the_pixel_limit_are_refused_before_decoding(clip6: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*a: object, **k: object) -> None:
        raise AssertionError("a frame was decoded")

    monkeypatch.setattr(video.Clip, "_decoded", never)
    with pytest.raises(ImageError) as err:
        sample(clip6, max_pixels=W * H - 1)
    assert err.value.reason == Reason.TOO_LARGE
    assert f"got {W}x{H} = {W * H}" in err.value.message and "nothing decoded" in err.value.message
    with pytest.raises(ImageError) as err:
        stub_pipeline(max_pixels=W * H - 1).analyze_file(clip6)
    assert err.value.reason == Reason.TOO_LARGE
    monkeypatch.undo()
    assert sample(clip6, max_pixels=W * H).info.width == W  # the limit itself is allowed


def test_mp4_claiming_a_huge_duration_is_bounded(clip6: Path) -> None:
    """mvhd (and the edit list) claim ~49 days: FFmpeg takes the duration from the sample tables,
    so the claim never reaches us, and sampling ends with the frames that exist."""
    data = clip6.read_bytes()
    assert data[data.find(b"mvhd") + 4] == 0  # version 0
    assert int.from_bytes(data[data.find(b"mvhd") + 16 :][:4], "big") == 1000  # timescale
    huge = patch_u32(patch_u32(data, b"mvhd", 20, 0xFFFFFFF0), b"elst", 12, 0xFFFFFFF0)
    t0 = time.monotonic()
    got = sample(huge)
    assert time.monotonic() - t0 < 5
    assert got.at == [(0, 0.0), (20, 2.0), (40, 4.0)]
    assert got.info.duration == 6.0
    assert got.cut is None


def mkv_with_duration(path: Path, ms: float) -> bytes:
    data = bytearray(write_video(path, noise_frames(60)).read_bytes())
    i = data.find(b"\x44\x89")  # Segment Info: Duration (float, in TimecodeScale units: 1 ms)
    assert data[i + 2] == 0x88, "expected an 8-byte float Duration"
    data[i + 3 : i + 11] = struct.pack(">d", ms)
    return bytes(data)


def test_mkv_claiming_an_hour_is_recorded_and_marked_truncated(tmp_path: Path) -> None:
    t0 = time.monotonic()
    got = sample(mkv_with_duration(tmp_path / "hour.mkv", 3600e3), "mkv")
    assert time.monotonic() - t0 < 5
    assert got.info.duration == 3600.0
    assert got.at == [(0, 0.0), (20, 2.0), (40, 4.0)]
    assert got.cut == VideoCut.TRUNCATED
    assert got.detail == "the frames end at 5.9 s of the 3600.0 s the container declares"


def test_mkv_claiming_centuries_is_recorded_and_bounded(tmp_path: Path) -> None:
    t0 = time.monotonic()
    got = sample(mkv_with_duration(tmp_path / "forever.mkv", 1e13), "mkv")
    assert time.monotonic() - t0 < 5
    assert got.info.duration == 1e10
    assert got.at == [(0, 0.0), (20, 2.0), (40, 4.0)]
    assert got.cut is None  # an absurd claim is not evidence of a cut file


# --- 4. container metadata --------------------------------------------------------------------

APPLE = {
    "creation_time": "2024-05-01T10:00:00.000000Z",
    "com.apple.quicktime.make": "Apple",
    "com.apple.quicktime.model": "iPhone 15 Pro",
    "com.apple.quicktime.location.ISO6709": "+48.8584+002.2945+035.000/",
}


def test_container_metadata_round_trips_into_capture(tmp_path: Path) -> None:
    path = write_video(tmp_path / "iphone.mov", noise_frames(3), metadata=APPLE)
    info = sample(path, "mov").info
    assert info.capture == Capture(
        taken_at="2024-05-01T10:00:00", taken_offset="+00:00", make="Apple", model="iPhone 15 Pro",
        gps_lat=48.8584, gps_lon=2.2945, gps_alt=35.0,
    )  # fmt: skip
    assert info.notes == ()
    res = stub_pipeline().analyze_file(path)
    assert res.capture == info.capture


def test_malformed_container_metadata_is_left_out_with_notes(tmp_path: Path) -> None:
    meta = {"creation_time": "yesterday", "com.apple.quicktime.make": "Apple", "com.apple.quicktime.location.ISO6709": "+95.0+200.0/"}
    path = write_video(tmp_path / "odd.mp4", noise_frames(3), metadata=meta)
    info = sample(path).info
    assert info.capture == Capture(make="Apple")
    assert info.notes == (
        "video creation_time ignored: expected ISO 8601 date and time, got 'yesterday'",
        "video location ignored: 95.000000, 200.000000 is off the globe",
    )


@pytest.mark.parametrize(
    ("tags", "capture", "notes"),
    [
        ({}, None, []),
        ({"creation_time": "2024-05-01T10:00:00.000000Z"}, Capture(taken_at="2024-05-01T10:00:00", taken_offset="+00:00"), []),
        (
            {"com.apple.quicktime.creationdate": "2024-05-01T12:00:00+0200", "creation_time": "2024-05-01T10:00:00Z"},
            Capture(taken_at="2024-05-01T12:00:00", taken_offset="+02:00"),
            [],
        ),
        ({"creation_time": "2024-05-01 10:00:00"}, Capture(taken_at="2024-05-01T10:00:00"), []),
        ({"creation_time": "1904-01-01T00:00:00.000000Z"}, None, []),  # QuickTime's "never set"
        ({"creation_time": "1970-01-01T00:00:00.000000Z"}, None, []),
        ({"creation_time": "yesterday"}, None, ["video creation_time ignored: expected ISO 8601 date and time, got 'yesterday'"]),
        ({"creation_time": "2024-13-01T10:00:00Z"}, None, ["video creation_time ignored: not a valid date and time, got '2024-13-01T10:00:00Z'"]),
        ({"creation_time": "2024-05-01T10:00:00+1500"}, Capture(taken_at="2024-05-01T10:00:00"), []),  # no such zone
        (
            {"com.android.manufacturer": "Google", "com.android.model": "Pixel 8", "com.android.version": "14"},
            Capture(make="Google", model="Pixel 8", software="14"),
            [],
        ),
        ({"location": "-33.8568+151.2153/"}, Capture(gps_lat=-33.8568, gps_lon=151.2153), []),
        ({"location": "+48.8584+002.2945+999999.0/"}, Capture(gps_lat=48.8584, gps_lon=2.2945), []),  # altitude off the scale
        ({"location": "+95.0+200.0/"}, None, ["video location ignored: 95.000000, 200.000000 is off the globe"]),
        ({"location": "Paris"}, None, ["video location ignored: expected ISO 6709 (+DD.DDDD+DDD.DDDD/), got 'Paris'"]),
        ({"make": "  Canon\x00 "}, Capture(make="Canon"), []),
    ],
)
def test_container_capture_table(tags: dict[str, str], capture: Capture | None, notes: list[str]) -> None:
    got: list[str] = []
    assert video.container_capture(tags, got) == capture
    assert got == notes


# --- 5. rotation ------------------------------------------------------------------------------


def rotate_tkhd(data: bytes, a: int, b: int, c: int, d: int) -> bytes:
    """Set the (first) track header's display matrix to [a b 0; c d 0; 0 0 1] (version 0 tkhd)."""
    i = data.find(b"tkhd")
    assert data[i + 4] == 0
    m = i + 4 + 4 + 4 + 4 + 4 + 4 + 4 + 8 + 2 + 2 + 2 + 2  # after version/flags ... reserved
    out = bytearray(data)
    out[m : m + 36] = struct.pack(">9i", a, b, 0, c, d, 0, 0, 0, 0x40000000)
    return bytes(out)


@pytest.mark.parametrize(
    ("matrix", "rotation", "corner"),
    [
        # QuickTime's matrix maps (x, y) to (a x + c y, b x + d y): [0 1; -1 0] is what a phone held
        # upright writes, shown turned 90 degrees clockwise: the stored top-left goes top-right
        ((0, 0x10000, -0x10000, 0), 270, "top_right"),
        ((0, -0x10000, 0x10000, 0), 90, "bottom_left"),
        ((-0x10000, 0, 0, -0x10000), 180, "bottom_right"),
    ],
)
def test_display_matrix_rotation_makes_frames_upright(tmp_path: Path, matrix: tuple[int, int, int, int], rotation: int, corner: str) -> None:
    frames = [np.zeros((H, W, 3), np.uint8) for _ in range(3)]
    for f in frames:
        f[0:8, 0:8] = 255  # a white marker in the stored frame's top-left corner
    data = write_video(tmp_path / "turned.mp4", frames).read_bytes()
    plain = sample(data, interval=0.1)
    assert plain.info.rotation == 0 and plain.frames[0].bgr.shape == (H, W, 3)
    rotated = rotate_tkhd(data, *matrix)
    got = sample(rotated, interval=0.1)
    assert got.info.rotation == rotation
    upright = (W, H) if rotation == 180 else (H, W)
    assert (got.info.width, got.info.height) == upright
    bgr = got.frames[0].bgr
    assert bgr.shape == (upright[1], upright[0], 3)
    assert np.array_equal(bgr, np.rot90(plain.frames[0].bgr, k=rotation // 90))
    corners = {
        "top_left": bgr[:8, :8],
        "top_right": bgr[:8, -8:],
        "bottom_left": bgr[-8:, :8],
        "bottom_right": bgr[-8:, -8:],
    }
    assert {k for k, v in corners.items() if v.mean() > 200} == {corner}
    assert all(v.mean() < 30 for k, v in corners.items() if k != corner)
    with io.BytesIO(rotated) as fo:
        assert np.array_equal(video.frame_at(fo, "mp4", 0, max_pixels=BIG).bgr, bgr)


# --- 6. with the real models ------------------------------------------------------------------


def lfw_faces(dev: Path, n: int) -> Iterator[np.ndarray]:
    import cv2

    with (dev / "lfw" / "labels.csv").open() as f:
        rows = list(csv.DictReader(f))
    for row in rows[:n]:
        img = cv2.imread(str(dev / "lfw" / "images" / row["file"]))
        assert img is not None, row["file"]
        yield img[: img.shape[0] // 2 * 2, : img.shape[1] // 2 * 2]


@pytest.mark.devdata
@pytest.mark.models
def test_faces_in_a_video_carry_their_frame(dev_data: Path, pipeline: Pipeline, tmp_path: Path) -> None:
    frames = [img for img in lfw_faces(dev_data, 3) for _ in range(6)]  # 6 frames per image
    path = write_video(tmp_path / "faces.mp4", frames, fps=3)
    res = pipeline.analyze_file(path)
    assert res.format == "mp4" and res.video is not None
    assert res.video.interval == pipeline.cfg.video.interval == 2.0
    assert [(s.frame, s.time) for s in res.video.sampled] == [(0, 0.0), (6, 2.0), (12, 4.0)]
    assert res.video.cut is None
    assert [s.faces for s in res.video.sampled] == [1, 1, 1]
    assert sorted((f.frame, f.time) for f in res.faces) == [(0, 0.0), (6, 2.0), (12, 4.0)]
    assert all(f.gender in ("male", "female", "uncertain") for f in res.faces)
