"""The project's dlib converter (daemon.dlibnet): dlib's primitives decoded exactly, hostile bytes
refused with a message, and the converted face ResNet equal to dlib's own descriptors."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from daemon import dlibnet, models
from daemon.dlibnet import DlibFormatError, Reader

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "dlib_face_reference.json"


def _recipe():  # noqa: ANN202
    """benchmarks/dlib_reference.py holds the one recipe for the reference chips (and made the
    fixture with dlib in a throw-away venv); the test regenerates the same pixels from it."""
    spec = importlib.util.spec_from_file_location("dlib_reference", REPO / "benchmarks" / "dlib_reference.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def dlib_int(value: int) -> bytes:
    """dlib's integer encoding (serialize.h): control byte (bit 7 sign, low bits = size), magnitude LE."""
    mag = abs(value)
    raw = mag.to_bytes(max(1, (mag.bit_length() + 7) // 8), "little")
    return bytes([len(raw) | (0x80 if value < 0 else 0)]) + raw


@pytest.mark.parametrize("value", [0, 1, 127, 128, 255, 256, -1, -300, 2**40 + 3, -(2**62)])
def test_reader_decodes_dlib_integers(value: int) -> None:
    r = Reader(dlib_int(value) + b"tail")
    assert r.int() == value and r.pos == len(dlib_int(value))


def test_reader_decodes_floats_strings_bools_and_tensors() -> None:
    # 0.75 = 3 * 2**-2: the mantissa is written first, then the exponent
    data = dlib_int(3) + dlib_int(-2) + dlib_int(5) + b"hello" + b"1" + b"0"
    data += dlib_int(2) + b"".join(dlib_int(d) for d in (1, 2, 1, 3)) + struct.pack("<6f", *range(6))
    data += dlib_int(7) + dlib_int(32000)
    r = Reader(data)
    assert r.float() == 0.75 and r.string() == "hello" and r.bool() is True and r.bool() is False
    assert r.tensor().tolist() == [[[[0.0, 1.0, 2.0]], [[3.0, 4.0, 5.0]]]]
    assert r.float() == float("inf") and r.pos == len(data)


@pytest.mark.parametrize(("data", "method", "expected"), [
    (b"", "int", "byte 0: an integer needs 1 bytes, only 0 left (truncated file?)"),
    (b"\x00", "int", "byte 0: integer control byte must give 1..8 bytes"),
    (b"\x09" + bytes(9), "int", "must give 1..8 bytes"),
    (b"\x81\x01", "uint", "and no sign"),
    (b"x", "bool", "byte 0: a bool must be '0' or '1', got b'x'"),
    (dlib_int(3) + dlib_int(1) * 4, "tensor", "byte 0: tensor version must be 2, got 3"),
    (dlib_int(2) + dlib_int(1) * 3 + dlib_int(5) + b"\0" * 8, "tensor", "needs 20 bytes, only 8 left"),
    (dlib_int(2) + dlib_int(-1) + dlib_int(1) * 3, "tensor", "dims must be >= 0"),
])
def test_reader_refuses_malformed_bytes_with_a_position(data: bytes, method: str, expected: str) -> None:
    with pytest.raises(DlibFormatError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        getattr(Reader(data), method)()


def test_parse_refuses_bytes_that_are_not_the_face_network() -> None:
    for junk in (b"", b"\x01\x00", b"not a dlib network at all" * 10):
        with pytest.raises(DlibFormatError):
            dlibnet.parse(junk)


@pytest.fixture(scope="module")
def dat_bytes(models_ready) -> bytes:  # noqa: ANN001
    mdir = models.default_models_dir()
    spec = models.load_manifest(mdir).models["dlib-face-v1"]
    path = mdir / spec.filename
    if not path.is_file():
        pytest.skip(f"{path} absent (only the derived .onnx is needed to run); remove "
                    f"{spec.derived_filename} and run `forensic-gender models fetch` to bring both back")
    return path.read_bytes()


def test_truncated_network_is_refused_with_the_byte_it_stopped_at(dat_bytes: bytes) -> None:
    with pytest.raises(DlibFormatError, match="truncated file"):
        dlibnet.parse(dat_bytes[: len(dat_bytes) // 2])


def test_conversion_is_deterministic_and_pinned(dat_bytes: bytes) -> None:
    mdir = models.default_models_dir()
    spec = models.load_manifest(mdir).models["dlib-face-v1"]
    out = dlibnet.convert(dat_bytes, extra_outputs=tuple(o.name for o in spec.outputs[1:]))
    assert hashlib.sha256(out).hexdigest() == spec.derived_sha256
    net = dlibnet.parse(dat_bytes)
    assert net.output_shape("level1") == (256, 4, 4) and net.output_shape("pooled") == (256,)
    assert net.layers[0].means == pytest.approx((122.782, 117.001, 104.298))


def test_converted_graph_equals_dlibs_own_descriptors(models_ready) -> None:  # noqa: ANN001
    ref = json.loads(FIXTURE.read_text())
    recipe = _recipe()
    chips = recipe.reference_chips()
    assert [n for n, _ in chips] == ref["chips"]
    assert recipe.chips_sha256(chips) == ref["chips_sha256"], "the chip recipe changed: regenerate the fixture"
    mdir = models.default_models_dir()
    spec = models.load_manifest(mdir).models["dlib-face-v1"]
    assert ref["model_sha256"] == spec.sha256
    sess = ort.InferenceSession(str(models.model_file(mdir, models.load_manifest(mdir), "dlib-face-v1")),
                                providers=["CPUExecutionProvider"])
    means = np.array(spec.normalization.means, np.float32)
    x = np.stack([((c.astype(np.float32) - means) * spec.normalization.scale).transpose(2, 0, 1)
                  for _, c in chips])
    got = sess.run(["descriptor"], {"chips": x})[0]
    want = np.array(ref["descriptors"], np.float32)
    assert got.shape == want.shape == (8, 128)
    assert float(np.abs(got - want).max()) <= 1e-4
    # the reference is not trivial: the chips give clearly different descriptors
    assert float(np.linalg.norm(want[0] - want[-1])) > 0.3
